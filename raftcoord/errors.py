"""The one exception hierarchy of raftcoord.

Every error a caller can see derives from :class:`RaftcoordError`. Each class
carries what the outer layers need to report it, so that ``server.py`` and
``cli.py`` only translate and never decide:

* ``http_status``: the status the client endpoint answers with;
* ``exit_code``: the CLI's exit code (2 for a usage or input mistake, as click
  does, 3 when a write may or may not have been applied, 1 for anything else);
* ``code``: a short stable name that travels in JSON error bodies and in the
  state machine's error results, so a replica can rebuild the same exception
  from a result without pickling anything.

Errors are split by who is at fault, as h11 does: the caller's input
(:class:`InvalidInputError` and its children), the cluster's state
(:class:`UnavailableError`, :class:`ConflictError`, ...), or a bug in
raftcoord (any other exception).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthError",
    "ClockOverflowError",
    "CommandError",
    "CompactedError",
    "ConfigError",
    "ConflictError",
    "DecodeError",
    "DuplicateRequestError",
    "InvalidInputError",
    "KeyFormatError",
    "KeyNotFoundError",
    "LimitExceededError",
    "NewerFormatError",
    "NotLeaderError",
    "RaftcoordError",
    "ReplicaFailedError",
    "RequestTooLargeError",
    "ReservedKeyError",
    "SessionExpiredError",
    "TimeoutError",
    "UnavailableError",
    "UnknownOutcomeError",
    "ValueFormatError",
    "error_from_code",
]


class RaftcoordError(Exception):
    """Base of every error raftcoord raises on purpose."""

    http_status: int = 500
    exit_code: int = 1
    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The name of the input field, setting or record part that was wrong.
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON- and CBOR-friendly mapping."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class InvalidInputError(RaftcoordError):
    """Bad input from a file, a peer, a client or the command line."""

    http_status = 400
    exit_code = 2
    code = "invalid_input"


class DecodeError(InvalidInputError, ValueError):
    """Bytes that do not decode to a valid record; ``field`` names the part."""

    code = "decode"


class KeyFormatError(DecodeError):
    """A coordinator key (header, node key, message key) is malformed."""

    code = "key_format"


class ValueFormatError(DecodeError):
    """A CBOR value (node state, message, command, snapshot) is malformed."""

    code = "value_format"


class NewerFormatError(ValueFormatError):
    """Bytes of a newer format than this node knows (a log entry, a snapshot): upgrade the node.

    The message names the format met, the formats this node knows, and says to
    upgrade. A replica that meets such a log entry stops applying (fail-stop)
    rather than guess at it or acknowledge it (issue 10, ``formats.py``).
    """

    code = "newer_format"


class CommandError(InvalidInputError):
    """The state machine refused a command; the state did not change."""

    code = "command"


class ReservedKeyError(CommandError):
    """A raw write touched a key under a header the coordinator owns."""

    code = "reserved_key"


class LimitExceededError(InvalidInputError):
    """A request passed one of the limits a client can reach (ops per txn,
    response size, ...); the message names the limit and its setting."""

    code = "limit_exceeded"


class RequestTooLargeError(LimitExceededError):
    """A request body or command is larger than the configured limit."""

    http_status = 413
    code = "request_too_large"


class ConfigError(InvalidInputError):
    """A configuration file or option is wrong; the message names the setting."""

    code = "config"


class ClockOverflowError(RaftcoordError, OverflowError):
    """A Lamport clock would pass 2**64-1; clocks never wrap silently."""

    code = "clock_overflow"


class KeyNotFoundError(RaftcoordError, KeyError):
    """The key does not exist."""

    http_status = 404
    code = "key_not_found"

    def __str__(self) -> str:  # KeyError would repr() the message otherwise.
        return self.message


class MemberNotFoundError(RaftcoordError):
    """No member of the cluster has that name."""

    http_status = 404
    code = "member_not_found"


class ConflictError(RaftcoordError):
    """A transaction's reads changed before it committed; retry it."""

    http_status = 409
    code = "conflict"


class CompactedError(RaftcoordError):
    """The requested clock or revision is older than what is still kept.

    ``oldest_clock`` is the clock of the oldest message still kept (a reader
    of messages may resume from just below it); ``compact_revision`` is the
    oldest revision a watch may still start from. Either is None when it
    does not apply.
    """

    http_status = 410
    code = "compacted"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        oldest_clock: int | None = None,
        compact_revision: int | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.oldest_clock = oldest_clock
        self.compact_revision = compact_revision

    def to_dict(self) -> dict[str, Any]:
        """The error as a mapping, with the oldest clock or revision kept."""
        out = super().to_dict()
        if self.oldest_clock is not None:
            out["oldest_clock"] = self.oldest_clock
        if self.compact_revision is not None:
            out["compact_revision"] = self.compact_revision
        return out


class DuplicateRequestError(RaftcoordError):
    """A request id was seen before and its result is no longer kept."""

    http_status = 409
    code = "duplicate_request"


class SessionExpiredError(RaftcoordError):
    """The client session named in a request id is not (or no longer) known.

    The state machine forgets sessions it cannot keep; a request of a
    forgotten session is refused rather than applied a second time. Whether
    an earlier attempt of it applied is unknown to the caller.
    """

    http_status = 409
    code = "session_expired"


class AuthError(RaftcoordError):
    """Missing or wrong credentials."""

    http_status = 401
    code = "auth"


class UnavailableError(RaftcoordError):
    """The cluster cannot serve the request now (no leader, no quorum, stopped)."""

    http_status = 503
    code = "unavailable"


class ReplicaFailedError(UnavailableError):
    """This replica stopped applying the log (fail-stop) and serves nothing."""

    code = "replica_failed"


class NotLeaderError(UnavailableError):
    """This node is not the leader and cannot forward the request."""

    code = "not_leader"


class TimeoutError(UnavailableError):  # noqa: A001 - deliberately ours
    """The request was not answered in time and certainly did not apply."""

    http_status = 504
    code = "timeout"


class UnknownOutcomeError(TimeoutError):
    """The request may or may not have been applied; retrying may be unsafe."""

    #: The CLI's own exit code, so scripts can tell "maybe applied" from "failed".
    exit_code = 3
    code = "unknown_outcome"


def _all_subclasses(cls: type[RaftcoordError]) -> list[type[RaftcoordError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[RaftcoordError]] = {c.code: c for c in _all_subclasses(RaftcoordError)}


def error_from_code(
    code: str, message: str, field: str | None = None, details: Mapping[str, Any] | None = None
) -> RaftcoordError:
    """Rebuild an error from its ``code``, as carried in results and JSON bodies.

    ``details`` is the whole error mapping (what :meth:`RaftcoordError.to_dict`
    gave); the fields a class carries beyond the message are taken from it.
    """
    cls = _BY_CODE.get(code, RaftcoordError)
    if cls is CompactedError and details is not None:
        extra = {k: details[k] for k in ("oldest_clock", "compact_revision")
                 if isinstance(details.get(k), int) and not isinstance(details.get(k), bool)}
        return CompactedError(message, field=field, **extra)
    return cls(message, field=field)
