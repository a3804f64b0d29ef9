"""Turn the results into the printed table, the JSON file and the PNG bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.workloads import Metric

PEERS = ("s3fs", "rclone")


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1 or a == 0:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(res: dict | None) -> str:
    if res is None:
        return ""
    status = res.get("status", "ok")
    if status == "timeout" and res.get("value") is not None:
        return f"> {fmt(res['value'])} s"  # cut off by the time budget after that long
    if status in ("timeout", "error", "skipped"):
        return status
    text = fmt(res.get("value"))
    return text + " BAD" if status == "bad" else text


def ratio(metric: Metric, row: dict[str, dict]) -> float | None:
    """fbmount's value divided by the best peer's (best = highest or lowest by metric)."""
    fb = row.get("fbmount")
    if not fb or fb.get("status") != "ok" or fb.get("value") is None:
        return None
    best = best_peer(metric, row)
    if best is None or row[best]["value"] == 0:
        return None
    return fb["value"] / row[best]["value"]


def best_peer(metric: Metric, row: dict[str, dict]) -> str | None:
    """The peer with the best measured value on this row (None: no peer measured it)."""
    done = [
        p
        for p in PEERS
        if p in row and row[p].get("status") == "ok" and row[p].get("value") is not None
    ]
    if not done:
        return None
    pick = max if metric.higher_is_better else min
    return pick(done, key=lambda p: row[p]["value"])


def ratio_text(metric: Metric, row: dict[str, dict]) -> str:
    r = ratio(metric, row)
    if r is not None:
        return f"{r:.2f}"
    # Every peer was cut off on a time row: fbmount's time over the least cut-off time
    # is an upper bound.
    fb = row.get("fbmount")
    cut = [
        row[p]["value"]
        for p in PEERS
        if p in row and row[p].get("status") == "timeout" and row[p].get("value")
    ]
    if metric.unit == "s" and cut and fb and fb.get("status") == "ok" and fb.get("value"):
        return f"< {fb['value'] / max(cut):.2f}"
    return ""


def table(metrics: list[Metric], results: dict, stats: dict, tools: list[str]) -> str:
    cols = [
        "workload",
        "unit",
        *tools,
        "fbmount / best peer",
        "fbmount peak RSS MiB",
        "daemon CPU s (" + " / ".join(t for t in tools if t != "native") + ")",
    ]
    rows: list[list[str]] = []
    seen_workloads: set[str] = set()
    for m in metrics:
        row = results.get(m.key)
        if not row:
            continue
        first = m.workload not in seen_workloads  # RSS and CPU once per workload
        seen_workloads.add(m.workload)
        per_tool = stats.get(m.workload, {}) if first else {}
        st = per_tool.get("fbmount")
        rows.append(
            [
                m.label,
                m.unit + (" ↑" if m.higher_is_better else " ↓"),
                *(cell(row.get(t)) for t in tools),
                ratio_text(m, row),
                fmt(st["hwm_mib"]) if st and "hwm_mib" in st else "",
                cpu_cell(per_tool, tools),
            ]
        )
    out = render(cols, rows)
    out.append(
        "↑ higher is better, ↓ lower is better; ratio = fbmount value / best peer value "
        "(so > 1 is better on ↑ rows, < 1 is better on ↓ rows). BAD = data check failed. "
        "> N s = that step was cut off after N s by the time budget (--timeout), "
        "skipped = not reached after a cut. "
        "RSS: fbmount's daemon; CPU: each tool's daemon (utime + stime), per workload "
        "(one fresh mount each)."
    )
    return "\n".join(out)


def cpu_cell(per_tool: dict, tools: list[str]) -> str:
    """The daemons' CPU seconds in one workload, in the order of `tools` ("-": none)."""
    mounts = [t for t in tools if t != "native"]
    if not any("cpu_s" in per_tool.get(t, {}) for t in mounts):
        return ""
    return " / ".join(
        fmt(per_tool[t]["cpu_s"]) if "cpu_s" in per_tool.get(t, {}) else "-" for t in mounts
    )


