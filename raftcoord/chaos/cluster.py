"""A cluster of real ``raftcoord node`` processes whose network can be cut, delayed and lossy.

:class:`ChaosCluster` writes a cluster file (fresh secret, short timeouts),
starts one ``python -m raftcoord node`` process per node, and always cleans
up: every process it started is killed by pid, and everything it created in
the kernel is removed, also when an exception escapes the ``with`` block.

Two networks, chosen by ``netns`` (None: the first when it works here):

* ``netns`` (root, iproute2): each node in a network namespace of its own,
  all on one bridge (see :mod:`raftcoord.chaos.netns`); cuts are silent
  drops per destination, so any partition can be made. The runner's clients
  reach the nodes from a control namespace on the same bridge: entering the
  cluster (``with`` or :meth:`start`) moves the calling thread there with
  setns(2) and leaving moves it back. Threads it starts meanwhile inherit the
  namespace; an older thread calls :meth:`enter_control` (a context manager).
  Stale namespaces of a crashed earlier run (our prefix, owner pid gone) are
  swept before starting.
* ``proxy`` (anyone): nodes on 127.0.0.1, each raft port behind a proxy of
  :mod:`raftcoord.chaos.faultproxy`; cuts and delays, no packet loss. The node
  process is the real one, started through a two-line launcher that tells the
  replica to listen on its hidden port.

:meth:`ChaosCluster.network_unsupported` says which network faults the
chosen network cannot make, so that a fault is reported unsupported, never
silently skipped. ``RAFTCOORD_CHAOS_NETNS=0`` forces the proxy network and
``=1`` requires namespaces (when the caller passes ``netns=None``).

Without root, where the kernel allows unprivileged user namespaces, the
namespace network still works inside one (the tmpfs gives ``ip netns`` a
writable /run/netns; nothing outside the new namespaces is touched)::

    unshare -Urnm --propagation private sh -c \\
        'mount -t tmpfs none /run && ip link set lo up && exec raftcoord chaos ...'

Otherwise the proxy network is chosen by itself.

Membership (for the ``member`` fault): :meth:`ChaosCluster.remove_member`
removes a node through the cluster's own HTTP API, waits for it to stop by
itself and deletes its data directory; :meth:`ChaosCluster.rejoin` adds it
back with the same name and addresses and starts it with ``--join``. A
removed node is in :attr:`ChaosCluster.removed` until then, and
:meth:`ChaosCluster.restart` refuses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from raftcoord.chaos import netns as _netns
from raftcoord.chaos.faultproxy import ProxyNetwork
from raftcoord.client import Client
from raftcoord.errors import (
    ConflictError,
    MemberNotFoundError,
    RaftcoordError,
    UnavailableError,
)

__all__ = ["ChaosCluster", "ClusterUnhealthyError", "MemberChangeRefusedError", "NetworkUnsupportedError",
           "free_ports"]

log = logging.getLogger(__name__)

#: Short but sane Raft timings, so a fault costs seconds, not tens of seconds.
ELECTION_TIMEOUT_MIN = 0.4
ELECTION_TIMEOUT_MAX = 1.2
HEARTBEAT_PERIOD = 0.1
REQUEST_TIMEOUT = 5
#: Messages kept: small, so the leader's retention purges (at its start and every 30 s) remove some
#: during a run and the message checks meet a purge floor (the default, 10,000, is never reached).
MESSAGE_RETENTION_COUNT = 25
#: Most nodes in one chaos cluster (Raft wants 3 to 7 voters; more only slows the run).
MAX_NODES = 15
#: "0" forces the proxy network, "1" requires namespaces, when the caller passes netns=None.
NETNS_ENV = "RAFTCOORD_CHAOS_NETNS"
_BIND_ENV = "RAFTCOORD_CHAOS_BIND"
_OWNER_ENV = "RAFTCOORD_CHAOS_OWNER"
_LAUNCH = "from raftcoord.chaos.cluster import _node_main as m; m()"
_RAFT_PORT = 7001
_CLIENT_PORT = 2379
_MEMBERS = "/raftcoord/v1/members"
#: Seconds one member-change request may take (the leader itself gives a change up to 30 s).
MEMBER_CALL_TIMEOUT = 35.0


class ClusterUnhealthyError(AssertionError):
    """The cluster did not become healthy within the deadline (names what was wrong)."""


class NetworkUnsupportedError(RuntimeError):
    """The chosen network cannot make this fault."""


class MemberChangeRefusedError(RuntimeError):
    """A member change the cluster kept refusing (no leader, no majority) until the deadline; names the last answer."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports on 127.0.0.1 that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_main() -> None:
    """``raftcoord node`` for the chaos cluster: the real CLI, with two additions by environment.

    ``$RAFTCOORD_CHAOS_BIND`` (proxy network): the replica listens there, behind
    its proxy. ``$RAFTCOORD_CHAOS_OWNER``: the pid of the runner; when the
    runner is gone (killed before it could clean up) the node kills itself,
    so no node outlives the run that started it.
    """
    from raftcoord import replica
    from raftcoord.cli import main

    bind = os.environ.get(_BIND_ENV)
    if bind:
        original = replica.Replica.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["bind_address"] = kwargs.get("bind_address") or bind
            original(self, *args, **kwargs)

        replica.Replica.__init__ = init  # type: ignore[method-assign]
    owner = int(os.environ.get(_OWNER_ENV) or 0)
    if owner:
        def watch() -> None:
            while os.getppid() == owner:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="chaos-owner-watch", daemon=True).start()
    main(args=sys.argv[1:], prog_name="raftcoord")


