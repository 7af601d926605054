"""The pure layers stay pure: wire formats, clock, errors and the state machine.

DESIGN.md requires raftcoord.keys, raftcoord.values, raftcoord.clock,
raftcoord.errors and raftcoord.store to do no I/O, read no clock, draw no random
number and start no thread, so that every replica applying the same log reaches
byte-identical state. Two checks enforce that:

1. Import check, in a fresh interpreter (``sys.executable -c ...``): importing
   those modules must not load random, socket, asyncio, aiohttp, pysyncobj,
   threading, selectors or subprocess. The package's ``__init__`` is a facade
   that re-exports the coordinator (which legitimately uses threads), so the
   subprocess installs a bare ``raftcoord`` package object first and imports the
   five modules by themselves: what is checked is what *they* pull in.

2. Source check (AST): ``time`` cannot be part of the import check, because
   CPython's C ``datetime`` module (imported by cbor2) imports ``time`` itself.
   So the sources of the five modules are parsed instead and must contain no
   ``import time`` / ``random`` / ``socket`` / ``threading`` (nor the other
   modules above), no ``from time import ...`` (or the others), no
   ``__import__``/``import_module`` of them, and no call of an attribute named
   now, utcnow, today, time_ns, monotonic, perf_counter or urandom (and their
   close relatives), which is how a wall-clock or entropy read would sneak in
   through an object that is already imported (``datetime.now()``,
   ``os.urandom()``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "raftcoord"
PURE_MODULES = ["errors", "keys", "values", "clock", "store", "events", "history", "commands", "sessions", "txn", "arguments"]

FORBIDDEN_LOADED = ["random", "socket", "asyncio", "aiohttp", "pysyncobj", "threading", "selectors", "subprocess"]
FORBIDDEN_IMPORTS = {"time", *FORBIDDEN_LOADED, "secrets"}
FORBIDDEN_CALLS = {
    "now",
    "utcnow",
    "today",
    "time_ns",
    "monotonic",
    "monotonic_ns",
    "perf_counter",
    "perf_counter_ns",
    "urandom",
    "getrandbits",
    "uuid1",
    "uuid4",
}

# Runs in a fresh interpreter; prints JSON {"baseline": [...], "<module>": [newly loaded forbidden]}.
IMPORT_PROBE = """
import importlib, json, sys, types
repo, names, forbidden = sys.argv[1], sys.argv[2].split(","), set(sys.argv[3].split(","))
sys.path.insert(0, repo)
pkg = types.ModuleType("raftcoord")
pkg.__path__ = [repo + "/raftcoord"]
sys.modules["raftcoord"] = pkg
report = {"baseline": sorted(forbidden & set(sys.modules))}
for name in names:
    before = set(sys.modules)
    importlib.import_module("raftcoord." + name)
    report[name] = sorted(forbidden & (set(sys.modules) - before))
report["all"] = sorted(forbidden & set(sys.modules))
print(json.dumps(report))
"""


def run_probe(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (ignoring PYTHON* variables) and parse its JSON output."""
    proc = subprocess.run(
        [sys.executable, "-E", "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pure_modules_load_no_io_thread_or_random_modules():
    """Importing keys, values, clock, errors and store loads none of the forbidden modules."""
    report = run_probe(IMPORT_PROBE, str(REPO), ",".join(PURE_MODULES), ",".join(FORBIDDEN_LOADED))
    assert report["baseline"] == [], f"the interpreter loaded {report['baseline']} before raftcoord"
    culprits = {name: report[name] for name in PURE_MODULES if report[name]}
    assert culprits == {}, f"modules pulled in by: {culprits}"
    assert report["all"] == []


def _source(name: str) -> ast.Module:
    path = PACKAGE / f"{name}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _violations(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_IMPORTS:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] in FORBIDDEN_IMPORTS:
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: call .{func.attr}()")
            elif isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: call {func.id}()")
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("__import__", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in FORBIDDEN_IMPORTS:
                    found.append(f"line {node.lineno}: {name}({arg.value!r})")
    return found


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_module_source_reads_no_clock_or_entropy(name):
    """The module's source imports no time/random/socket/threading and calls no now()/urandom()."""
    assert _violations(_source(name)) == []


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("import time", 1),
        ("import time as t", 1),
        ("import os, random", 1),
        ("from time import monotonic", 1),
        ("from threading import Lock", 1),
        ("import socket.x", 1),
        ("datetime.now(timezone.utc)", 1),
        ("datetime.utcnow()", 1),
        ("date.today()", 1),
        ("os.urandom(8)", 1),
        ("x = t.perf_counter() - t.monotonic()", 2),
        ("importlib.import_module('random')", 1),
        ("__import__('time')", 1),
        ("from datetime import datetime, timezone", 0),
        ("from raftcoord import clock as lamport", 0),
        ("datetime.fromtimestamp(0, timezone.utc)", 0),
        ("x.timestamp()", 0),
        ("from . import time", 0),
    ],
)
def test_source_check_catches_what_it_should(snippet, expected):
    """The AST check flags forbidden imports and clock/entropy calls, and only those."""
    assert len(_violations(ast.parse(snippet))) == expected


# Decoding a CBOR tag 36 (MIME) makes cbor2 import the email package, which
# imports random, socket and threading: untrusted bytes reaching the state
# machine load modules the pure layers must not depend on.
DECODE_PROBE = """
import json, sys, types
sys.path.insert(0, sys.argv[1])
pkg = types.ModuleType("raftcoord")
pkg.__path__ = [sys.argv[1] + "/raftcoord"]
sys.modules["raftcoord"] = pkg
from raftcoord.values import Message
forbidden = set(sys.argv[2].split(","))
before = set(sys.modules)
data = bytes.fromhex(
    "a3" "6474797065" "01"                          # "type": 1
    "677061796c6f6164" "d824" "63613a62"            # "payload": tag 36 "a:b"
    "6974696d657374616d70" "c11a65937d25"           # "timestamp": tag 1
)
try:
    Message.decode(data)
except Exception:
    pass
print(json.dumps(sorted(forbidden & (set(sys.modules) - before))))
"""


def test_decoding_untrusted_cbor_loads_no_forbidden_module():
    """Decoding a message with exotic tags loads none of the forbidden modules."""
    loaded = run_probe(DECODE_PROBE, str(REPO), ",".join(FORBIDDEN_LOADED))
    assert loaded == []
