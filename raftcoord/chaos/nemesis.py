"""Faults for the chaos cluster, each a small class with ``inject`` and ``heal``.

A fault is made with no arguments (the runner builds them from
:func:`faults_for`), injects itself into a :class:`~raftcoord.chaos.cluster.ChaosCluster`
with a seeded ``random.Random`` and returns a one-line description, and
heals exactly what it did. ``unsupported(cluster)`` says why the cluster's
network cannot make it (None when it can); ``inject`` then raises
:class:`~raftcoord.chaos.cluster.NetworkUnsupportedError` rather than do
nothing, so that a run reports the fault as unsupported, never as survived.
Network faults compose: a partition leaves a delay or loss in place and the
other way round.

A fault that the cluster's state of the moment refuses (a member change
without a leader or a majority) sets ``skipped`` and says "skipped" in its
description: the runner counts it apart, and its heal does nothing.
"""

from __future__ import annotations

import random
from typing import ClassVar, Protocol, runtime_checkable

from raftcoord.chaos.cluster import ChaosCluster, MemberChangeRefusedError, NetworkUnsupportedError

__all__ = [
    "DelayFault", "DropFault", "Fault", "KillFault", "KillLeaderFault", "KillMajorityFault", "MemberFault",
    "PartitionFault", "PauseFault", "FAULTS", "faults_for",
]


@runtime_checkable
class Fault(Protocol):
    """What the runner needs of a fault."""

    kind: str

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        """Make the fault; a one-line description of what was done."""
        ...

    def heal(self, cluster: ChaosCluster) -> None:
        """Undo it."""
        ...


class _Base:
    kind: ClassVar[str] = ""

    def unsupported(self, cluster: ChaosCluster) -> str | None:
        """Why ``cluster`` cannot have this fault, or None."""
        return None

    def _check(self, cluster: ChaosCluster) -> None:
        why = self.unsupported(cluster)
        if why:
            raise NetworkUnsupportedError(f"{self.kind}: {why}")


def _members(cluster: ChaosCluster) -> list[str]:
    # A node a member fault removed (and could not add back yet) is no one's victim.
    removed = getattr(cluster, "removed", set())
    return [n for n in cluster.names if n not in removed] or list(cluster.names)


def _leader_or_any(cluster: ChaosCluster, rng: random.Random) -> str:
    leader = cluster.leader()
    return leader if leader is not None else rng.choice([n for n in _members(cluster) if cluster.alive(n)]
                                                        or _members(cluster))


class KillFault(_Base):
    """SIGKILL one random node; heal restarts it."""

    kind: ClassVar[str] = "kill"

    def __init__(self) -> None:
        self.victims: list[str] = []

    def _pick(self, cluster: ChaosCluster, rng: random.Random) -> list[str]:
        return [rng.choice(_members(cluster))]

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self.victims = self._pick(cluster, rng)
        for name in self.victims:
            cluster.kill(name)
        return f"{self.kind}: SIGKILL {', '.join(self.victims)}"

    def heal(self, cluster: ChaosCluster) -> None:
        for name in self.victims:
            if not cluster.alive(name):
                cluster.restart(name)
        self.victims = []


class KillLeaderFault(KillFault):
    """SIGKILL the leader (a random node when none is known); heal restarts it."""

    kind: ClassVar[str] = "kill-leader"

    def _pick(self, cluster: ChaosCluster, rng: random.Random) -> list[str]:
        return [_leader_or_any(cluster, rng)]