class ChaosCluster:
    """``nodes`` node processes under ``root``; a context manager that starts, waits and cleans up."""

    def __init__(self, root: Path, nodes: int = 3, *, netns: bool | None = None, seed: int = 0) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes: must be 1-{MAX_NODES}, got {nodes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.names = [f"n{i + 1}" for i in range(nodes)]
        if netns is None and os.environ.get(NETNS_ENV, "").strip() in ("0", "1"):
            netns = os.environ[NETNS_ENV].strip() == "1"
        why = _netns.available() if netns is not False else "not asked for"
        if netns and why:
            raise NetworkUnsupportedError(f"network namespaces cannot be used here: {why}")
        self.mode = "proxy" if why else "netns"
        #: Why the namespace network is not used (None when it is).
        self.netns_unavailable = why
        self.secret = secrets.token_urlsafe(24)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        #: Nodes a member fault removed from the cluster and has not added back yet (see :meth:`rejoin`).
        self.removed: set[str] = set()
        self._all_pids: list[int] = []
        self._entered: _netns.ThreadNetns | None = None
        self._net: _netns.NetnsNetwork | None = None
        self._proxy: ProxyNetwork | None = None
        self._bind: dict[str, str] = {}
        self.raft: dict[str, str] = {}
        self.client_addr: dict[str, str] = {}
        self._blocked: set[frozenset[str]] = set()
        self._loss = 0.0
        self._delay = 0.0
        self.config_path = self.root / "cluster.toml"
        try:
            self._set_up_network(nodes)
            self._write_config()
        except BaseException:
            self.close()  # nothing half-made may outlive a failed constructor
            raise
        #: How the runner's clients reach each node (from the control namespace in netns mode).
        self.client_urls = {n: f"http://{a}" for n, a in self.client_addr.items()}

    def _set_up_network(self, nodes: int) -> None:
        if self.mode == "netns":
            self._net = _netns.NetnsNetwork(self.names)
            self.raft = {n: f"{self._net.addr[n]}:{_RAFT_PORT}" for n in self.names}
            self.client_addr = {n: f"{self._net.addr[n]}:{_CLIENT_PORT}" for n in self.names}
            return
        ports = free_ports(3 * nodes)
        self.raft = {n: f"127.0.0.1:{ports[3 * i]}" for i, n in enumerate(self.names)}
        self._bind = {n: f"127.0.0.1:{ports[3 * i + 1]}" for i, n in enumerate(self.names)}
        self.client_addr = {n: f"127.0.0.1:{ports[3 * i + 2]}" for i, n in enumerate(self.names)}
        self._proxy = ProxyNetwork({n: (ports[3 * i], ports[3 * i + 1]) for i, n in enumerate(self.names)},
                                   self._live_pids)

    # ------------------------------------------------------------ lifecycle

    def _write_config(self) -> None:
        lines = [
            "[cluster]",
            f'name = "chaos-{self.seed}"',
            f'secret = "{self.secret}"',
            f'data_dir = "{self.root / "data"}"',
            f"request_timeout = {REQUEST_TIMEOUT}",
            f"election_timeout_min = {ELECTION_TIMEOUT_MIN}",
            f"election_timeout_max = {ELECTION_TIMEOUT_MAX}",
            f"heartbeat_period = {HEARTBEAT_PERIOD}",
            f"message_retention_count = {MESSAGE_RETENTION_COUNT}",
            "",
        ]
        for name in self.names:
            lines += ["[[node]]", f'name = "{name}"', f'raft = "{self.raft[name]}"',
                      f'client = "{self.client_addr[name]}"', ""]
        self.config_path.write_text("\n".join(lines))
        self.config_path.chmod(0o600)

    def __enter__(self) -> ChaosCluster:
        try:
            self.start()
            self.wait_healthy(60)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self, *names: str, join: bool = False) -> None:
        """Start the named nodes (all by default); the first call enters the control namespace.

        ``join``: start them with ``--join`` (nodes just added back by :meth:`rejoin`).
        """
        if self._net is not None and self._entered is None:
            entered = _netns.ThreadNetns(self._net.control)
            entered.enter()
            self._entered = entered
        for name in names or self.names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                raise RuntimeError(f"{name} is already running (pid {proc.pid})")
            env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
            env[_OWNER_ENV] = str(os.getpid())
            argv = [sys.executable, "-c", _LAUNCH, "node", "--config", str(self.config_path), "--name", name]
            if join:
                argv.append("--join")
            if self._net is not None:
                argv = self._net.exec_prefix(name) + argv
            else:
                env[_BIND_ENV] = self._bind[name]
            with open(self.root / f"{name}.log", "ab") as logf:
                proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
            self.procs[name] = proc
            self.paused.discard(name)
            self._all_pids.append(proc.pid)

    def kill(self, name: str) -> None:
        """SIGKILL node ``name`` and wait until it is gone."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        self.paused.discard(name)

    def restart(self, name: str) -> None:
        """Start ``name`` again (killing it first if it still runs); a removed node must :meth:`rejoin` instead."""
        if name in self.removed:
            # Started without --join on an empty data directory it would be a
            # voter of its own cluster file that the others no longer count.
            raise RuntimeError(f"{name} was removed from the cluster: add it back with rejoin(), not restart()")
        self.kill(name)
        self.start(name)

    def pause(self, name: str) -> None:
        """SIGSTOP node ``name``."""
        self.procs[name].send_signal(signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT node ``name``."""
        self.procs[name].send_signal(signal.SIGCONT)
        self.paused.discard(name)

    def alive(self, name: str) -> bool:
        """Whether ``name``'s process runs and is not paused."""
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None and name not in self.paused

    def _live_pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def pids(self) -> list[int]:
        """Every pid this cluster ever started."""
        return list(self._all_pids)

    def namespaces(self) -> list[str]:
        """The network namespaces this cluster created and has not removed yet."""
        return list(self._net.created) if self._net is not None else []

    def data_dir(self, name: str) -> Path:
        """Node ``name``'s data directory (the cluster file's ``data_dir/<name>``)."""
        return self.root / "data" / name

    def log(self, name: str) -> str:
        """What node ``name`` wrote to its log so far."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        """Kill every process started (by pid), remove proxies and namespaces, leave the control namespace."""
        for pid in self._all_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("node process %d did not exit after SIGKILL", proc.pid)
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        if self._entered is not None:
            self._entered.leave()
            self._entered = None
        if self._net is not None:
            self._net.close()

    @contextlib.contextmanager
    def enter_control(self) -> Iterator[None]:
        """Run the block with the calling thread in the control namespace (no-op without namespaces)."""
        if self._net is None:
            yield
            return
        entered = _netns.ThreadNetns(self._net.control)
        entered.enter()
        try:
            yield
        finally:
            entered.leave()

    # -------------------------------------------------------------- network

    def network_unsupported(self, *, cut: bool = False, loss: bool = False, delay: bool = False) -> str | None:
        """Why this network cannot make the given faults, or None when it can."""
        if self._net is not None:
            if delay and not self._net.has_netem and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
                return "no netem qdisc in this kernel, and /dev/net/tun (for the delay line) is not usable"
            return None
        if loss:
            return f"the proxy network cannot drop packets of a TCP stream (no namespaces: {self.netns_unavailable})"
        return None

    def set_network(self, blocked: set[frozenset[str]] | None = None, *, loss: float = 0.0,
                    delay: float = 0.0) -> None:
        """Cut exactly the ``blocked`` pairs of node names; drop ``loss`` of other node traffic; delay it."""
        blocked = set(blocked or ())
        for pair in blocked:
            if len(pair) != 2 or not pair <= set(self.names):
                raise ValueError(f"not a pair of node names: {sorted(pair)}")
        why = self.network_unsupported(loss=bool(loss), delay=bool(delay))
        if why:
            raise NetworkUnsupportedError(why)
        net = self._net if self._net is not None else self._proxy
        assert net is not None
        net.set_faults(blocked, loss=loss, delay=delay)
        self._blocked, self._loss, self._delay = blocked, loss, delay

    def partition(self, *groups: list[str] | set[str]) -> None:
        """Cut every pair of nodes in different ``groups`` (nodes in no group keep all their links)."""
        blocked = set()
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                blocked |= {frozenset((x, y)) for x in a for y in b}
        self.set_network(blocked, loss=self._loss, delay=self._delay)

    def heal_network(self) -> None:
        """Every link whole again: no cut, loss or delay."""
        self.set_network(set())

    @property
    def blocked(self) -> set[frozenset[str]]:
        """The pairs cut right now."""
        return set(self._blocked)

    def dropped(self) -> int:
        """How much the network faults dropped so far (packets with namespaces, chunks through the proxy)."""
        if self._net is not None:
            return self._net.dropped()
        return self._proxy.dropped if self._proxy is not None else 0

    @property
    def loss(self) -> float:
        """The share of node-to-node packets dropped right now."""
        return self._loss

    @property
    def delay(self) -> float:
        """The delay added to node-to-node traffic right now, in seconds."""
        return self._delay

    # -------------------------------------------------------------- clients

    def client(self, name: str, *, timeout: float = 10.0, dial_timeout: float = 1.0) -> Client:
        """A client of node ``name`` only (works from the control namespace in netns mode)."""
        return Client([self.client_urls[name]], timeout=timeout, dial_timeout=dial_timeout)

    def status(self, name: str, timeout: float = 2.0) -> dict[str, Any]:
        """Node ``name``'s own status, or raise."""
        return self.client(name, timeout=timeout).status()

    def leader(self) -> str | None:
        """The name of a live node that says it is leader, if any."""
        for name in self.names:
            if not self.alive(name):
                continue
            try:
                if self.status(name).get("role") == "leader":
                    return name
            except RaftcoordError:
                continue
        return None

    def _health(self, name: str) -> str | None:
        """None when ``name`` is healthy, else what is wrong."""
        if name in self.paused:
            return "paused"
        proc = self.procs.get(name)
        if proc is None:
            return "never started"
        if proc.poll() is not None:
            tail = self.log(name).strip().splitlines()[-1:] if (self.root / f"{name}.log").exists() else []
            return f"exited with code {proc.returncode}" + (f" (log: {tail[0][:300]})" if tail else "")
        try:
            self.client(name, timeout=2).call("GET", "/health", timeout=2, retry=False)
            st = self.status(name)
        except (RaftcoordError, OSError) as exc:
            return f"unhealthy: {getattr(exc, 'message', exc)}"
        if not st.get("leader"):
            return "knows no leader"
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every node runs, answers /health with 200, and all name one leader that says so."""
        deadline = time.monotonic() + timeout
        problems: dict[str, str] = {}
        while True:
            problems = {n: why for n in self.names if (why := self._health(n)) is not None}
            if not problems:
                try:
                    statuses = {n: self.status(n) for n in self.names}
                except (RaftcoordError, OSError) as exc:
                    problems = {"cluster": f"a status failed: {getattr(exc, 'message', exc)}"}
                else:
                    leaders = {n: st.get("leader") for n, st in statuses.items()}
                    roles = [n for n, st in statuses.items() if st.get("role") == "leader"]
                    if len(set(map(str, leaders.values()))) == 1 and len(roles) == 1:
                        return
                    problems = {"cluster": f"no single agreed leader: role leader={roles}, leader fields={leaders}"}
            if time.monotonic() >= deadline:
                raise ClusterUnhealthyError(f"cluster not healthy after {timeout} s: " + "; ".join(
                    f"{n}: {why}" for n, why in sorted(problems.items())))
            time.sleep(0.1)

    # ------------------------------------------------------------ membership

    def _member_client(self, exclude: str | None = None) -> Client:
        """A client of every running member but ``exclude`` (that one last, when it runs)."""
        live = [n for n in self.names if n != exclude and n not in self.removed and self.alive(n)]
        if exclude is not None and exclude not in self.removed and self.alive(exclude):
            live.append(exclude)
        if not live:
            raise UnavailableError("no member of the cluster is running", field="members")
        return Client([self.client_urls[n] for n in live], timeout=MEMBER_CALL_TIMEOUT, dial_timeout=1.0)

    def members(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The member registry as a running member answers it (a linearizable read)."""
        out = self._member_client().call("GET", _MEMBERS, timeout=timeout)
        if not isinstance(out, dict) or not isinstance(out.get("members"), list):
            raise UnavailableError(f"the member list is not a list: {out!r}", field="members")
        return [m for m in out["members"] if isinstance(m, dict)]

    def _member_change(self, body: dict[str, Any], done: Any, deadline: float) -> None:
        """POST ``body`` to the member route until it applied (``done(members)`` says so) or ``deadline``.

        A change is not idempotent and its answer may be lost (a timeout, a
        leader change): after any failure the registry decides whether it
        applied before the change is asked again.
        """
        last = "nothing was tried"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MemberChangeRefusedError(f"{body['action']} {body['name']}: not done before the deadline "
                                               f"(last: {last})")
            try:
                self._member_client(exclude=body["name"]).call("POST", _MEMBERS, body, retry=False,
                                                               timeout=min(MEMBER_CALL_TIMEOUT, max(1.0, left)))
                return
            except (UnavailableError, ConflictError, MemberNotFoundError) as exc:
                # Unavailable covers no leader, not leader, timeouts and unknown outcomes; a conflict is a
                # change still in flight (or, after a lost answer, this one done); not found, a removal done.
                last = f"{type(exc).__name__}: {exc.message}"
            try:
                if done(self.members(timeout=min(5.0, max(0.5, deadline - time.monotonic())))):
                    return
            except RaftcoordError as exc:
                last += f"; the member list: {exc.message}"
            time.sleep(0.3)

    def remove_member(self, name: str, *, timeout: float = 30.0, stop_timeout: float = 20.0) -> tuple[bool, float]:
        """Remove ``name`` from the cluster through its HTTP API, wait for it to stop by itself, delete its data.

        Retries while the cluster cannot make the change (no leader, no
        majority) and raises :class:`MemberChangeRefusedError` when it never
        could within ``timeout`` (nothing was changed then, or at least nothing
        is known to have been). A node still running ``stop_timeout`` seconds
        after its removal is SIGKILLed. Returns whether it stopped by itself
        (False is a finding) and the seconds from the change's answer until
        it was gone.
        """
        self._member_change({"action": "remove", "name": name},
                            lambda members: not any(m.get("name") == name for m in members),
                            time.monotonic() + timeout)
        self.removed.add(name)
        removed_at = time.monotonic()
        by_itself = True
        proc = self.procs.get(name)
        if name in self.paused:
            self.resume(name)
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                by_itself = False
                log.warning("%s did not stop by itself within %g s of its removal: SIGKILL", name, stop_timeout)
                self.kill(name)
        took = time.monotonic() - removed_at
        shutil.rmtree(self.data_dir(name), ignore_errors=True)
        return by_itself, took

    def rejoin(self, name: str, *, timeout: float = 60.0) -> None:
        """Add the removed ``name`` back as a voter (same addresses), start it with ``--join``, wait until healthy.

        Raises :class:`MemberChangeRefusedError` when the cluster kept
        refusing the addition, :class:`ClusterUnhealthyError` when the node
        did not become healthy; either within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        body = {"action": "add", "name": name, "raft": self.raft[name], "client": self.client_addr[name],
                "voter": True}
        mine = {k: body[k] for k in ("name", "raft", "client", "voter")}
        self._member_change(body, lambda members: mine in [
            {k: m.get(k) for k in ("name", "raft", "client", "voter")} for m in members], deadline)
        # A member again: from here on a plain restart of it is right (its data directory joins by itself).
        self.removed.discard(name)
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            self.start(name, join=True)
        while (why := self._health(name)) is not None:
            if time.monotonic() >= deadline:
                raise ClusterUnhealthyError(f"{name} added back but not healthy after {timeout:g} s: {why}")
            time.sleep(0.2)
