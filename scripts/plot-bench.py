#!/usr/bin/env python3
"""Plot delivery latency percentiles against offered rate from a `bench max` run.

Usage: scripts/plot-bench.py [MAX_JSON] [OUT_SVG]
  MAX_JSON  defaults to target/bench/max.json (what `bench max` writes)
  OUT_SVG   defaults to docs/bench-latency.svg

Only the Python standard library: the SVG is written by hand. The x axis is the offered rate
(messages/s), the y axis is latency in ms on a log scale; one line per percentile (p50, p90,
p99, p99.9, max) of the end-to-end delivery latency, plus the "sent" ack p99. Filled markers are
trials that sustained their rate, hollow ones did not; the half-rate trial is included.
"""

import json
import math
import sys
from pathlib import Path

W, H = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 50, 60
SERIES = [
    ("p50_ms", "delivery p50", "#1b9e77", ""),
    ("p90_ms", "delivery p90", "#7570b3", ""),
    ("p99_ms", "delivery p99", "#d95f02", ""),
    ("p999_ms", "delivery p99.9", "#e7298a", ""),
    ("max_ms", "delivery max", "#666666", ""),
    ("sent_p99", "sent ack p99", "#1f78b4", "6,4"),
]


def points(record):
    search = record["result"]["search"]
    trials = [(s["trial"], s["pass"]) for s in search["steps"]]
    if search.get("half"):
        trials.append((search["half"], True))
    rows = []
    for t, ok in trials:
        d = dict(t["delivery_latency"])
        d["sent_p99"] = t["sent_latency"]["p99_ms"]
        rows.append((t["spec"]["rate"], d, ok))
    rows.sort(key=lambda r: r[0])
    return rows


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench/max.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/bench-latency.svg")
    record = json.loads(src.read_text())
    rows = points(record)
    if not rows:
        sys.exit(f"{src}: no trials")
    xs = [r[0] for r in rows]
    ys = [max(r[1][k], 0.01) for r in rows for k, *_ in SERIES]
    x0, x1 = 0.0, max(xs) * 1.05
    lo = 10 ** math.floor(math.log10(min(ys)))
    hi = 10 ** math.ceil(math.log10(max(ys)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y):
        y = max(y, lo)
        return TOP + ph - (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
    ]
    m = record.get("machine", {})
    title = "Latency vs offered rate (bench max, one-to-one, open loop)"
    sub = (
        f'{m.get("cores", "?")} x {m.get("cpu_model", "?")}, {m.get("profile", "?")} build, '
        f'commit {m.get("git_commit") or "?"}; {record["settings"]["load"]["size"]} B bodies'
    )
    out.append(f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{esc(title)}</text>')
    out.append(f'<text x="{LEFT}" y="36" fill="#444">{esc(sub)}</text>')
    # Grid: decades on y, 6 ticks on x.
    d = lo
    while d <= hi * 1.0001:
        y = py(d)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{d:g}"
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        d *= 10
    raw = (x1 - x0) / 6
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    for i in range(int(x1 // step) + 1):
        x = i * step
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP}" x2="{px(x):.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">offered rate (messages/s)</text>'
    )
    out.append(
        f'<text transform="translate(18,{TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"latency (ms, log scale)</text>"
    )
    for i, (key, label, color, dash) in enumerate(SERIES):
        pts = [(px(r[0]), py(r[1][key]), r[2]) for r in rows]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>'
        )
        for x, y, ok in pts:
            fill = color if ok else "white"
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
            )
        ly = TOP + 10 + i * 18
        lx = LEFT + pw + 14
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{color}" stroke-width="2"{dash_attr}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{esc(label)}</text>')
    ly = TOP + 10 + len(SERIES) * 18 + 10
    out.append(f'<text x="{LEFT + pw + 14}" y="{ly}" fill="#444">filled: sustained</text>')
    out.append(f'<text x="{LEFT + pw + 14}" y="{ly + 16}" fill="#444">hollow: not sustained</text>')
    out.append("</svg>")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(out) + "\n")
    print(f"wrote {dst} ({len(rows)} trials from {src})")


if __name__ == "__main__":
    main()
