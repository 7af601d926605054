"""Issue 10, item 4: log entries and snapshots carry a format version; a node stops on a newer one.

A replica that meets a log entry of a format newer than it knows must stop
applying (fail-stop, role "failed", a CRITICAL line that says to upgrade)
rather than guess at the bytes or acknowledge them; the nodes that know the
format go on. A snapshot of a newer format is refused with a message that
says it is newer and to upgrade, not "unsupported". The "newer" replicas
here are a subclass that knows entry format 2 (a version frame around a
format-1 command), standing in for the next release.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pysyncobj.config import FAIL_REASON
from replica_support import free_port, put, wait_for
from test_replica import FAST, Cluster, cluster, leader_of, snap, value  # noqa: F401
from test_endpoint import api, coord  # noqa: F401

import raftcoord.store as store_module
from raftcoord import formats, raftfiles
from raftcoord.errors import InvalidInputError, NewerFormatError, ReplicaFailedError, ValueFormatError
from raftcoord.formats import BATCH_MAGIC, ENTRY_FORMAT, KNOWN_ENTRY_FORMATS, VERSION_MAGIC, check_entry
from raftcoord.proposals import decode_batch, encode_batch
from raftcoord.replica import Replica
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor

V2 = VERSION_MAGIC + b"\x02"


class NewerReplica(Replica):
    """A replica of a later release: it also knows entry format 2, a version frame around a format-1 command."""

    def _apply(self, entry: bytes) -> Any:
        if entry.startswith(V2):
            entry = entry[len(V2):]
        return super()._apply(entry)


# ------------------------------------------------------------ the registry


def test_issue10_plain_commands_and_batches_are_known() -> None:
    """Format 1 (a plain CBOR command, or a batch) passes the check; so does an empty entry."""
    assert ENTRY_FORMAT == 1 and KNOWN_ENTRY_FORMATS == {1}
    for entry in (put(b"k", b"v"), encode_batch([put(b"a", b"1"), put(b"b", b"2")]), BATCH_MAGIC, b"", b"\x00"):
        check_entry(entry)


def test_issue10_a_newer_entry_format_is_refused_with_what_to_do() -> None:
    """b"\\xffrcV" + 2 names format 2, the formats known, and says to upgrade this node."""
    with pytest.raises(NewerFormatError) as err:
        check_entry(V2 + put(b"k", b"v"))
    msg = err.value.message
    assert "format 2 is newer than this node knows (1)" in msg and "upgrade this node" in msg
    assert err.value.code == "newer_format" and isinstance(err.value, ValueFormatError)


@pytest.mark.parametrize("entry", [b"\xff", b"\xffrcX\x00", VERSION_MAGIC, VERSION_MAGIC + b"\x01" + put(b"k", b"v"),
                                   VERSION_MAGIC + b"\x00", b"\xff\xff\xff\xff"])
def test_issue10_unknown_framing_is_refused(entry: bytes) -> None:
    """An entry starting with 0xFF that is neither a batch nor a newer version frame stops the node too."""
    with pytest.raises(NewerFormatError) as err:
        check_entry(entry)
    assert "upgrade this node" in err.value.message


@given(st.binary(max_size=40))
def test_issue10_check_entry_passes_exactly_the_known_framings(entry: bytes) -> None:
    """Any bytes: passes iff a plain command (no 0xFF first) or a batch frame; else NewerFormatError."""
    known = not entry.startswith(b"\xff") or entry.startswith(BATCH_MAGIC)
    try:
        check_entry(entry)
    except NewerFormatError:
        assert not known
    else:
        assert known


def test_issue10_a_framed_command_inside_a_batch_is_refused() -> None:
    """A batch of this format holds no framed command; one that does was written by a later format."""
    batch = encode_batch([put(b"a", b"1"), V2 + put(b"b", b"2")])
    check_entry(batch)  # the entry's own framing is known...
    with pytest.raises(NewerFormatError, match="format 2 is newer"):
        decode_batch(batch)  # ...its second command is not
    assert decode_batch(batch + b"x") is None  # a batch that does not parse stays "not a batch"


def test_issue10_propose_refuses_any_framed_command(cluster: Cluster) -> None:
    """No proposer can forge a frame: a command beginning with 0xFF is refused before it reaches the log."""
    (r,) = cluster.start(1)
    for command in (V2 + put(b"k", b"v"), b"\xff", encode_batch([put(b"a", b"1")])):
        with pytest.raises(InvalidInputError, match="0xFF"):
            r.propose(command, 1)


def test_issue10_known_formats_names_every_part() -> None:
    """One place says what this node writes and reads: entries, store snapshots, snapshot files."""
    known = formats.known_formats()
    assert known["entry"] == {"writes": 1, "reads": [1]}
    assert known["snapshot"] == {"writes": store_module.SNAPSHOT_FORMAT,
                                 "reads": sorted(store_module._READABLE_FORMATS)}
    assert known["snapshot_file"] == {"writes": raftfiles.DUMP_VERSION, "reads": [raftfiles.DUMP_VERSION]}


def test_issue10_version_command_prints_the_formats() -> None:
    """`raftcoord version` says which formats this node writes and reads."""
    from raftcoord.cli import main

    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0, result.output
    assert f"log entry {ENTRY_FORMAT} (reads 1)" in result.output
    assert f"snapshot {store_module.SNAPSHOT_FORMAT}" in result.output


def test_issue10_node_status_carries_the_formats(api: Any) -> None:
    """GET /raftcoord/v1/status says which formats the answering node writes and reads."""
    out = api.ok("/raftcoord/v1/status")
    assert out["formats"] == formats.known_formats()
    assert out["formats"]["entry"] == {"writes": ENTRY_FORMAT, "reads": sorted(KNOWN_ENTRY_FORMATS)}


# ------------------------------------------------- a mixed-version cluster


def _submit_raw(r: Replica, entry: bytes) -> list[tuple[Any, int]]:
    """Hand ``entry`` to ``r``'s engine as it is (propose() refuses 0xFF); the answers land in the list."""
    answers: list[tuple[Any, int]] = []
    r._submit(entry, lambda res, err: answers.append((res, err)))
    return answers


