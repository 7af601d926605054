"""A tiny runner for store scenario scripts (tests/testdata/store/*.txt), etcd-io/raft style.

A script is a sequence of blocks. Each block is one command line, a line
``----``, then the expected output lines, ended by a blank line or the end of
the file. Lines starting with ``#`` (and blank lines) between blocks are
comments and are kept as they are when the file is rewritten.

Command lines are ``name arg=value ...``. A value is a bare word (taken
literally) or a double-quoted string with Python byte escapes
(``key="N\\x11n1"``). Byte fields (key, value, range_end) take the UTF-8 of a
bare word. Writes go to every replica (see :class:`Replicas`), so each script
also checks that replicas stay byte-identical:

    put key= value= [prev_kv=true] [req=client,seq,low]
    delete key= [range_end=] [prefix=true] [prev_kv=true] [req=...]
    txn {JSON}            compare/success/failure as in store.py; in JSON the
                          strings of key, range_end and byte values are UTF-8
                          bytes, "req": ["c", 1, 0] as usual
    post from= clock= type=U [event=C] [payload=JSON] ts=2026-01-01T00:00:00Z [req=...]
    node host= status= clock= ts= [addr=] [cluster=] [any=extra]
    purge [before=ts] [max_count=n]
    truncate | barrier | session   (session registers a client: c<applied>)
    cmd {JSON}            any command map, JSON types kept; strings "b:..." are
                          bytes and "t:..." timestamps (for malformed commands)
    raw hex=...           raw command bytes (garbage)

Reads look at the first replica and change nothing:

    get key= | range key= [range_end=] [prefix=true] [limit=] [offset=] [desc=true]
    messages [since=] [limit=] | nodes | state | restore (every replica from a snapshot)

Run it through ``tests/test_store_determinism.py``; with ``RAFTCOORD_REWRITE=1``
in the environment the files are rewritten with the actual output instead of
compared (read the diff before committing it).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raftcoord.keys import MESSAGE_PREFIX, NODE_PREFIX, prefix_end
from raftcoord.store import Applied, KeyDeleted, KeyPut, MessagePosted, NodeStateSet, Store
from raftcoord.values import decode_cbor, encode_cbor

__all__ = ["Replicas", "ScriptError", "apply_to_replicas", "run_script"]

SEPARATOR = "----"


class ScriptError(Exception):
    """A script line the runner cannot read."""


# ---------------------------------------------------------------------------
# Replicas: the same commands, byte-identical stores
# ---------------------------------------------------------------------------


@dataclass
class Replicas:
    """Several stores fed the same command bytes; after every command their snapshots must be equal."""

    n: int = 3
    stores: list[Store] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stores:
            self.stores = [Store() for _ in range(self.n)]

    def apply(self, raw: Any) -> Applied:
        """Apply ``raw`` to every replica; assert identical results, events and snapshots."""
        applied = [s.apply(raw) for s in self.stores]
        results = {encode_cbor(a.result) for a in applied}
        assert len(results) == 1, f"replicas answered differently: {[a.result for a in applied]}"
        assert all(a.events == applied[0].events for a in applied), "replicas emitted different events"
        snaps = {s.snapshot() for s in self.stores}
        assert len(snaps) == 1, "replica snapshots differ after the same command"
        return applied[0]

    def restore_all(self) -> None:
        """Replace every replica by one restored from the first replica's snapshot."""
        snap = self.stores[0].snapshot()
        self.stores = [Store.restore(snap) for _ in self.stores]
        assert all(s.snapshot() == snap for s in self.stores), "restore(snapshot()) is not byte-identical"

    @property
    def store(self) -> Store:
        """The first replica, for reads."""
        return self.stores[0]


def apply_to_replicas(commands: Iterable[Any], n: int = 3, *, restore_every: int = 0) -> Replicas:
    """Feed every command to ``n`` fresh stores, asserting byte-identical snapshots after each.

    With ``restore_every=k`` the last replica is replaced every k commands by a
    store restored from its own snapshot, which must then keep agreeing.
    """
    reps = Replicas(n)
    for i, raw in enumerate(commands, 1):
        reps.apply(raw)
        if restore_every and i % restore_every == 0:
            reps.stores[-1] = Store.restore(reps.stores[-1].snapshot())
    return reps


