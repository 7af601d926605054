"""The cluster file: loading, defaults, and errors that name the file and the setting."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from raftcoord.config import (
    SECRET_ENV,
    ClusterConfig,
    NodeConfig,
    check_can_start,
    is_loopback,
    load_config,
    parse_address,
    stable_id,
)
from raftcoord.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "cluster.example.toml"
SECRET = "0123456789abcdef-secret"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    return repr(value)


def _table(header: str, values: dict[str, Any]) -> str:
    lines = [header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_cluster(
    tmp_path: Path,
    cluster: dict[str, Any] | None = None,
    nodes: list[dict[str, Any]] | None = None,
    extra: str = "",
) -> Path:
    """Write a two-node cluster file, with ``cluster`` and ``nodes`` overriding settings."""
    base_cluster: dict[str, Any] = {"name": "c1"}
    base_cluster.update(cluster or {})
    base_nodes: list[dict[str, Any]] = [
        {"name": "n1", "raft": "127.0.0.1:7001", "client": "127.0.0.1:2379"},
        {"name": "n2", "raft": "127.0.0.1:7002", "client": "127.0.0.1:2380"},
    ]
    for base, override in zip(base_nodes, nodes or []):
        base.update(override)
    text = _table("[cluster]", base_cluster)
    text += "".join(_table("[[node]]", n) for n in base_nodes)
    path = tmp_path / "cluster.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path


def load(path: Path, **env: str) -> ClusterConfig:
    """Load with a controlled environment."""
    return load_config(path, env=env)


def expect_error(path: Path, setting: str, *phrases: str, **env: str) -> ConfigError:
    """Load ``path``, expecting a ConfigError that names the file and ``setting``."""
    with pytest.raises(ConfigError) as info:
        load(path, **env)
    exc = info.value
    assert exc.field == setting
    # Whole-file problems read "<file>: <problem>"; others "<file>: <setting>: <problem>".
    prefix = f"{path}: " if setting == "file" else f"{path}: {setting}: "
    assert str(exc).startswith(prefix), str(exc)
    for phrase in phrases:
        assert phrase in str(exc), str(exc)
    assert exc.exit_code == 2 and exc.http_status == 400
    return exc


# ------------------------------------------------------------------ valid


def test_example_file_loads() -> None:
    """The shipped example is valid: four nodes, one non-voter, defaults as documented."""
    config = load(EXAMPLE)
    assert config.name == "puzzledb-example"
    assert [n.name for n in config.nodes] == ["n1", "n2", "n3", "n4"]
    assert [n.name for n in config.voters] == ["n1", "n2", "n3"]
    assert [n.name for n in config.non_voters] == ["n4"]
    assert config.node("n1").raft == "127.0.0.1:7001"
    assert config.node("n1").data_dir == EXAMPLE.parent / "data" / "n1"
    assert config.secret is None and config.token is None
    assert (config.election_timeout_min, config.election_timeout_max, config.heartbeat_period) == (0.4, 1.4, 0.1)


def test_example_documents_every_setting() -> None:
    """Every setting the loader knows appears in the example, set or commented out."""
    text = EXAMPLE.read_text(encoding="utf-8")
    cluster_fields = {f.name for f in dataclasses.fields(ClusterConfig)} - {"nodes", "path", "secret_source"}
    node_fields = {f.name for f in dataclasses.fields(NodeConfig)}
    for name in cluster_fields | node_fields | {"secret_file"}:
        assert re.search(rf"^#? ?{name} = ", text, re.MULTILINE), f"{name} is not documented in the example"


def test_defaults(tmp_path: Path) -> None:
    """A file with only names and addresses gets the documented defaults."""
    config = load(write_cluster(tmp_path))
    assert config.request_timeout == 10.0
    assert config.election_timeout_min == 0.4 and config.election_timeout_max == 1.4
    assert config.heartbeat_period == 0.1
    assert config.message_retention_seconds == 3600 and config.message_retention_count == 10000
    assert config.compaction_entries == 10000 and config.fsync is False
    assert config.data_dir == tmp_path / "data"
    assert config.node("n2").data_dir == tmp_path / "data" / "n2"
    assert all(n.voter for n in config.nodes)
    assert config.path == tmp_path / "cluster.toml"


def test_all_settings_read(tmp_path: Path) -> None:
    """Every setting given in the file reaches the config."""
    path = write_cluster(
        tmp_path,
        cluster={
            "secret": SECRET,
            "data_dir": "/var/lib/rc",
            "token": "tok-123",
            "request_timeout": 3,
            "election_timeout_min": 1.0,
            "election_timeout_max": 2.5,
            "heartbeat_period": 0.2,
            "message_retention_seconds": 0.5,
            "message_retention_count": 5,
            "compaction_entries": 2,
            "fsync": True,
        },
        nodes=[{"data_dir": "own"}, {"voter": False}],
    )
    c = load(path)
    assert (c.secret, c.secret_source, c.token) == (SECRET, "secret", "tok-123")
    assert c.data_dir == Path("/var/lib/rc")
    assert (c.request_timeout, c.election_timeout_min, c.election_timeout_max, c.heartbeat_period) == (3, 1, 2.5, 0.2)
    assert (c.message_retention_seconds, c.message_retention_count, c.compaction_entries, c.fsync) == (0.5, 5, 2, True)
    assert c.node("n1").data_dir == tmp_path / "own"
    assert c.node("n2").data_dir == Path("/var/lib/rc/n2") and not c.node("n2").voter


def test_secret_and_token_stay_out_of_repr(tmp_path: Path) -> None:
    """repr() of a config never shows the secret or the token."""
    c = load(write_cluster(tmp_path, cluster={"secret": SECRET, "token": "tok-secret-value"}))
    assert SECRET not in repr(c) and "tok-secret-value" not in repr(c)


def test_secret_from_environment_wins(tmp_path: Path) -> None:
    """RAFTCOORD_SECRET overrides the file's secret."""
    c = load(write_cluster(tmp_path, cluster={"secret": SECRET}), **{SECRET_ENV: "from-the-environment-1234"})
    assert (c.secret, c.secret_source) == ("from-the-environment-1234", "env")


