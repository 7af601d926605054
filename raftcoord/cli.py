"""The ``raftcoord`` command line.

Every command is a thin client: what it does, a library user could do with
the public API or the client endpoint. Errors are one line on stderr and the
exit code the error class carries; never a traceback.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import click

from raftcoord import __version__
from raftcoord.errors import RaftcoordError

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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raftcoord")
def main() -> None:
    """raftcoord: a Raft-replicated coordinator for PuzzleDB nodes.

    Node states and a Lamport-ordered message box, replicated peer to peer.
    """


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
