"""Reports: per-layer table, latency, and a single-file HTML page with its plots embedded."""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path
from typing import Any

from redonnx.io.files import publish
from redonnx.measure.bench import interleaved_times
from redonnx.measure.runtime import session


def layer_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each original layer with its parameters and MACs before and after (separated layers summed)."""
    from redonnx.report.result import layer_rows

    return report.get("layers") or layer_rows(report["before"]["layers"], report["after"]["layers"])


def latency(before, after, feeds: dict, runs: int = 50) -> dict[str, float]:
    """onnxruntime CPU latency (optimizations on) on ``feeds``, medians of interleaved runs."""
    import statistics

    sessions = [session(m, optimize=True, threads=0, spin=True) for m in (before, after)]  # as deployed
    t = interleaved_times(sessions, feeds, runs=runs)
    b, a = statistics.median(t[0]), statistics.median(t[1])
    return {"before_ms": b, "after_ms": a, "speedup": b / a if a else float("inf"), "runs": runs}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def removed_bars(rows: list[dict[str, Any]]) -> str:
    """Per-layer share of parameters removed, by depth (the paper's Figure 5, one training state)."""
    from redonnx.report.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.bar(range(len(rows)), [r["removed_pct"] for r in rows], color="tab:blue")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("% parameters removed")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_html(report: dict[str, Any], path: str | Path, density_pngs: list[Path] | None = None) -> Path:
    """One self-contained HTML page: summary, budget, verification, plots, per-layer table."""
    rows = layer_table(report)
    b, a, rem = report["before"], report["after"], report["removed"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>redonnx report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{padding:2px 8px;text-align:right}"
        "th{background:#eee}td:first-child,th:first-child{text-align:left}.fail{color:#b00}</style></head><body>",
        f"<h1>redonnx report</h1><p>{esc(str(report.get('input')))} &rarr; {esc(str(report.get('output')))}</p>",
        "<table><tr><th></th><th>before</th><th>after</th><th>removed</th></tr>",
        f"<tr><td>parameters</td><td>{b['params']:,}</td><td>{a['params']:,}</td>"
        f"<td>{rem['params_pct']:.1f} %</td></tr>",
        f"<tr><td>MACs</td><td>{_n(b['macs'])}</td><td>{_n(a['macs'])}</td><td>{_p(rem['macs_pct'])}</td></tr>",
        f"<tr><td>deflated bytes</td><td>{b['deflated_bytes']:,}</td><td>{a['deflated_bytes']:,}</td>"
        f"<td>{b['deflated_bytes'] / max(a['deflated_bytes'], 1):.2f}x</td></tr>",
    ]
    if report.get("latency"):
        lat = report["latency"]
        parts.append(f"<tr><td>latency (ms, onnxruntime CPU)</td><td>{lat['before_ms']:.3f}</td>"
                     f"<td>{lat['after_ms']:.3f}</td><td>{lat['speedup']:.2f}x</td></tr>")  # fmt: skip
    speed = report.get("speed") or {}
    if speed.get("speedup_vs_input"):
        f = speed["speedup_vs_input"]
        parts.append(f"<tr><td>speed (measured, {esc(speed.get('config', ''))})</td><td></td><td></td>"
                     f"<td>{f['speedup']:.2f}x ({f['ratio_low']:.3f}-{f['ratio_high']:.3f})</td></tr>")  # fmt: skip
    parts.append("</table>")
    if speed:
        parts.append(f"<p>target {esc(str(report.get('target')))}: writing the {esc(speed.get('kept', ''))}</p>")
    parts += _budget_html(report) + _verification_html(report) + _passes_html(report)
    if rows and any(r["params_before"] for r in rows):
        try:
            parts.append(f"<h2>Parameters removed per layer</h2><img src='data:image/png;base64,{removed_bars(rows)}'>")
        except Exception as exc:  # matplotlib missing: the table still says it all
            parts.append(f"<p>(plot unavailable: {esc(str(exc))})</p>")
    for png in density_pngs or []:
        data = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(f"<h3>{esc(Path(png).stem)}</h3><img src='data:image/png;base64,{data}'>")
    parts.append("<h2>Layers</h2><table><tr><th>layer</th><th>op</th><th>params before</th><th>after</th>"
                 "<th>MACs before</th><th>after</th><th>removed</th></tr>")  # fmt: skip
    for r in rows:
        parts.append(f"<tr><td>{esc(r['layer'])}</td><td>{r['op']}</td><td>{r['params_before']:,}</td>"
                     f"<td>{r['params_after']:,}</td><td>{_n(r['macs_before'])}</td><td>{_n(r['macs_after'])}</td>"
                     f"<td>{r['removed_pct']:.1f} %</td></tr>")  # fmt: skip
    parts.append("</table></body></html>")
    out = Path(path)
    with tempfile.NamedTemporaryFile("w", delete=False, dir=out.parent or ".", suffix=".html") as f:
        f.write("\n".join(parts))
    publish(Path(f.name), out)
    return out


def _n(v: int | None) -> str:
    return f"{v:,}" if v is not None else "?"


def _p(v: float | None, missing: str = "?") -> str:
    return f"{v:.1f} %" if v is not None else missing


def _budget_html(report: dict[str, Any]) -> list[str]:
    """The budget trials; their MACs removed where counted (``--target-macs`` counts them)."""
    s = report.get("budget")
    if not s:
        return []
    counted = any(t["macs_removed_pct"] is not None for t in s["trials"])
    rows = "".join(
        f"<tr><td>{t['value']:.3g}</td>"
        + (f"<td>{_p(t['macs_removed_pct'], '-')}</td>" if counted else "")
        + f"<td>{t['cosine']:.4f}</td><td>{'ok' if t['passed'] else 'over'}</td></tr>"
        for t in s["trials"]
    )
    knob = s["knob"].replace("_", " ")
    macs = "<th>MACs removed</th>" if counted else ""
    return [f"<h2>Budget: {html.escape(s['goal'])} &rarr; {knob} {s['value']:.3g}</h2>",
            f"<table><tr><th>{knob}</th>{macs}<th>cosine</th><th></th></tr>{rows}</table>"]  # fmt: skip


def _verification_html(report: dict[str, Any]) -> list[str]:
    v = report.get("verification")
    if not v:
        return []
    head = "passed" if v["passed"] else "<span class='fail'>FAILED</span>"
    rows = "".join(
        f"<tr><td>{html.escape(o['name'])}</td><td>{o['max_abs']:.3g}</td><td>{o['needed_rtol']:.3g}</td>"
        f"<td>{o['cosine']:.6f}</td><td>{_agreement(o['top1_agreement'])}</td></tr>"
        for o in v["outputs"]
    )
    return [f"<h2>Verification {head}</h2><p>{html.escape(v['inputs'])}</p>",
            "<table><tr><th>output</th><th>max |diff|</th><th>of max |ref|</th><th>cosine</th><th>top-1</th></tr>",
            rows, "</table>"]  # fmt: skip


def _agreement(v: float | None) -> str:
    return "" if v is None else f"{v:.2%}"


def _passes_html(report: dict[str, Any]) -> list[str]:
    out = ["<h2>Passes</h2><ul>"]
    for p in report["passes"]:
        counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items()) or "no change"
        out.append(f"<li><b>{p['name']}</b> ({p['seconds']:.2f} s): {html.escape(counts)}")
        if p["declined"]:
            out.append(f"<details><summary>{len(p['declined'])} left alone</summary><ul>")
            out += [f"<li>{html.escape(d['node'])}: {html.escape(d['reason'])}</li>" for d in p["declined"]]
            out.append("</ul></details>")
        out.append("</li>")
    out.append("</ul>")
    return out
