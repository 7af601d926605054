"""``raftcoord snapshot save|status|restore``: backups of a running cluster (issue 10).

As with ``etcdctl snapshot``: ``save FILE`` asks a node for a backup of one
revision (``GET /raftcoord/v1/snapshot``, a linearizable read) and writes it
to FILE; ``status FILE`` checks a file and says what it holds; ``restore
FILE --config NEW.toml --name NODE`` turns it into the data directory of one
node of a new cluster. Restore every node of the new cluster from the same
file, then start them as usual (``raftcoord node --config NEW.toml --name
NODE``). The file format is :mod:`raftcoord.backup`'s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import click

from raftcoord.backup import SNAPSHOT_PATH, Backup, backup_status, read_backup, restore_data_dir
from raftcoord.client_http import Endpoint, parse_endpoint
from raftcoord.errors import AuthError, InvalidInputError, RaftcoordError, UnavailableError, ValueFormatError
from raftcoord.errors import error_from_code
from raftcoord.raftfiles import fsync_path

__all__ = ["download_backup", "snapshot"]

#: Seconds ``snapshot save`` may take when --timeout is not given: a large store takes a while to send.
SAVE_TIMEOUT: Final = 300.0
#: Bytes read from the socket at a time.
_READ_BYTES: Final = 1024 * 1024
#: Seconds a node may stay silent (before its answer, or within it) before the next one is tried.
_PATIENCE: Final = 30.0
#: The most of an error answer read.
_MAX_ERROR_BODY: Final = 64 * 1024


class _TryNext(Exception):
    """This endpoint could not give a backup; another may."""


def download_backup(endpoints: list[str], path: str | os.PathLike[str], *, token: str | None = None,
                    timeout: float = SAVE_TIMEOUT, dial_timeout: float = 2.0) -> Backup:
    """Save a backup of the cluster's state at ``path``, from the first of ``endpoints`` that gives one.

    The file is written beside ``path`` under a temporary name, synced,
    checked (:func:`raftcoord.backup.read_backup`) and only then renamed
    over ``path``, so ``path`` is either the old file or a whole, checked
    backup. An endpoint that cannot be reached, is busy or unavailable, or
    sends a damaged file is skipped for the next one; a refusal (a wrong
    token, say) is raised at once. ``timeout`` bounds the whole download.
    Returns the backup written (its state included).
    """
    if not endpoints:
        raise InvalidInputError("no endpoints given (use --endpoints or --config)", field="endpoints")
    eps = [parse_endpoint(e) for e in endpoints]
    if token is not None and (not token or not token.isascii() or not token.isprintable()):
        raise InvalidInputError("token: must be printable ASCII text", field="token")
    target = Path(path)
    if target.is_dir():
        raise InvalidInputError(f"{target} is a directory; give the backup file's name", field="file")
    if not target.parent.is_dir():
        raise InvalidInputError(f"{target.parent} is not a directory", field="file")
    deadline = time.monotonic() + timeout
    last = "no endpoint was tried"
    for i, ep in enumerate(eps):
        if time.monotonic() >= deadline:
            last += " (then the timeout passed)"
            break
        # A node that takes the request and then says nothing (paused,
        # wedged) is left for the next one after a while; the last one left
        # may take until the deadline, as a large store takes time to send.
        patience = None if i == len(eps) - 1 else max(_PATIENCE, 5 * dial_timeout)
        try:
            return _fetch(ep, target, token, deadline, dial_timeout, patience)
        except _TryNext as exc:
            last = str(exc)
    where = ", ".join(e.url for e in eps)
    raise UnavailableError(f"no endpoint gave a backup ({where}): {last}")


def _fetch(ep: Endpoint, target: Path, token: str | None, deadline: float, dial_timeout: float,
           patience: float | None) -> Backup:
    def arm() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _TryNext(f"{ep}: the timeout passed during the download (give a longer --timeout)")
        sock.settimeout(left if patience is None else min(left, patience))

    left = deadline - time.monotonic()
    conn: http.client.HTTPConnection
    if ep.scheme == "https":
        conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=min(dial_timeout, left),
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(ep.host, ep.port, timeout=min(dial_timeout, left))
    tmp: Path | None = None
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise _TryNext(f"{ep}: cannot connect: {exc.strerror or exc}") from None
        sock = conn.sock  # the answer reads from it after the connection lets go of it (Connection: close)
        headers = {"Accept": "application/octet-stream"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            # The node answers once it has the whole backup in memory.
            arm()
            conn.request("GET", ep.prefix + SNAPSHOT_PATH, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                _refused(ep, response.status, response.read(_MAX_ERROR_BODY))
            tmp = _receive(response, target, arm)
        except (OSError, http.client.HTTPException) as exc:
            why = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or repr(exc))
            raise _TryNext(f"{ep}: the download failed: {why}") from None
        try:
            backup = read_backup(tmp)
        except ValueFormatError as exc:
            raise _TryNext(f"{ep}: sent a damaged backup: {exc.message}") from None
        try:
            os.replace(tmp, target)
            tmp = None
            fsync_path(target.parent)  # the rename
        except OSError as exc:
            raise InvalidInputError(f"cannot write {target}: {exc.strerror or exc}", field="file") from None
        return backup
    finally:
        conn.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _receive(response: http.client.HTTPResponse, target: Path, arm: Any) -> Path:
    """The answer's body in a synced temporary file beside ``target``; its path.

    A failure to read the answer raises ``OSError`` (``_fetch`` tries the
    next node); a failure to write here is this machine's, and final.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise InvalidInputError(f"cannot write beside {target}: {exc.strerror or exc}", field="file") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                arm()
                chunk = response.read1(_READ_BYTES)
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise InvalidInputError(f"cannot write {tmp}: {exc.strerror or exc}", field="file") from None
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise InvalidInputError(f"cannot write {tmp}: {exc.strerror or exc}", field="file") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _refused(ep: Endpoint, status: int, body: bytes) -> None:
    """An answer other than 200: raise the node's error, or _TryNext when another node may do better."""
    try:
        obj = json.loads(body.decode("utf-8"))
        message = str(obj.get("message") or obj.get("error"))[:500]
        code = obj.get("raftcoord_code", obj.get("code"))
        field = obj.get("field") if isinstance(obj.get("field"), str) else None
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        message, code, field = f"HTTP {status}", None, None
    if status == 404:
        raise _TryNext(f"{ep}: has no {SNAPSHOT_PATH} route (a raftcoord older than issue 10?)")
    if status >= 500 or status in (408, 429):
        raise _TryNext(f"{ep}: {message}")
    if status in (401, 403):
        raise AuthError(f"{ep}: {message}")
    if isinstance(code, str):
        err = error_from_code(code, f"{ep}: {message}", field)
        if isinstance(err, RaftcoordError) and type(err) is not RaftcoordError:
            raise err
    raise InvalidInputError(f"{ep}: answered {status}: {message}")


