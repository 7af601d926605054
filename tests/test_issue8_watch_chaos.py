"""The fault suite's watch check (raftcoord.chaos.watches) on hand-made watch logs, and its watcher
against a stream that breaks."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from raftcoord.chaos.watches import KeyState, WatchEvent, Watcher, WatchLog, check_watches, decode_event, dump


def put(key: str, value: str, rev: int, created: int, version: int) -> WatchEvent:
    """A PUT event."""
    return WatchEvent("PUT", key, value, rev, created, version)


def delete(key: str, rev: int) -> WatchEvent:
    """A DELETE event."""
    return WatchEvent("DELETE", key, "", rev)


# a put at 3, a txn at 4 writing two keys, an update at 5, a delete at 6, a put at 7
LINES = [
    (put("chaos/a", "1", 3, 3, 1),),
    (put("chaos/b", "1", 4, 4, 1), put("chaos/c", "1", 4, 4, 1)),
    (put("chaos/a", "2", 5, 3, 2),),
    (delete("chaos/b", 6),),
    (put("chaos/c", "2", 7, 4, 2),),
]
FINAL = {"chaos/a": KeyState("2", 5, 3, 2), "chaos/c": KeyState("2", 7, 4, 2)}


def log_of(lines: list[tuple[WatchEvent, ...]], through: int = 7, **kw: Any) -> WatchLog:
    """A watch log of ``lines``, brought to ``through``."""
    return WatchLog(lines=list(lines), through=through, **kw)


def test_complete_history_passes() -> None:
    """Every node delivered every revision once, in order: the replay gives the final state."""
    result = check_watches({"n1": log_of(LINES), "n2": log_of(LINES), "n3": log_of(LINES)}, FINAL, 7)
    assert result.ok, result.problems
    assert result.detail["events"] == 6


def test_events_after_the_final_revision_are_ignored() -> None:
    """Events past the revision the final state was read at (the fence, late writes) do not count."""
    later = LINES + [(put("chaos/w/fence", "7", 8, 8, 1),)]
    assert check_watches({"n1": log_of(later, through=8)}, FINAL, 7).ok


def test_gap_is_caught() -> None:
    """A revision missing on one node (the update of a at 5) fails, naming the key and the node."""
    gap = [line for line in LINES if line[0].mod_revision != 5]
    result = check_watches({"n1": log_of(LINES), "n2": log_of(gap)}, FINAL, 7)
    assert not result.ok
    assert any(p.startswith("n2: the final state has chaos/a") for p in result.problems), result.problems
    assert any("n2's events differ from n1's" in p for p in result.problems), result.problems
    assert not any(p.startswith("n1") for p in result.problems), result.problems


def test_gap_hidden_by_a_later_write_is_caught() -> None:
    """A lost event whose key was written again later: the final state matches, the version chain does not."""
    lines = LINES + [(put("chaos/a", "3", 8, 3, 3),)]
    final = {**FINAL, "chaos/a": KeyState("3", 8, 3, 3)}
    gap = [line for line in lines if line[0].mod_revision != 5]
    result = check_watches({"n1": log_of(gap, through=8)}, final, 8)
    assert not result.ok
    assert any("PUT chaos/a='3' @8" in p and "an event is missing" in p for p in result.problems), result.problems


def test_missing_create_is_caught() -> None:
    """A key's first event lost: its delete (or next put) names the missing event."""
    gap = [line for line in LINES if line[0].mod_revision != 4]
    result = check_watches({"n1": log_of(gap)}, FINAL, 7)
    assert not result.ok
    assert any("DELETE chaos/b @6 deletes a key the events so far never created" in p for p in result.problems)


def test_duplicate_is_caught() -> None:
    """A revision delivered twice (a resume from too early) fails, however the replay ends."""
    dup = LINES[:3] + [LINES[2]] + LINES[3:]
    result = check_watches({"n1": log_of(dup)}, FINAL, 7)
    assert not result.ok
    assert any("n1: revision 5 delivered twice" in p for p in result.problems), result.problems


def test_split_revision_is_caught() -> None:
    """A revision's events over two responses is not atomic."""
    split = [LINES[0], (LINES[1][0],), (LINES[1][1],)] + LINES[2:]
    result = check_watches({"n1": log_of(split)}, FINAL, 7)
    assert not result.ok
    assert any("revision 4 split over two responses" in p for p in result.problems), result.problems


def test_out_of_order_is_caught() -> None:
    """Revisions delivered out of order fail, even when every one of them arrived."""
    swapped = [LINES[0], LINES[2], LINES[1]] + LINES[3:]
    result = check_watches({"n1": log_of(swapped)}, FINAL, 7)
    assert not result.ok
    assert any("n1: revision 4" in p and "arrived after revision 5 (out of order)" in p
               for p in result.problems), result.problems


