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
import concurrent.futures
import functools
import json
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

__all__ = ["FAILURE_LOG_PERIOD", "HOUSEKEEPING_PERIOD", "PURGE_PERIOD", "NodeServer", "ask_cluster",
           "event_loop_factory", "open_coordinator", "run_node"]

log = logging.getLogger(__name__)

#: Seconds a clean stop may spend recording ``leaving`` and ``down``.
GOODBYE_TIMEOUT = 5.0
#: Seconds between two looks at whether the cluster removed this node.
REMOVAL_CHECK_PERIOD = 1.0
#: Seconds without a leader after which a node asks the other members whether it was removed.
LEADERLESS_ASK_AFTER = 5.0


def open_coordinator(path: str, *, node: str, join: bool = False, **kwargs: Any) -> Coordinator:
    """The embedded coordinator of ``node`` as described in the cluster file ``path``.

    ``join``: the node was added to a running cluster (``raftcoord member
    add``) and its data directory is empty: it takes the voters and its vote
    from the cluster's member registry, as ``raftcoord node --join`` does.

    Starts the node's replica (Raft peer traffic on its ``raft`` address) but
    no HTTP endpoint. Close it with :meth:`Coordinator.close`.
    """
    config = load_config(path)
    if join and not any(Path(config.node(node).data_dir).glob("raft.*")):
        # Its own event loop on a thread of its own: the caller may be inside one.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            kwargs.update(pool.submit(asyncio.run, ask_cluster(config, node, required=True)).result())
    return _open(config, node, **kwargs)


def _open(config: ClusterConfig, node: str, **kwargs: Any) -> Coordinator:
    # The coordinator layer builds its replica (and takes request_timeout,
    # max_txn_ops, max_response_bytes from the config); nothing points back here.
    return Coordinator.from_cluster_config(config, node=node, **kwargs)