# ---------------------------------------------------------------------------
# Reading command lines
# ---------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*([A-Za-z_]+)(?:=("(?:[^"\\]|\\.)*"|\S+))?(?=\s|$)')


def parse_args(text: str) -> dict[str, str | bytes | None]:
    """``a=b c="x\\x11" d`` -> {"a": "b", "c": b"x\\x11", "d": None}: quoted values are bytes."""
    args: dict[str, str | bytes | None] = {}
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ScriptError(f"cannot read arguments at {text[pos:]!r}")
        name, value = m.group(1), m.group(2)
        if value is not None and value.startswith('"'):
            args[name] = codecs.escape_decode(value[1:-1].encode("utf-8"))[0]
        else:
            args[name] = value
        pos = m.end()
    return args


def _bytes(v: str | bytes | None) -> bytes:
    if v is None:
        raise ScriptError("a byte field needs a value")
    return v if isinstance(v, bytes) else v.encode("utf-8")


def _text(v: str | bytes | None) -> str:
    if v is None:
        raise ScriptError("a text field needs a value")
    return v.decode("utf-8") if isinstance(v, bytes) else v


def _int(v: str | bytes | None) -> int:
    return int(_text(v))


def _char_or_int(v: str | bytes | None) -> int:
    s = _text(v)
    return ord(s) if len(s) == 1 and not s.isdigit() else int(s)


def _bool(v: str | bytes | None) -> bool:
    return v is None or _text(v).lower() in ("true", "1", "yes")


def _ts(v: str | bytes | None) -> datetime:
    ts = datetime.fromisoformat(_text(v))
    if ts.tzinfo is None:
        raise ScriptError(f"timestamp {v!r} needs a zone (use Z)")
    return ts


def _req(v: str | bytes | None) -> list[Any]:
    client, seq, low = _text(v).split(",")
    return [client, int(seq), int(low)]


