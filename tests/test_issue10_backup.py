"""Issue 10, item 3: backup files, ``snapshot save|status|restore``, and a cluster restored from a backup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord.backup import (
    BACKUP_VERSION,
    MAGIC,
    BackupHeader,
    backup_status,
    capture,
    decode_backup,
    encode_backup,
    encode_backup_parts,
    read_backup,
    restore_data_dir,
)
from raftcoord.cli import main
from raftcoord.config import load_config
from raftcoord.errors import InvalidInputError, ValueFormatError
from raftcoord.keys import NODE_PREFIX
from raftcoord.raftfiles import Dump, decode_dump, encode_dump
from raftcoord.store import Store
from raftcoord.values import encode_cbor

UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CREATED = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
U = ord("U")


def _apply(store: Store, op: str, **fields: Any) -> dict[str, Any]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    applied = store.apply(encode_cbor({"op": op, **fields}))
    assert applied.ok, applied.result
    return applied.result


def sample_store(keys: int = 5, messages: int = 3) -> Store:
    """A store with user keys (one overwritten, one deleted), node states and messages."""
    store = Store()
    for i in range(keys):
        _apply(store, "put", key=f"k{i}".encode(), value=f"v{i}".encode())
    _apply(store, "put", key=b"k0", value=b"v0-again")
    _apply(store, "put", key=b"gone", value=b"x")
    _apply(store, "delete", key=b"gone")
    _apply(store, "put", key=b"M-user-key", value=b"a user key that starts with M")
    for host in ("n1", "n2"):
        _apply(store, "node", state={"host": host, "status": "up", "clock": 1, "timestamp": T0,
                                     "addr": f"127.0.0.1:{7000 + int(host[1])}", "cluster": "old"})
    for i in range(messages):
        _apply(store, "post", from_="n1", clock=i, type=U, timestamp=T0, event=ord("C"), payload={"i": i})
    return store


def sample_backup(store: Store | None = None) -> tuple[Store, bytes]:
    store = sample_store() if store is None else store
    header, image = capture(store, cluster="old", created=CREATED)
    return store, encode_backup(header, image.encode())


def with_checksum(body: bytes) -> bytes:
    """``body`` (every item before the checksum) with a correct checksum after it."""
    return body + b"\x58\x20" + hashlib.sha256(body).digest()


def cbor_bytes(data: bytes) -> bytes:
    return encode_cbor(data)


# ---------------------------------------------------------------- the format


def test_issue10_backup_round_trip() -> None:
    """A backup decodes to its header and the store's snapshot bytes, restoring the same store."""
    store, data = sample_backup()
    backup = decode_backup(data)
    h = backup.header
    assert (h.cluster, h.revision, h.clock, h.created) == ("old", store.revision, store.clock, CREATED)
    assert (h.keys, h.messages, h.nodes) == (len(store) - 5, 3, 2)
    assert h.keys == 6  # k0-k4 and the user key that starts with M
    assert backup.state == store.snapshot()
    assert backup.size == len(data)
    assert backup.sha256 == hashlib.sha256(data[:-34]).hexdigest()
    assert Store.restore(backup.state).snapshot() == store.snapshot()


def test_issue10_backup_layout_is_pinned() -> None:
    """Magic and version first, in fixed places; the file ends with a SHA-256 of everything before it."""
    _, data = sample_backup()
    assert MAGIC == b"\x70raftcoord-backup"
    assert data.startswith(MAGIC + b"\x01")
    assert data[-34:-32] == b"\x58\x20"
    assert data[-32:] == hashlib.sha256(data[:-34]).digest()
    assert BACKUP_VERSION == 1


def test_issue10_backup_parts_are_the_file_with_the_state_uncopied() -> None:
    """encode_backup_parts, written one after the other, is the file; the state is passed through as is."""
    store = sample_store()
    header, image = capture(store, cluster="old", created=CREATED)
    state = image.encode()
    parts = encode_backup_parts(header, state)
    assert b"".join(parts) == encode_backup(header, state)
    assert any(part is state for part in parts)


