"""The HTML report of a finished job: the guarantee in words, a risk-vs-sparsity plot (inline SVG), the levels.

Deliberately plain (no scripts, no external assets) so it renders anywhere and can be saved as one file.
"""

from __future__ import annotations

from html import escape
from typing import Any

W, H = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 20, 45


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def risk_plot_svg(levels: list[dict[str, Any]], epsilon: float, certified_sparsity: float | None) -> str:
    """Empirical risk on D_cal against sparsity; dashed line at ε; a marker at the certified sparsity."""
    pts = [(float(lv["sparsity"]), float(lv["empirical_risk"])) for lv in levels
           if lv.get("evaluated", True) and lv.get("empirical_risk") is not None]
    rejected = {float(lv["sparsity"]) for lv in levels if lv.get("rejected")}
    ys = [y for _, y in pts] + [epsilon, 0.0]
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or 0.01
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = 0.0, 1.0

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT)

    def sy(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * (H - TOP - BOTTOM)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             'role="img" aria-label="Empirical risk against sparsity" font-family="sans-serif" font-size="11">',
             f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="#fafafa" '
             'stroke="#999"/>']
    for i in range(6):
        x = i / 5
        parts.append(f'<text x="{sx(x):.1f}" y="{H - BOTTOM + 15}" text-anchor="middle">{x:.1f}</text>')
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle">sparsity '
                 '(fraction of prunable weights set to zero)</text>')
    parts.append(f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})">empirical risk on D_cal</text>')
    parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(epsilon):.1f}" y2="{sy(epsilon):.1f}" '
                 'stroke="#c0392b" stroke-dasharray="6 4"/>')
    parts.append(f'<text x="{W - RIGHT - 4}" y="{sy(epsilon) - 4:.1f}" text-anchor="end" fill="#c0392b">'
                 f'ε = {epsilon:g}</text>')
    if certified_sparsity:
        parts.append(f'<line x1="{sx(certified_sparsity):.1f}" x2="{sx(certified_sparsity):.1f}" y1="{TOP}" '
                     f'y2="{H - BOTTOM}" stroke="#27ae60"/>')
    if pts:
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="#2c3e50" stroke-width="1.5"/>')
        for x, y in pts:
            colour = "#27ae60" if x in rejected else "#7f8c8d"
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                         f'<title>sparsity {x:g}: risk {y:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(job_id: str, result: dict[str, Any]) -> str:
    levels = result.get("levels") or []
    epsilon = float(result.get("epsilon") or 0.0)
    certified = result.get("certified_sparsity")
    summary_keys = ["certified_sparsity", "certified", "epsilon", "delta", "risk", "bound", "procedure",
                    "criterion", "n_calibration", "n_tune", "dense_accuracy", "prunable_parameters",
                    "zeroed_parameters", "artifact_sha256"]
    summary = "".join(f"<tr><th>{escape(k)}</th><td>{escape(_fmt(result.get(k)))}</td></tr>"
                      for k in summary_keys if k in result)
    rows = "".join(
        "<tr{cls}><td>{s}</td><td>{r}</td><td>{p}</td><td>{rej}</td><td>{ev}</td></tr>".format(
            cls=' class="ok"' if lv.get("rejected") else "",
            s=escape(_fmt(lv.get("sparsity"))), r=escape(_fmt(lv.get("empirical_risk"))),
            p=escape(_fmt(lv.get("p_value"))), rej=escape(_fmt(lv.get("rejected"))),
            ev=escape(_fmt(lv.get("evaluated", True))))
        for lv in levels
    )
    verdict = (f"Certified sparsity {certified:g}" if result.get("certified") and certified is not None
               else "Nothing certified: the dense model is returned")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>certiprune report {escape(job_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 900px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ padding: 2px 10px; border-bottom: 1px solid #ddd;
text-align: left; }} tr.ok td {{ background: #eafaf1; }} .guarantee {{ font-size: 1.1em; padding: .8em;
background: #f4f6f7; border-left: 4px solid #27ae60; }}
</style></head><body>
<h1>{escape(verdict)}</h1>
<p class="guarantee">{escape(str(result.get("guarantee", "")))}</p>
{risk_plot_svg(levels, epsilon, certified)}
<h2>Summary</h2><table>{summary}</table>
<h2>Levels</h2>
<table><thead><tr><th>sparsity</th><th>empirical risk</th><th>p-value</th><th>rejected (safe)</th>
<th>evaluated</th></tr></thead><tbody>{rows}</tbody></table>
<p>Job <code>{escape(job_id)}</code>. Rejected levels are those whose null hypothesis “risk &gt; ε” was rejected
by the family-wise error procedure.</p>
</body></html>"""


def prefers_html(accept: str | None) -> bool:
    """True when the Accept header ranks text/html above application/json (browsers do; API clients do not)."""
    if not accept:
        return False
    ranks: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        ranks[media.lower()] = max(q, ranks.get(media.lower(), 0.0))
    html = max(ranks.get("text/html", 0.0), ranks.get("application/xhtml+xml", 0.0))
    json_q = ranks.get("application/json", 0.0)
    return html > 0 and html > json_q


__all__ = ["prefers_html", "render_report", "risk_plot_svg"]
