"""``raftcoord member``: list and change the cluster's members (issue 10).

Changes go one node at a time through the log, on the leader (any node
forwards them). Adding a node is two steps, as with etcd: ``member add``
records it (a voter also joins the Raft configuration), then the new node
starts with ``raftcoord node --config FILE --name NAME --join``.
"""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["member"]

#: Member changes may wait for a new voter to catch up: at least this many seconds.
CHANGE_TIMEOUT = 60.0


def _client(ctx: click.Context) -> Any:
    from raftcoord.cli import _target

    return _target(ctx).client()


def _change(ctx: click.Context, body: dict[str, Any]) -> dict[str, Any]:
    timeout = max(CHANGE_TIMEOUT, float(ctx.find_root().obj["timeout"]))

    def check(out: Any) -> dict[str, Any]:
        if not isinstance(out, dict) or not isinstance(out.get("member"), dict):
            raise ValueError("the answer names no member")
        return out

    return _client(ctx).call("POST", "/raftcoord/v1/members", body, check=check, timeout=timeout,  # type: ignore[no-any-return]
                             retry=False)


@click.group()
def member() -> None:
    """List and change the cluster's members, one node at a time."""


@member.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--serializable", is_flag=True, help="Read the answering node's registry (may be stale).")
@click.pass_context
def list_members(ctx: click.Context, as_json: bool, serializable: bool) -> None:
    """Every member: name, role, raft and client address."""

    def check(out: Any) -> dict[str, Any]:
        if not isinstance(out, dict) or not isinstance(out.get("members"), list):
            raise ValueError("members is not a list")
        return out

    path = "/raftcoord/v1/members" + ("?consistency=serializable" if serializable else "")
    answer = _client(ctx).call("GET", path, check=check)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    leader = answer.get("leader")
    rows = [("NAME", "ROLE", "RAFT", "CLIENT")]
    for m in answer["members"]:
        role = "leader" if m.get("name") == leader else "voter" if m.get("voter") else "non-voter"
        rows.append((str(m.get("name")), role, str(m.get("raft")), str(m.get("client"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@member.command("add")
@click.argument("name")
@click.option("--raft", "raft", required=True, metavar="HOST:PORT", help="The new node's raft address.")
@click.option("--client", "client", required=True, metavar="HOST:PORT", help="The new node's client address.")
@click.option("--non-voter", is_flag=True, help="Add it as a non-voting replica (promote it later).")
@click.pass_context
def add(ctx: click.Context, name: str, raft: str, client: str, non_voter: bool) -> None:
    """Add NAME; then start it with `raftcoord node --config FILE --name NAME --join`."""
    answer = _change(ctx, {"action": "add", "name": name, "raft": raft, "client": client, "voter": not non_voter})
    kind = "non-voter" if non_voter else "voter"
    click.echo(f"added {name} as a {kind} (raft {raft}, client {client})")
    if answer.get("pending"):
        click.echo(f"note: {answer.get('note')}")
    click.echo(f"next: start it with `raftcoord node --config FILE --name {name} --join`")


@member.command("promote")
@click.argument("name")
@click.pass_context
def promote(ctx: click.Context, name: str) -> None:
    """Make the non-voter NAME a voter (it must be running and caught up)."""
    _change(ctx, {"action": "promote", "name": name})
    click.echo(f"promoted {name} to voter; it restarts its replica as a voter")


@member.command("remove")
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Remove NAME (a leader hands leadership over first); the node then stops itself."""
    _change(ctx, {"action": "remove", "name": name})
    click.echo(f"removed {name}")