def _json(v: str | bytes | None) -> Any:
    s = _text(v)
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _txn_bytes(obj: Any, *, byte_value: bool) -> Any:
    """Convert a txn compare or op from JSON: keys, range ends and byte values become bytes."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for name in ("key", "range_end"):
        if isinstance(out.get(name), str):
            out[name] = out[name].encode("utf-8")
    if isinstance(out.get("value"), str) and byte_value:
        out["value"] = out["value"].encode("utf-8")
    if out.get("target") == "keys" and isinstance(out.get("value"), list):
        out["value"] = [[k.encode("utf-8") if isinstance(k, str) else k, r] for k, r in out["value"]]
    return out


def _literal(obj: Any) -> Any:
    """JSON for ``cmd``: "b:..." strings are bytes, "t:..." timestamps, the rest as JSON says."""
    if isinstance(obj, str):
        if obj.startswith("b:"):
            return obj[2:].encode("utf-8")
        if obj.startswith("t:"):
            return _ts(obj[2:])
        return obj
    if isinstance(obj, list):
        return [_literal(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _literal(v) for k, v in obj.items()}
    return obj


def build_command(name: str, rest: str) -> bytes:
    """The CBOR bytes of a write command line."""
    if name == "raw":
        return bytes.fromhex(_text(parse_args(rest)["hex"]))
    if name == "cmd":
        return encode_cbor(_literal(json.loads(rest)))
    if name == "txn":
        spec = json.loads(rest) if rest.strip() else {}
        cmd: dict[str, Any] = {"op": "txn"}
        if "compare" in spec:
            cmd["compare"] = [_txn_bytes(c, byte_value=isinstance(c, dict) and c.get("target") == "value") for c in spec["compare"]]
        for branch in ("success", "failure"):
            if branch in spec:
                cmd[branch] = [_txn_bytes(o, byte_value=isinstance(o, dict) and o.get("op") == "put") for o in spec[branch]]
        if "req" in spec:
            cmd["req"] = spec["req"]
        return encode_cbor(cmd)
    args = parse_args(rest)
    cmd = {"op": name}
    if "req" in args:
        cmd["req"] = _req(args.pop("req"))
    if name == "put":
        cmd.update(key=_bytes(args.pop("key")), value=_bytes(args.pop("value", b"")))
        if "prev_kv" in args:
            cmd["prev_kv"] = _bool(args.pop("prev_kv"))
    elif name == "delete":
        cmd["key"] = _bytes(args.pop("key"))
        if "range_end" in args:
            cmd["range_end"] = _bytes(args.pop("range_end"))
        if _bool(args.pop("prefix", "false")):
            cmd["range_end"] = prefix_end(cmd["key"])
        if "prev_kv" in args:
            cmd["prev_kv"] = _bool(args.pop("prev_kv"))
    elif name == "post":
        cmd.update({"from": _text(args.pop("from")), "clock": _int(args.pop("clock")), "type": _char_or_int(args.pop("type"))})
        cmd["timestamp"] = _ts(args.pop("ts"))
        if "event" in args:
            cmd["event"] = _char_or_int(args.pop("event"))
        if "payload" in args:
            cmd["payload"] = _json(args.pop("payload"))
    elif name == "node":
        state: dict[str, Any] = {
            "host": _text(args.pop("host")),
            "status": _text(args.pop("status")),
            "clock": _int(args.pop("clock")),
            "timestamp": _ts(args.pop("ts")),
        }
        for extra in list(args):
            state[extra] = _text(args.pop(extra))
        cmd["state"] = state
    elif name == "purge":
        if "before" in args:
            cmd["before"] = _ts(args.pop("before"))
        if "max_count" in args:
            cmd["max_count"] = _int(args.pop("max_count"))
    elif name not in ("truncate", "barrier", "session"):
        raise ScriptError(f"unknown command {name!r}")
    if args:
        raise ScriptError(f"unknown arguments for {name}: {sorted(args)}")
    return encode_cbor(cmd)


# ---------------------------------------------------------------------------
# Writing output
# ---------------------------------------------------------------------------

_BARE = re.compile(rb"[A-Za-z0-9_./:+-]+")


def fmt_bytes(b: bytes) -> str:
    """Bytes as a bare word when plain, else double-quoted with \\x escapes."""
    if _BARE.fullmatch(b):
        return b.decode("ascii")
    out = []
    for c in b:
        ch = chr(c)
        out.append(ch if 0x20 <= c < 0x7F and ch not in '"\\' else f"\\x{c:02x}")
    return '"' + "".join(out) + '"'


def fmt_key(k: bytes) -> str:
    """A key; node and message keys are shown by what they hold."""
    if k[:2] == MESSAGE_PREFIX and len(k) == 11:
        return f"<msg {int.from_bytes(k[2:10], 'big')} {fmt_code(k[10])}>"
    if k[:2] == NODE_PREFIX and len(k) > 2:
        return f"<node {k[2:].decode('utf-8', 'replace')}>"
    return fmt_bytes(k)


def fmt_code(c: int) -> str:
    """A message type or event: its letter when it is one."""
    return chr(c) if 0x41 <= c <= 0x5A else str(c)


def fmt_ts(ts: datetime) -> str:
    """A timestamp in UTC, RFC 3339 with Z."""
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def fmt_any(v: Any) -> str:
    """A payload or extra value, compactly."""
    if isinstance(v, bytes):
        return fmt_bytes(v)
    if isinstance(v, datetime):
        return fmt_ts(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(fmt_any(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{fmt_any(k)}:{fmt_any(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def fmt_message(m: dict[str, Any]) -> str:
    """A message map: clock, type, from, event, timestamp, payload, extras."""
    parts = [f"clock={m.get('clock')}", f"type={fmt_code(m['type'])}"]
    if "from" in m:
        parts.append(f"from={m['from']}")
    if "event" in m:
        parts.append(f"event={fmt_code(m['event'])}")
    parts.append(f"ts={fmt_ts(m['timestamp'])}")
    if "payload" in m:
        parts.append(f"payload={fmt_any(m['payload'])}")
    parts += [f"{k}={fmt_any(v)}" for k, v in sorted(m.items()) if k not in ("clock", "type", "from", "event", "timestamp", "payload")]
    return " ".join(parts)


def fmt_node(n: dict[str, Any]) -> str:
    """A node-state map."""
    parts = [n["host"], n["status"], f"clock={n['clock']}", f"ts={fmt_ts(n['timestamp'])}"]
    parts += [f"{k}={fmt_any(n[k])}" for k in ("addr", "cluster") if n.get(k)]
    parts += [f"{k}={fmt_any(v)}" for k, v in sorted(n.items()) if k not in ("host", "status", "clock", "timestamp", "addr", "cluster")]
    return " ".join(parts)


def fmt_value(key: bytes, value: bytes) -> str:
    """A stored value: messages and node states decoded, user values as bytes."""
    if key[:2] == MESSAGE_PREFIX:
        return "{" + fmt_message(decode_cbor(value)) + "}"
    if key[:2] == NODE_PREFIX:
        return "{" + fmt_node(decode_cbor(value)) + "}"
    return fmt_bytes(value)


def fmt_kv(kv: dict[str, Any]) -> str:
    """A key-value in etcd's field names: ``key=value create= mod= version=``."""
    head = fmt_key(kv["key"]) + (f"={fmt_value(kv['key'], kv['value'])}" if "value" in kv else "")
    return f"{head} create={kv['create_revision']} mod={kv['mod_revision']} version={kv['version']}"


