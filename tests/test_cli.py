"""The raftcoord command line, through click's CliRunner."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fake_endpoint import FakeCluster, fake_cluster, refused_addr, silent_listener
from raftcoord import __version__
from raftcoord.cli import main
from raftcoord.errors import UnknownOutcomeError


def test_help_lists_commands() -> None:
    """--help prints the group's help with its commands."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "version" in result.output


def test_version() -> None:
    """version prints raftcoord's and pysyncobj's versions."""
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"raftcoord {__version__} (pysyncobj 0.3.17)")


def test_demo_exchanges_messages() -> None:
    """demo shows both nodes up and each observing the other's messages."""
    result = CliRunner().invoke(main, ["demo", "--messages", "4"])
    assert result.exit_code == 0, result.output
    assert "n1   up" in result.output and "n2   up" in result.output
    lines = {line.split(" observed")[0]: line for line in result.output.splitlines() if " observed " in line}
    assert lines["n1"].count(":n2:") == 2 and lines["n2"].count(":n1:") == 2


def test_unknown_command_is_a_usage_error() -> None:
    """An unknown command exits 2 with one line, not a traceback."""
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ----------------------------------------------------------------- issue 6


def one_line_error(result: Result, exit_code: int | None = None) -> str:
    """Assert ``result`` failed with exactly one "Error: ..." line and no traceback; return it."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    if exit_code is not None:
        assert result.exit_code == exit_code, result.output
    return lines[0]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    with fake_cluster(2) as c:
        yield c


def cluster_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(f'[cluster]\nname = "t"\n{extra}\n[[node]]\nname = "n1"\nraft = "127.0.0.1:7001"\n'
                    'client = "127.0.0.1:2379"\n')
    return path


BAD_ARGUMENTS = {
    "non-utf8-key": ["put", "\udcff", "v"],
    "non-utf8-value": ["put", "k", "\udcfe"],
    "non-utf8-get": ["get", "\udcff"],
    "non-utf8-del": ["del", "\udcff"],
    "non-utf8-prefix": ["scan", "\udcff"],
    "non-utf8-payload": ["post", "U", "--payload", "\udcff"],
    "non-utf8-endpoint": ["--endpoints", "\udcff:1", "get", "k"],
    "non-utf8-token": ["--token", "\udcff", "get", "k"],
    "token-newline": ["--token", "a\nb", "get", "k"],
    "unicode-digit-type": ["post", "²"],
    "unicode-digit-event": ["post", "U", "--event", "²"],
    "arabic-digit-type": ["post", "٣"],
    "type-256": ["post", "256"],
    "type-two-letters": ["post", "UU"],
    "endpoint-open-bracket": ["--endpoints", "http://[::1", "get", "k"],
    "endpoint-port-text": ["--endpoints", "127.0.0.1:abc", "get", "k"],
    "endpoint-port-too-big": ["--endpoints", "127.0.0.1:65536", "get", "k"],
    "endpoint-port-huge": ["--endpoints", "127.0.0.1:99999999999999999999999", "get", "k"],
    "endpoints-empty": ["--endpoints", ",", "get", "k"],
    "timeout-nan": ["--timeout", "nan", "get", "k"],
    "timeout-negative": ["--timeout", "-1", "get", "k"],
    "timeout-inf": ["--timeout", "inf", "get", "k"],
    "timeout-1e300": ["--timeout", "1e300", "get", "k"],
    "timeout-zero": ["--timeout", "0", "get", "k"],
    "dial-timeout-nan": ["--dial-timeout", "nan", "get", "k"],
    "since-5000-digits": ["messages", "--since", "1" * 5000],
    "since-negative": ["messages", "--since", "-1"],
    "limit-negative": ["scan", "--limit", "-1"],
    "demo-too-many": ["demo", "--messages", "1000000000"],
    "unknown-command": ["nope"],
    "missing-argument": ["get"],
}


@pytest.mark.parametrize("args", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_issue6_d13_bad_argument_is_one_error_line(args: list[str]) -> None:
    """A bad argument or option is one "Error:" line and a non-zero exit, never a traceback."""
    one_line_error(invoke("--endpoints", refused_addr(), *args) if args[0] != "--endpoints" else invoke(*args))


CONFIG_FILES = ["nested-5000", "dev-zero", "fifo", "secret-file-urandom", "missing", "directory"]


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_issue6_d13_bad_config_file_is_one_error_line(case: str, tmp_path: Path) -> None:
    """A hostile --config is one "Error:" line, at once (the bounds are config.py's, H-http's part)."""
    if case == "nested-5000":
        path = tmp_path / "deep.toml"
        path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    elif case == "dev-zero":
        path = Path("/dev/zero")
    elif case == "fifo":
        path = tmp_path / "fifo.toml"
        os.mkfifo(path)
    elif case == "secret-file-urandom":
        path = cluster_file(tmp_path, 'secret_file = "/dev/urandom"')
    elif case == "missing":
        path = tmp_path / "missing.toml"
    else:
        path = tmp_path
    start = time.monotonic()
    one_line_error(invoke("--config", str(path), "status"), 2)
    assert time.monotonic() - start < 5


MALFORMED_ANSWERS = {"html": b"<html><body>It works!</body></html>", "list": b"[1,2]", "empty": b"{}"}
COMMANDS = {
    "put": ["put", "k", "v"],
    "del": ["del", "k"],
    "post": ["post", "U"],
    "get": ["get", "k"],
    "scan": ["scan"],
    "nodes": ["nodes"],
    "messages": ["messages"],
}


@pytest.mark.parametrize("command", list(COMMANDS.values()), ids=list(COMMANDS))
@pytest.mark.parametrize("answer", list(MALFORMED_ANSWERS.values()), ids=list(MALFORMED_ANSWERS))
def test_issue6_d13_endpoint_answering_something_else_is_an_error(
    cluster: FakeCluster, command: list[str], answer: bytes
) -> None:
    """A 200 that is not a raftcoord answer is an error line; a write says it may have been applied."""
    cluster.hooks[0] = lambda stage, route, h: (
        (200, answer) if stage == "before" and route != "/raftcoord/v1/session" else None)
    line = one_line_error(invoke("--timeout", "2", "--endpoints", cluster.addr(0), *command))
    if command[0] in ("put", "del", "post"):
        assert "may have been applied" in line


def test_issue6_d13_messages_more_forever_ends(cluster: FakeCluster) -> None:
    """A server that answers the same page with more: true forever: one error line, not a loop."""
    page = {"messages": [{"clock": 7, "type": 85}], "more": True}
    cluster.hooks[0] = lambda stage, route, h: (200, page) if stage == "before" else None
    one_line_error(invoke("--timeout", "2", "--endpoints", cluster.addr(0), "messages"))


def test_issue6_d13_hostile_error_message_stays_one_line(cluster: FakeCluster) -> None:
    """An error answer with newlines, escapes and 100 KB of text is printed as one bounded line."""
    message = "bad\n\x1b[31mred\r\nsecond line\n" + "x" * 100_000
    cluster.hooks[0] = lambda stage, route, h: (400, {"message": message, "code": "invalid_input"})
    line = one_line_error(invoke("--endpoints", cluster.addr(0), "get", "k"), 2)
    assert "\x1b" not in line and len(line) < 500


def test_issue6_d15_unknown_outcome_says_may_have_been_applied(cluster: FakeCluster) -> None:
    """A 504 unknown_outcome on a put exits 3 with "may have been applied", not a plain timeout."""
    for i in (0, 1):
        cluster.hooks[i] = lambda stage, route, h: (
            (504, {"code": "unknown_outcome", "message": "commit not confirmed"})
            if stage == "before" and route == "/v3/kv/put" else None)
    result = invoke("--timeout", "1", "--endpoints", f"{cluster.addr(0)},{cluster.addr(1)}", "put", "k", "v")
    line = one_line_error(result, UnknownOutcomeError.exit_code)
    assert "may have been applied" in line


@pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "v"], ["messages"], ["nodes"]],
                         ids=["get", "put", "messages", "nodes"])
def test_issue6_d15_paused_first_endpoint_costs_the_dial_timeout(cluster: FakeCluster, command: list[str]) -> None:
    """With a paused first endpoint a command moves on after the dial timeout (2 s), not its 8 s timeout."""
    cluster.store.kv["k"] = "v"
    with silent_listener() as paused:
        start = time.monotonic()
        result = invoke("--timeout", "8", "--endpoints", f"{paused},{cluster.addr(0)}", *command)
        elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 4.0, f"{command[0]} took {elapsed:.1f} s"


def test_issue6_d15_status_shows_a_paused_node_unreachable_quickly(cluster: FakeCluster) -> None:
    """status asks the nodes at once and shows a paused one unreachable after the dial timeout."""
    with silent_listener() as paused:
        start = time.monotonic()
        result = invoke("--timeout", "8", "--endpoints", f"{cluster.addr(0)},{paused},{cluster.addr(1)}",
                        "status", "--json")
        elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["reachable"] for r in rows] == [True, False, True]
    assert elapsed < 4.0, f"status took {elapsed:.1f} s"


def test_dial_timeout_option(cluster: FakeCluster) -> None:
    """--dial-timeout sets how long a silent node is given."""
    cluster.store.kv["k"] = "v"
    with silent_listener() as paused:
        start = time.monotonic()
        result = invoke("--dial-timeout", "0.3", "--endpoints", f"{paused},{cluster.addr(0)}", "get", "k")
        elapsed = time.monotonic() - start
    assert result.exit_code == 0 and result.output == "v\n", result.output
    assert elapsed < 1.5


def test_put_get_del_post_messages_against_a_fake_node(cluster: FakeCluster) -> None:
    """The client commands work end to end against a well-behaved node."""
    ep = ["--endpoints", cluster.addr(0)]
    assert invoke(*ep, "put", "k", "v").output == "OK revision=1\n"
    assert invoke(*ep, "get", "k").output == "v\n"
    assert invoke(*ep, "del", "k").output == "1\n"
    assert invoke(*ep, "post", "U", "--event", "C").output == "posted clock=1\n"
    assert invoke(*ep, "messages").output.startswith("1\tU\t")


def test_issue6_d13_payload_out_of_range_is_an_error() -> None:
    """--payload 1e400 is refused (it would become infinity), not sent."""
    assert "out of range" in one_line_error(invoke("--endpoints", refused_addr(), "post", "U", "--payload", "1e400"), 2)


# ----------------------------------------------------------------- issue 8


@pytest.fixture
def real_node() -> Iterator[Any]:
    """The real endpoint over a memory coordinator (node n1, state up), on a real socket."""
    from raftcoord.coordinator import Coordinator
    from test_issue8_watch_http import Served

    coordinator = Coordinator.memory("n1", cluster="t")
    coordinator.set_node_state("up", addr="127.0.0.1:7001")
    served = Served(coordinator)
    try:
        yield served
    finally:
        served.stop()
        coordinator.close()


def test_issue8_5_messages_show_type_and_event_letters(real_node: Any) -> None:
    """messages shows type and event as letters (U, C) in text and in JSON, not byte codes 85, 67."""
    real_node.coordinator.post_message("U", "C", {"a": 1})
    real_node.coordinator.post_message(7)  # not a printable letter: stays a number
    text = invoke("--endpoints", real_node.addr, "messages")
    assert text.exit_code == 0, text.output
    first, second = text.output.splitlines()
    assert first.split("\t")[1:3] == ["U", "C"] and second.split("\t")[1:3] == ["7", "-"]
    result = invoke("--endpoints", real_node.addr, "messages", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown[0]["type"], shown[0]["event"], shown[0]["payload"]) == ("U", "C", {"a": 1})
    assert shown[1]["type"] == 7 and "event" not in shown[1]


def test_issue8_5_scan_without_prefix_lists_user_keys_only(real_node: Any) -> None:
    """scan with no prefix lists user keys (also ones starting with M or N), no node or message records."""
    coordinator = real_node.coordinator
    coordinator.post_message("U", "C")
    for key in (b"a", b"M", b"Mx", b"N", b"Nz", b"zz"):
        coordinator.put(key, b"v-" + key)
    result = invoke("--endpoints", real_node.addr, "scan")
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.splitlines()] == ["M", "Mx", "N", "Nz", "a", "zz"]
    shown = json.loads(invoke("--endpoints", real_node.addr, "scan", "--json").output)
    assert [kv["key"] for kv in shown["kvs"]] == ["M", "Mx", "N", "Nz", "a", "zz"] and shown["count"] == 6
    limited = json.loads(invoke("--endpoints", real_node.addr, "scan", "--limit", "3", "--json").output)
    assert [kv["key"] for kv in limited["kvs"]] == ["M", "Mx", "N"] and limited["more"] is True
    desc = invoke("--endpoints", real_node.addr, "scan", "--desc", "--limit", "3")
    assert [line.split("\t")[0] for line in desc.output.splitlines()] == ["zz", "a", "Nz"]
    under_n = invoke("--endpoints", real_node.addr, "scan", "N", "--serializable")
    assert [line.split("\t")[0] for line in under_n.output.splitlines()] == ["N", "Nz"]


def test_issue8_5_scan_all_shows_records_decoded(real_node: Any) -> None:
    """scan --all shows node and message records decoded (state, message fields), never raw CBOR."""
    real_node.coordinator.post_message("U", "C", {"a": 1})
    real_node.coordinator.put(b"k", b"v")
    result = invoke("--endpoints", real_node.addr, "scan", "--all")
    assert result.exit_code == 0, result.output
    assert "\\x" not in result.output and "\x11" not in result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("<message 2 U>\t") and json.loads(lines[0].split("\t", 1)[1])["event"] == "C"
    assert lines[1].startswith("<node n1>\t") and json.loads(lines[1].split("\t", 1)[1])["status"] == "up"
    assert lines[2] == "k\tv"
    shown = json.loads(invoke("--endpoints", real_node.addr, "scan", "--all", "--json").output)
    message, node_kv, user = shown["kvs"]
    assert message["record"] == "message" and message["value"]["type"] == "U"
    assert message["value"]["payload"] == {"a": 1}
    assert node_kv["record"] == "node" and node_kv["value"]["host"] == "n1" and node_kv["value"]["status"] == "up"
    assert user["key"] == "k" and user["value"] == "v" and "record" not in user
