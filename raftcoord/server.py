"""The node process: a replica, its coordinator, and the HTTP client endpoint.

:func:`open_coordinator` builds the embedded coordinator of one node from a
cluster file (what a PuzzleDB node calls); :func:`run_node` runs a whole node
in the foreground (what ``raftcoord node`` calls) until SIGTERM or SIGINT.

Besides serving clients, a running node does two things on a timer:

* it announces its own node state (``up`` once the cluster has a leader,
  ``exiting`` when it stops), so ``raftcoord nodes`` shows who is there;
* while it is the leader, it proposes purges of messages older than the
  retention settings, with the cut-off inside the command (the state machine
  never reads a clock).

Nothing in that housekeeping may stop a node: a failure (a slow Raft thread,
no leader, a bug) is logged, at most one line a minute, shows on ``/health``
through the replica's status, and the next round tries again. Start-up
problems (a port in use, a host that does not resolve, a data directory that
is a file or not writable) raise one :class:`RaftcoordError` with a clear
message, which the CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from raftcoord.config import ClusterConfig, load_config
from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app, serve
from raftcoord.errors import ConfigError, RaftcoordError, UnavailableError

__all__ = ["NodeServer", "open_coordinator", "run_node"]

log = logging.getLogger(__name__)

#: How often a node checks whether to announce itself or purge messages.
HOUSEKEEPING_PERIOD = 1.0
#: How often the leader proposes a retention purge.
PURGE_PERIOD = 30.0
#: Housekeeping failures are logged at most once per this many seconds.
FAILURE_LOG_PERIOD = 60.0


def open_coordinator(path: str, *, node: str, **kwargs: Any) -> Coordinator:
    """The embedded coordinator of ``node`` as described in the cluster file ``path``.

    Starts the node's replica (Raft peer traffic on its ``raft`` address) but
    no HTTP endpoint. Close it with :meth:`Coordinator.close`.
    """
    return _open(load_config(path), node, **kwargs)


def _open(config: ClusterConfig, node: str, **kwargs: Any) -> Coordinator:
    # The coordinator layer builds its replica (and takes request_timeout,
    # max_txn_ops, max_response_bytes from the config); nothing points back here.
    return Coordinator.from_cluster_config(config, node=node, **kwargs)


class NodeServer:
    """One node: coordinator, client endpoint and housekeeping, in one event loop.

    ``coordinator`` (for tests and embedding) replaces the one :meth:`start`
    would open from the config; the server closes it when it stops.
    """

    def __init__(self, config: ClusterConfig, node: str, *, coordinator: Coordinator | None = None) -> None:
        self.config = config
        self.node = config.node(node)
        self.coordinator: Coordinator | None = None
        self._given = coordinator
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._announced = False
        self._last_purge = 0.0
        self._failing_since: float | None = None
        self._last_failure_log = -FAILURE_LOG_PERIOD
        self._failures = 0

    async def start(self) -> None:
        """Start the replica and the endpoint; returns once both listen.

        Raises :class:`ConfigError` for a data directory that cannot be used
        and :class:`UnavailableError` for an address that cannot be listened
        on, each naming the setting; whatever was started is stopped again.
        """
        loop = asyncio.get_running_loop()
        if self._given is not None:
            self.coordinator, self._given = self._given, None
        else:
            _check_data_dir(self.config, self.node.name)
            try:
                self.coordinator = await loop.run_in_executor(None, _open, self.config, self.node.name)
            except OSError as exc:
                raise UnavailableError(
                    f"node {self.node.name}: cannot start the replica on raft address {self.node.raft}: "
                    f"{_reason(exc)}",
                    field="raft",
                ) from None
        try:
            app = make_app(self.coordinator, self.config, self.node.name)
            host, port = self.node.client_address
            try:
                self._runner = await serve(
                    app,
                    host,
                    port,
                    header_timeout=self.config.client_header_timeout,
                    max_connections=self.config.max_client_connections,
                )
            except OSError as exc:
                raise UnavailableError(
                    f"node {self.node.name}: cannot serve clients on {self.node.client}: {_reason(exc)}",
                    field="client",
                ) from None
        except BaseException:
            coord, self.coordinator = self.coordinator, None
            if coord is not None:
                await loop.run_in_executor(None, coord.close)
            raise
        log.info("node %s: raft %s, client endpoint http://%s", self.node.name, self.node.raft, self.node.client)

    async def run(self) -> None:
        """Serve until :meth:`request_stop`, then stop cleanly.

        Housekeeping never ends this loop: a failed round is logged
        (throttled) and the next one tries again.
        """
        await self.start()
        try:
            while not self._stopping.is_set():
                await self._guarded_housekeeping()
                try:
                    await asyncio.wait_for(self._stopping.wait(), HOUSEKEEPING_PERIOD)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Say goodbye, close the endpoint, then the replica."""
        loop = asyncio.get_running_loop()
        coord = self.coordinator
        if coord is not None and self._announced:
            try:
                await loop.run_in_executor(None, lambda: coord.set_node_state("exiting", addr=self.node.raft))
            except RaftcoordError as exc:
                log.info("could not record the exiting state: %s", exc.message)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if coord is not None:
            await loop.run_in_executor(None, coord.close)
            self.coordinator = None
        log.info("node %s stopped", self.node.name)

    async def _guarded_housekeeping(self) -> None:
        """One round of housekeeping; a failure is logged at most once a minute, never raised."""
        try:
            await self._housekeeping()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing here may stop the node
            now = time.monotonic()
            self._failures += 1
            if self._failing_since is None:
                self._failing_since = now
            if now - self._last_failure_log >= FAILURE_LOG_PERIOD:
                self._last_failure_log = now
                reason = exc.message if isinstance(exc, RaftcoordError) else f"{type(exc).__name__}: {exc}"
                log.warning(
                    "node %s: housekeeping failed (%d times in %.0f s; the node carries on): %s",
                    self.node.name, self._failures, now - self._failing_since, reason,
                    exc_info=not isinstance(exc, RaftcoordError),
                )
                self._failures = 0
        else:
            if self._failing_since is not None:
                log.info("node %s: housekeeping works again", self.node.name)
                self._failing_since = None
                self._failures = 0
                self._last_failure_log = -FAILURE_LOG_PERIOD

    async def _housekeeping(self) -> None:
        coord = self.coordinator
        assert coord is not None
        loop = asyncio.get_running_loop()
        status = await loop.run_in_executor(None, coord.status)
        if not status.get("leader"):
            return
        if not self._announced:
            try:
                await loop.run_in_executor(None, lambda: coord.set_node_state("up", addr=self.node.raft))
                self._announced = True
                log.info("node %s is up; leader is %s", self.node.name, status.get("leader"))
            except RaftcoordError as exc:
                log.info("could not announce the node state yet: %s", exc.message)
        now = loop.time()
        if status.get("role") == "leader" and now - self._last_purge >= PURGE_PERIOD:
            self._last_purge = now
            await loop.run_in_executor(None, self._purge, coord)

    def _purge(self, coord: Coordinator) -> None:
        before = datetime.now(timezone.utc) - timedelta(seconds=self.config.message_retention_seconds)
        try:
            n = coord.purge_messages(before=before, max_count=self.config.message_retention_count)
        except RaftcoordError as exc:
            log.info("message purge not applied: %s", exc.message)
            return
        if n:
            log.info("purged %d messages (older than %s or beyond %d)", n, before.isoformat(),
                     self.config.message_retention_count)


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror or exc})"
    if exc.errno == getattr(os, "EADDRINUSE", None) or "address already in use" in str(exc).lower():
        return "the address is already in use by another process"
    return exc.strerror or str(exc)


def _check_data_dir(config: ClusterConfig, name: str) -> None:
    """Refuse a data directory that is a file, cannot be created or is not writable."""
    node = config.node(name)
    index = [n.name for n in config.nodes].index(name)
    setting = f"node[{index}].data_dir"
    where = f"{config.path}: " if config.path is not None else ""
    path = Path(node.data_dir)

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{where}{setting}: {path} {problem}", field=setting)

    if path.exists() and not path.is_dir():
        raise fail("is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot be created: {exc.strerror or exc}") from None
    try:  # os.access is not enough: root passes it, a read-only mount does not
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise fail(f"is not writable: {exc.strerror or exc}") from None


def run_node(path: str, name: str) -> None:
    """Run node ``name`` of the cluster file ``path`` until SIGTERM or SIGINT."""
    config = load_config(path)
    config.node(name)  # an unknown name fails before anything starts

    async def main() -> None:
        server = NodeServer(config, name)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run()

    asyncio.run(main())
