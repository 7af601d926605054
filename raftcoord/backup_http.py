"""``GET /raftcoord/v1/snapshot``: a backup file of the cluster's state, from any node (issue 10).

The answer is a backup file (:mod:`raftcoord.backup`), ``application/octet-stream``
with its length, of one revision read linearizably: a read barrier through
the log, then, under the replica's state lock, the store's frozen image
(references only, as ``GET /raftcoord/v1/digest`` reads the store off the
Raft thread; here even the encoding happens after the lock is let go, on
the worker pool). The image is encoded and checksummed on the pool and
written out in slices, so neither the Raft thread nor the event loop waits
on the size of the store.

One backup at a time per node: each holds a copy of the whole state in
memory while it is sent, so a second request meanwhile is answered 503
(``unavailable``) and a client tries another node. The route needs the
bearer token like every other but ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any, Final

from aiohttp import web

from raftcoord.backup import SNAPSHOT_PATH, capture, encode_backup_parts
from raftcoord.errors import InvalidInputError, UnavailableError

__all__ = ["SNAPSHOT_PATH", "SnapshotRoute"]

log = logging.getLogger(__name__)

#: Bytes handed to the transport at a time, so a slow reader applies back-pressure.
WRITE_SLICE: Final = 1024 * 1024


class SnapshotRoute:
    """The snapshot route of one application; ``endpoint`` is its ``_Endpoint``.

    Wired in ``make_app`` as ``app.router.add_get(SNAPSHOT_PATH, SnapshotRoute(endpoint).get)``.
    """

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self._busy = False  # event-loop state: set and cleared on the loop only

    def _cluster(self) -> str:
        config = self.endpoint.config
        if config is not None:
            return str(config.name)
        return str(getattr(self.endpoint.coord, "cluster", "") or "")

    async def get(self, request: web.Request) -> web.StreamResponse:
        """GET /raftcoord/v1/snapshot: the backup file's bytes."""
        for name in request.query:
            raise InvalidInputError(f"{name}: unknown query parameter (this route takes none)", field=name)
        if self._busy:
            raise UnavailableError("a backup is already being taken on this node; try again or ask another node")
        self._busy = True
        try:
            return await self._send(request)
        finally:
            self._busy = False

    async def _send(self, request: web.Request) -> web.StreamResponse:
        coord, cluster = self.endpoint.coord, self._cluster()

        def take() -> tuple[Any, list[bytes], float]:
            started = time.monotonic()
            created = datetime.now(timezone.utc)
            header, image = coord.read(lambda store: capture(store, cluster=cluster, created=created),
                                       consistency="linearizable")
            return header, encode_backup_parts(header, image.encode()), time.monotonic() - started

        header, parts, took = await self.endpoint.run(take)
        size = sum(map(len, parts))
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="raftcoord-{header.revision}.backup"',
            "X-Raftcoord-Revision": str(header.revision),
        })
        response.content_length = size
        await response.prepare(request)
        try:
            for part in parts:
                view = memoryview(part)
                for at in range(0, len(view), WRITE_SLICE):
                    await response.write(view[at:at + WRITE_SLICE])
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away: nothing to answer, and not a bug.
            log.info("backup at revision %d to %s not sent in full: %s", header.revision, request.remote,
                     type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        log.info("backup at revision %d sent to %s: %d bytes, taken in %.0f ms", header.revision,
                 request.remote, size, took * 1000)
        return response