class NodeServer:
    """One node: coordinator, client endpoint and housekeeping, in one event loop.

    ``coordinator`` (for tests and embedding) replaces the one :meth:`start`
    would open from the config; the server closes it when it stops.
    """

    def __init__(self, config: ClusterConfig, node: str, *, coordinator: Coordinator | None = None,
                 join: bool = False) -> None:
        self.config = config
        self.node = config.node(node)
        self.join = join
        self._membership_task: asyncio.Task[None] | None = None
        #: True once this node saw itself in its replica's member registry.
        self._seen_self = False
        self._leaderless_since: float | None = None
        #: True once this node learned that the cluster removed it (it then stops).
        self.removed = False
        self._promotion: asyncio.Task[None] | None = None
        self.coordinator: Coordinator | None = None
        self._given = coordinator
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.housekeeper: Housekeeper | None = None

    async def start(self, open_kwargs: dict[str, Any] | None = None) -> None:
        """Start the replica and the endpoint; returns once both listen.

        Raises :class:`ConfigError` for a data directory that cannot be used
        and :class:`UnavailableError` for an address that cannot be listened
        on, each naming the setting; whatever was started is stopped again.
        ``open_kwargs`` (``voters``, ``voter``) replace what the node would
        otherwise ask the cluster or read from its file.
        """
        loop = asyncio.get_running_loop()
        if self._given is not None:
            self.coordinator, self._given = self._given, None
        else:
            _check_data_dir(self.config, self.node.name)
            kwargs: dict[str, Any] = dict(open_kwargs or {})
            fresh = not any(Path(self.node.data_dir).glob("raft.*"))
            if open_kwargs is None and self.join and not fresh:
                log.info("node %s: --join, but the data directory holds this node's data: starting from it",
                         self.node.name)
            elif open_kwargs is None and (self.join or fresh):
                kwargs = await ask_cluster(self.config, self.node.name, required=self.join)
            try:
                self.coordinator = await loop.run_in_executor(
                    None, functools.partial(_open, self.config, self.node.name, **kwargs))
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
        if getattr(self.coordinator, "membership", None) is not None:
            self._membership_task = asyncio.create_task(self._watch_membership())
        log.info("node %s: raft %s, client endpoint http://%s", self.node.name, self.node.raft, self.node.client)

    async def _become_voter(self, voters: list[str]) -> None:
        """Reopen this non-voter's replica as a voter, after ``member promote`` (same data, same process)."""
        log.warning("node %s was promoted to voter: restarting its replica as a voter (voters %s)",
                    self.node.name, ", ".join(voters))
        await self._close_parts(goodbye=0.0)
        await self.start({"voters": voters, "voter": True})

    async def _watch_membership(self) -> None:
        """Follow this node's entry in the member registry (issue 10).

        A promoted non-voter reopens its replica as a voter. A removed node
        stops, and says so in its log.

        A non-voter, and a voter that heard the change commit, see their
        name leave their own registry. A removed voter usually does not: the
        leader drops it from the configuration as it appends the change, so
        it hears nothing more and no peer takes its connection. A voter
        without a leader, or connected to no peer, for a while therefore asks
        the other members.
        """
        loop = asyncio.get_running_loop()
        coord = self.coordinator
        while not self._stopping.is_set():
            try:
                await asyncio.sleep(REMOVAL_CHECK_PERIOD)
                if coord is None or getattr(coord, "membership", None) is None:
                    return
                members = await loop.run_in_executor(
                    None, lambda: coord.read(lambda st: st.members, consistency="serializable"))
                names = [m.name for m in members]
                me = next((m for m in members if m.name == self.node.name), None)
                if me is not None and me.voter and getattr(coord.backend, "self_address", "") is None:
                    voters = [m.raft for m in members if m.voter and m.name != self.node.name]
                    # A task of its own: reopening cancels this watcher.
                    self._promotion = asyncio.get_running_loop().create_task(self._become_voter(voters))
                    return
                if self.node.name in names:
                    self._seen_self = True
                elif self._seen_self and names:
                    self._removed("its replica applied the change")
                    return
                status = coord.status()
                now = loop.time()
                partners = status.get("partners") or {}
                # pysyncobj keeps the last leader it knew while it is connected
                # to nobody (it starts no election then): cut off counts too.
                if status.get("leader") and (not partners or any(partners.values())):
                    self._leaderless_since = None
                    continue
                if self._leaderless_since is None:
                    self._leaderless_since = now
                if self._seen_self and now - self._leaderless_since >= LEADERLESS_ASK_AFTER:
                    self._leaderless_since = now
                    answer = await _fetch_members(self.config, self.node.name, timeout=3.0, with_leader=True)
                    if answer is not None and answer.get("members") and not any(
                            isinstance(m, dict) and m.get("name") == self.node.name for m in answer["members"]):
                        self._removed(f"{answer.get('answered_by')} no longer lists it")
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - this check must never stop a node by itself failing
                log.debug("removal check failed: %s", exc)

    def _removed(self, how: str) -> None:
        log.warning("node %s was removed from the cluster (%s): stopping; its data directory %s is no longer "
                    "used by the cluster", self.node.name, how, self.node.data_dir)
        self.removed = True
        self.request_stop()

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
        # A removed node says no goodbye: its record says "removed", written by the leader.
        await self._close_parts(goodbye=0.0 if self.removed else GOODBYE_TIMEOUT)
        log.info("node %s stopped", self.node.name)

    async def _close_parts(self, *, goodbye: float) -> None:
        loop = asyncio.get_running_loop()
        coord = self.coordinator
        housekeeper, self.housekeeper = self.housekeeper, None
        task, self._membership_task = self._membership_task, None
        if task is not None:
            task.cancel()
        if housekeeper is not None:
            await loop.run_in_executor(None, housekeeper.stop, goodbye)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if coord is not None:
            await loop.run_in_executor(None, coord.close)
            self.coordinator = None


