"""The ``raftcoord`` command line.

Every command is a thin client: what it does, a library user could do with
the public API or the client endpoint. Whatever the input, the arguments,
the options, the files or what an endpoint answers, an error is ONE line on
stderr ("Error: ...") and a non-zero exit code, never a traceback:

* 1: the request failed (unreachable, refused, not found, ...);
* 2: bad input or usage (the error class's code, as click does);
* 3: a write's outcome is unknown: it may or may not have been applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Final

import click

from raftcoord import __version__
from raftcoord.errors import CompactedError, ConfigError, InvalidInputError, RaftcoordError, UnknownOutcomeError

__all__ = ["main"]

log = logging.getLogger(__name__)

#: Longest error line printed; a hostile endpoint's message is cut here.
_MAX_ERROR: Final = 400


def _one_line(text: str) -> str:
    """``text`` as one printable line of bounded length (it may come from a remote node)."""
    flat = " ".join(_safe(part) for part in str(text).split())
    return flat if len(flat) <= _MAX_ERROR else flat[: _MAX_ERROR - 3] + "..."


def _safe(value: Any) -> str:
    """``value`` as printable text: control characters and lone surrogates escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _fail(message: str, exit_code: int) -> click.ClickException:
    err = click.ClickException(_one_line(message))
    err.exit_code = exit_code
    return err


def _usage_line(exc: click.UsageError) -> click.ClickException:
    if type(exc).__name__ == "NoArgsIsHelpError":  # click 8.2: the help text itself, keep it
        return exc
    hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
    return _fail(exc.format_message() + hint, exc.exit_code)