def _mixed(cluster: Cluster) -> tuple[Replica, list[Replica]]:
    """One replica of this release and two of the next, with a leader."""
    addrs = cluster.addresses(3)
    old = cluster.replica(addrs[0], addrs)
    new = []
    for i, a in enumerate(addrs[1:], start=1):
        r = NewerReplica(a, [p for p in addrs if p != a], cluster.tmp / f"new{i}", password=None, settings=FAST)
        cluster.made.append(r)
        new.append(r)
    leader_of([old, *new])
    return old, new


def test_issue10_an_old_replica_stops_on_a_newer_entry_and_the_others_go_on(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """One replica knows only format 1, two know format 2: the old one fail-stops, unchanged; the others apply."""
    old, new = _mixed(cluster)
    proposer = new[0]
    assert proposer.propose(put(b"before", b"1"), 5)["ok"]
    wait_for(lambda: value(old, b"before") == b"1", 5, "the old replica to apply format-1 entries")
    old_state = snap(old)
    caplog.set_level(logging.CRITICAL, logger="raftcoord.replica")

    answers = _submit_raw(proposer, V2 + put(b"newer", b"2"))
    wait_for(lambda: value(proposer, b"newer") == b"2", 10, "the newer replicas to apply the format-2 entry")
    wait_for(lambda: old.status()["role"] == "failed", 10, "the old replica to stop")
    st_old = old.status()
    assert "format 2 is newer than this node knows (1)" in st_old["error"]
    assert "upgrade this node" in st_old["error"] and st_old["healthy"] is False
    assert answers == [] or answers[0][1] == FAIL_REASON.SUCCESS  # the newer proposer hears its own apply
    with pytest.raises(ReplicaFailedError):
        old.propose(put(b"x", b"y"), 1)
    # Its store is as it was before the entry: nothing guessed, nothing half-applied.
    assert old._store.snapshot() == old_state
    lines = [r for r in caplog.records if r.levelno == logging.CRITICAL and "format 2" in r.getMessage()]
    assert len(lines) == 1 and re.search(r"at log index \d+, log entry format 2 is newer", lines[0].getMessage())
    # The others go on without it (two of three still make a majority).
    leader_of(new, 10)
    assert new[1].propose(put(b"after", b"3"), 10)["ok"]
    wait_for(lambda: all(value(r, b"after") == b"3" for r in new), 10, "later writes on the newer replicas")


def test_issue10_the_old_proposer_of_a_newer_entry_never_hears_applied(cluster: Cluster) -> None:
    """An old node that forwarded a newer entry (and a write of its own beside it) hears no "applied" for it."""
    old, new = _mixed(cluster)
    assert old.propose(put(b"warm", b"up"), 5)["ok"]
    answers = _submit_raw(old, V2 + put(b"newer", b"2"))
    wait_for(lambda: old.status()["role"] == "failed", 10, "the old replica to stop")
    wait_for(lambda: all(value(r, b"newer") == b"2" for r in new), 10, "the newer replicas to apply it")
    assert all(err != FAIL_REASON.SUCCESS for _res, err in answers), answers
    assert old._store.get(b"newer") is None


def test_issue10_a_restarted_old_replica_stops_again_and_an_upgraded_one_catches_up(tmp_path: Path) -> None:
    """The entry stays in the journal: the old code stops on it at every start; the newer code applies it."""
    addr = f"127.0.0.1:{free_port()}"
    with NewerReplica(addr, [], tmp_path, password=None, settings=FAST) as r:
        wait_for(lambda: r.status()["role"] == "leader", 5, "leadership")
        assert r.propose(put(b"a", b"1"), 5)["ok"]
        answers = _submit_raw(r, V2 + put(b"b", b"2"))
        wait_for(lambda: answers, 5, "the format-2 entry applied")
        assert r.propose(put(b"c", b"3"), 5)["ok"]
    with Replica(addr, [], tmp_path, password=None, settings=FAST) as r:
        wait_for(lambda: r.status()["role"] == "failed", 10, "the old code to stop at the entry")
        assert "format 2 is newer" in r.status()["error"]
        assert r._store.get(b"a") is not None and r._store.get(b"b") is None and r._store.get(b"c") is None
    with NewerReplica(addr, [], tmp_path, password=None, settings=FAST) as r:
        wait_for(lambda: r._store.get(b"c") is not None, 10, "the upgraded node to apply the rest")
        assert r._store.get(b"b").value == b"2"


# ----------------------------------------------------------------- snapshots


def _newer_snapshot() -> bytes:
    snap_map = decode_cbor(Store().snapshot())
    snap_map["format"] = max(store_module._READABLE_FORMATS) + 1
    return encode_cbor(snap_map)


def _newer_message() -> str:
    readable = store_module._READABLE_FORMATS
    return (f"snapshot format {max(readable) + 1} is newer than this node knows "
            f"({min(readable)}-{max(readable)}): upgrade raftcoord")


def test_issue10_a_newer_store_snapshot_says_newer_not_unsupported() -> None:
    """Store.restore of a newer format names it, the formats known, and says to upgrade."""
    with pytest.raises(ValueFormatError) as err:
        Store.restore(_newer_snapshot())
    assert _newer_message() in err.value.message and "unsupported" not in err.value.message


def test_issue10_a_newer_snapshot_file_version_says_newer() -> None:
    """decode_dump of a newer file version raises NewerFormatError naming both versions."""
    raw = decode_cbor(raftfiles.encode_dump(raftfiles.Dump((b"", 1, 1), (b"", 0, 0), (), Store().snapshot())))
    raw["version"] = raftfiles.DUMP_VERSION + 1
    with pytest.raises(NewerFormatError) as err:
        raftfiles.decode_dump(encode_cbor(raw))
    assert f"snapshot file version {raftfiles.DUMP_VERSION + 1} is newer than this node knows" in err.value.message
    raw["version"] = "x"
    with pytest.raises(ValueFormatError, match="unsupported snapshot file version"):
        raftfiles.decode_dump(encode_cbor(raw))


def test_issue10_a_replica_refuses_to_start_on_a_newer_snapshot(tmp_path: Path) -> None:
    """The startup load of a newer snapshot format stops the replica with the "newer ... upgrade" message."""
    dump = raftfiles.Dump((b"", 1, 1), (b"", 0, 0), (), _newer_snapshot())
    (tmp_path / "raft.snapshot").write_bytes(raftfiles.encode_dump(dump))
    with pytest.raises(ValueFormatError) as err:
        Replica(f"127.0.0.1:{free_port()}", [], tmp_path, password=None)
    assert _newer_message() in err.value.message