async def ask_cluster(config: ClusterConfig, name: str, *, required: bool) -> dict[str, Any]:
    """The voters and this node's vote, as the cluster's member registry has them.

    ``--join`` (``required``) needs an answer naming this node: a node
    that is not a member could only disrupt the cluster. A fresh node
    of a new cluster finds nobody, or a registry not yet seeded, and
    starts from its cluster file. Returns the ``voters`` and ``voter``
    arguments of :meth:`Coordinator.from_cluster_config` (empty: the file's).
    """
    node = config.node(name)
    answer = await _fetch_members(config, name, timeout=10.0 if required else 2.0)
    if answer is None:
        if required:
            raise UnavailableError(f"node {name}: --join: no other node of the cluster file answered; "
                                   "start it once the cluster runs", field="join")
        return {}
    members = {m.get("name"): m for m in answer.get("members") or () if isinstance(m, dict)}
    me = members.get(name)
    raft_voters = [str(a) for a in answer.get("raft_voters") or ()]
    if me is None and node.raft in raft_voters:
        # Added as a voter to a one-node cluster: the change waits for this
        # node to commit it (pysyncobj issue 51), so only the leader's Raft
        # configuration has it yet.
        voters = [a for a in raft_voters if a != node.raft]
        log.info("node %s: joining as a voter being added; voters %s", name, ", ".join(voters))
        return {"voters": voters, "voter": True}
    if me is None:
        if required:
            raise ConfigError(f"node {name} is not a member of the cluster: add it first with "
                              f"`raftcoord member add {name} --raft {node.raft} "
                              f"--client {node.client}`", field="join")
        return {}
    if me.get("raft") != node.raft:
        raise ConfigError(f"node {name} is a member with raft address {me.get('raft')}, "
                          f"but the cluster file says {node.raft}", field="raft")
    voters = [str(m["raft"]) for m in members.values() if m.get("voter") and m.get("name") != name]
    log.info("node %s: joining as a %s; voters %s", name,
             "voter" if me.get("voter") else "non-voter", ", ".join(voters))
    return {"voters": voters, "voter": bool(me.get("voter"))}


async def _fetch_members(config: ClusterConfig, me: str, *, timeout: float,
                         with_leader: bool = False) -> dict[str, Any] | None:
    """The member registry as another node of ``config`` answers it, or None if none did.

    Asks each other node of the cluster file in turn, for its own replica's
    view; with ``with_leader`` a node that answers without knowing a leader
    is passed over. The answer gains
    ``answered_by``, the name of the node that gave it.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    per_node = aiohttp.ClientTimeout(total=max(0.5, timeout / max(1, len(config.nodes) - 1)))
    try:
        async with aiohttp.ClientSession(timeout=per_node, headers=headers) as session:
            for node in config.nodes:
                if node.name == me:
                    continue
                try:
                    # Serializable: a one-node cluster that added a second voter
                    # has no quorum until that voter joins.
                    async with session.get(f"{node.client_url}/raftcoord/v1/members",
                                           params={"consistency": "serializable"}) as resp:
                        if resp.status != 200:
                            continue
                        answer = json.loads(await resp.read())
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue
                if not isinstance(answer, dict) or not isinstance(answer.get("members"), list):
                    continue
                if with_leader and not answer.get("leader"):
                    continue
                answer["answered_by"] = node.name
                return answer
    except Exception as exc:  # noqa: BLE001 - asking is best effort
        log.debug("asking the cluster for its members failed: %s", exc)
    return None


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


def run_node(path: str, name: str, *, join: bool = False) -> None:
    """Run node ``name`` of the cluster file ``path`` until SIGTERM or SIGINT (or its removal).

    ``join``: the node was added to a running cluster (``raftcoord member
    add``) and starts with an empty data directory: it asks the cluster for
    the voters and its own vote instead of trusting the file.
    """
    config = load_config(path)
    config.node(name)  # an unknown name fails before anything starts

    async def main() -> None:
        server = NodeServer(config, name, join=join)
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
