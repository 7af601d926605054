"""The node process: a replica, its coordinator, and the HTTP client endpoint.

:func:`open_coordinator` builds the embedded coordinator of one node from a
cluster file (what a PuzzleDB node calls); :func:`run_node` runs a whole node
in the foreground (what ``raftcoord node`` calls) until SIGTERM or SIGINT.

Besides serving clients, a running node does its timer work (its own node
state, ``joining`` then ``up``, and ``leaving`` then ``down`` when it stops;
on the leader, liveness marking and retention purges) through a
:class:`~raftcoord.housekeeping.Housekeeper`, on a thread of its own: the
coordinator's when it has one (``Coordinator.housekeeper``), else one the
server starts. Nothing in that housekeeping may stop a node: a failure is
logged, at most one line a minute, and the next round tries again.

Start-up problems (a port in use, a host that does not resolve, a data
directory that is a file or not writable) raise one :class:`RaftcoordError`
with a clear message, which the CLI prints as one line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from raftcoord.config import ClusterConfig, load_config
from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app, serve
from raftcoord.errors import ConfigError, UnavailableError
from raftcoord.housekeeping import FAILURE_LOG_PERIOD, HOUSEKEEPING_PERIOD, PURGE_PERIOD, Housekeeper

__all__ = ["FAILURE_LOG_PERIOD", "HOUSEKEEPING_PERIOD", "PURGE_PERIOD", "NodeServer", "event_loop_factory",
           "open_coordinator", "run_node"]

log = logging.getLogger(__name__)

#: Seconds a clean stop may spend recording ``leaving`` and ``down``.
GOODBYE_TIMEOUT = 5.0


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
        self.housekeeper: Housekeeper | None = None

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
        housekeeper = getattr(self.coordinator, "housekeeper", None)
        if housekeeper is None:
            housekeeper = Housekeeper(self.coordinator, self.config, self.node.name)
        self.housekeeper = housekeeper
        housekeeper.start()  # a no-op when the coordinator already started it
        log.info("node %s: raft %s, client endpoint http://%s", self.node.name, self.node.raft, self.node.client)

    async def run(self) -> None:
        """Serve until :meth:`request_stop`, then stop cleanly."""
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (safe from a signal handler)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Say goodbye (``leaving``, then ``down``), close the endpoint, then the replica."""
        loop = asyncio.get_running_loop()
        coord = self.coordinator
        housekeeper, self.housekeeper = self.housekeeper, None
        if housekeeper is not None:
            await loop.run_in_executor(None, housekeeper.stop, GOODBYE_TIMEOUT)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if coord is not None:
            await loop.run_in_executor(None, coord.close)
            self.coordinator = None
        log.info("node %s stopped", self.node.name)


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

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is importable (a dependency, except on Windows), else None: asyncio's own.

    Under load the client endpoint's event loop spent about half its time in
    asyncio's own machinery (selector, transports, callbacks); uvloop does
    that in C (issue 9: a fifth less CPU per get). ``RAFTCOORD_EVENT_LOOP=asyncio``
    keeps asyncio's loop regardless.
    """
    if os.environ.get("RAFTCOORD_EVENT_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
