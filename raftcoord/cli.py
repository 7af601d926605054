"""The ``raftcoord`` command line.

Every command is a thin client: what it does, a library user could do with
the public API or the client endpoint. Errors are one line on stderr and the
exit code the error class carries; never a traceback.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from typing import Any

import click

from raftcoord import __version__
from raftcoord.errors import InvalidInputError, RaftcoordError

__all__ = ["main"]


class _Group(click.Group):
    """A group that turns raftcoord errors into click's one-line errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RaftcoordError as exc:
            err = click.ClickException(exc.message)
            err.exit_code = exc.exit_code
            raise err from None


class _Target:
    """Where the client commands go: endpoints, or every node of a config file."""

    def __init__(self, endpoints: str | None, config: str | None, token: str | None, timeout: float) -> None:
        self.config_path = config
        self.timeout = timeout
        self.members: list[dict[str, str]] = []
        self.token = token
        if config:
            from raftcoord.config import load_config

            cfg = load_config(config)
            self.members = [{"name": n.name, "client": n.client_url, "raft": n.raft} for n in cfg.nodes]
            self.token = token or cfg.token
        if endpoints:
            self.members = [{"name": e.strip(), "client": e.strip(), "raft": ""} for e in endpoints.split(",") if e.strip()]
        if not self.members:
            self.members = [{"name": "localhost:2379", "client": "127.0.0.1:2379", "raft": ""}]

    def client(self) -> Any:
        from raftcoord.client import Client

        return Client([m["client"] for m in self.members], token=self.token, timeout=self.timeout)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "RAFTCOORD"})
@click.version_option(__version__, prog_name="raftcoord")
@click.option("--endpoints", metavar="URLS", help="Comma-separated client URLs or host:port of nodes.")
@click.option("--config", "config", metavar="FILE", type=click.Path(dir_okay=False),
              help="A cluster file; its nodes' client addresses are the endpoints.")
@click.option("--token", metavar="TOKEN", help="Bearer token for the client endpoint (default: the config's).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each request.")
@click.pass_context
def main(ctx: click.Context, endpoints: str | None, config: str | None, token: str | None, timeout: float) -> None:
    """raftcoord: a Raft-replicated coordinator for PuzzleDB nodes.

    Node states and a Lamport-ordered message box, replicated peer to peer.
    Client commands reach the cluster through --endpoints or --config
    (or RAFTCOORD_ENDPOINTS / RAFTCOORD_CONFIG); by default 127.0.0.1:2379.
    """
    ctx.obj = {"endpoints": endpoints, "config": config, "token": token, "timeout": timeout}


def _target(ctx: click.Context) -> _Target:
    o = ctx.find_root().obj
    return _Target(o["endpoints"], o["config"], o["token"], o["timeout"])


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


@main.command()
@click.option("--messages", "count", default=6, show_default=True, help="How many messages to post.")
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
@click.pass_context
def node(ctx: click.Context, node_config: str | None, name: str, log_level: str) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C."""
    import logging

    from raftcoord.server import run_node

    path = node_config or ctx.find_root().obj["config"]
    if not path:
        raise InvalidInputError("node needs --config FILE", field="config")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_node(path, name)


@main.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """One row per member: role, term, indexes, leader, node state, reachable."""
    target = _target(ctx)
    client = target.client()
    rows = []
    for m in target.members:
        row: dict[str, Any] = {"name": m["name"], "client_url": m["client"], "raft": m["raft"], "reachable": False}
        try:
            st = client.status(endpoint=m["client"])
        except RaftcoordError as exc:
            row["error"] = exc.message
        else:
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
        rows.append(row)
    try:
        states = {n["host"]: n.get("status") for n in client.nodes()}
    except RaftcoordError:
        states = {}
    for row in rows:
        row["status"] = states.get(row["name"], "unknown")
    if as_json:
        _emit_json(rows)
        return
    header = ("NAME", "RAFT", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER", "STATUS", "REACHABLE")
    table = [header] + [
        (
            str(r["name"]), str(r["raft"] or "-"), str(r.get("role") or "-"), str(r.get("term", "-")),
            str(r.get("commit_index", "-")), str(r.get("last_applied", "-")), str(r.get("leader") or "-"),
            str(r["status"]), "yes" if r["reachable"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command()
@json_option
@click.pass_context
def nodes(ctx: click.Context, as_json: bool) -> None:
    """Every node's state record."""
    states = _target(ctx).client().nodes()
    if as_json:
        _emit_json(states)
        return
    for n in states:
        click.echo(f"{n['host']}\t{n['status']}\tcluster={n.get('cluster', '')}\taddr={n.get('addr', '')}"
                   f"\tclock={n.get('clock')}\t{n.get('timestamp')}")