def test_out_of_order_inside_one_response_is_caught() -> None:
    """One response listing revisions backwards fails too."""
    backwards = [(LINES[2][0], LINES[0][0])] + [LINES[1]] + LINES[3:]
    result = check_watches({"n1": log_of(backwards)}, FINAL, 7)
    assert not result.ok and any("out of order" in p for p in result.problems), result.problems


def test_compacted_resume_is_reported_not_passed() -> None:
    """A resume answered with compact_revision fails and says so, even if the events happen to replay."""
    result = check_watches({"n1": log_of(LINES, compacted=[(4, 6)])}, FINAL, 7)
    assert not result.ok
    assert result.problems == ["n1: resuming from revision 4 was answered compact_revision 6: the events in "
                               "between were never delivered (compacted, not a pass)"]


def test_watch_not_brought_to_the_end_is_caught() -> None:
    """A watch that never reached the final revision fails (it may have missed the last events)."""
    result = check_watches({"n1": log_of(LINES[:4], through=6)}, FINAL, 7)
    assert not result.ok
    assert any("brought only to revision 6, not to the final revision 7" in p for p in result.problems)


def test_wrong_final_value_is_caught() -> None:
    """An event stream that replays to another value than the store holds fails."""
    result = check_watches({"n1": log_of(LINES)}, {**FINAL, "chaos/a": KeyState("9", 5, 3, 2)}, 7)
    assert not result.ok and "the final state has chaos/a" in result.problems[0]


def test_decode_event_reads_the_gateway_shape() -> None:
    """etcd's gateway leaves out type PUT and zero fields, and writes int64s as strings."""
    e = decode_event({"kv": {"key": "Y2hhb3MvYQ==", "create_revision": "3", "mod_revision": "5", "version": "2",
                             "value": "Mg=="}})
    assert e == put("chaos/a", "2", 5, 3, 2)
    assert decode_event({"type": "DELETE", "kv": {"key": "Y2hhb3MvYQ==", "mod_revision": "6"}}) == delete("chaos/a", 6)


def test_dump_writes_every_response_per_node(tmp_path: Path) -> None:
    """A failing run's watch logs are written one JSON line per response, after a line per node."""
    dump({"n1": log_of(LINES, resumes=2, compacted=[(4, 6)])}, tmp_path / "watches.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "watches.jsonl").read_text().splitlines()]
    assert rows[0] == {"node": "n1", "through": 7, "resumes": 2, "compacted": [[4, 6]], "errors": []}
    assert [[e["mod_revision"] for e in r["events"]] for r in rows[1:]] == [[3], [4, 4], [5], [6], [7]]


# ----------------------------------------------------------- the watcher


def _line(events: list[WatchEvent], created: bool = False, **extra: Any) -> bytes:
    def kv(e: WatchEvent) -> dict[str, Any]:
        import base64

        out = {"key": base64.b64encode(e.key.encode()).decode(), "mod_revision": str(e.mod_revision)}
        if e.type == "PUT":
            out |= {"value": base64.b64encode(e.value.encode()).decode(), "create_revision": str(e.create_revision),
                    "version": str(e.version)}
        return out

    result: dict[str, Any] = {"header": {"revision": "7"}, **extra}
    if created:
        result["created"] = True
    if events:
        result["events"] = [({"type": "DELETE"} if e.type == "DELETE" else {}) | {"kv": kv(e)} for e in events]
    return json.dumps({"result": result}).encode() + b"\n"


class _Breaking(BaseHTTPRequestHandler):
    """A /v3/watch that serves the events from the asked start revision, breaking after two responses
    (from revision 6 on it answers compact_revision 6)."""

    protocol_version = "HTTP/1.1"
    asked: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        start = int(body["create_request"].get("start_revision", "0"))
        self.asked.append(start)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines = [_line([], created=True)] + [_line(list(ln)) for ln in LINES if ln[0].mod_revision >= start]
        if start >= 6:
            lines = [_line([], created=True), _line([], compact_revision="6", canceled=True)]
        for data in lines[:3]:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.close_connection = True


def test_watcher_resumes_from_the_next_revision_after_a_break() -> None:
    """A stream that breaks is reopened from the revision after the last one received; a compacted
    answer is recorded, not passed over."""
    _Breaking.asked = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Breaking)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    watcher = Watcher("n1", f"http://127.0.0.1:{server.server_address[1]}").start()
    try:
        deadline = time.monotonic() + 10
        while not watcher.log.compacted and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.close()
        server.shutdown()
        server.server_close()
    # 1: revisions 3 and 4, break; 5: revisions 5 and 6, break; 7: compacted (start 7 >= 6).
    assert _Breaking.asked[:3] == [1, 5, 7], _Breaking.asked
    assert [ln[0].mod_revision for ln in watcher.log.lines] == [3, 4, 5, 6]
    assert watcher.log.compacted[0] == (7, 6) and watcher.log.resumes >= 2
    assert watcher.log.through == 6
