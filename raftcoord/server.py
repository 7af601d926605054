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
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from raftcoord.config import ClusterConfig, check_can_start, load_config
from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app
from raftcoord.errors import RaftcoordError
from raftcoord.replica import open_replica_backend

__all__ = ["NodeServer", "open_coordinator", "run_node"]

log = logging.getLogger(__name__)

#: How often a node checks whether to announce itself or purge messages.
HOUSEKEEPING_PERIOD = 1.0
#: How often the leader proposes a retention purge.
PURGE_PERIOD = 30.0


def open_coordinator(path: str, *, node: str, **kwargs: Any) -> Coordinator:
    """The embedded coordinator of ``node`` as described in the cluster file ``path``.

    Starts the node's replica (Raft peer traffic on its ``raft`` address) but
    no HTTP endpoint. Close it with :meth:`Coordinator.close`.
    """
    return _open(load_config(path), node, **kwargs)


def _open(config: ClusterConfig, node: str, **kwargs: Any) -> Coordinator:
    node_cfg = config.node(node)
    check_can_start(config, node)
    backend = open_replica_backend(config, node)
    kwargs.setdefault("timeout", config.request_timeout)
    return Coordinator(backend, host=node_cfg.name, cluster=config.name, addr=node_cfg.raft, **kwargs)


class NodeServer:
    """One node: coordinator, client endpoint and housekeeping, in one event loop."""

    def __init__(self, config: ClusterConfig, node: str) -> None:
        self.config = config
        self.node = config.node(node)
        self.coordinator: Coordinator | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._announced = False
        self._last_purge = 0.0

    async def start(self) -> None:
        """Start the replica and the endpoint; returns once both listen."""
        loop = asyncio.get_running_loop()
        self.coordinator = await loop.run_in_executor(None, _open, self.config, self.node.name)
        app = make_app(self.coordinator, self.config, self.node.name)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, port = _split(self.node.client)
        await web.TCPSite(self._runner, host, port).start()
        log.info("node %s: raft %s, client endpoint http://%s", self.node.name, self.node.raft, self.node.client)

    async def run(self) -> None:
        """Serve until :meth:`request_stop`, then stop cleanly."""
        await self.start()
        try:
            while not self._stopping.is_set():
                await self._housekeeping()
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


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


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