@main.command()
@click.argument("key")
@click.argument("value")
@click.pass_context
def put(ctx: click.Context, key: str, value: str) -> None:
    """Set KEY to VALUE (both UTF-8 text); prints the revision."""
    click.echo(f"OK revision={_target(ctx).client().put(key.encode(), value.encode())}")


@main.command()
@click.argument("key")
@json_option
@serializable_option
@click.pass_context
def get(ctx: click.Context, key: str, as_json: bool, serializable: bool) -> None:
    """Print the value of KEY (exit 1 if it does not exist)."""
    kv = _target(ctx).client().get(key.encode(), serializable=serializable)
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
    click.echo(_target(ctx).client().delete(key.encode(), prefix=prefix))


@main.command()
@click.argument("prefix", default="")
@click.option("--limit", default=0, help="At most this many keys (0: all).")
@click.option("--desc", is_flag=True, help="Descending key order.")
@json_option
@serializable_option
@click.pass_context
def scan(ctx: click.Context, prefix: str, limit: int, desc: bool, as_json: bool, serializable: bool) -> None:
    """List keys starting with PREFIX (all keys if omitted), with values."""
    out = _target(ctx).client().scan(prefix.encode(), limit=limit, descending=desc, serializable=serializable)
    if as_json:
        _emit_json({**out, "kvs": [_kv_json(kv) for kv in out["kvs"]]})
        return
    for kv in out["kvs"]:
        click.echo(f"{_text(kv['key'])}\t{_text(kv['value'])}")


@main.command()
@click.argument("type")
@click.option("--event", help="Event code: C created, U updated, D deleted (or an int).")
@click.option("--payload", help="The payload as JSON (text that is not JSON is sent as a string).")
@json_option
@click.pass_context
def post(ctx: click.Context, type: str, event: str | None, payload: str | None, as_json: bool) -> None:
    """Post a message of TYPE (O object, D database, C collection, U user, or an int)."""
    body: Any = None
    if payload is not None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = payload
    msg = _target(ctx).client().post(_code_arg(type), None if event is None else _code_arg(event), body)
    if as_json:
        _emit_json(msg)
    else:
        click.echo(f"posted clock={msg.get('clock')}")


@main.command()
@click.option("--since", type=int, default=None, help="Only messages with a clock above this.")
@click.option("--limit", default=0, help="At most this many messages (0: all).")
@json_option
@click.pass_context
def messages(ctx: click.Context, since: int | None, limit: int, as_json: bool) -> None:
    """List messages in clock order."""
    msgs = _target(ctx).client().messages(since=since, limit=limit)
    if as_json:
        _emit_json(msgs)
        return
    for m in msgs:
        click.echo(f"{m.get('clock')}\t{_letter(m.get('type'))}\t{_letter(m.get('event'))}\tfrom={m.get('from')}"
                   f"\t{json.dumps(m.get('payload'), default=str)}\t{m.get('timestamp')}")


def _code_arg(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _letter(code: Any) -> str:
    if isinstance(code, int) and 32 < code < 127:
        return chr(code)
    return "-" if code is None else str(code)