def render(cols: list[str], rows: list[list[str]]) -> list[str]:
    """Header, rule and rows as aligned text lines: the first two columns (workload, unit)
    left-aligned, the numbers right-aligned."""
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]

    def line(cells: list[str]) -> str:
        return " | ".join(
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells)
        )

    return [line(cols), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)]


def best_peer_cell(metric: Metric, row: dict[str, dict]) -> str:
    """The best peer's cell on one row (the one fbmount is divided by), or every peer's
    when none was measured."""
    best = best_peer(metric, row)
    if best is None:
        return " / ".join(f"{p} {cell(row[p])}" for p in PEERS if p in row)
    return f"{cell(row[best])} ({best})"


def links_table(metrics: list[Metric], runs: list[tuple[str, dict]]) -> str:
    """One row per measurement, fbmount / best peer / ratio for each link side by side:
    `runs` is (link name, results) per link, in the order measured."""
    cols = ["workload", "unit"]
    for name, _ in runs:
        cols += [f"fbmount, {name}", f"best peer, {name}", f"ratio, {name}"]
    rows = []
    for m in metrics:
        if not any(results.get(m.key, {}).get("fbmount") for _, results in runs):
            continue  # the native client's rows: in each link's own table
        r = [m.label, m.unit + (" ↑" if m.higher_is_better else " ↓")]
        for _, results in runs:
            row = results.get(m.key, {})
            r += [cell(row.get("fbmount")), best_peer_cell(m, row), ratio_text(m, row)]
        rows.append(r)
    out = render(cols, rows)
    out.append("ratio = fbmount / best peer on that link (> 1 better on ↑ rows, < 1 on ↓ rows).")
    return "\n".join(out)


def requests(stats: dict, workloads: list[str], tools: list[str]) -> str:
    """Per workload: connections each tool opened through the far link, and fbmount's own
    count of its S3 requests (fbmount status), when the run has them."""
    out = []
    conns = []
    for w in workloads:
        row = stats.get(w, {})
        if any("link" in row.get(t, {}) for t in tools):
            cells = []
            for t in (t for t in tools if t in row):
                link = row[t].get("link")
                cells.append(f"{t} {link['connections']}" if link else f"{t} -")
            conns.append(f"  {w:<10} " + ", ".join(cells))
    if conns:
        out.append("\nTCP connections opened through the far link per workload (each costs 1 RTT):")
        out += conns
    reqs = []
    for w in workloads:
        r = stats.get(w, {}).get("fbmount", {}).get("requests")
        if r:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(r.items(), key=lambda kv: -kv[1]))
            reqs.append(f"  {w:<10} {sum(r.values())}: {parts}")
    if reqs:
        out.append("\nfbmount's S3 requests per workload (its own count, before the unmount):")
        out += reqs
    return "\n".join(out)


def notes(metrics: list[Metric], results: dict) -> str:
    lines = []
    for m in metrics:
        for tool, res in results.get(m.key, {}).items():
            if res.get("note"):
                lines.append(f"  {m.key} / {tool}: {res['note']}")
    return "\n".join(lines)


def save_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def save_png(
    path: Path, metrics: list[Metric], results: dict, tools: list[str], title: str
) -> str | None:
    """One small bar chart per metric; returns an error string if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib); no PNG written"
    shown = [m for m in metrics if results.get(m.key)]
    if not shown:
        return None
    ncols = 4
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    colors = {"fbmount": "#2b7bba", "s3fs": "#e08214", "rclone": "#5aae61", "native": "#888888"}
    for ax, m in zip(axes.flat, shown, strict=False):
        row = results[m.key]
        names = [t for t in tools if t in row]
        vals = []
        labels = []
        for t in names:
            res = row[t]
            ok = res.get("status") in ("ok", "bad") and res.get("value") is not None
            v = res["value"] if ok and not math.isnan(res["value"]) else 0.0
            vals.append(v)
            labels.append(cell(res) if not ok or res.get("status") == "bad" else fmt(v))
        bars = ax.bar(names, vals, color=[colors.get(t, "#999999") for t in names])
        for bar, label in zip(bars, labels, strict=True):
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(
            f"{m.label.strip()}\n({m.unit}, {'higher' if m.higher_is_better else 'lower'}"
            " is better)",
            fontsize=8,
        )
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
