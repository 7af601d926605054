"""raftcoord: a Raft-replicated coordinator service for PuzzleDB nodes.

The names a PuzzleDB node needs are exported here; everything else is in the
modules named by their layer (see DESIGN.md).
"""

from raftcoord.coordinator import Coordinator, MemoryBackend, Observer, Transaction
from raftcoord.errors import (
    CompactedError,
    ConflictError,
    KeyNotFoundError,
    LimitExceededError,
    RaftcoordError,
    UnavailableError,
    UnknownOutcomeError,
)
from raftcoord.store import KeyValue
from raftcoord.values import Event, Message, MessageType, NodeState, NodeStatus

__version__ = "0.1.0"

__all__ = [
    "CompactedError",
    "ConflictError",
    "Coordinator",
    "Event",
    "KeyNotFoundError",
    "KeyValue",
    "LimitExceededError",
    "MemoryBackend",
    "Message",
    "MessageType",
    "NodeState",
    "NodeStatus",
    "Observer",
    "RaftcoordError",
    "Transaction",
    "UnavailableError",
    "UnknownOutcomeError",
    "__version__",
]