def render_result(res: dict[str, Any]) -> list[str]:
    """A command's result as output lines (the error message text is left out on purpose)."""
    if not res.get("ok"):
        err = res["error"]
        return [f"error {err['code']}" + (f" field={err['field']}" if "field" in err else "") + f" rev={res['revision']}"]
    head = ["ok", f"rev={res['revision']}"]
    head += [f"{k}={fmt_any(v)}" for k, v in sorted(res.items()) if k not in ("ok", "revision") and isinstance(v, (bool, int, str))]
    lines = [" ".join(head)]
    if "prev_kv" in res:
        lines.append("  prev " + fmt_kv(res["prev_kv"]))
    lines += ["  prev " + fmt_kv(p) for p in res.get("prev_kvs", [])]
    if "message" in res:
        lines.append("  message " + fmt_message(res["message"]))
    for r in res.get("responses", []):
        lines += render_response(r)
    return lines


def render_response(r: dict[str, Any]) -> list[str]:
    """One txn response."""
    if r["op"] == "range":
        lines = [f"  range count={r['count']} more={fmt_any(r['more'])}"]
        return lines + ["    " + fmt_kv(kv) for kv in r["kvs"]]
    head = f"  {r['op']} rev={r['revision']}" + (f" deleted={r['deleted']}" if "deleted" in r else "")
    lines = [head]
    if "prev_kv" in r:
        lines.append("    prev " + fmt_kv(r["prev_kv"]))
    return lines + ["    prev " + fmt_kv(p) for p in r.get("prev_kvs", [])]


def render_events(events: tuple[Any, ...]) -> list[str]:
    """Events, one per line, prefixed ``>``."""
    lines = []
    for e in events:
        if isinstance(e, KeyPut):
            kv = e.kv
            value = "" if kv.key[:2] in (MESSAGE_PREFIX, NODE_PREFIX) else f"={fmt_bytes(kv.value)}"
            lines.append(f"> put {fmt_key(kv.key)}{value} create={kv.create_revision} mod={kv.mod_revision} version={kv.version}")
        elif isinstance(e, KeyDeleted):
            lines.append(f"> delete {fmt_key(e.key)} rev={e.revision}")
        elif isinstance(e, MessagePosted):
            lines.append(f"> message clock={e.message.clock}")
        elif isinstance(e, NodeStateSet):
            lines.append(f"> node {e.state.host} {e.state.status.value}")
        else:  # pragma: no cover - a new event type needs a line here
            lines.append(f"> {e!r}")
    return lines


