"""The benchmark's table (with ratios and the issue's targets), its JSON file and its plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["LABELS", "NONVOTERS", "format_markdown", "format_table", "nonvoter_lines", "plot", "targets",
           "write_json"]

#: How each system is named in the table and the plot.
LABELS = {"raftcoord": "raftcoord HTTP", "embedded": "raftcoord embedded", "etcd": "etcd",
          "pysyncobj": "ReplDict", "pysyncobj-batch": "ReplDict batch", "raftcoord+7nv": "raftcoord 3v+7nv"}
#: The system with 3 voters and 7 non-voters (issue 10); its rows carry their paired 3-voter figures.
NONVOTERS = "raftcoord+7nv"


def _row(report: dict[str, Any], system: str, workload: str, clients: int) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r["system"] == system and r["workload"] == workload
                 and r["clients"] == clients), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _cell(r: dict[str, Any] | None, workload: str) -> str:
    if r is None:
        return "-"
    if "failed" in r:
        return "failed"
    if r.get("per_second") is None or r.get("p50_ms") is None:
        return f"no figures ({r.get('errors', 0)} errors)"
    text = f"{r['per_second']:,.0f}/s {_ms(r['p50_ms'])}/{_ms(r['p99_ms'])}"
    if workload == "messages" and r.get("delivery_ms", {}).get("p99") is not None:
        text += f" d{r['delivery_ms']['p50']:.1f}/{r['delivery_ms']['p99']:.1f}"
    if r.get("errors"):
        text += f" ({r['errors']} err)"
    return text


def _ratios(report: dict[str, Any], workload: str, clients: int) -> str:
    http, etcd = _row(report, "raftcoord", workload, clients), _row(report, "etcd", workload, clients)
    emb, plain = _row(report, "embedded", workload, clients), _row(report, "pysyncobj", workload, clients)
    parts = []
    if http and etcd:
        if workload == "messages":
            parts.append(f"delivery p99 {_ratio(http['delivery_ms']['p99'], etcd['delivery_ms']['p99'])}x")
            if emb:
                parts.append(f"embedded p99 {_ratio(emb['delivery_ms']['p99'], etcd['delivery_ms']['p99'])}x")
        else:
            parts.append(f"{_ratio(http.get('per_second'), etcd.get('per_second'))}x")
            parts.append(f"p50 {_ratio(http.get('p50_ms'), etcd.get('p50_ms'))}x")
    if emb and plain:
        parts.append(f"emb/ReplDict {_ratio(emb.get('per_second'), plain.get('per_second'))}x")
    nv = _row(report, NONVOTERS, workload, clients)
    if nv and nv.get("vs_3_voters"):
        parts.append(f"3v+7nv/3v p50 {nv['vs_3_voters']['p50']}x p99 {nv['vs_3_voters']['p99']}x")
    return ", ".join(parts) or "-"


def nonvoter_lines(report: dict[str, Any]) -> list[str]:
    """One line per client count: put latency with 3 voters + 7 non-voters against 3 voters alone, and the ratio."""
    lines = []
    for r in sorted((r for r in report["rows"] if r["system"] == NONVOTERS), key=lambda r: r["clients"]):
        if "vs_3_voters" not in r:
            lines.append(f"non-voters: puts at {r['clients']} clients: no figures ({r.get('failed', 'no ratio')})")
            continue
        b, v = r["baseline"], r["vs_3_voters"]
        lines.append(f"non-voters: puts at {r['clients']} clients, p50/p99 ms: 3 voters + 7 non-voters "
                     f"{_ms(r['p50_ms'])}/{_ms(r['p99_ms'])} ({r['per_second']:,.0f}/s), 3 voters alone "
                     f"{_ms(b['p50_ms'])}/{_ms(b['p99_ms'])} ({b['per_second']:,.0f}/s): "
                     f"ratio p50 {v['p50']}x, p99 {v['p99']}x, throughput {v['per_second']}x")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The whole report as text: one line per workload and client count, then failover, restart, memory."""
    systems = [s for s in LABELS if s in report["systems"]]
    o = report["options"]
    lines = [f"raftcoord bench{' --quick' if o['quick'] else ''}: 3 members each on 127.0.0.1, closed loop, "
             f"{o['seconds']:g} s per row after {o['warmup']:g} s warm-up, through the leader; raftcoord and "
             f"ReplDict with a secret; " + ", ".join(f"{LABELS[s]} {report['systems'][s]['version']}"
                                                      for s in systems if report["systems"][s].get("version")),
             "cells: ops/s p50/p99 ms (messages: + d delivery p50/p99 ms to the last member); "
             "ratios: raftcoord HTTP / etcd (throughput, p50), embedded / ReplDict without batching"
             + ("; raftcoord 3v+7nv: 3 voters and 7 non-voters, puts at 1 and 16 clients in a phase of their own, "
                "each row paired with the same puts on 3 voters alone (3v+7nv/3v)" if NONVOTERS in report["systems"]
                else "")]
    for s, why in report.get("skipped", {}).items():
        lines.append(f"{s}: skipped ({why})")
    table = []
    for workload in ("puts", "get-linearizable", "get-serializable", "cas", "messages"):
        for clients in o["clients"]:
            cells = [_cell(_row(report, s, workload, clients), workload) for s in systems]
            if any(c != "-" for c in cells):
                table.append((workload, clients, cells, _ratios(report, workload, clients)))
    widths = [max([len(LABELS[s])] + [len(cells[i]) for _, _, cells, _ in table]) + 2 for i, s in enumerate(systems)]
    head = f"{'workload':<17}{'clients':>7}  " + "".join(f"{LABELS[s]:<{w}}" for s, w in zip(systems, widths))
    lines += [head + "ratios", "-" * (len(head) + 40)]
    for workload, clients, cells, ratios in table:
        lines.append(f"{workload:<17}{clients:>7}  " + "".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + ratios)
    lines += nonvoter_lines(report)
    fo = report.get("failover", {})
    if fo:
        lines.append("failover (SIGKILL of the leader until a write through a survivor succeeds): " + "; ".join(
            f"{LABELS[s]} p50 {f.get('p50_s')} s, p99 {f.get('p99_s')} s, max {f.get('max_s')} s over {f['kills']}"
            for s, f in fo.items()))
        if "raftcoord" in fo and "etcd" in fo:
            ratio = _ratio(fo["raftcoord"].get("p99_s"), fo["etcd"].get("p99_s"))
            lines.append(f"  failover p99 ratio raftcoord/etcd {ratio}x")
    keys = report.get("keys") or {}
    for r in keys.get("restart", []):
        lines.append(f"restart: a raftcoord node holding {r['keys']:,} keys served a linearizable read "
                     f"{r['seconds']} s after its process started")
    mem = keys.get("memory")
    if mem:
        line = f"memory: largest raftcoord node RSS {mem['max_rss_bytes'] / 2**20:.0f} MB holding {mem['keys']:,} keys"
        if mem.get("estimate_1m_bytes"):
            line += (f"; EXTRAPOLATED linearly to 1,000,000 keys: {mem['estimate_1m_bytes'] / 2**20:.0f} MB "
                     f"(--quick measures 100,000)")
        lines.append(line)
    for t in report.get("targets", []):
        mark = "met" if t["met"] else ("MISSED" if t["met"] is False else "not measured")
        lines.append(f"target {t['name']}: {mark} ({t['detail']})")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The throughput table and the other figures as Markdown (what the README shows)."""
    systems = [s for s in LABELS if s in report["systems"]]
    lines = ["| workload | clients | " + " | ".join(LABELS[s] for s in systems) + " | ratios |",
             "|---|---|" + "---|" * len(systems) + "---|"]
    for workload in ("puts", "get-linearizable", "get-serializable", "cas", "messages"):
        for clients in report["options"]["clients"]:
            cells = [_cell(_row(report, s, workload, clients), workload) for s in systems]
            if any(c != "-" for c in cells):
                lines.append(f"| {workload} | {clients} | " + " | ".join(cells)
                             + f" | {_ratios(report, workload, clients)} |")
    text = format_table(report).splitlines()
    tail = [line for line in text
            if line.startswith(("non-voters", "failover", "  failover", "restart", "memory", "target"))]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line.strip()}" for line in tail) + "\n"


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures behind it and whether it is met (None: not measured)."""
    out = []

    def add(name: str, value: float | None, limit: float | None, detail: str, higher: bool = True) -> None:
        met = None if value is None or limit is None else (value >= limit if higher else value <= limit)
        out.append({"name": name, "value": value, "limit": limit, "met": met, "detail": detail})

    def per_s(system: str, workload: str, clients: int) -> float | None:
        r = _row(report, system, workload, clients)
        return r.get("per_second") if r else None

    for workload, label in (("puts", "puts"), ("get-linearizable", "linearizable gets"),
                            ("get-serializable", "serializable gets")):
        v = _ratio(per_s("raftcoord", workload, 64), per_s("etcd", workload, 64))
        add(f"{label} at 64 clients >= 1.0 x etcd", v, 1.0, f"{v}x")
    h, e = _row(report, "raftcoord", "puts", 1), _row(report, "etcd", "puts", 1)
    v = _ratio(h.get("p50_ms") if h else None, e.get("p50_ms") if e else None)
    add("puts at 1 client p50 <= 1.5 x etcd's", v, 1.5, f"{v}x", higher=False)
    v = _ratio(per_s("embedded", "puts", 64), per_s("pysyncobj", "puts", 64))
    add("embedded puts at 64 >= 3 x ReplDict (no batching)", v, 3.0, f"{v}x")
    worst = None
    for clients in report["options"]["clients"]:
        e = _row(report, "etcd", "messages", clients)
        for s in ("raftcoord", "embedded"):
            r = _row(report, s, "messages", clients)
            if r and e and r.get("delivery_ms", {}).get("p99") and e.get("delivery_ms", {}).get("p99"):
                ratio = _ratio(r["delivery_ms"]["p99"], e["delivery_ms"]["p99"])
                worst = ratio if worst is None else max(worst, ratio)
    add("post-to-delivery p99 <= 1.0 x etcd's put-to-watch p99 (worst row)", worst, 1.0, f"{worst}x", higher=False)
    fo = report.get("failover", {})
    p99 = fo.get("raftcoord", {}).get("p99_s")
    add("failover p99 <= 1.0 s", p99, 1.0, f"{p99} s", higher=False)
    v = _ratio(p99, fo.get("etcd", {}).get("p99_s"))
    add("failover p99 <= etcd's", v, 1.0, f"{v}x", higher=False)
    for r in (report.get("keys") or {}).get("restart", []):
        limit = 1.0 if r["keys"] <= 100_000 else 5.0
        add(f"restart with {r['keys']:,} keys <= {limit:g} s", r["seconds"], limit, f"{r['seconds']} s", higher=False)
    mem = (report.get("keys") or {}).get("memory")
    if mem:
        v = mem.get("estimate_1m_bytes") or (mem["max_rss_bytes"] if mem["keys"] >= 1_000_000 else None)
        mb = round(v / 2**20) if v else None
        add("memory <= 400 MB for 1,000,000 keys of 100 bytes", mb, 400, f"{mb} MB"
            + (" extrapolated" if mem.get("estimate_1m_bytes") else ""), higher=False)
    return out


def write_json(report: dict[str, Any], path: Path) -> None:
    """Every figure as JSON."""
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict[str, Any], path: Path) -> bool:
    """Throughput against p99 latency, one line per system, one panel per workload; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    workloads = [w for w in ("puts", "get-linearizable", "get-serializable", "cas", "messages")
                 if any(r["workload"] == w for r in report["rows"])]
    if not workloads:
        return False
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(workloads):]:
        ax.axis("off")
    for ax, workload in zip(flat, workloads):
        for system, label in LABELS.items():
            rows = sorted((r for r in report["rows"] if r["system"] == system and r["workload"] == workload
                           and r.get("per_second") and r.get("p99_ms")), key=lambda r: r["clients"])
            if not rows:
                continue
            ax.plot([r["per_second"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=label)
            for r in rows:
                ax.annotate(str(r["clients"]), (r["per_second"], r["p99_ms"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_title(workload + (" (ack)" if workload == "messages" else ""))
        ax.set_xlabel("operations/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("p99 latency, ms (points: clients)")
        ax.grid(True, which="both", alpha=0.3)
    flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