# ---------------------------------------------------------------------- CLI

def _print_fields(rows: list[tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        click.echo(f"{name + ':':<{width}} {value}")


@click.group()
def snapshot() -> None:
    """Back up a running cluster to a file, check a backup, restore one into a new cluster."""


@snapshot.command("save")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def save(ctx: click.Context, file: str) -> None:
    """Save a consistent backup of the cluster's state to FILE.

    One revision, read linearizably by whichever node answers first
    (--endpoints or --config), written with a SHA-256 checksum. FILE is
    replaced only once the whole backup has arrived and checks out.
    Without --timeout the download may take up to 300 seconds.
    """
    from raftcoord.cli import _target

    root = ctx.find_root()
    target = _target(ctx)
    timeout = target.timeout
    if root.get_parameter_source("timeout") == click.core.ParameterSource.DEFAULT:
        timeout = max(timeout, SAVE_TIMEOUT)
    backup = download_backup([m["client"] for m in target.members], file, token=target.token,
                             timeout=timeout, dial_timeout=target.dial_timeout)
    h = backup.header
    click.echo(f"Snapshot saved at {file}: revision {h.revision}, clock {h.clock}, {h.keys} keys, "
               f"{h.messages} messages, {h.nodes} nodes, {backup.size} bytes, sha256 {backup.sha256}")


@snapshot.command("status")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(file: str, as_json: bool) -> None:
    """Check the backup FILE and print what it holds (exit 2 if it is damaged)."""
    info = backup_status(file)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    _print_fields([
        ("file", info["file"]),
        ("cluster", info["cluster"]),
        ("created", info["created"]),
        ("revision", info["revision"]),
        ("clock", info["clock"]),
        ("keys", info["keys"]),
        ("messages", info["messages"]),
        ("nodes", info["nodes"]),
        ("size", f"{info['size']} bytes"),
        ("sha256", info["sha256"]),
    ])


@snapshot.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--config", "node_config", metavar="CLUSTER.toml", type=click.Path(dir_okay=False),
              help="The NEW cluster's file (default: the group's --config).")
@click.option("--name", required=True, help="The node to restore, a [[node]] of that file.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write (default: the node's data_dir in the file). Must be empty or absent.")
@click.pass_context
def restore(ctx: click.Context, file: str, node_config: str | None, name: str, data_dir: str | None) -> None:
    """Seed node NAME's data directory of a new cluster from the backup FILE.

    Run it for every node of the new cluster with the same FILE, then start
    the nodes. The new cluster keeps every key, node state and message of
    the backup, its revision and clock, and takes its members from its own
    cluster file.
    """
    from raftcoord.config import load_config

    path = node_config or ctx.find_root().obj["config"]
    if not path:
        raise InvalidInputError("restore needs --config CLUSTER.toml (the new cluster's file)", field="config")
    config = load_config(path)
    config.node(name)  # an unknown name fails before the file is read
    backup = read_backup(file)
    where = restore_data_dir(backup, config, name, data_dir=data_dir)
    h = backup.header
    click.echo(f"Restored revision {h.revision} (clock {h.clock}, {h.keys} keys, {h.messages} messages, "
               f"{h.nodes} nodes) into {where}")
    click.echo(f"Start the node with: raftcoord node --config {path} --name {name}")