# ---------------------------------------------------------------------------
# Running a script
# ---------------------------------------------------------------------------

_READ_ARGS = {
    "get": {"key"},
    "range": {"key", "range_end", "prefix", "limit", "offset", "desc"},
    "messages": {"since", "limit"},
}
_WRITES = {"put", "delete", "txn", "post", "node", "purge", "truncate", "barrier", "session", "cmd", "raw"}


def execute(reps: Replicas, line: str) -> list[str]:
    """Run one command line and return its output lines."""
    name, _, rest = line.strip().partition(" ")
    if name in _WRITES:
        applied = reps.apply(build_command(name, rest))
        return render_result(applied.result) + render_events(applied.events)
    s = reps.store
    args = parse_args(rest)
    unknown = set(args) - _READ_ARGS.get(name, set())
    if unknown:
        raise ScriptError(f"unknown arguments for {name}: {sorted(unknown)}")
    if name == "get":
        kv = s.get(_bytes(args["key"]))
        return ["<none>" if kv is None else fmt_kv(kv.to_map())]
    if name == "range":
        key = _bytes(args["key"])
        end = prefix_end(key) if _bool(args.get("prefix", "false")) else _bytes(args.get("range_end", b""))
        res = s.range(
            key,
            end,
            limit=_int(args.get("limit", "0")),
            offset=_int(args.get("offset", "0")),
            descending=_bool(args.get("desc", "false")),
        )
        return [f"count={res.count} more={fmt_any(res.more)}"] + [fmt_kv(kv.to_map()) for kv in res.kvs]
    if name == "messages":
        since = _int(args["since"]) if "since" in args else None
        try:
            msgs = s.messages(since, limit=_int(args.get("limit", "0")))
        except Exception as exc:  # noqa: BLE001 - the script shows the error
            return [f"raises {type(exc).__name__} field={getattr(exc, 'field', None)}"]
        return [fmt_message(m.to_map()) for m in msgs] or ["<none>"]
    if name == "nodes":
        return [fmt_node(n.to_map()) for n in s.node_states()] or ["<none>"]
    if name == "state":
        lines = [f"rev={s.revision} clock={s.clock} floor={s.message_floor} keys={len(s)}"]
        return lines + ["  " + fmt_kv(kv.to_map()) for kv in s.range(b"\x00", b"\x00").kvs]
    if name == "restore":
        reps.restore_all()
        return [f"restored rev={reps.store.revision} keys={len(reps.store)}"]
    raise ScriptError(f"unknown command {name!r}")


@dataclass
class Case:
    """One block of a script."""

    lineno: int
    command: str
    expected: list[str]
    actual: list[str] = field(default_factory=list)


def parse_script(text: str) -> list[str | Case]:
    """Split a script into comment/blank lines (kept verbatim) and cases."""
    lines = text.splitlines()
    items: list[str | Case] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            items.append(line)
            i += 1
            continue
        if i + 1 >= len(lines) or lines[i + 1] != SEPARATOR:
            raise ScriptError(f"line {i + 1}: command {line!r} is not followed by {SEPARATOR!r}")
        case = Case(i + 1, line, [])
        i += 2
        while i < len(lines) and lines[i].strip():
            case.expected.append(lines[i])
            i += 1
        items.append(case)
    return items


def render_script(items: list[str | Case]) -> str:
    """The script text with every case's actual output."""
    out: list[str] = []
    for item in items:
        if isinstance(item, Case):
            out += [item.command, SEPARATOR, *item.actual]
        else:
            out.append(item)
    return "\n".join(out) + "\n"


def run_script(path: Path) -> tuple[str, str, list[Case]]:
    """Run a script; return (file text, text with actual output, the cases that differ)."""
    text = path.read_text(encoding="utf-8")
    items = parse_script(text)
    reps = Replicas(3)
    wrong = []
    for item in items:
        if isinstance(item, Case):
            item.actual = execute(reps, item.command)
            assert all(line.strip() for line in item.actual), "output lines must not be blank"
            if item.actual != item.expected:
                wrong.append(item)
    return text, render_script(items), wrong