class KillMajorityFault(KillFault):
    """SIGKILL a random majority at once; heal restarts them all."""

    kind: ClassVar[str] = "kill-majority"

    def _pick(self, cluster: ChaosCluster, rng: random.Random) -> list[str]:
        members = _members(cluster)
        return sorted(rng.sample(members, len(members) // 2 + 1))


class PauseFault(_Base):
    """SIGSTOP one node (the leader half of the time); heal sends SIGCONT."""

    kind: ClassVar[str] = "pause"

    def __init__(self) -> None:
        self.victim: str | None = None

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self.victim = _leader_or_any(cluster, rng) if rng.random() < 0.5 else rng.choice(_members(cluster))
        cluster.pause(self.victim)
        return f"pause: SIGSTOP {self.victim}"

    def heal(self, cluster: ChaosCluster) -> None:
        if self.victim is not None:
            cluster.resume(self.victim)
            self.victim = None


class PartitionFault(_Base):
    """A silent network partition: isolate the leader, majority/minority, or a bridge (5+ nodes).

    ``shape`` fixes the partition ("isolate-leader", "majority-minority",
    "bridge"); None (the default) draws one of those the cluster size allows.
    """

    kind: ClassVar[str] = "partition"
    shapes: ClassVar[tuple[str, ...]] = ("isolate-leader", "majority-minority", "bridge")

    def __init__(self, shape: str | None = None) -> None:
        if shape is not None and shape not in self.shapes:
            raise ValueError(f"unknown partition shape {shape!r} (known: {', '.join(self.shapes)})")
        self.shape = shape
        self.groups: list[list[str]] = []
        self._before: set[frozenset[str]] = set()

    def unsupported(self, cluster: ChaosCluster) -> str | None:
        if self.shape == "bridge" and len(cluster.names) < 5:
            return "a bridge partition needs at least 5 nodes"
        return cluster.network_unsupported(cut=True)

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self._check(cluster)
        shape = self.shape or rng.choice([s for s in self.shapes if s != "bridge" or len(cluster.names) >= 5])
        names = list(cluster.names)
        if shape == "isolate-leader":
            leader = _leader_or_any(cluster, rng)
            self.groups = [[leader], [n for n in names if n != leader]]
            what = f"isolate leader {leader}"
        elif shape == "majority-minority":
            minority = sorted(rng.sample(names, len(names) // 2))
            self.groups = [minority, [n for n in names if n not in minority]]
            what = f"minority {minority} | majority {self.groups[1]}"
        else:
            rng.shuffle(names)
            bridge, rest = names[0], names[1:]
            half = len(rest) // 2
            self.groups = [sorted(rest[:half]), sorted(rest[half:])]
            what = f"bridge {bridge}: {self.groups[0]} cut from {self.groups[1]}, both reach {bridge}"
        self._before = cluster.blocked
        cut = {frozenset((a, b)) for a in self.groups[0] for b in self.groups[1]}
        cluster.set_network(self._before | cut, loss=cluster.loss, delay=cluster.delay)
        return f"partition ({shape}): {what}"

    def heal(self, cluster: ChaosCluster) -> None:
        cluster.set_network(self._before, loss=cluster.loss, delay=cluster.delay)
        self.groups = []


class DelayFault(_Base):
    """Delay all node-to-node traffic by 50-250 ms."""

    kind: ClassVar[str] = "delay"

    def unsupported(self, cluster: ChaosCluster) -> str | None:
        return cluster.network_unsupported(delay=True)

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self._check(cluster)
        delay = round(rng.uniform(0.05, 0.25), 3)
        cluster.set_network(cluster.blocked, loss=cluster.loss, delay=delay)
        return f"delay: {delay * 1000:.0f} ms on every node link"

    def heal(self, cluster: ChaosCluster) -> None:
        cluster.set_network(cluster.blocked, loss=cluster.loss, delay=0.0)


class DropFault(_Base):
    """Drop a random 10-40 % of node-to-node packets."""

    kind: ClassVar[str] = "drop"

    def unsupported(self, cluster: ChaosCluster) -> str | None:
        return cluster.network_unsupported(loss=True)

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self._check(cluster)
        loss = round(rng.uniform(0.1, 0.4), 2)
        cluster.set_network(cluster.blocked, loss=loss, delay=cluster.delay)
        return f"drop: {loss:.0%} of node-to-node packets"

    def heal(self, cluster: ChaosCluster) -> None:
        cluster.set_network(cluster.blocked, loss=0.0, delay=cluster.delay)


class MemberFault(_Base):
    """Remove a voter through the cluster's API (the leader a third of the time); heal adds it back.

    Inject: ``POST /raftcoord/v1/members {"action": "remove"}`` to a running
    member (retried while the cluster has no leader or majority), wait for
    the removed node to stop by itself (it is SIGKILLed after
    :data:`STOP_TIMEOUT` seconds, and the description says so: a finding),
    then delete its data directory. Heal: add it back as a voter with the
    same name and addresses, start it with ``--join`` on its empty data
    directory, and wait until it is healthy, so the cluster ends with all
    its original voters. A removal the cluster refused until
    :data:`REFUSED_TIMEOUT` is a skipped fault, not a failure.

    ``target`` fixes the victim's role: "leader", "follower", or None (the
    default: the leader a third of the time, which exercises the hand-over).
    """

    kind: ClassVar[str] = "member"
    targets: ClassVar[tuple[str, ...]] = ("leader", "follower")
    #: Seconds a removed node has to stop by itself.
    STOP_TIMEOUT: ClassVar[float] = 20.0
    #: Seconds a removal may be refused (no leader, no majority) before the fault is skipped.
    REFUSED_TIMEOUT: ClassVar[float] = 20.0
    #: Seconds the heal has to add the node back and see it healthy.
    HEAL_TIMEOUT: ClassVar[float] = 90.0

    def __init__(self, target: str | None = None) -> None:
        if target is not None and target not in self.targets:
            raise ValueError(f"unknown member fault target {target!r} (known: {', '.join(self.targets)})")
        self.target = target
        self.victim: str | None = None
        self.skipped = False
        #: What the removal showed that it should not have (a node that did not stop by itself), or None.
        self.finding: str | None = None

    def unsupported(self, cluster: ChaosCluster) -> str | None:
        if len(cluster.names) < 2:
            return "removing a voter needs at least 2 nodes (the last voter cannot be removed)"
        return None

    def _pick(self, cluster: ChaosCluster, rng: random.Random) -> tuple[str, str]:
        members = _members(cluster)
        leader = cluster.leader()
        wants_leader = self.target == "leader" or (self.target is None and rng.random() < 1 / 3)
        if wants_leader and leader is not None:
            return leader, "the leader"
        followers = [n for n in members if n != leader]
        return rng.choice(followers or members), "a follower" if leader is not None else "no leader known"

    def inject(self, cluster: ChaosCluster, rng: random.Random) -> str:
        self._check(cluster)
        self.skipped, self.finding = False, None
        victim, role = self._pick(cluster, rng)
        try:
            by_itself, took = cluster.remove_member(victim, timeout=self.REFUSED_TIMEOUT,
                                                    stop_timeout=self.STOP_TIMEOUT)
        except MemberChangeRefusedError as exc:
            self.skipped, self.victim = True, None
            return f"member: skipped: the cluster refused to remove {victim} for {self.REFUSED_TIMEOUT:g} s ({exc})"
        self.victim = victim
        if by_itself:
            how = f"it stopped by itself {took:.1f} s after the change"
        else:
            self.finding = f"{victim} did not stop by itself within {self.STOP_TIMEOUT:g} s of its removal"
            how = f"FINDING: {self.finding}, SIGKILLed"
        return f"member: removed {victim} ({role}); {how}; its data directory deleted"

    def heal(self, cluster: ChaosCluster) -> None:
        if self.victim is not None:
            cluster.rejoin(self.victim, timeout=self.HEAL_TIMEOUT)
            self.victim = None


#: Every fault kind by name.
FAULTS: dict[str, type[_Base]] = {
    cls.kind: cls for cls in (KillFault, KillLeaderFault, KillMajorityFault, PauseFault, PartitionFault,
                              DelayFault, DropFault, MemberFault)
}


def faults_for(kinds: str | list[str]) -> list[type]:
    """The fault classes for ``"kill,pause,partition"`` (or a list of kinds); ValueError naming unknown ones."""
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    wanted = [k.strip() for k in kinds if k.strip()]
    unknown = [k for k in wanted if k not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    return [FAULTS[k] for k in dict.fromkeys(wanted)]