def test_issue10_backup_of_an_empty_store() -> None:
    """A backup of a store that never saw a command round-trips too."""
    _, data = sample_backup(Store())
    backup = decode_backup(data)
    assert (backup.header.revision, backup.header.keys, backup.header.messages) == (1, 0, 0)


def test_issue10_backup_every_flipped_byte_is_refused() -> None:
    """Whichever byte of a backup changes, and however, decoding refuses it."""
    _, data = sample_backup(sample_store(keys=2, messages=1))
    for at in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[at] ^= flip
            with pytest.raises(ValueFormatError):
                decode_backup(bytes(damaged))


def test_issue10_backup_truncated_anywhere_is_refused_as_truncated() -> None:
    """A file cut short at any point is refused, and the error says truncated (or empty)."""
    _, data = sample_backup(sample_store(keys=2, messages=1))
    for cut in range(len(data)):
        with pytest.raises(ValueFormatError) as err:
            decode_backup(data[:cut])
        assert "truncated" in err.value.message or (cut == 0 and "empty" in err.value.message), (cut, err.value)


def test_issue10_backup_trailing_garbage_is_refused() -> None:
    """Bytes after the checksum are named as trailing garbage, not silently ignored."""
    _, data = sample_backup()
    for extra in (b"\x00", b"x" * 100, data):
        with pytest.raises(ValueFormatError, match="trailing garbage") as err:
            decode_backup(data + extra)
        assert str(len(extra)) in err.value.message


def test_issue10_backup_checksum_mismatch_is_named() -> None:
    """A changed byte inside the state keeps the framing and fails the checksum, named as such."""
    store, data = sample_backup()
    at = data.index(store.snapshot()) + 10
    damaged = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]
    with pytest.raises(ValueFormatError, match="checksum mismatch") as err:
        decode_backup(damaged)
    assert err.value.field == "sha256"


def test_issue10_backup_wrong_magic_is_refused() -> None:
    """Text, JSON, a replica's raft.snapshot and an empty file are not backups, and the error says so."""
    store = sample_store()
    dump = encode_dump(Dump((b"\x01", 2, 0), (b"\x01", 1, 0), ("127.0.0.1:1",), store.snapshot()))
    for data in (b"hello, world", json.dumps({"format": "raftcoord-backup"}).encode(), dump,
                 encode_cbor("raftcoord-backuq") + b"\x01"):
        with pytest.raises(ValueFormatError, match="not a raftcoord backup file") as err:
            decode_backup(data)
        assert err.value.field == "format"
    with pytest.raises(ValueFormatError, match="raft.snapshot"):
        decode_backup(dump)
    with pytest.raises(ValueFormatError, match="empty"):
        decode_backup(b"")


def test_issue10_backup_of_a_newer_version_is_refused_as_newer() -> None:
    """A file of a newer format version says so and names the upgrade, whatever follows the version."""
    _, data = sample_backup()
    rest = data[len(MAGIC) + 1:-34]
    for version in (2, 24, 1000, 2**32):
        newer = with_checksum(MAGIC + encode_cbor(version) + rest)
        with pytest.raises(ValueFormatError, match=f"version {version} is newer") as err:
            decode_backup(newer)
        assert err.value.field == "version" and "upgrade" in err.value.message
    with pytest.raises(ValueFormatError, match="newer"):
        decode_backup(MAGIC + encode_cbor(7) + b"a layout this version cannot know")
    with pytest.raises(ValueFormatError, match="unsupported backup file format version 0"):
        decode_backup(with_checksum(MAGIC + encode_cbor(0) + rest))


def test_issue10_backup_malformed_header_is_refused_after_a_good_checksum() -> None:
    """A well-framed file whose header is not a valid header map is refused, naming the header."""
    state = sample_store().snapshot()
    for header in (encode_cbor([1, 2]), encode_cbor({"cluster": "c"}), b"\xff\xff",
                   encode_cbor({"cluster": "c", "revision": -1, "clock": 0, "created": CREATED, "keys": 0,
                                "messages": 0, "nodes": 0})):
        data = with_checksum(MAGIC + b"\x01" + cbor_bytes(header) + cbor_bytes(state))
        with pytest.raises(ValueFormatError):
            decode_backup(data)


