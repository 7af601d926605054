"""Issue 9: restart time and node memory with a large state.

Compaction used to count commands only, so a few huge transactions (the
bench loads 1,000,000 keys as 1,000 txns of 1,000 puts) never set off a
snapshot and a restart replayed every put; and the snapshot was encoded on
the Raft thread, which applies nothing meanwhile (about 0.3 s at 1,000,000
keys).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from replica_support import free_port, put, wait_for

import raftcoord.raftfiles as raftfiles
import raftcoord.store as store_mod
from raftcoord.config import load_config
from raftcoord.errors import ConfigError
from raftcoord.replica import Replica, ReplicaSettings
from raftcoord.store import Store


def snap(r: Replica) -> bytes:
    return r.read(lambda s: s.snapshot(), consistency="serializable")


def value(r: Replica, key: bytes) -> bytes | None:
    kv = r.read(lambda s: s.get(key), consistency="serializable")
    return None if kv is None else kv.value


def journal_entries(r: Replica) -> int:
    """Entries in the replica's journal now (status() may lag by a tick)."""
    return r._on_raft_thread(lambda: len(r._engine._SyncObj__raftLog))


# ------------------------------------------------- 1. compaction by bytes


def test_issue9_a_few_huge_commands_set_off_a_snapshot(tmp_path: Path) -> None:
    """Three commands of 90 kB pass a 200 kB compaction_bytes: a snapshot, though 3 << compaction_entries."""
    settings = ReplicaSettings(compaction_bytes=200_000)
    assert settings.compaction_entries >= 1000
    addr = f"127.0.0.1:{free_port()}"
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        for i in range(3):
            r.propose(put(b"big%d" % i, b"x" * 90_000), 5)
        wait_for((tmp_path / "raft.snapshot").exists, 5, "a snapshot set off by bytes")
        wait_for(lambda: journal_entries(r) <= 3, 5, "the journal trimmed")
        before = snap(r)
    dump = raftfiles.decode_dump((tmp_path / "raft.snapshot").read_bytes())
    assert Store.restore(dump.state).get(b"big2") is not None
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        wait_for(lambda: snap(r) == before, 10, "the state back")


def test_issue9_small_commands_below_compaction_bytes_take_no_snapshot(tmp_path: Path) -> None:
    """The bytes bound counts bytes: small commands under both bounds leave the journal alone."""
    settings = ReplicaSettings(compaction_bytes=200_000)
    with Replica(f"127.0.0.1:{free_port()}", [], tmp_path, password=None, settings=settings) as r:
        for i in range(20):
            r.propose(put(b"k%02d" % i, b"v" * 100), 5)
        r.read_barrier(5)
        assert not (tmp_path / "raft.snapshot").exists()


def test_issue9_compaction_bytes_is_checked() -> None:
    assert ReplicaSettings().compaction_bytes == 32 * 1024 * 1024
    with pytest.raises(ConfigError):
        ReplicaSettings(compaction_bytes=1000)


def _cluster_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[cluster]\nname = "t"\nsecret = "0123456789abcdef0123456789abcdef"\n' + extra
        + '\n[[node]]\nname = "n1"\nraft = "127.0.0.1:7001"\nclient = "127.0.0.1:8001"\n'
    )
    return path


def test_issue9_compaction_bytes_is_a_bounded_cluster_setting(tmp_path: Path) -> None:
    from raftcoord.replica import open_replica_backend

    assert load_config(_cluster_file(tmp_path, "")).compaction_bytes == 32 * 1024 * 1024
    config = load_config(_cluster_file(tmp_path, "compaction_bytes = 1048576"))
    assert config.compaction_bytes == 1048576
    for bad in ("1000", "1.5", "1099511627777"):
        with pytest.raises(ConfigError, match="compaction_bytes"):
            load_config(_cluster_file(tmp_path, f"compaction_bytes = {bad}"))
    config = load_config(_cluster_file(tmp_path, f'compaction_bytes = 1048576\ndata_dir = "{tmp_path}/d"'))
    r = open_replica_backend(config, "n1", bind_address=f"127.0.0.1:{free_port()}")
    try:
        assert r.settings.compaction_bytes == 1048576
    finally:
        r.close()


# ------------------------------------------ 2. snapshot encoding off the Raft thread