def test_secret_from_file(tmp_path: Path) -> None:
    """secret_file is read (relative to the cluster file) and stripped."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "secret.txt").chmod(0o600)
    c = load(write_cluster(tmp_path, cluster={"secret_file": "secret.txt"}))
    assert (c.secret, c.secret_source) == (SECRET, "secret_file")


def test_ipv6_addresses(tmp_path: Path) -> None:
    """Bracketed IPv6 addresses are accepted and kept canonical."""
    c = load(write_cluster(tmp_path, nodes=[{"raft": "[::1]:7001", "client": "[::1]:2379"}]))
    assert c.node("n1").raft == "[::1]:7001"
    assert c.node("n1").raft_address == ("::1", 7001)
    assert c.node("n1").client_url == "http://[::1]:2379"


def test_node_lookup_and_ids(tmp_path: Path) -> None:
    """node() finds by name, refuses unknown names; IDs are stable and distinct."""
    c = load(write_cluster(tmp_path))
    assert c.node("n2").name == "n2"
    assert [n.name for n in c.peers("n1")] == ["n2"]
    with pytest.raises(ConfigError, match=r"node 'n9' is not in the file \(nodes: 'n1', 'n2'\)") as info:
        c.node("n9")
    assert str(info.value).startswith(str(tmp_path / "cluster.toml"))
    assert c.node("n1").member_id == stable_id("n1") != stable_id("n2")
    assert stable_id("n1") == int.from_bytes(hashlib.sha256(b"n1").digest()[:8], "big")
    assert 0 < c.cluster_id < 2**64


# ------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    ("cluster", "nodes", "setting", "phrase"),
    [
        ({}, [{}, {"raft": "abc"}], "node[1].raft", "'abc' is not host:port"),
        ({}, [{"client": "127.0.0.1:0"}], "node[0].client", "not in 1-65535"),
        ({}, [{"client": "127.0.0.1:70000"}], "node[0].client", "not in 1-65535"),
        ({}, [{"raft": "127.0.0.1:x1"}], "node[0].raft", "is not a number"),
        ({}, [{"raft": "::1:7001"}], "node[0].raft", "IPv6 address in brackets"),
        ({}, [{"raft": 7001}], "node[0].raft", "must be a \"host:port\" string"),
        ({}, [{}, {"name": "n1"}], "node[1].name", "already the name of node[0]"),
        ({}, [{}, {"raft": "127.0.0.1:2379"}], "node[1].raft", "already used by node[0].client"),
        ({}, [{}, {"client": "127.0.0.1:2379"}], "node[1].client", "already used by node[0].client"),
        ({}, [{"name": ""}], "node[0].name", "1-255 bytes"),
        ({}, [{"name": "é" * 128}], "node[0].name", "1-255 bytes of UTF-8, got 256"),
        ({}, [{"name": "a\x00b"}], "node[0].name", "NUL"),
        ({}, [{"name": "../etc"}], "node[0].data_dir", "give this node its own data_dir"),
        ({}, [{"data_dir": "same"}, {"data_dir": "same"}], "node[1].data_dir", "already the data_dir of node[0]"),
        ({}, [{"voter": False}, {"voter": False}], "node", "at least one [[node]] needs voter = true"),
        ({}, [{"voter": 1}], "node[0].voter", "must be true or false"),
        ({}, [{"vote": True}], "node[0].vote", "did you mean node[0].voter?"),
        ({"nmae": "x"}, [], "cluster.nmae", "did you mean cluster.name?"),
        ({"name": 5}, [], "cluster.name", "must be a string"),
        ({"request_timeout": "10"}, [], "cluster.request_timeout", "must be a number of seconds"),
        ({"request_timeout": 0}, [], "cluster.request_timeout", "more than 0"),
        ({"request_timeout": float("inf")}, [], "cluster.request_timeout", "more than 0"),
        ({"election_timeout_min": 2.0}, [], "cluster.election_timeout_max", "greater than"),
        ({"heartbeat_period": 0.2}, [], "cluster.heartbeat_period", "less than a third"),
        ({"message_retention_seconds": -1}, [], "cluster.message_retention_seconds", "more than 0"),
        ({"message_retention_seconds": 0}, [], "cluster.message_retention_seconds", "more than 0"),
        ({"message_retention_count": 0}, [], "cluster.message_retention_count", "less than 1"),
        ({"compaction_entries": 1}, [], "cluster.compaction_entries", "less than 2"),
        ({"compaction_entries": 1.5}, [], "cluster.compaction_entries", "must be an integer"),
        ({"fsync": "yes"}, [], "cluster.fsync", "must be true or false"),
        ({"secret": "short"}, [], "cluster.secret", "at least 16"),
        ({"secret": SECRET, "secret_file": "s"}, [], "cluster.secret_file", "not both"),
        ({"secret_file": "missing.txt"}, [], "cluster.secret_file", "cannot read"),
        ({"token": ""}, [], "cluster.token", "must not be empty"),
        ({"token": "two words"}, [], "cluster.token", "spaces"),
        ({"data_dir": 3}, [], "cluster.data_dir", "must be a path string"),
    ],
)
def test_mistake_names_setting_and_file(
    tmp_path: Path, cluster: dict[str, Any], nodes: list[dict[str, Any]], setting: str, phrase: str
) -> None:
    """Each kind of mistake raises ConfigError naming the file and the setting."""
    expect_error(write_cluster(tmp_path, cluster=cluster, nodes=nodes), setting, phrase)


def test_missing_required_settings(tmp_path: Path) -> None:
    """A missing cluster name, node name or address is named."""
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\n[[node]]\nname = "n1"\nraft = "127.0.0.1:1"\nclient = "127.0.0.1:2"\n')
    expect_error(path, "cluster.name", "is required")
    path.write_text('[cluster]\nname = "c"\n[[node]]\nname = "n1"\nclient = "127.0.0.1:2"\n')
    expect_error(path, "node[0].raft", "is required")
    path.write_text('[cluster]\nname = "c"\n[[node]]\nraft = "127.0.0.1:1"\nclient = "127.0.0.1:2"\n')
    expect_error(path, "node[0].name", "is required")


def test_missing_tables(tmp_path: Path) -> None:
    """No [cluster], no [[node]], or a mistyped table is an error naming it."""
    path = tmp_path / "cluster.toml"
    path.write_text('[[node]]\nname = "n1"\nraft = "127.0.0.1:1"\nclient = "127.0.0.1:2"\n')
    expect_error(path, "cluster", "missing")
    path.write_text('[cluster]\nname = "c"\n')
    expect_error(path, "node", "at least one node")
    path.write_text('[cluster]\nname = "c"\nnode = "n1"\n[[node]]\nname="n1"\n')
    expect_error(path, "cluster.node", "unknown setting")
    expect_error(write_cluster(tmp_path, extra="[clustre]\nname = 'x'\n"), "clustre", "did you mean cluster?")
    path.write_text('node = 1\n[cluster]\nname = "c"\n')
    expect_error(path, "node", "array of tables")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    """A missing file, bad TOML or non-UTF-8 bytes name the file."""
    expect_error(tmp_path / "nope.toml", "file", "cannot read")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname = 1\n")
    expect_error(bad, "file", "not valid TOML", "line 1")
    bad.write_bytes(b'[cluster]\nname = "\xff"\n')
    expect_error(bad, "file", "not UTF-8")


def test_short_secret_from_environment_names_the_variable(tmp_path: Path) -> None:
    """A short RAFTCOORD_SECRET is refused, naming the variable."""
    expect_error(write_cluster(tmp_path), SECRET_ENV, "at least 16", **{SECRET_ENV: "x"})


# ---------------------------------------------------------- starting up


def test_loopback_node_starts_without_secret(tmp_path: Path) -> None:
    """A node bound to loopback addresses may start without a secret."""
    c = load(write_cluster(tmp_path, nodes=[{"raft": "localhost:7001"}]))
    assert check_can_start(c, "n1").name == "n1"
    assert check_can_start(c, "n2").name == "n2"


@pytest.mark.parametrize("field", ["raft", "client"])
def test_non_loopback_node_refused_without_secret(tmp_path: Path, field: str) -> None:
    """A node bound to a non-loopback address refuses to start without a secret."""
    path = write_cluster(tmp_path, nodes=[{field: "0.0.0.0:7005"}])
    c = load(path)
    with pytest.raises(ConfigError) as info:
        check_can_start(c, "n1")
    assert info.value.field == "cluster.secret"
    assert str(info.value).startswith(f"{path}: cluster.secret: ")
    assert f"non-loopback {field} address 0.0.0.0:7005" in str(info.value)
    check_can_start(c, "n2")  # the other node is on loopback
    secured = load(path, **{SECRET_ENV: SECRET})
    assert check_can_start(secured, "n1").name == "n1"


def test_check_can_start_unknown_node(tmp_path: Path) -> None:
    """Starting a node the file does not list is refused."""
    with pytest.raises(ConfigError, match="node 'zz' is not in the file"):
        check_can_start(load(write_cluster(tmp_path)), "zz")


def test_address_helpers() -> None:
    """parse_address and is_loopback handle names, IPv4 and IPv6."""
    assert parse_address("example.com:80") == ("example.com", 80)
    assert parse_address("[fe80::1]:9") == ("fe80::1", 9)
    for bad in ("", ":80", "host:", "[1.2.3.4]:80", "a b:1", "[::1]80"):
        with pytest.raises(ValueError):
            parse_address(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


# ------------------------------------------- issue 6: limits and bounds


def test_issue6_d2_limit_settings_defaults_and_bounds(tmp_path: Path) -> None:
    """max_txn_ops, max_request_bytes and max_response_bytes default as etcd does and are bounded."""
    c = load(write_cluster(tmp_path))
    assert (c.max_txn_ops, c.max_request_bytes, c.max_response_bytes) == (128, 1572864, 33554432)
    c = load(write_cluster(tmp_path, cluster={"max_txn_ops": 5, "max_request_bytes": 65536,
                                              "max_response_bytes": 4 * 1024 * 1024}))
    assert (c.max_txn_ops, c.max_request_bytes, c.max_response_bytes) == (5, 65536, 4 * 1024 * 1024)
    for setting, bad in (("max_txn_ops", 0), ("max_txn_ops", 10**9), ("max_txn_ops", 1.5),
                         ("max_request_bytes", 10), ("max_request_bytes", 2**40),
                         ("max_response_bytes", 100), ("max_response_bytes", 2**50)):
        expect_error(write_cluster(tmp_path, cluster={setting: bad}), f"cluster.{setting}")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("message_retention_seconds", 1e11),
        ("request_timeout", 1e300),
        ("request_timeout", 1e-300),
        ("heartbeat_period", 1e-300),
        ("election_timeout_min", 1e-300),
        ("election_timeout_max", 1e300),
        ("message_retention_count", 10**30),
        ("compaction_entries", 10**30),
    ],
)
def test_issue6_d12_numbers_bounded_to_a_sane_range(tmp_path: Path, setting: str, value: Any) -> None:
    """A number that would crash or wedge a node later is refused at load, naming the setting."""
    cluster: dict[str, Any] = {setting: value}
    if setting in ("heartbeat_period", "election_timeout_min"):
        # "matching" timeouts, so that only the range check can refuse them
        cluster = {"heartbeat_period": 1e-300, "election_timeout_min": 1e-299, "election_timeout_max": 1e-298}
        setting = "heartbeat_period" if setting == "heartbeat_period" else "election_timeout_min"
        with pytest.raises(ConfigError) as info:
            load(write_cluster(tmp_path, cluster=cluster))
        assert info.value.field is not None and info.value.field.startswith("cluster.")
        return
    exc = expect_error(write_cluster(tmp_path, cluster=cluster), f"cluster.{setting}")
    assert "at most" in str(exc) or "at least" in str(exc)


def test_issue6_d12_retention_at_its_maximum_does_not_overflow(tmp_path: Path) -> None:
    """The largest message_retention_seconds accepted still gives a valid purge cut-off."""
    from datetime import datetime, timedelta, timezone

    from raftcoord.config import MAX_RETENTION_SECONDS

    c = load(write_cluster(tmp_path, cluster={"message_retention_seconds": MAX_RETENTION_SECONDS}))
    assert datetime.now(timezone.utc) - timedelta(seconds=c.message_retention_seconds) > datetime(1, 1, 2,
                                                                                               tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("localhost:7001", "127.0.0.1:7001"),
        ("127.0.0.1:7001", "LOCALHOST:7001"),
        ("[::1]:7001", "localhost:7001"),
        ("[0:0:0:0:0:0:0:1]:7001", "[::1]:7001"),
    ],
)
def test_issue6_d12_same_loopback_address_spelled_twice(tmp_path: Path, first: str, second: str) -> None:
    """localhost:P and 127.0.0.1:P are the same listening address: used twice, it is an error."""
    path = write_cluster(tmp_path, nodes=[{"raft": first}, {"raft": second}])
    expect_error(path, "node[1].raft", "already used by node[0].raft")


def test_issue6_d12_distinct_addresses_still_allowed(tmp_path: Path) -> None:
    """Different loopback addresses, or one port on two real hosts, are fine."""
    load(write_cluster(tmp_path, nodes=[{"raft": "127.0.0.1:7001"}, {"raft": "127.0.0.2:7001"}]))
    load(write_cluster(tmp_path, nodes=[{"raft": "10.0.0.1:7001"}, {"raft": "10.0.0.2:7001"}]))


def test_issue6_d13_config_dev_zero_refused() -> None:
    """--config /dev/zero is refused at once as not a regular file (never read without limit)."""
    import subprocess
    import sys

    # In a child with a memory cap: before the fix this read /dev/zero until memory ran out.
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from raftcoord.config import load_config\n"
        "from raftcoord.errors import ConfigError\n"
        "try:\n    load_config('/dev/zero')\n"
        "except ConfigError as exc:\n    print('ConfigError', exc.field, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ConfigError file /dev/zero: "), out.stdout + out.stderr[-500:]
    assert "not a regular file" in out.stdout


def test_issue6_d13_config_fifo_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO as the cluster file is refused without waiting for a writer."""
    import os
    import threading

    fifo = tmp_path / "cluster.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def go() -> None:
        try:
            load(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so the thread ends, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_config blocked on a FIFO")
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0])