def test_issue10_backup_header_claiming_huge_lengths_is_refused_without_allocating() -> None:
    """A damaged length head that claims exabytes is refused as truncated, not read."""
    huge = MAGIC + b"\x01" + b"\x41\x00" + b"\x5b" + (2**62).to_bytes(8, "big") + b"abc"
    with pytest.raises(ValueFormatError, match="truncated"):
        decode_backup(huge)
    with pytest.raises(ValueFormatError, match="header claims"):
        decode_backup(MAGIC + b"\x01" + b"\x5b" + (2**62).to_bytes(8, "big"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_issue10_backup_fuzz_arbitrary_bytes_give_only_value_format_errors(data: bytes) -> None:
    """Arbitrary bytes, alone or after the magic and version, give ValueFormatError and nothing else."""
    for candidate in (data, MAGIC + data, MAGIC + b"\x01" + data):
        with pytest.raises(ValueFormatError):
            decode_backup(candidate)


_FUZZ_STORE, _FUZZ_DATA = sample_backup(sample_store(keys=2, messages=1))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_FUZZ_DATA)), st.integers(0, len(_FUZZ_DATA)), st.binary(max_size=40))
def test_issue10_backup_fuzz_spliced_files_give_only_value_format_errors(start: int, end: int, new: bytes) -> None:
    """A real backup with any slice replaced by other bytes is refused with ValueFormatError (unless unchanged)."""
    start, end = min(start, end), max(start, end)
    data = _FUZZ_DATA[:start] + new + _FUZZ_DATA[end:]
    if data == _FUZZ_DATA:
        assert decode_backup(data).state == _FUZZ_STORE.snapshot()
        return
    with pytest.raises(ValueFormatError):
        decode_backup(data)


def test_issue10_backup_header_validates_when_built() -> None:
    """A header with a negative revision or a naive time cannot be built, so cannot be written."""
    with pytest.raises(ValueFormatError):
        BackupHeader(cluster="c", revision=-1, clock=0, created=CREATED, keys=0, messages=0, nodes=0)
    with pytest.raises(ValueFormatError):
        BackupHeader(cluster="c", revision=1, clock=0, created=datetime(2026, 1, 1), keys=0, messages=0, nodes=0)


def test_issue10_backup_status_reads_the_file(tmp_path: Path) -> None:
    """backup_status checks the file and reports its header, sizes and checksum."""
    store, data = sample_backup()
    path = tmp_path / "b.backup"
    path.write_bytes(data)
    info = backup_status(path)
    assert info == {
        "file": str(path), "format_version": 1, "cluster": "old", "created": "2026-11-29T12:00:00Z",
        "revision": store.revision, "clock": store.clock, "keys": 6, "messages": 3, "nodes": 2,
        "state_bytes": len(store.snapshot()), "size": len(data), "sha256": hashlib.sha256(data[:-34]).hexdigest(),
    }
    assert read_backup(path).state == store.snapshot()


def test_issue10_backup_status_refuses_damaged_and_missing_files(tmp_path: Path) -> None:
    """A damaged file, an empty one, a directory and a missing file are refused naming the path."""
    _, data = sample_backup()
    path = tmp_path / "b.backup"
    path.write_bytes(data[:-1])
    with pytest.raises(ValueFormatError, match=f"{path}: backup file is truncated"):
        backup_status(path)
    path.write_bytes(b"")
    with pytest.raises(ValueFormatError, match="empty"):
        backup_status(path)
    with pytest.raises(InvalidInputError, match="directory"):
        backup_status(tmp_path)
    with pytest.raises(InvalidInputError, match="cannot read"):
        backup_status(tmp_path / "missing")


# ---------------------------------------------------------------- restore_data_dir


def write_config(path: Path, nodes: list[tuple[str, int, bool]], data_dir: Path) -> Path:
    """A cluster file of ``(name, port, voter)`` nodes (raft on port, client on port + 1)."""
    lines = ["[cluster]", 'name = "new"', f'data_dir = "{data_dir}"', ""]
    for name, port, voter in nodes:
        lines += ["[[node]]", f'name = "{name}"', f'raft = "127.0.0.1:{port}"', f'client = "127.0.0.1:{port + 1}"',
                  f"voter = {'true' if voter else 'false'}", ""]
    path.write_text("\n".join(lines))
    return path