class _HeldEncode:
    """StoreImage.encode, held until released, remembering the thread that ran it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        real = store_mod.StoreImage.encode

        def encode(image: Any) -> bytes:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            self.release.wait(10)
            if self.fail:
                raise OSError("disk full (test)")
            return real(image)

        monkeypatch.setattr(store_mod.StoreImage, "encode", encode)


def test_issue9_the_raft_thread_applies_while_a_snapshot_is_encoded(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """While a snapshot's encoding is held, proposals still apply, and the snapshot is the state when taken."""
    settings = ReplicaSettings(compaction_entries=5)
    addr = f"127.0.0.1:{free_port()}"
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        held = _HeldEncode(monkeypatch)
        for i in range(6):
            r.propose(put(b"k%02d" % i, b"v"), 5)
        try:
            assert held.entered.wait(5), "no snapshot started"
            for i in range(6, 12):  # would time out if the Raft thread were the one encoding
                r.propose(put(b"k%02d" % i, b"v"), 2)
            assert not (tmp_path / "raft.snapshot").exists()
        finally:
            held.release.set()
        wait_for((tmp_path / "raft.snapshot").exists, 5, "the snapshot written")
        assert all(not name.startswith("raftcoord-raft") for name in held.threads), held.threads
        dump = raftfiles.decode_dump((tmp_path / "raft.snapshot").read_bytes())
        taken = Store.restore(dump.state)
        assert taken.get(b"k00") is not None and taken.get(b"k06") is None  # the state when the image was taken
        monkeypatch.undo()
        wait_for(lambda: journal_entries(r) < 12, 5, "the journal trimmed to the snapshot")
        before = snap(r)
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        wait_for(lambda: snap(r) == before, 10, "the state back")


def test_issue9_a_failed_background_snapshot_installs_nothing(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An encode that fails leaves no snapshot and the whole journal; the next snapshot works."""
    settings = ReplicaSettings(compaction_entries=5)
    addr = f"127.0.0.1:{free_port()}"
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        held = _HeldEncode(monkeypatch, fail=True)
        held.release.set()
        for i in range(6):
            r.propose(put(b"k%02d" % i, b"v"), 5)
        wait_for(lambda: len(held.threads) >= 1, 5, "a snapshot attempt")
        r.propose(put(b"after", b"v"), 5)
        assert not (tmp_path / "raft.snapshot").exists()
        assert not list(tmp_path.glob("raft.snapshot*tmp"))
        assert journal_entries(r) >= 7
        monkeypatch.undo()
        for i in range(6):
            r.propose(put(b"m%02d" % i, b"v"), 5)
        wait_for((tmp_path / "raft.snapshot").exists, 5, "a later snapshot")
        before = snap(r)
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        wait_for(lambda: snap(r) == before, 10, "the state back")


def test_issue9_a_snapshot_from_the_leader_is_not_overwritten_by_an_older_local_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader's snapshot installed while this node's own one is still being written wins."""
    settings = ReplicaSettings(compaction_entries=5)
    with Replica(f"127.0.0.1:{free_port()}", [], tmp_path, password=None, settings=settings) as r:
        held = _HeldEncode(monkeypatch)
        for i in range(6):
            r.propose(put(b"k%02d" % i, b"v"), 5)
        assert held.entered.wait(5), "no snapshot started"
        leaders = raftfiles.encode_dump(raftfiles.Dump((b"x", 900, 3), (b"y", 899, 3), ("a:1",), Store().snapshot()))
        serializer = r._engine._SyncObj__serializer

        def receive() -> bool:
            return bool(serializer.setTransmissionData((leaders, True, True)))

        try:
            assert r._on_raft_thread(receive)
        finally:
            held.release.set()
        wait_for(lambda: serializer.rc_job is None, 5, "the local snapshot finished")
        assert (tmp_path / "raft.snapshot").read_bytes() == leaders


def test_issue9_dump_parts_are_the_dump_bytes_with_the_state_uncopied() -> None:
    """The background writer writes the pieces one after another: together, exactly encode_dump's bytes."""
    for n in (0, 23, 24, 255, 256, 65535, 65536, 70000):
        state = bytes(range(256)) * (n // 256) + b"s" * (n % 256)
        dump = raftfiles.Dump((b"\x65state\x40", 5, 1), (b"y", 4, 1), ("127.0.0.1:1", "127.0.0.1:2"), state)
        parts = raftfiles.encode_dump_parts(dump)
        assert b"".join(parts) == raftfiles.encode_dump(dump)
        assert any(p is state for p in parts)


# ------------------------------------------------- 3. restore without the cyclic GC


def test_issue9_the_snapshot_is_restored_at_start_without_the_cyclic_gc(tmp_path: Path) -> None:
    """Restoring 1,000,000 keys makes millions of objects, none of them cyclic garbage: no GC passes meanwhile."""
    import gc

    seen: list[bool] = []

    class Watched(Store):
        @classmethod
        def restore(cls, data: bytes) -> Store:
            seen.append(gc.isenabled())
            return super().restore(data)

    settings = ReplicaSettings(compaction_entries=5)
    addr = f"127.0.0.1:{free_port()}"
    with Replica(addr, [], tmp_path, password=None, settings=settings) as r:
        for i in range(8):
            r.propose(put(b"k%02d" % i, b"v"), 5)
        wait_for((tmp_path / "raft.snapshot").exists, 5, "a snapshot")
    assert gc.isenabled()
    with Replica(addr, [], tmp_path, password=None, settings=settings, state_machine=Watched) as r:
        assert seen and seen[0] is False
        assert gc.isenabled()
        assert value(r, b"k00") == b"v"