class _Group(click.Group):
    """A group that turns every error into click's one-line "Error: ..." and an exit code."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _usage_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnknownOutcomeError as exc:
            message = exc.message if "may have been applied" in exc.message else (
                f"{exc.message} (the write may have been applied)")
            raise _fail(message, exc.exit_code) from None
        except CompactedError as exc:
            message = exc.message
            if exc.oldest_clock is not None and "oldest clock kept" not in message:
                message += f" (the oldest clock kept is {exc.oldest_clock})"
            if exc.compact_revision is not None and "compact" not in message:
                message += f" (the oldest revision kept is {exc.compact_revision})"
            raise _fail(message, exc.exit_code) from None
        except RaftcoordError as exc:
            raise _fail(exc.message, exc.exit_code) from None
        except click.UsageError as exc:
            raise _usage_line(exc) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except RecursionError:
            raise _fail("input nested too deeply", 2) from None
        except Exception as exc:  # the promise is one line, whatever broke
            if logging.getLogger().handlers:  # `node` configured logging: keep the traceback there
                log.exception("unexpected error")
            raise _fail(f"unexpected {type(exc).__name__}: {exc} (a bug in raftcoord)", 1) from None


class _Seconds(click.ParamType):
    """A timeout: a finite number of seconds, more than 0, at most an hour."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from raftcoord.client import MAX_TIMEOUT

        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{_safe(value)!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
            self.fail(f"{_safe(value)} is not more than 0 and at most {MAX_TIMEOUT:g} seconds", param, ctx)
        return seconds


def _utf8(text: str, name: str) -> bytes:
    """An argument as UTF-8 bytes; a non-UTF-8 argument (surrogate-escaped by Python) is refused."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{name} is not valid UTF-8 text: {_safe(text)}", field=name.lower()) from None


class _Target:
    """Where the client commands go: endpoints, or every node of a config file."""

    def __init__(self, endpoints: str | None, config: str | None, token: str | None, timeout: float,
                 dial_timeout: float) -> None:
        self.config_path = config
        self.timeout = timeout
        self.dial_timeout = dial_timeout
        self.members: list[dict[str, str]] = []
        self.token = token
        if config:
            from raftcoord.config import load_config

            try:
                cfg = load_config(config)
            except RecursionError:
                raise ConfigError(f"{_safe(config)}: nested too deeply to be a cluster file", field="file") from None
            self.members = [{"name": n.name, "client": n.client_url, "raft": n.raft} for n in cfg.nodes]
            self.token = token or cfg.token
        if endpoints is not None:
            given = [e.strip() for e in endpoints.split(",") if e.strip()]
            self.members = [{"name": e, "client": e, "raft": ""} for e in given]
            if not self.members:
                raise InvalidInputError("--endpoints: no endpoint given", field="endpoints")
        if not self.members:
            self.members = [{"name": "localhost:2379", "client": "127.0.0.1:2379", "raft": ""}]

    def client(self, endpoints: list[str] | None = None) -> Any:
        """A client of the members (or of ``endpoints``, in that order)."""
        from raftcoord.client import Client

        return Client(endpoints or [m["client"] for m in self.members], token=self.token, timeout=self.timeout,
                      dial_timeout=self.dial_timeout)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "RAFTCOORD"})
@click.version_option(__version__, prog_name="raftcoord")
@click.option("--endpoints", metavar="URLS", help="Comma-separated client URLs or host:port of nodes.")
@click.option("--config", "config", metavar="FILE", type=click.Path(dir_okay=False),
              help="A cluster file; its nodes' client addresses are the endpoints.")
@click.option("--token", metavar="TOKEN", help="Bearer token for the client endpoint (default: the config's).")
@click.option("--timeout", type=_Seconds(), default=10.0, show_default=True,
              help="Seconds to wait for each command's request, retries on other endpoints included.")
@click.option("--dial-timeout", type=_Seconds(), default=2.0, show_default=True,
              help="Seconds to wait for a node to accept and start answering before trying the next one.")
@click.pass_context
def main(ctx: click.Context, endpoints: str | None, config: str | None, token: str | None, timeout: float,
         dial_timeout: float) -> None:
    """raftcoord: a Raft-replicated coordinator for PuzzleDB nodes.

    Node states and a Lamport-ordered message box, replicated peer to peer.
    Client commands reach the cluster through --endpoints or --config
    (or RAFTCOORD_ENDPOINTS / RAFTCOORD_CONFIG); by default 127.0.0.1:2379.

    Exit codes: 0 done; 1 failed; 2 bad input or usage; 3 the outcome of a
    write is unknown (it may have been applied: check before retrying).
    """
    ctx.obj = {"endpoints": endpoints, "config": config, "token": token, "timeout": timeout,
               "dial_timeout": dial_timeout}


def _target(ctx: click.Context) -> _Target:
    o = ctx.find_root().obj
    return _Target(o["endpoints"], o["config"], o["token"], o["timeout"], o["dial_timeout"])


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _kv_json(kv: dict[str, Any]) -> dict[str, Any]:
    return {**kv, "key": _text(kv["key"]), "value": _text(kv["value"])}


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
serializable_option = click.option("--serializable", is_flag=True,
                                   help="Read the answering node's replica (faster; may be stale).")


@main.command()
def version() -> None:
    """Print the version of raftcoord and of the Raft engine."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        engine = dist_version("pysyncobj")
    except PackageNotFoundError:  # pragma: no cover - dependency always installed
        engine = "not installed"
    click.echo(f"raftcoord {__version__} (pysyncobj {engine})")
    from raftcoord.formats import describe_known  # issue 10: what a rolling upgrade must check

    click.echo(f"formats: {describe_known()}")


@main.command()
@click.option("--messages", "count", type=click.IntRange(0, 1000), default=6, show_default=True,
              help="How many messages to post.")
def demo(count: int) -> None:
    """Run two in-memory nodes that share one store and exchange messages.

    Shows the embedded API: node states, posting messages of type U (user)
    with event C (created), and observers receiving the other node's
    messages in clock order.
    """
    from raftcoord.coordinator import Coordinator, MemoryBackend

    backend = MemoryBackend()
    nodes = [Coordinator(backend, host=f"n{i}", cluster="demo") for i in (1, 2)]
    received: dict[str, list[Any]] = {c.host: [] for c in nodes}
    done = threading.Semaphore(0)

    def observer_for(host: str) -> Any:
        def observe(message: Any) -> None:
            received[host].append(message)
            done.release()

        return observe

    for c in nodes:
        c.add_observer(observer_for(c.host))
        c.set_node_state("up", addr=f"memory://{c.host}")
    click.echo("cluster state:")
    for state in nodes[0].get_cluster_state():
        click.echo(f"  {state.host:<4} {state.status.value:<8} cluster={state.cluster} clock={state.clock}")
    click.echo(f"posting {count} messages (type U, event C), alternating n1 and n2:")
    for i in range(count):
        sender = nodes[i % 2]
        m = sender.post_message("U", "C", {"value": i})
        click.echo(f"  {sender.host} posted clock={m.clock} payload={m.payload}")
    for _ in range(count):  # each message is observed by the node that did not post it
        if not done.acquire(timeout=5):
            raise click.ClickException("observers did not receive every message within 5 s")
    for c in nodes:
        seen = ", ".join(f"{m.clock}:{m.from_host}:{m.payload['value']}" for m in received[c.host])
        click.echo(f"{c.host} observed (clock:from:value): {seen}")
    click.echo("local clocks: " + ", ".join(f"{c.host}={c.clock}" for c in nodes))
    click.echo(f"store revision {nodes[0].revision()} at {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
    for c in nodes:
        c.close()


@main.command()
@click.option("--config", "node_config", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="The cluster file (default: the group's --config).")
@click.option("--name", required=True, help="This node's name in the cluster file.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--join", is_flag=True,
              help="Join a running cluster that added this node (`raftcoord member add`): take the voters "
                   "from its member registry, not from the file.")
@click.pass_context
def node(ctx: click.Context, node_config: str | None, name: str, log_level: str, join: bool) -> None:
    """Run one node in the foreground until SIGTERM, Ctrl-C or its removal from the cluster."""
    import logging

    from raftcoord.server import run_node

    path = node_config or ctx.find_root().obj["config"]
    if not path:
        raise InvalidInputError("node needs --config FILE", field="config")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_node(path, name, join=join)


@main.command()
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True, help="Nodes in the cluster.")
@click.option("--duration", type=click.FloatRange(1, 86400), default=60.0, show_default=True,
              help="Seconds of faults.")
@click.option("--faults", default="kill,pause,partition", show_default=True,
              help="Comma-separated fault kinds: kill, kill-leader, kill-majority, pause, partition, delay, drop, "
                   "member.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Seed of the fault schedule and the workload (default: a random one, printed).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where a failing run writes its history and report (default: a new temporary directory).")
@click.option("--network", type=click.Choice(["auto", "netns", "proxy"]), default="auto", show_default=True,
              help="Partitions through network namespaces (root) or a proxy on the raft ports.")
@click.option("--max-ops", type=click.IntRange(1, 10**7), default=None,
              help="Register operations at most (default: 100 per second, at most 30,000).")
@click.option("-v", "--verbose", is_flag=True, help="Log the run's progress to stderr.")
def chaos(nodes: int, duration: float, faults: str, seed: int | None, out: str | None, network: str,
          max_ops: int | None, verbose: bool) -> None:
    """Run the fault suite: a real cluster under faults, then every check; prints one JSON line.

    Starts NODES node processes, runs register, message and durability
    workloads and a watch on every node against them while injecting faults
    for DURATION seconds, heals, kills and restarts the whole cluster, and
    checks linearizability, message order, recovery, durability, agreement
    and watches. Exit code 0 when every
    check passed, 1 otherwise (the history and a report are then written).
    """
    import random
    from pathlib import Path

    from raftcoord.chaos import runner

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("raftcoord.client").setLevel(logging.WARNING)
    options = runner.ChaosOptions(
        nodes=nodes,
        duration=duration,
        faults=[k.strip() for k in faults.split(",") if k.strip()],
        seed=random.SystemRandom().randrange(2**31) if seed is None else seed,
        out=Path(out) if out else None,
        netns={"auto": None, "netns": True, "proxy": False}[network],
        max_ops=max_ops,
    )
    summary = runner.sigterm_as_interrupt(lambda: runner.run(options))
    click.echo(json.dumps(summary, sort_keys=False))
    if not summary["ok"]:
        raise click.exceptions.Exit(1)


@main.command()
@click.option("--quick", is_flag=True, help="Short rows, 2 failovers, 100,000 keys (memory extrapolated); < 2 min.")
@click.option("--systems", default="all", show_default=True,
              help="Comma-separated: raftcoord, embedded, etcd, pysyncobj, pysyncobj-batch, raftcoord+7nv.")
@click.option("--workloads", default="all", show_default=True,
              help="Comma-separated: puts, get-linearizable, get-serializable, cas, messages, failover, restart, "
                   "memory.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True,
              help="Where bench.json, bench.md and bench.png are written.")
def bench(quick: bool, systems: str, workloads: str, out: str) -> None:
    """Benchmark raftcoord beside etcd and plain pysyncobj on 127.0.0.1; prints a table with ratios.

    Starts its own 3-member clusters (killed when it ends, also on Ctrl-C),
    runs every workload against every system in turn at 1, 16 and 64
    clients, and writes every figure to OUT/bench.json, the table as Markdown
    to OUT/bench.md and, when matplotlib is installed (pip install
    'raftcoord[bench]'), a plot to OUT/bench.png. etcd is skipped, with a
    line saying so, when no etcd is on the PATH.
    """
    from pathlib import Path

    from raftcoord.bench import SYSTEMS, WORKLOADS, BenchOptions, run
    from raftcoord.bench.report import format_table

    def pick(text: str, known: tuple[str, ...], name: str) -> tuple[str, ...]:
        if text.strip() == "all":
            return known
        chosen = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = [x for x in chosen if x not in known]
        if unknown or not chosen:
            raise InvalidInputError(f"{name} must be 'all' or some of {', '.join(known)}, not {_safe(text)!r}",
                                    field=name.lstrip("-"))
        return chosen

    chosen = {"systems": pick(systems, SYSTEMS, "--systems"), "workloads": pick(workloads, WORKLOADS, "--workloads"),
              "out": Path(out)}
    options = BenchOptions.quick_run(**chosen) if quick else BenchOptions(**chosen)
    try:
        report = run(options)
    except KeyboardInterrupt:
        raise _fail("interrupted; every process the benchmark started was killed", 130) from None
    click.echo(format_table(report))
    click.echo("figures written to " + " and ".join(report["files"].values()))


@main.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """One row per member: role, term, indexes, leader, node state, reachable.

    The members are asked at once, each given the dial timeout to start
    answering, so a paused node costs about that, not the whole timeout.
    """
    target = _target(ctx)
    client = target.client()

    def row_for(m: dict[str, str]) -> dict[str, Any]:
        row: dict[str, Any] = {"name": m["name"], "client_url": m["client"], "raft": m["raft"], "reachable": False}
        try:
            st = client.status(endpoint=m["client"])
        except RaftcoordError as exc:
            row["error"] = exc.message
            return row
        row.update(
            reachable=True,
            name=st.get("name", m["name"]),
            raft=st.get("raft", m["raft"]) or st.get("self", ""),
            role=st.get("role"),
            term=st.get("term"),
            commit_index=st.get("commit_index"),
            last_applied=st.get("last_applied"),
            leader=st.get("leader"),
        )
        return row

    with ThreadPoolExecutor(max_workers=min(32, len(target.members))) as pool:
        rows = list(pool.map(row_for, target.members))
    reachable = [m["client"] for m, r in zip(target.members, rows) if r["reachable"]]
    states: dict[Any, Any] = {}
    if reachable:
        try:
            states = {n.get("host"): n.get("status") for n in target.client(reachable).nodes()}
        except RaftcoordError:
            pass
    for row in rows:
        row["status"] = states.get(row["name"], "unknown")
    if as_json:
        _emit_json(rows)
        return
    header = ("NAME", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER", "STATUS", "REACHABLE")
    table = [header] + [
        tuple(_one_line(cell)[:80] for cell in (
            r["name"], r["raft"] or "-", r.get("role") or "-", r.get("term", "-"),
            r.get("commit_index", "-"), r.get("last_applied", "-"), r.get("leader") or "-",
            r["status"], "yes" if r["reachable"] else "no",
        ))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command()
@json_option
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """Every node's state record, with its raft role and how long ago the leader heard it.

    Only the leader hears every node: the answer of whichever node replies
    first names the leader, which is then asked for its view (the first
    answer is shown if the leader cannot be reached).
    """
    client = _target(ctx).client()

    def check(out: Any) -> dict[str, Any]:
        if not isinstance(out, dict) or not isinstance(out.get("nodes"), list) or \
                not all(isinstance(n, dict) for n in out["nodes"]):
            raise ValueError("nodes is not a list of objects")
        return out

    answer = client.call("GET", "/raftcoord/v1/nodes", check=check)
    leader_url = answer.get("leader_client_url")
    if answer.get("role") != "leader" and isinstance(leader_url, str) and leader_url:
        try:
            answer = client.call("GET", "/raftcoord/v1/nodes", endpoint=leader_url, check=check, retry=False)
        except RaftcoordError as exc:
            log.info("the leader's view is not available (%s); showing %s's", exc.message, answer.get("node"))
    states = answer["nodes"]
    if as_json:
        _emit_json(states)
        return
    for n in states:
        heard = n.get("heard_ago")
        heard_text = f"heard={heard:.1f}s" if isinstance(heard, (int, float)) else "heard=-"
        click.echo("\t".join(_safe(x) for x in (
            n.get("host"), n.get("status"), f"role={n.get('raft_role') or '-'}", heard_text,
            f"clock={n.get('clock')}", f"cluster={n.get('cluster', '')}", f"addr={n.get('addr', '')}",
            n.get("timestamp"))))


@main.command()
@click.argument("key")
@click.argument("value")
@click.pass_context
def put(ctx: click.Context, key: str, value: str) -> None:
    """Set KEY to VALUE (both UTF-8 text); prints the revision."""
    data = (_utf8(key, "KEY"), _utf8(value, "VALUE"))
    click.echo(f"OK revision={_target(ctx).client().put(*data)}")


@main.command()
@click.argument("key")
@json_option
@serializable_option
@click.pass_context
def get(ctx: click.Context, key: str, as_json: bool, serializable: bool) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    kv = _target(ctx).client().get(_utf8(key, "KEY"), serializable=serializable)
    if as_json:
        _emit_json(_kv_json(kv))
    else:
        click.echo(_text(kv["value"]))


@main.command(name="del")
@click.argument("key")
@click.option("--prefix", is_flag=True, help="Delete every user key starting with KEY.")
@click.pass_context
def delete(ctx: click.Context, key: str, prefix: bool) -> None:
    """Delete KEY; prints how many keys were deleted."""
    click.echo(_target(ctx).client().delete(_utf8(key, "KEY"), prefix=prefix))


@main.command()
@click.argument("prefix", default="")
@click.option("--limit", type=click.IntRange(0, 2**63 - 1), default=0, help="At most this many keys (0: all).")
@click.option("--desc", is_flag=True, help="Descending key order.")
@click.option("--all", "show_all", is_flag=True,
              help="Also list the node and message records, decoded, as <node HOST> and <message CLOCK TYPE>.")
@json_option
@serializable_option
@click.pass_context
def scan(ctx: click.Context, prefix: str, limit: int, desc: bool, show_all: bool, as_json: bool,
         serializable: bool) -> None:
    """List user keys starting with PREFIX (all user keys if omitted), with values."""
    out = _target(ctx).client().scan(_utf8(prefix, "PREFIX"), limit=limit, descending=desc,
                                     serializable=serializable, user_only=not show_all)
    if as_json:
        _emit_json({**out, "kvs": [_record_json(kv) for kv in out["kvs"]]})
        return
    for kv in out["kvs"]:
        shown = _record_json(kv)
        value = shown["value"] if "record" not in shown else json.dumps(shown["value"], sort_keys=True)
        click.echo(f"{shown['key']}\t{value}")


def _record_json(kv: dict[str, Any]) -> dict[str, Any]:
    """A scanned key-value for display: a node or message record decoded, a user key as text."""
    from raftcoord.keys import is_reserved

    if not is_reserved(kv["key"]):
        return _kv_json(kv)
    from raftcoord.endpoint import to_json
    from raftcoord.errors import DecodeError
    from raftcoord.values import Message, NodeState

    out = {**kv, "record": "node" if kv["key"].startswith(b"N") else "message", "key": _display_key(kv["key"])}
    try:
        if out["record"] == "node":
            out["value"] = to_json(NodeState.decode(kv["value"]).to_map())
        else:
            out["value"] = _letters(to_json(Message.decode(kv["value"]).to_map()))
    except DecodeError as exc:  # a record written by a newer version, or damaged
        out["value"] = {"undecodable": _one_line(exc.message)}
    return out


def _display_key(key: bytes) -> str:
    """A key as shown: a user key as text, a node or message record's as ``<node HOST>``, ``<message CLOCK TYPE>``."""
    from raftcoord.errors import DecodeError
    from raftcoord.keys import NodeKey, decode_key, is_reserved

    if not is_reserved(key):
        return _text(key)
    kind = "node" if key.startswith(b"N") else "message"
    try:
        decoded = decode_key(key)
    except DecodeError:
        return f"<{kind} {key[2:].hex()}>"
    if isinstance(decoded, NodeKey):
        return f"<node {_safe(decoded.host)}>"
    return f"<message {decoded.clock} {_letter(decoded.type)}>"


@main.command()
@click.argument("type")
@click.option("--event", help="Event code: C created, U updated, D deleted (or an int).")
@click.option("--payload", help="The payload as JSON (text that is not JSON is sent as a string).")
@json_option
@click.pass_context
def post(ctx: click.Context, type: str, event: str | None, payload: str | None, as_json: bool) -> None:
    """Post a message of TYPE (O object, D database, C collection, U user, or an int)."""
    code = _code_arg(type, "TYPE")
    event_code = None if event is None else _code_arg(event, "--event")
    body: Any = None
    if payload is not None:
        _utf8(payload, "--payload")
        try:
            body = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)
        except _OutOfRange as exc:
            raise InvalidInputError(f"--payload: {exc}", field="payload") from None
        except (ValueError, RecursionError):
            body = payload  # not JSON: sent as text
    msg = _target(ctx).client().post(code, event_code, body)
    if as_json:
        _emit_json(msg)
    else:
        click.echo(f"posted clock={_safe(msg.get('clock'))}")


@main.command()
@click.option("--since", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Only messages with a clock above this.")
@click.option("--limit", type=click.IntRange(0, 2**63 - 1), default=0, help="At most this many messages (0: all).")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new messages as they come (from now, or after --since) until Ctrl-C.")
@json_option
@click.pass_context
def messages(ctx: click.Context, since: int | None, limit: int, follow: bool, as_json: bool) -> None:
    """List messages in clock order (with --follow, stream them: one line, or one JSON object, each)."""
    client = _target(ctx).client()
    if follow:
        if limit:
            raise InvalidInputError("--limit does not go with --follow", field="limit")
        with _until_interrupted():
            for m in client.follow_messages(since=since):
                if as_json:
                    click.echo(json.dumps(_letters(m), sort_keys=True, default=str))
                else:
                    click.echo(_message_line(m))
        return
    msgs = client.messages(since=since, limit=limit)
    if as_json:
        _emit_json([_letters(m) for m in msgs])
        return
    for m in msgs:
        click.echo(_message_line(m))


def _message_line(m: dict[str, Any]) -> str:
    return "\t".join(_safe(x) for x in (
        m.get("clock"), _letter(m.get("type")), _letter(m.get("event")), f"from={m.get('from')}",
        json.dumps(m.get("payload"), default=str), m.get("timestamp")))


@contextlib.contextmanager
def _until_interrupted() -> Iterator[None]:
    """Ctrl-C ends a stream normally (exit 0); a closed stdout (a pipe to ``head``) too."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("", err=True)
    except BrokenPipeError:
        pass


@main.command()
@click.argument("prefix")
@click.option("--rev", type=click.IntRange(1, 2**63 - 1), default=None,
              help="Start at this revision (default: the next one); older kept revisions are replayed.")
@click.option("--prev-kv", is_flag=True, help="Also show each key's value before the event.")
@json_option
@click.pass_context
def watch(ctx: click.Context, prefix: str, rev: int | None, prev_kv: bool, as_json: bool) -> None:
    """Print every change to keys starting with PREFIX ("" for all) until Ctrl-C.

    One line per event: revision, PUT or DELETE, key, value (with --json,
    one JSON object per event). Node and message records are shown decoded,
    as in scan --all. If the node goes away the watch resumes on another
    endpoint from the next revision, so no event is missed or repeated.
    """
    client = _target(ctx).client()
    with _until_interrupted():
        for answer in client.watch(_utf8(prefix, "PREFIX"), prefix=True, start_revision=rev, prev_kv=prev_kv):
            for event in answer["events"]:
                shown = _record_json(event["kv"]) if event["type"] == "PUT" else {"key": _display_key(event["kv"]["key"])}
                prev = _record_json(event["prev_kv"]) if event["prev_kv"] is not None else None
                if as_json:
                    out = {"revision": answer["revision"], "type": event["type"], **shown}
                    if prev is not None:
                        out["prev_value"] = prev["value"]
                    click.echo(json.dumps(out, sort_keys=True, default=str))
                    continue
                value = shown.get("value")
                cells = [str(answer["revision"]), event["type"], shown["key"]]
                if event["type"] == "PUT":
                    cells.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
                if prev is not None:
                    before = prev["value"]
                    cells.append("prev=" + (before if isinstance(before, str) else json.dumps(before, sort_keys=True)))
                click.echo("\t".join(cells))


def _code_arg(text: str, name: str) -> str | int:
    """A message type or event: an int 0-255 or one printable ASCII character."""
    if text.isascii() and text.isdigit() and len(text) <= 3 and int(text) <= 255:
        return int(text)
    if len(text) == 1 and text.isascii() and text.isprintable() and not text.isdigit():
        return text
    raise InvalidInputError(f"{name} must be an int 0-255 or one ASCII letter such as U, got {_safe(text)!r}",
                            field=name.lstrip("-").lower())


class _OutOfRange(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(f"the number {text[:40]} is out of range")
    return value


def _letter(code: Any) -> str:
    if _is_letter(code):
        return chr(code)
    return "-" if code is None else str(code)


def _is_letter(code: Any) -> bool:
    return isinstance(code, int) and not isinstance(code, bool) and 32 < code < 127


def _letters(message: Any) -> Any:
    """A message's JSON with ``type`` and ``event`` as their letters (``"U"``) where they have one."""
    if not isinstance(message, dict):
        return message
    return {k: chr(v) if k in ("type", "event") and _is_letter(v) else v for k, v in message.items()}


from raftcoord.cli_member import member as _member_group  # noqa: E402 - its commands use the helpers above

main.add_command(_member_group)

from raftcoord.cli_snapshot import snapshot as _snapshot_group  # noqa: E402 - issue 10 backup (H2)

main.add_command(_snapshot_group)
