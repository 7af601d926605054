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