def test_issue10_restore_writes_the_same_dump_for_every_node(tmp_path: Path) -> None:
    """Every node's raft.snapshot holds the backup's state, the new voters, and the same two entries."""
    store, data = sample_backup()
    config = load_config(write_config(tmp_path / "new.toml", [("a", 7100, True), ("b", 7110, True),
                                                               ("c", 7120, True), ("d", 7130, False)],
                                      tmp_path / "data"))
    backup = decode_backup(data)
    dumps = {}
    for name in "abcd":
        where = restore_data_dir(backup, config, name)
        assert where == tmp_path / "data" / name
        assert sorted(os.listdir(where)) == ["raft.snapshot"]
        dumps[name] = (where / "raft.snapshot").read_bytes()
    assert len(set(dumps.values())) == 1, "every node must start from the same dump"
    dump = decode_dump(dumps["a"])
    assert dump.cluster == ("127.0.0.1:7100", "127.0.0.1:7110", "127.0.0.1:7120")
    assert dump.prev[1:] == (1, 0) and dump.last[1:] == (2, 0)
    assert Store.restore(dump.state).snapshot() == store.snapshot()
    assert sorted(os.listdir(tmp_path / "data")) == list("abcd"), "no temporary directory is left"


@pytest.mark.skipif(not hasattr(Store, "clear_members"), reason="the member registry is not in this store yet")
def test_issue10_restore_clears_the_member_registry(tmp_path: Path) -> None:
    """The old cluster's members are not carried into the new one: its first leader seeds its own."""
    store = sample_store()
    _apply(store, "member", action="seed", members=[
        {"name": "n1", "raft": "10.0.0.1:7000", "client": "10.0.0.1:2379", "voter": True}])
    assert store.members
    _, data = sample_backup(store)
    config = load_config(write_config(tmp_path / "new.toml", [("a", 7100, True)], tmp_path / "data"))
    where = restore_data_dir(decode_backup(data), config, "a")
    restored = Store.restore(decode_dump((where / "raft.snapshot").read_bytes()).state)
    assert restored.members == ()
    assert (restored.revision, restored.clock, len(restored)) == (store.revision, store.clock, len(store))


def test_issue10_restore_refuses_a_data_dir_that_holds_data(tmp_path: Path) -> None:
    """Any file in the data directory, hidden ones too, refuses the restore and nothing is written."""
    _, data = sample_backup()
    config = load_config(write_config(tmp_path / "new.toml", [("a", 7100, True)], tmp_path / "data"))
    target = tmp_path / "data" / "a"
    for leftover in ("raft.journal", ".hidden", "replica.lock"):
        target.mkdir(parents=True, exist_ok=True)
        (target / leftover).write_bytes(b"old")
        with pytest.raises(InvalidInputError, match="already holds data") as err:
            restore_data_dir(decode_backup(data), config, "a")
        assert err.value.field == "data_dir" and err.value.exit_code == 2
        assert sorted(os.listdir(target)) == [leftover]
        (target / leftover).unlink()
    assert sorted(os.listdir(tmp_path / "data")) == ["a"]
    # Empty: fine.
    restore_data_dir(decode_backup(data), config, "a")
    assert sorted(os.listdir(target)) == ["raft.snapshot"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInputError, match="not a directory"):
        restore_data_dir(decode_backup(data), config, "a", data_dir=tmp_path / "afile")


def test_issue10_restore_refuses_a_backup_whose_header_disagrees_with_its_state(tmp_path: Path) -> None:
    """A well-formed file whose header does not describe its state is not restored."""
    store = sample_store()
    header, image = capture(store, cluster="old", created=CREATED)
    wrong = BackupHeader(cluster="old", revision=header.revision + 1, clock=header.clock, created=CREATED,
                         keys=header.keys, messages=header.messages, nodes=header.nodes)
    config = load_config(write_config(tmp_path / "new.toml", [("a", 7100, True)], tmp_path / "data"))
    with pytest.raises(ValueFormatError, match="inconsistent"):
        restore_data_dir(decode_backup(encode_backup(wrong, image.encode())), config, "a")
    assert not (tmp_path / "data" / "a").exists()