def test_issue6_d13_config_over_size_cap_refused(tmp_path: Path) -> None:
    """A cluster file larger than the cap is refused naming the file and the cap."""
    from raftcoord.config import MAX_CONFIG_BYTES

    path = write_cluster(tmp_path, extra="#" * (MAX_CONFIG_BYTES + 10) + "\n")
    expect_error(path, "file", "larger than")


@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ("{b = ", "}")])
def test_issue6_d13_config_nested_5000_deep(tmp_path: Path, opener: str, closer: str) -> None:
    """TOML nested 5,000 deep is a clean ConfigError, not a RecursionError."""
    path = tmp_path / "cluster.toml"
    path.write_text("a = " + opener * 5000 + "1" + closer * 5000 + "\n")
    exc = expect_error(path, "file")
    assert "too deeply" in str(exc).removeprefix(f"{path}: ")


@pytest.mark.parametrize("target", ["/dev/urandom", "/dev/zero", "dir", "big"])
def test_issue6_d13_secret_file_not_a_small_regular_file(tmp_path: Path, target: str) -> None:
    """A secret_file that is a device, a directory or a big file is refused naming the setting."""
    if target == "dir":
        (tmp_path / "dir").mkdir()
    elif target == "big":
        (tmp_path / "big").write_text("x" * (1024 * 1024))
    exc = expect_error(write_cluster(tmp_path, cluster={"secret_file": target}), "cluster.secret_file")
    assert target in str(exc)


