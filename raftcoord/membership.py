"""Membership: who is in the cluster and who votes, changed one node at a time through the log.

The member registry (:attr:`raftcoord.store.Store.members`: name, raft and
client address, voter or not) is part of the replicated state, so every
node and every restart agree on it. It starts empty, and reads of an empty
registry answer the cluster file's nodes; the first member change seeds it
from the leader's cluster file (``seed`` changes nothing once the registry
holds anyone), and from then on only member changes move it: a node's own
cluster file never overrides it. Seeding waits for the first change rather
than for the first leader so that a rolling upgrade from a release without
a registry proposes no command the old nodes do not know.

A change of a voter travels in one Raft entry with pysyncobj's own change of
the Raft configuration (:meth:`raftcoord.replica.Replica.change_voters`), so
the registry and the configuration move together. pysyncobj takes a change
when its entry is appended (the Raft paper's single-server rule), refuses a
second one until the first committed, and refuses one before its leader's
first entry committed; a follower forwards it to the leader. A non-voter is
a pysyncobj read-only node, which any node with the secret may be, so adding
or removing one changes only the registry.

The upstream problems this works around (pysyncobj issues 51, 89 and 133):

* **Adding a voter to a one-node cluster** (51): the configuration changes on
  append, so the entry that adds the second voter needs that voter to
  commit. :meth:`Membership.add` therefore returns once the change is in the
  leader's log when the cluster would otherwise wait for the new node: the
  new node, started with ``--join``, commits it by catching up.
* **The new node's port** (89): a node joins only once it is a member
  (``--join`` asks the cluster first), and it binds the raft port it was
  added with, so no other process can be mistaken for it.
* **Removing the leader**: pysyncobj refuses a leader's removal of itself, so
  the leader first hands leadership over (Raft's TimeoutNow) and the new
  leader removes it.

Every change runs on the leader (:class:`raftcoord.endpoint` forwards a
request to it) so that its outcome is heard: a removed node is dropped from
the configuration before the entry that removes it commits, and would never
hear back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Final

from raftcoord.commands import Member, MemberChange
from raftcoord.errors import (
    ConflictError,
    InvalidInputError,
    MemberNotFoundError,
    NotLeaderError,
    RaftcoordError,
    UnavailableError,
    UnknownOutcomeError,
    error_from_code,
)
from raftcoord.values import NodeState, NodeStatus, encode_cbor

__all__ = ["MEMBER_CHANGE_TIMEOUT", "Membership", "seed_members"]

log = logging.getLogger(__name__)

#: Seconds a member change may take by default (a new voter may need a snapshot first).
MEMBER_CHANGE_TIMEOUT: Final = 30.0
#: Seconds to wait for a one-node cluster's second voter to commit its own addition.
_APPENDED_WAIT: Final = 2.0
#: Seconds a voter change waits for enough voters to be connected before it is refused.
_STARTED_GRACE: Final = 3.0


def seed_members(nodes: Iterable[Any]) -> tuple[Member, ...]:
    """The registry a cluster file describes: its ``[[node]]`` entries, by name."""
    return tuple(sorted((Member(n.name, n.raft, n.client, bool(n.voter)) for n in nodes), key=lambda m: m.name))


class Membership:
    """The member registry of one node's coordinator, and the changes to it.

    ``coordinator`` is a :class:`raftcoord.coordinator.Coordinator` over a
    :class:`raftcoord.replica.Replica`; ``config`` the node's cluster file
    (its nodes seed an empty registry). Changes are made on the leader; a
    call on another node raises :class:`NotLeaderError` naming the leader.
    """

    def __init__(self, coordinator: Any, config: Any) -> None:
        self.coordinator = coordinator
        self.config = config
        self._lock = threading.Lock()  # one change at a time from this node

    # ----------------------------------------------------------------- reads

    def members(self, *, consistency: str = "linearizable") -> tuple[Member, ...]:
        """The registry; the cluster file's nodes while it was never seeded."""
        members = self.coordinator.read(lambda store: store.members, consistency=consistency)
        return members or seed_members(getattr(self.config, "nodes", ()))

    def leader(self) -> Member | None:
        """The member this node believes leads, or None."""
        addr = self.coordinator.status().get("leader")
        return next((m for m in self.members(consistency="serializable") if m.raft == addr), None)

    # ---------------------------------------------------------------- seeding

    def seed_if_empty(self, timeout: float = 5.0) -> bool:
        """On the leader, before a change: fill an empty registry from the cluster file; True if this call did."""
        if self.coordinator.read(lambda store: bool(store.members), consistency="serializable"):
            return False
        nodes = getattr(self.config, "nodes", ())
        if not nodes:
            return False
        cmd = MemberChange(action="seed", members=seed_members(nodes))
        result = self.coordinator.execute(cmd.to_map(), timeout=timeout)
        if result.get("seeded"):
            log.info("member registry seeded from the cluster file: %s",
                     ", ".join(f"{m.name}{'' if m.voter else ' (non-voter)'}" for m in cmd.members))
        return bool(result.get("seeded"))

    # ---------------------------------------------------------------- changes

    def add(self, member: Member, *, timeout: float = MEMBER_CHANGE_TIMEOUT) -> dict[str, Any]:
        """Add ``member``; a voter joins the Raft configuration in the same entry."""
        with self._lock:
            current = self._leader_members(timeout)
            for m in current:
                if m.name == member.name:
                    raise ConflictError(f"member {member.name!r} already exists", field="name")
                for field_name in ("raft", "client"):
                    if getattr(m, field_name) == getattr(member, field_name):
                        raise ConflictError(f"member {m.name!r} already uses the {field_name} address "
                                            f"{getattr(member, field_name)}", field=field_name)
            cmd = MemberChange(action="add", members=(member,))
            if not member.voter:
                result = self.coordinator.execute(cmd.to_map(), timeout=timeout)
            else:
                voters = sum(m.voter for m in current)
                self._check_started(current, add=member, started=False)
                result = self._change_voter("add", member, cmd, timeout, quorum_waits=voters == 1)
            log.info("member %s added (%s, raft %s, client %s)", member.name,
                     "voter" if member.voter else "non-voter", member.raft, member.client)
            return result

    def promote(self, name: str, *, timeout: float = MEMBER_CHANGE_TIMEOUT) -> dict[str, Any]:
        """Make the non-voter ``name`` a voter (it restarts its replica as one)."""
        with self._lock:
            member = self._find(name, self._leader_members(timeout))
            if member.voter:
                raise ConflictError(f"member {name!r} is already a voter", field="name")
            self._check_caught_up(member)
            self._check_started(self.members(consistency="serializable"), add=member, started=True)
            cmd = MemberChange(action="promote", name=name)
            voters = sum(m.voter for m in self.members(consistency="serializable"))
            result = self._change_voter("add", member, cmd, timeout, quorum_waits=voters == 1)
            log.info("member %s promoted to voter", name)
            return result

    def remove(self, name: str, *, timeout: float = MEMBER_CHANGE_TIMEOUT) -> dict[str, Any]:
        """Remove ``name``; a voter leaves the Raft configuration in the same entry.

        The leader cannot remove itself: call :meth:`hand_over` first (the
        endpoint does) and make the change on the new leader.
        """
        with self._lock:
            current = self._leader_members(timeout)
            member = self._find(name, current)
            cmd = MemberChange(action="remove", name=name)
            if not member.voter:
                result = self.coordinator.execute(cmd.to_map(), timeout=timeout)
            else:
                if sum(m.voter for m in current) == 1:
                    raise ConflictError(f"member {name!r} is the last voter", field="name")
                if member.raft == self.coordinator.status().get("self"):
                    raise NotLeaderError(f"member {name!r} leads: hand leadership over before removing it",
                                         field="name")
                self._check_started(current, remove=member)
                result = self._change_voter("rem", member, cmd, timeout)
            log.info("member %s removed", name)
            self._mark_removed(member)
            return result

    def _mark_removed(self, member: Member) -> None:
        """Best effort: the removed node's state record says ``removed``.

        Written even when the node never wrote a record (removed right after
        it started), and only over the record read here: a removed node can
        no longer commit a record of its own.
        """
        def read(store: Any) -> tuple[NodeState | None, int]:
            state = store.node_state(member.name)
            kv = store.get(state.key) if state is not None else None
            return state, (kv.mod_revision if kv is not None else 0)

        now = datetime.now(timezone.utc)
        try:
            state, revision = self.coordinator.read(read, consistency="linearizable")
            if state is None:
                new = NodeState(host=member.name, status=NodeStatus.REMOVED, clock=0, timestamp=now,
                                addr=member.raft, cluster=str(getattr(self.coordinator, "cluster", "") or ""))
            else:
                new = replace(state, status=NodeStatus.REMOVED, timestamp=now)
            self.coordinator.execute({"op": "node", "state": new.to_map(), "expect_revision": revision}, timeout=5.0)
        except RaftcoordError as exc:
            log.info("could not record node %s as removed: %s", member.name, exc.message)

    def hand_over(self, timeout: float = 10.0) -> str | None:
        """On the leader: hand leadership to another voter; the new leader's raft address."""
        new = self.coordinator.backend.transfer_leadership(timeout)
        if new is not None:
            log.info("handed leadership over to %s", new)
        return new

    # --------------------------------------------------------------- helpers

    def _leader_members(self, timeout: float) -> tuple[Member, ...]:
        status = self.coordinator.status()
        if status.get("role") != "leader":
            raise NotLeaderError("member changes are made on the leader", field="leader")
        if not self.coordinator.read(lambda store: bool(store.members), consistency="linearizable"):
            self.seed_if_empty(timeout)
        return self.members(consistency="linearizable")

    @staticmethod
    def _find(name: str, members: Iterable[Member]) -> Member:
        for m in members:
            if m.name == name:
                return m
        raise MemberNotFoundError(f"no member named {name!r}", field="name")

    def _check_started(self, members: Iterable[Member], *, add: Member | None = None, started: bool = False,
                       remove: Member | None = None) -> None:
        """Refuse a voter change after which the running voters would not be a majority.

        pysyncobj takes a change as it is appended: removing a running voter
        while another is down left {leader, the down one}, which commits
        nothing, so the change itself never committed and the cluster stood
        still until the down node came back (found by the fault suite's
        member fault). etcd's strict reconfiguration check, with its one
        exception: a one-node cluster may add its second voter (the new node
        commits its own addition).
        """
        voters = [m for m in members if m.voter]
        if add is not None and len(voters) == 1 and not started:
            return  # 1 -> 2: allowed, as etcd allows it
        after = [m for m in voters if remove is None or m.name != remove.name]
        total = len(after) + (1 if add is not None else 0)
        deadline = time.monotonic() + _STARTED_GRACE
        while True:
            # Connected to the leader: a new leader has heard from a follower
            # only since it won, so how long ago says little yet; and right
            # after a leader change a connection may still be coming up.
            status = self.coordinator.status()
            partners = status.get("partners") or {}
            up = [m for m in after if m.raft == status.get("self") or partners.get(m.raft)]
            if add is not None and started:
                up.append(add)
            if len(up) >= total // 2 + 1:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        down = [m.name for m in after if m not in up]
        what = f"adding {add.name}" if add is not None else f"removing {remove.name}" if remove is not None else "it"
        raise UnavailableError(f"{what} would leave {len(up)} running of {total} voters, not a majority; "
                               f"bring {', '.join(down) or 'the missing voters'} back first", field="name")

    def _check_caught_up(self, member: Member) -> None:
        heard = (self.coordinator.status().get("peers") or {}).get(member.raft)
        if heard is None:
            raise UnavailableError(f"non-voter {member.name!r} has not connected to this leader: start it "
                                   "and let it catch up before promoting it", field="name")

    def _change_voter(self, kind: str, member: Member, cmd: MemberChange, timeout: float, *,
                      quorum_waits: bool = False) -> dict[str, Any]:
        backend = self.coordinator.backend
        if not hasattr(backend, "change_voters"):
            raise InvalidInputError("this backend has no Raft configuration to change", field="backend")
        data = encode_cbor(cmd.to_map())
        # With one voter the entry that adds a second needs that second voter
        # to commit (pysyncobj issue 51): it is in the log, and the new node
        # commits it as it joins.
        wait = _APPENDED_WAIT if quorum_waits else timeout
        refused_until = time.monotonic() + min(timeout, 10.0)
        while True:
            try:
                result = backend.change_voters(kind, member.raft, data, wait)
                break
            except ConflictError:
                # pysyncobj refuses while a previous change or a new leader's
                # first entry is uncommitted: both pass within moments.
                if time.monotonic() > refused_until:
                    raise
                time.sleep(0.2)
            except UnknownOutcomeError:
                if quorum_waits and member.raft in self.coordinator.status().get("voters", ()):
                    return {"ok": True, "pending": True, "member": member.to_map(),
                            "note": "in the leader's log; it commits once the new node runs (start it with --join)"}
                return self._settle(kind, member, timeout)
        if not result.get("ok", True):
            err = result.get("error") or {}
            raise error_from_code(err.get("code", "internal"), err.get("message", "member change refused"),
                                  err.get("field"))
        return dict(result)

    def _settle(self, kind: str, member: Member, timeout: float) -> dict[str, Any]:
        """After an unknown outcome: read the registry until it tells whether the change applied."""
        deadline = time.monotonic() + min(timeout, 10.0)
        while time.monotonic() < deadline:
            try:
                names = {m.name: m for m in self.members(consistency="linearizable")}
            except UnavailableError:
                time.sleep(0.2)
                continue
            now = names.get(member.name)
            if kind == "rem" and now is None:
                return {"ok": True, "member": member.to_map()}
            if kind == "add" and now is not None and now.voter:
                return {"ok": True, "member": now.to_map()}
            time.sleep(0.2)
        raise UnknownOutcomeError(f"the change of member {member.name!r} may or may not have applied: "
                                  "list the members to see", field="name")