def test_issue10_restored_data_dir_starts_a_replica_with_the_state(tmp_path: Path) -> None:
    """A one-node cluster started on a restored data directory serves the backup's keys and clock, and writes."""
    from raftcoord.coordinator import Coordinator

    store, data = sample_backup()
    path = write_config(tmp_path / "new.toml", [("a", _free_port(), True)], tmp_path / "data")
    restore_data_dir(decode_backup(data), load_config(path), "a")
    coord = Coordinator.from_config(str(path), node="a")
    try:
        assert coord.get(b"k0", consistency="serializable") == b"v0-again"
        assert coord.revision(consistency="serializable") == store.revision
        m = coord.post_message("U", "C", {"after": "restore"})
        assert m.clock > store.clock
        assert coord.get(b"k1") == b"v1"
    finally:
        coord.close()


def _free_port() -> int:
    from raftcoord.chaos.cluster import free_ports

    return int(free_ports(2)[0])


# ---------------------------------------------------------------- the CLI


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_error_line(result: Result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_issue10_cli_snapshot_status_prints_what_the_file_holds(tmp_path: Path) -> None:
    """snapshot status prints revision, clock, key, message and node counts and the checksum; --json too."""
    store, data = sample_backup()
    path = tmp_path / "b.backup"
    path.write_bytes(data)
    result = invoke("snapshot", "status", str(path))
    assert result.exit_code == 0, result.output
    fields = dict(line.split(":", 1) for line in result.output.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["revision"] == str(store.revision)
    assert fields["clock"] == str(store.clock)
    assert (fields["keys"], fields["messages"], fields["nodes"]) == ("6", "3", "2")
    assert fields["sha256"] == hashlib.sha256(data[:-34]).hexdigest()
    assert fields["size"] == f"{len(data)} bytes"
    assert fields["cluster"] == "old"
    result = invoke("snapshot", "status", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == backup_status(path)


def test_issue10_cli_snapshot_status_refuses_a_damaged_file_with_one_line(tmp_path: Path) -> None:
    """A corrupted or truncated file: one Error line naming the problem, exit 2."""
    _, data = sample_backup()
    path = tmp_path / "b.backup"
    for damaged, words in ((data[:-5], "truncated"), (data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum"),
                           (b"not a backup", "not a raftcoord backup file")):
        path.write_bytes(damaged)
        result = invoke("snapshot", "status", str(path))
        assert result.exit_code == 2, result.output
        assert words in one_error_line(result)
    result = invoke("snapshot", "status", str(tmp_path / "missing"))
    assert result.exit_code == 2
    one_error_line(result)


def test_issue10_cli_snapshot_restore_into_a_non_empty_dir_is_refused(tmp_path: Path) -> None:
    """restore into a data directory that holds a file: one Error line, exit 2, the directory untouched."""
    _, data = sample_backup()
    path = tmp_path / "b.backup"
    path.write_bytes(data)
    config = write_config(tmp_path / "new.toml", [("a", 7100, True)], tmp_path / "data")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "raft.journal").write_bytes(b"old log")
    result = invoke("snapshot", "restore", str(path), "--config", str(config), "--name", "a")
    assert result.exit_code == 2, result.output
    assert "already holds data" in one_error_line(result)
    assert os.listdir(tmp_path / "data" / "a") == ["raft.journal"]
    # --data-dir elsewhere, empty: restored.
    result = invoke("snapshot", "restore", str(path), "--config", str(config), "--name", "a",
                    "--data-dir", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    assert "Restored revision" in result.output and "raftcoord node --config" in result.output
    assert os.listdir(tmp_path / "elsewhere") == ["raft.snapshot"]


def test_issue10_cli_snapshot_restore_bad_input_is_one_line(tmp_path: Path) -> None:
    """An unknown node, a missing config, a damaged file: one Error line each, exit 2, nothing written."""
    _, data = sample_backup()
    path = tmp_path / "b.backup"
    path.write_bytes(data)
    config = write_config(tmp_path / "new.toml", [("a", 7100, True)], tmp_path / "data")
    result = invoke("snapshot", "restore", str(path), "--config", str(config), "--name", "zz")
    assert result.exit_code == 2 and "zz" in one_error_line(result)
    result = invoke("snapshot", "restore", str(path), "--name", "a")
    assert result.exit_code == 2 and "--config" in one_error_line(result)
    (tmp_path / "bad.backup").write_bytes(data[:-1])
    result = invoke("snapshot", "restore", str(tmp_path / "bad.backup"), "--config", str(config), "--name", "a")
    assert result.exit_code == 2 and "truncated" in one_error_line(result)
    assert not (tmp_path / "data").exists()


def test_issue10_cli_snapshot_save_with_no_reachable_node_fails_with_one_line(tmp_path: Path) -> None:
    """save when no endpoint answers: one Error line, exit 1, no file left behind."""
    port = _free_port()
    result = invoke("--endpoints", f"127.0.0.1:{port}", "--timeout", "2", "snapshot", "save",
                    str(tmp_path / "b.backup"))
    assert result.exit_code == 1, result.output
    assert "no endpoint gave a backup" in one_error_line(result)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the route, over a real socket


class _Served:
    """An endpoint app over an in-memory coordinator, on a real 127.0.0.1 port, in a thread."""

    def __init__(self, coord: Any, config: Any = None, node: str | None = None) -> None:
        from aiohttp import web

        from raftcoord.endpoint import make_app

        self.loop = asyncio.new_event_loop()
        self.app = make_app(coord, config, node)
        self.runner = web.AppRunner(self.app)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait()
        self.port = self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> int:
        from aiohttp import web

        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def close(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served() -> Iterator[tuple[Any, _Served]]:
    from raftcoord.coordinator import Coordinator

    coord = Coordinator.memory("n1", cluster="mem")
    server = _Served(coord)
    yield coord, server
    server.close()
    coord.close()


def test_issue10_snapshot_route_answers_a_checked_backup(served: tuple[Any, _Served], tmp_path: Path) -> None:
    """GET /raftcoord/v1/snapshot gives a backup of the current revision; snapshot save writes it to FILE."""
    coord, server = served
    for i in range(20):
        coord.put(f"key{i}".encode(), b"v" * i)
    coord.post_message("U", "C", {"n": 1})
    revision = coord.revision()
    path = tmp_path / "b.backup"
    result = invoke("--endpoints", f"127.0.0.1:{_free_port()},127.0.0.1:{server.port}", "snapshot", "save", str(path))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Snapshot saved at {path}: revision {revision},")
    backup = read_backup(path)
    assert backup.header.cluster == "mem"
    assert backup.header.revision == revision and backup.header.messages == 1 and backup.header.keys == 20
    restored = Store.restore(backup.state)
    assert restored.get(b"key7").value == b"v" * 7
    assert sorted(os.listdir(tmp_path)) == ["b.backup"], "no temporary file is left"
    # Saved again over the old file: replaced whole.
    coord.put(b"later", b"x")
    result = invoke("--endpoints", f"127.0.0.1:{server.port}", "snapshot", "save", str(path))
    assert result.exit_code == 0, result.output
    assert read_backup(path).header.revision == revision + 1


def test_issue10_snapshot_route_needs_the_token(tmp_path: Path) -> None:
    """With a token configured, the snapshot route refuses a request without it: exit 1, one line."""
    from raftcoord.coordinator import Coordinator

    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nname = "tok"\ntoken = "s3cret-token"\n\n'
                    '[[node]]\nname = "n1"\nraft = "127.0.0.1:7000"\nclient = "127.0.0.1:7001"\n')
    coord = Coordinator.memory("n1", cluster="tok")
    server = _Served(coord, load_config(path, env={}), "n1")
    try:
        out = tmp_path / "b.backup"
        result = invoke("--endpoints", f"127.0.0.1:{server.port}", "snapshot", "save", str(out))
        assert result.exit_code == 1, result.output
        one_error_line(result)
        assert not out.exists()
        result = invoke("--endpoints", f"127.0.0.1:{server.port}", "--token", "s3cret-token", "snapshot", "save",
                        str(out))
        assert result.exit_code == 0, result.output
        assert read_backup(out).header.cluster == "tok"
    finally:
        server.close()
        coord.close()


def test_issue10_snapshot_route_refuses_query_parameters(served: tuple[Any, _Served]) -> None:
    """An unknown query parameter is a 400 naming it, not ignored."""
    import urllib.error
    import urllib.request

    _, server = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/raftcoord/v1/snapshot?revision=3", timeout=10)
    assert err.value.code == 400
    assert "revision" in json.loads(err.value.read())["message"]


# ------------------------------------------------ Done when: save, restore into a fresh cluster, compare


class _RenamedCluster:
    """Builds a LocalCluster whose nodes are m1, m2, ...: the restored n1, n2, ... records stay as they were."""

    @staticmethod
    def make(root: Path, n: int = 3) -> Any:
        from cluster_support import LocalCluster

        cluster = LocalCluster(root, n)
        old = cluster.names
        cluster.names = [f"m{i + 1}" for i in range(n)]
        cluster.raft = {new: cluster.raft[o] for new, o in zip(cluster.names, old)}
        cluster.client_addr = {new: cluster.client_addr[o] for new, o in zip(cluster.names, old)}
        cluster.write_config(cluster.config_path, cluster.secret)
        return cluster


def _everything(client: Any, *, serializable: bool = False) -> tuple[int, dict[bytes, dict[str, Any]]]:
    out = client.range(b"\x00", b"\x00", serializable=serializable)
    assert not out["more"]
    return out["revision"], {kv["key"]: kv for kv in out["kvs"]}


def _all_up(cluster: Any, names: list[str]) -> bool:
    states = {n.get("host"): n.get("status") for n in cluster.client().nodes()}
    return all(states.get(name) == "up" for name in names)


def test_issue10_backup_saved_from_a_cluster_restores_into_a_fresh_cluster(tmp_path: Path) -> None:
    """Done when: save a snapshot, restore it into a fresh 3-node cluster, compare every key and message, write on."""
    from cluster_support import LocalCluster, wait_until

    (tmp_path / "src").mkdir()
    src = LocalCluster(tmp_path / "src")
    dst = None
    try:
        src.start()
        src.wait_for_leader()
        wait_until(lambda: _all_up(src, src.names), 30, "every source node up")
        client = src.client()
        for i in range(40):
            client.put(f"user/{i:03}".encode(), f"value {i}".encode() * (i % 5 + 1))
        for i in range(0, 40, 7):
            client.put(f"user/{i:03}".encode(), b"overwritten")
        client.delete(b"user/", prefix=False)
        client.delete(b"user/013")
        client.put(b"M-is-a-user-key", b"\x00\x01binary\xff")
        posted = [client.post("U", "C", {"i": i, "text": "x" * i}) for i in range(12)]
        posted += [client.post("O", "D", None), client.post(200)]

        save = invoke("--config", str(src.config_path), "snapshot", "save", str(tmp_path / "cluster.backup"))
        assert save.exit_code == 0, save.output
        backup = read_backup(tmp_path / "cluster.backup")
        h = backup.header
        # The source, read after the save, is at the same revision: the backup is all of it.
        revision, src_kvs = _everything(client)
        src_messages = client.messages()
        assert revision == h.revision, "the source changed after the save; the comparison would not hold"
        assert [m["clock"] for m in src_messages] == [m["clock"] for m in posted]
        assert (h.keys, h.messages, h.nodes) == (40, 14, 3)
        assert h.clock == posted[-1]["clock"]
        status = invoke("snapshot", "status", str(tmp_path / "cluster.backup"))
        assert status.exit_code == 0 and f"revision: {h.revision}" in " ".join(status.output.split())
        src.stop_all()

        (tmp_path / "dst").mkdir()
        dst = _RenamedCluster.make(tmp_path / "dst")
        for name in dst.names:
            result = invoke("snapshot", "restore", str(tmp_path / "cluster.backup"), "--config", str(dst.config_path),
                            "--name", name)
            assert result.exit_code == 0, result.output
        # A second restore of a node is refused: its data directory now holds data.
        again = invoke("snapshot", "restore", str(tmp_path / "cluster.backup"), "--config", str(dst.config_path),
                       "--name", "m1")
        assert again.exit_code == 2 and "already holds data" in again.output
        dst.start()
        dst.wait_for_leader()
        wait_until(lambda: _all_up(dst, dst.names), 30, "every restored node up")
        new = dst.client()
        new_revision, dst_kvs = _everything(new)

        # Every key of the source, with its value and revisions, is in the new cluster as it was.
        for key, kv in src_kvs.items():
            assert dst_kvs.get(key) == kv, key
        # The only other keys are the new nodes' own records, written after the restored revision.
        added = {k: kv for k, kv in dst_kvs.items() if k not in src_kvs}
        assert sorted(added) == sorted(NODE_PREFIX + name.encode() for name in dst.names)
        assert min(kv["create_revision"] for kv in added.values()) == h.revision + 1
        assert all(kv["mod_revision"] <= h.revision for kv in src_kvs.values())
        assert new_revision > h.revision
        # Every message: clock, type, event, payload, sender and time.
        assert new.messages() == src_messages
        for node in dst.names:  # every node holds the same restored state
            def same(node: str = node) -> bool:
                revision, kvs = _everything(dst.client(node), serializable=True)
                return revision == new_revision and kvs == dst_kvs
            wait_until(same, 30, f"{node} to hold the restored state")
        members = _members(new)
        if members is not None:
            assert sorted(m["name"] for m in members) == dst.names

        # The new cluster works: writes commit after the restored revision, messages after its clock.
        rev = new.put(b"after/restore", b"yes")
        assert rev > new_revision
        message = new.post("U", "U", {"after": "restore"})
        assert message["clock"] > h.clock
        for node in dst.names:
            wait_until(lambda node=node: dst.client(node).get(b"after/restore", serializable=True)["value"] == b"yes",
                       30, f"{node} to apply the new write")
        assert [m["clock"] for m in new.messages(since=h.clock)] == [message["clock"]]
    finally:
        src.stop_all()
        if dst is not None:
            dst.stop_all()


def _members(client: Any) -> list[dict[str, Any]] | None:
    from raftcoord.errors import KeyNotFoundError

    try:
        return list(client.call("GET", "/raftcoord/v1/members")["members"])
    except KeyNotFoundError:
        return None  # no member routes in this build


def _snapshot_route(server: _Served) -> Any:
    for route in server.app.router.routes():
        owner = getattr(route.handler, "__self__", None)
        if type(owner).__name__ == "SnapshotRoute":
            return owner
    raise AssertionError("no snapshot route")


def test_issue10_snapshot_save_moves_on_from_a_busy_node(served: tuple[Any, _Served], tmp_path: Path) -> None:
    """A node already sending a backup answers 503; save takes it from the next endpoint, or fails with one line."""
    coord, busy = served
    coord.put(b"k", b"v")
    _snapshot_route(busy)._busy = True
    other = _Served(coord)
    try:
        path = tmp_path / "b.backup"
        result = invoke("--endpoints", f"127.0.0.1:{busy.port}", "snapshot", "save", str(path))
        assert result.exit_code == 1 and "already being taken" in one_error_line(result)
        assert not path.exists()
        result = invoke("--endpoints", f"127.0.0.1:{busy.port},127.0.0.1:{other.port}", "snapshot", "save", str(path))
        assert result.exit_code == 0, result.output
        assert read_backup(path).header.keys == 1
    finally:
        other.close()


def test_issue10_snapshot_save_refuses_a_damaged_download(tmp_path: Path) -> None:
    """A node that sends bytes that are not a whole backup: nothing is written at FILE, one Error line."""
    import socket

    _, data = sample_backup()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        for body in (data[:-3] + b"abc", b"garbage"):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        path = tmp_path / "b.backup"
        for words in ("checksum mismatch", "not a raftcoord backup file"):
            result = invoke("--endpoints", f"127.0.0.1:{port}", "snapshot", "save", str(path))
            assert result.exit_code == 1, result.output
            line = one_error_line(result)
            assert "sent a damaged backup" in line and words in line
            assert os.listdir(tmp_path) == []
    finally:
        thread.join(10)
        listener.close()