def test_issue6_d6_client_connection_settings(tmp_path: Path) -> None:
    """Client connection timeouts and the connection bound are settings with defaults and ranges."""
    c = load(write_cluster(tmp_path))
    assert (c.client_header_timeout, c.client_body_timeout, c.max_client_connections) == (10.0, 30.0, 1024)
    c = load(write_cluster(tmp_path, cluster={"client_header_timeout": 2, "client_body_timeout": 5,
                                              "max_client_connections": 64}))
    assert (c.client_header_timeout, c.client_body_timeout, c.max_client_connections) == (2.0, 5.0, 64)
    for setting, bad in (("client_header_timeout", 0), ("client_header_timeout", 1e9),
                         ("client_body_timeout", 1e-9), ("max_client_connections", 0)):
        expect_error(write_cluster(tmp_path, cluster={setting: bad}), f"cluster.{setting}")


# ------------------------------------------- issue 8: node liveness


def test_issue8_3_node_timeout_default_and_bounds(tmp_path: Path) -> None:
    """node_timeout defaults to 5 s, is bounded to 0.5-86400 s and must exceed three heartbeat periods."""
    assert load(write_cluster(tmp_path)).node_timeout == 5.0
    assert load(write_cluster(tmp_path, cluster={"node_timeout": 2})).node_timeout == 2.0
    assert load(EXAMPLE).node_timeout == 5.0
    for bad, phrase in ((0, "more than 0"), (0.1, "at least 0.5"), (1e6, "at most 86400"), (-1, "more than 0"),
                        (float("nan"), "more than 0"), ("5", "number of seconds"), (True, "number of seconds")):
        expect_error(write_cluster(tmp_path, cluster={"node_timeout": bad}), "cluster.node_timeout", phrase)
    exc = expect_error(write_cluster(tmp_path, cluster={"node_timeout": 0.8, "heartbeat_period": 0.3,
                                                        "election_timeout_min": 1.0, "election_timeout_max": 2.0}),
                       "cluster.node_timeout", "three heartbeat periods")
    assert "0.3" in str(exc)
