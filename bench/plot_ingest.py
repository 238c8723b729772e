"""Where an ingested alert's CPU goes: bench/results/ingest.json as a bar chart (SVG, no plotting library).

One bar per run: CPU milliseconds per alert in tomd's process, its parse workers, the
PostgreSQL server and the broker, stacked; beside it the rate measured and the rate the
machine's cores would allow for that much CPU. Writes docs/ingest-cpu.svg.

    python bench/plot_ingest.py [RESULTS.json] [OUT.svg]
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = [("tomd", "#4c72b0", "tomd (all daemons)"), ("parse_workers", "#8172b2", "parse worker"),
         ("postgresql", "#dd8452", "PostgreSQL server"), ("broker", "#55a868", "broker")]


def label(run: dict) -> str:
    cut = "cutouts" if run["cutouts"] else "no cutouts"
    w = f", {run['parse_workers']} parse worker" if run.get("parse_workers") else ""
    d = f", {run['daemons']} daemons" if (run.get("daemons") or 1) > 1 else ""
    return f"{run['backend']}, {run['rules']} rules, {cut}{w}{d}"


def svg(results: dict) -> str:
    runs = [r for r in results["runs"] if r.get("cpu_ms_per_alert")]
    scale = 130.0  # px per ms
    left, top, row = 330, 56, 26
    most = max(sum(r["cpu_ms_per_alert"].get(k, 0.0) for k, _, _ in PARTS) for r in runs)
    width = left + int(most * scale) + 250
    height = top + row * len(runs) + 60
    cores = results.get("cpus") or 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">CPU per ingested alert, by process '
           f'({results["alerts"]:,} real ZTF alerts, {cores} cores; bench/ingest.py)</text>']
    x = 10
    for key, colour, name in PARTS:
        out.append(f'<rect x="{x}" y="32" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + 16}" y="42">{escape(name)}</text>')
        x += 30 + 7 * len(name)
    out.append(f'<text x="{left + int(most * scale) + 8}" y="42" fill="#444">alerts/s measured '
               f'(what {cores} cores allow)</text>')
    for i, r in enumerate(runs):
        y = top + i * row
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(label(r))}</text>')
        x = float(left)
        cpu = r["cpu_ms_per_alert"]
        for key, colour, name in PARTS:
            w = cpu.get(key, 0.0) * scale
            if w > 0:
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 6}" fill="{colour}">'
                           f'<title>{escape(name)}: {cpu.get(key, 0.0):.2f} ms</title></rect>')
                x += w
        bound = cpu.get("cpu_bound_alerts_per_s")
        out.append(f'<text x="{x + 6:.1f}" y="{y + 15}">{r["alerts_per_s"]:,.0f}'
                   + (f' <tspan fill="#777">({bound:,.0f})</tspan>' if bound else "") + "</text>")
    axis_y = top + row * len(runs) + 4
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + most * scale:.0f}" y2="{axis_y}" stroke="#999"/>')
    ms = 0.0
    while ms <= most + 1e-9:
        xx = left + ms * scale
        out.append(f'<line x1="{xx:.0f}" y1="{axis_y}" x2="{xx:.0f}" y2="{axis_y + 4}" stroke="#999"/>'
                   f'<text x="{xx:.0f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">{ms:g}</text>')
        ms += 0.5
    out.append(f'<text x="{left + most * scale / 2:.0f}" y="{axis_y + 32}" text-anchor="middle" fill="#555">'
               f'ms of CPU per alert</text></svg>')
    return "\n".join(out) + "\n"


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "ingest.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "ingest-cpu.svg"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(svg(json.loads(src.read_text())))
    print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
