"""Network namespaces for the chaos cluster: one per node, a switch, a control namespace.

Layout of one run (``R`` picks the /24, ``P`` is the owning process id)::

    rcchaos-P-R-sw   a bridge ``br0``; one veth port per node and one for control
    rcchaos-P-R-n1   ``eth0`` = 10.213.R.11/24, the node process runs here (``ip netns exec``)
    rcchaos-P-R-ctl  ``eth0`` = 10.213.R.2/24, the runner's client sockets live here

Addresses exist only inside these namespaces; the root namespace gets no
address, route or interface (each veth is created directly inside its
namespaces). Faults are silent drops on each node's egress: a ``clsact``
qdisc with a classic-BPF ``cls_bpf`` filter in direct-action mode that
returns TC_ACT_SHOT for the blocked destinations (and, for the "drop" fault,
for a random share of packets to the other nodes). That needs only
CONFIG_NET_CLS_BPF, where ``tc netem loss 100%`` needs netem, which some
kernels (this machine's) lack. The "delay" fault uses netem when the kernel
has it, else :mod:`raftcoord.chaos.delayline` (a tap and a packet socket).
The runner reaches the nodes by entering the control namespace with
``setns(2)`` (ctypes; Python 3.11 has no ``os.setns``): see
:class:`ThreadNetns`. Stale namespaces (our prefix, owner pid gone) are
swept, their processes killed, before a new run builds its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

#: Every namespace this package creates starts with this; the stale sweep looks only at these.
PREFIX: Final = "rcchaos-"
NETNS_DIR: Final = Path("/var/run/netns")
CLONE_NEWNET: Final = 0x40000000
_NAME: Final = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(\d+)-")
#: "No verdict": the next filter (the delay redirect) still sees the packet.
_TC_ACT_UNSPEC: Final = 0xFFFFFFFF
_TC_ACT_SHOT: Final = 2
_SKF_AD_RANDOM: Final = (-0x1000 + 56) & 0xFFFFFFFF


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed, or namespaces cannot be used here."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if _libc() is None:
        return "no libc setns()"
    name = f"{PREFIX}{os.getpid()}-0-probe"
    try:
        _run("ip", "netns", "add", name)
    except (NetnsError, OSError) as exc:
        return f"`ip netns add` failed: {exc}"
    try:
        _run("ip", "netns", "del", name, check=False)
    except OSError:
        pass
    return None


def _libc() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path, use_errno=True)
    return libc if hasattr(libc, "setns") else None


def setns(fd: int) -> None:
    """Move the CALLING THREAD into the network namespace open at ``fd``."""
    libc = _libc()
    if libc is None:
        raise NetnsError("no libc setns()")
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


class ThreadNetns:
    """Puts the calling thread into namespace ``name`` until :meth:`leave`.

    setns(2) moves one thread, and a thread started later inherits the
    namespace of the thread that started it. So the thread that enters the
    control namespace, and every thread it starts afterwards (the runner's
    client workers), open their sockets there; threads started before, and
    other processes, stay where they were.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._home: int | None = None
        self._thread_id: int | None = None

    def enter(self) -> None:
        """Enter the namespace (remembering where this thread was)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.name, os.O_RDONLY)
        try:
            setns(target)
        except BaseException:
            os.close(home)
            raise
        finally:
            os.close(target)
        self._home = home
        import threading

        self._thread_id = threading.get_ident()

    def leave(self) -> None:
        """Return the entering thread to where it was (call from that thread)."""
        import threading

        if self._home is None:
            return
        if threading.get_ident() != self._thread_id:
            log.warning("leaving namespace %s from another thread than the one that entered it", self.name)
        try:
            setns(self._home)
        finally:
            os.close(self._home)
            self._home = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids_in(name: str) -> None:
    out = _run("ip", "netns", "pids", name, check=False).stdout
    for word in out.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def namespaces() -> list[str]:
    """Names of the existing named network namespaces."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete our namespaces (and kill their processes) whose owning process is gone."""
    removed = []
    for name in namespaces():
        m = _NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _kill_pids_in(name)
        if _run("ip", "netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    if removed:
        log.warning("removed stale chaos namespaces of an earlier run: %s", ", ".join(removed))
    return removed


def _subnet_in_use() -> set[int]:
    used = set()
    for name in namespaces():
        m = _NAME.match(name)
        if m is not None:
            used.add(int(m.group(2)))
    return used


# ------------------------------------------------------------ classic BPF

def drop_program(blocked: Iterable[str], lossy: Iterable[str] = (), loss: float = 0.0) -> str:
    """``tc ... bpf bytecode`` text dropping IPv4 packets to ``blocked``, and to ``lossy`` with p=``loss``."""
    blocked = sorted(set(blocked))
    lossy = sorted(set(lossy) - set(blocked)) if loss > 0 else []
    # Instructions as (code, jt_label, jf_label, k); labels resolved below.
    prog: list[tuple[int, str | None, str | None, int]] = [
        (0x28, None, None, 12),            # ldh [12]: ethertype
        (0x15, None, "pass", 0x0800),      # jeq IPv4
        (0x20, None, None, 30),            # ld [30]: destination address
    ]
    for addr in blocked:
        prog.append((0x15, "drop", None, int(ipaddress.IPv4Address(addr))))
    for addr in lossy:
        prog.append((0x15, "maybe", None, int(ipaddress.IPv4Address(addr))))
    labels: dict[str, int] = {}
    labels["pass"] = len(prog)
    prog.append((0x06, None, None, _TC_ACT_UNSPEC))
    labels["maybe"] = len(prog)
    threshold = min(0xFFFFFFFF, int(loss * 0x100000000)) if loss > 0 else 0
    prog.append((0x20, None, None, _SKF_AD_RANDOM))        # ld rand
    prog.append((0x35, "keep", "drop", threshold))          # jge threshold: keep, else drop
    labels["keep"] = len(prog)
    prog.append((0x06, None, None, _TC_ACT_UNSPEC))
    labels["drop"] = len(prog)
    prog.append((0x06, None, None, _TC_ACT_SHOT))
    words = []
    for i, (code, jt, jf, k) in enumerate(prog):
        t = labels[jt] - i - 1 if jt else 0
        f = labels[jf] - i - 1 if jf else 0
        if not (0 <= t <= 255 and 0 <= f <= 255):
            raise NetnsError("too many addresses for one BPF program")
        words.append(f"{code} {t} {f} {k}")
    return f"{len(words)}," + ",".join(words)


class NetnsNetwork:
    """The namespaces, bridge and filters of one chaos run; :meth:`close` removes them all."""

    def __init__(self, nodes: list[str]) -> None:
        sweep_stale()
        used = _subnet_in_use()
        free = [r for r in range(1, 251) if r not in used]
        if not free:
            raise NetnsError("no free 10.213.R.0/24 subnet")
        seed = os.getpid() % len(free)
        self.run = free[seed]
        self.base = f"{PREFIX}{os.getpid()}-{self.run}-"
        self.switch = self.base + "sw"
        self.control = self.base + "ctl"
        self.nodes = list(nodes)
        self.ns = {name: self.base + name for name in nodes}
        self.addr = {name: f"10.213.{self.run}.{11 + i}" for i, name in enumerate(nodes)}
        self.control_addr = f"10.213.{self.run}.2"
        self.created: list[str] = []
        self.has_netem = False
        self._state: dict[str, tuple[frozenset[str], frozenset[str], float, float]] = {}
        self._lines: dict[str, Any] = {}  # node -> DelayLine, when delaying without netem
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        ports = [(self.control, self.control_addr, "pc")] + [
            (self.ns[n], self.addr[n], f"p{i}") for i, n in enumerate(self.nodes)]
        for ns, addr, port in ports:
            self._add_ns(ns)
            # Created inside both namespaces at once: no name ever appears in the root namespace.
            _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        for name in self.nodes:
            _run("tc", "-n", self.ns[name], "qdisc", "add", "dev", "eth0", "clsact")
        probe = _run("tc", "-n", self.control, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms",
                     check=False)
        self.has_netem = probe.returncode == 0
        if self.has_netem:
            _run("tc", "-n", self.control, "qdisc", "del", "dev", "eth0", "root", check=False)

    def exec_prefix(self, name: str) -> list[str]:
        """The argv prefix that runs a command in node ``name``'s namespace (the pid stays the command's)."""
        return ["ip", "netns", "exec", self.ns[name]]

    def pids(self) -> list[int]:
        """Processes in any of our namespaces."""
        out = []
        for ns in self.created:
            for word in _run("ip", "netns", "pids", ns, check=False).stdout.split():
                out.append(int(word))
        return out

    def set_faults(self, blocked: set[frozenset[str]], *, loss: float = 0.0, delay: float = 0.0) -> None:
        """Make exactly these pairs unreachable, drop ``loss`` of other node traffic, delay by ``delay`` s.

        Filters run in order on each node's egress: the drop program first (a
        cut or lost packet goes no further), then, for a delay without netem,
        a redirect of what is left for the other nodes to the node's delay line.
        """
        for name in self.nodes:
            cut = frozenset(self.addr[o] for o in self.nodes if o != name and frozenset((name, o)) in blocked)
            rest = frozenset(self.addr[o] for o in self.nodes if o != name) - cut
            want = (cut, rest if loss else frozenset(), loss, delay)
            old = self._state.get(name, (frozenset(), frozenset(), 0.0, 0.0))
            if old == want:
                continue
            ns = self.ns[name]
            _run("tc", "-n", ns, "filter", "del", "dev", "eth0", "egress", check=False)
            if cut or (loss and rest):
                _run("tc", "-n", ns, "filter", "add", "dev", "eth0", "egress", "prio", "1", "bpf", "da",
                     "bytecode", drop_program(cut, rest, loss))
            self._set_delay(name, old[3], delay, rest)
            self._state[name] = want

    def _set_delay(self, name: str, old: float, delay: float, targets: frozenset[str]) -> None:
        ns = self.ns[name]
        if self.has_netem:
            if old and old != delay:
                _run("tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root", check=False)
            if delay and old != delay:
                _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem", "delay",
                     f"{int(delay * 1000)}ms", f"{max(1, int(delay * 250))}ms")
            return
        from raftcoord.chaos.delayline import TAP, DelayLine  # it needs ThreadNetns from here

        line = self._lines.get(name)
        if line is not None and line.delay != delay:
            self._lines.pop(name).close()
            line = None
        if not delay:
            return
        if line is None:
            line = self._lines[name] = DelayLine(ns, delay)
            _run("ip", "-n", ns, "link", "set", TAP, "up")
        for addr in sorted(targets):
            _run("tc", "-n", ns, "filter", "add", "dev", "eth0", "egress", "prio", "2", "protocol", "ip", "u32",
                 "match", "ip", "dst", f"{addr}/32", "action", "mirred", "egress", "redirect", "dev", TAP)

    def dropped(self) -> int:
        """Packets the fault filters dropped so far, all nodes together."""
        total = 0
        for name in self.nodes:
            out = _run("tc", "-n", self.ns[name], "-s", "qdisc", "show", "dev", "eth0", check=False).stdout
            m = re.search(r"qdisc clsact .*?\(dropped (\d+)", out, re.S)
            total += int(m.group(1)) if m else 0
        return total

    def close(self) -> None:
        """Kill every process left in our namespaces and delete the namespaces (bridge and veths go with them)."""
        for line in self._lines.values():
            line.close()
        self._lines.clear()
        for ns in reversed(self.created):
            _kill_pids_in(ns)
        for ns in reversed(self.created):
            if _run("ip", "netns", "del", ns, check=False).returncode != 0:
                log.warning("could not delete namespace %s", ns)
        self.created.clear()
