"""What the state machine hands out: key-values, range results, events.

Plain frozen values with no behaviour beyond conversion to etcd-shaped maps,
kept apart from ``store.py`` so the state machine holds only state changes.
Like the store, this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raftcoord.values import Message, NodeState

__all__ = [
    "Applied",
    "Change",
    "Event",
    "KeyDeleted",
    "KeyEvent",
    "KeyPut",
    "KeyValue",
    "MessagePosted",
    "NodeStateSet",
    "RangeResult",
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key with its value and etcd-style revisions."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    def to_map(self, *, keys_only: bool = False) -> dict[str, Any]:
        """The key-value in etcd's field names."""
        out: dict[str, Any] = {
            "key": self.key,
            "create_revision": self.create_revision,
            "mod_revision": self.mod_revision,
            "version": self.version,
        }
        if not keys_only:
            out["value"] = self.value
        return out


@dataclass(frozen=True, slots=True)
class RangeResult:
    """The answer to a range read."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool

    def to_map(self, *, keys_only: bool = False, count_only: bool = False) -> dict[str, Any]:
        """The result in etcd's field names."""
        kvs = [] if count_only else [kv.to_map(keys_only=keys_only) for kv in self.kvs]
        return {"kvs": kvs, "count": self.count, "more": self.more}


@dataclass(frozen=True, slots=True)
class KeyPut:
    """A key was created or changed."""

    kv: KeyValue
    prev: KeyValue | None


@dataclass(frozen=True, slots=True)
class KeyDeleted:
    """A key was deleted at ``revision``."""

    key: bytes
    revision: int
    prev: KeyValue


@dataclass(frozen=True, slots=True)
class MessagePosted:
    """A message entered the message box with its clock assigned."""

    message: Message


@dataclass(frozen=True, slots=True)
class NodeStateSet:
    """A node's state record was written."""

    state: NodeState


Event = KeyPut | KeyDeleted | MessagePosted | NodeStateSet
#: The events that change keys: what the watch history keeps.
KeyEvent = KeyPut | KeyDeleted


@dataclass(frozen=True, slots=True)
class Change:
    """Every key change of one revision, in the order the command made them.

    What a watch replays: one revision is delivered whole or not at all
    (etcd's "atomic" guarantee). Reserved node and message keys are in it
    too; a watcher filters by its key range.
    """

    revision: int
    events: tuple[KeyEvent, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one command gave: its result and the events it caused."""

    result: dict[str, Any]
    events: tuple[Event, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the command was applied (not refused)."""
        return bool(self.result.get("ok"))
