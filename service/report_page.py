"""The HTML report of a finished job: the guarantee in words, the risk curve (inline SVG), the pruned model.

Deliberately plain: no scripts and no external assets, so it renders air-gapped, can be saved as
one file, and a Content-Security-Policy of ``default-src 'none'`` (in a ``<meta>``) holds it to
that. Everything that comes from a job — layer names read from the uploaded model above all — is
HTML-escaped where it is written.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any
from urllib.parse import quote

#: Shared with the jobs page (service/routes/pages.py) so both look alike.
BASE_CSS = """
:root { color-scheme: light; --ok: #1e8449; --bad: #c0392b; --muted: #5d6d7e; --line: #d5dbdb; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1000px; margin: 1.5em auto;
  padding: 0 1em; color: #1c2833; line-height: 1.45; }
a { color: #1f618d; }
nav { font-size: .9em; color: var(--muted); margin-bottom: .5em; }
h1 { font-size: 1.6em; margin: .2em 0 .4em; } h2 { font-size: 1.15em; margin: 1.6em 0 .5em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .9em; word-break: break-all; }
.muted { color: var(--muted); font-size: .9em; }
.button { display: inline-block; padding: .55em 1.1em; border-radius: 6px; background: #1f618d; color: #fff;
  text-decoration: none; font-weight: 600; border: 0; cursor: pointer; font-size: 1em; }
.button:hover { background: #154360; }
"""

REPORT_CSS = """
.guarantee { font-size: 1.05em; padding: .8em 1em; background: #f4f6f7; border-left: 4px solid var(--ok); margin: 0; }
.guarantee.none { border-left-color: var(--bad); }
.plain { margin: .6em 0 1em; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: .6em; margin: 1em 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .5em .8em; }
.card .label { font-size: .8em; color: var(--muted); } .card .value { font-size: 1.35em; font-weight: 600; }
.card .value.long { font-size: 1.1em; white-space: nowrap; padding: .15em 0; }
svg.risk-plot text.halo { paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
.download { display: flex; align-items: center; gap: 1em; flex-wrap: wrap; margin: 1em 0; }
.bar { background: #eaecee; width: 140px; height: 10px; border-radius: 3px; overflow: hidden; display: inline-block;
  vertical-align: middle; } .bar span { display: block; height: 100%; background: #2e86c1; }
tr.chosen td { font-weight: 600; } tr.ok td { background: #eafaf1; }
svg.risk-plot { width: 100%; max-width: 850px; height: auto; display: block; }
details summary { cursor: pointer; color: #1f618d; }
"""

#: No scripts, no fetches, no external anything: the report only needs its own inline CSS and SVG.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

RISK_WORDS = {
    "accuracy_drop": "accuracy drop (dense accuracy − pruned accuracy)",
    "disagreement": "disagreement with the dense model",
    "error_rate": "error rate",
}
#: Series colours, matching matplotlib's default cycle (calibration.report's PNG).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")

# Plot geometry (SVG user units): the plot area, then a legend column on the right.
W, H = 850, 360
LEFT, TOP, PLOT_W, PLOT_H = 64, 16, 540, 290
LEGEND_X = LEFT + PLOT_W + 16


def e(value: Any) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


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


def _pct(value: Any, digits: int = 2) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:.{digits}%}"


def _int(value: Any) -> str:
    v = _num(value)
    return "—" if v is None else f"{int(v):,}"


def human_bytes(n: Any) -> str:
    v = _num(n)
    if v is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TB"  # pragma: no cover


def _series(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per criterion (the winner first when there are several), each with its levels."""
    criteria = [c for c in (result.get("criteria") or []) if isinstance(c, dict)]
    if not criteria:
        return [{"criterion": result.get("criterion"), "delta": result.get("delta"),
                 "certified_sparsity": result.get("certified_sparsity"), "levels": result.get("levels") or []}]
    return criteria


def _evaluated(levels: list[Any]) -> list[dict[str, Any]]:
    return [lv for lv in levels if isinstance(lv, dict) and lv.get("evaluated", True)
            and _num(lv.get("sparsity")) is not None and _num(lv.get("empirical_risk")) is not None]


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def plot_ranges(result: dict[str, Any]) -> tuple[float, float, float, float, bool]:
    """(x_lo, x_hi, y_lo, y_hi, cut): the y range shows ε and every level up to each criterion's first
    failure; what lies far above (a full curve rising to 0.5, bounds shooting to 1) is cut off, ``cut``
    says so, so that the region around ε — where the decision is made — stays readable."""
    epsilon = _num(result.get("epsilon")) or 0.0
    xs, risks, values, decisive = [], [], [], []
    for crit in _series(result):
        failed = False
        for lv in _evaluated(crit.get("levels") or []):
            x, r, u = float(lv["sparsity"]), float(lv["empirical_risk"]), _num(lv.get("upper_bound"))
            xs.append(x)
            risks.append(r)
            values += [r] if u is None else [r, u]
            if not failed:
                decisive.append(r)
                failed = not lv.get("rejected")
    x_hi = min(1.0, max(0.1, math.ceil((max(xs, default=0.0) + 0.02) * 10) / 10))
    y_lo = min([0.0, *risks])
    top = max([epsilon, *values, 1e-3])
    y_hi = min(top, max(2.5 * epsilon, 1.15 * max(decisive, default=0.0), 1e-3))
    pad = (y_hi - y_lo) * 0.06
    return 0.0, x_hi, y_lo - (pad if y_lo < 0 else 0.0), y_hi + pad, top > y_hi + pad


def risk_plot_svg(result: dict[str, Any]) -> str:
    """Empirical risk (solid) and its upper confidence bound (dashed) per tested sparsity and criterion,
    the tolerance ε (red, dashed) and the certified sparsity λ̂ (green). Filled dots: levels the
    procedure rejected (certified safe); hollow dots: levels it did not."""
    series = _series(result)
    epsilon = _num(result.get("epsilon")) or 0.0
    certified = _num(result.get("certified_sparsity"))
    is_certified = bool(result.get("certified")) and certified is not None and certified > 0
    x_lo, x_hi, y_lo, y_hi, cut = plot_ranges(result)

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * PLOT_W

    def sy(y: float) -> float:
        return TOP + (y_hi - y) / (y_hi - y_lo) * PLOT_H

    risk_name = str(result.get("risk") or "risk").replace("_", " ")
    out = [
        (f'<svg class="risk-plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
         'role="img" aria-labelledby="plot-title" font-family="system-ui, sans-serif" font-size="11">'),
        (f'<title id="plot-title">{e(risk_name)} and its upper confidence bound against sparsity; '
         f'tolerance ε = {epsilon:g}</title>'),
        (f'<defs><clipPath id="plot-area"><rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/>'
         '</clipPath></defs>'),
        f'<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="#fbfcfc" stroke="#aab7b8"/>',
    ]
    # Grid and ticks.
    x_step = 0.1 if x_hi > 0.5 else 0.05
    for i in range(round((x_hi - x_lo) / x_step) + 1):
        x = x_lo + i * x_step
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{TOP}" y2="{TOP + PLOT_H}" stroke="#eef0f0"/>')
        out.append(f'<text x="{sx(x):.1f}" y="{TOP + PLOT_H + 15}" text-anchor="middle">{x:.0%}</text>')
    y_step = _nice_step(y_hi - y_lo)
    y = math.ceil(y_lo / y_step) * y_step
    while y <= y_hi + 1e-12:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eef0f0"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        y += y_step
    out.append(f'<text x="{LEFT + PLOT_W / 2}" y="{H - 12}" text-anchor="middle">'
               'sparsity (fraction of prunable weights set to zero)</text>')
    mid = TOP + PLOT_H / 2
    out.append(f'<text x="14" y="{mid}" text-anchor="middle" transform="rotate(-90 14 {mid})">'
               f'{e(risk_name)} on the calibration set</text>')

    # Curves, clipped to the plot area (capped upper bounds leave through the top).
    out.append('<g clip-path="url(#plot-area)">')
    for i, crit in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        name = e(crit.get("criterion"))
        levels = _evaluated(crit.get("levels") or [])
        ucb_pts = [(float(lv["sparsity"]), _num(lv.get("upper_bound"))) for lv in levels]
        ucb_pts = [(x, u) for x, u in ucb_pts if u is not None]
        if ucb_pts:
            pts = " ".join(f"{sx(x):.1f},{sy(u):.1f}" for x, u in ucb_pts)
            out.append(f'<polyline class="ucb" data-criterion="{name}" points="{pts}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.4" stroke-dasharray="5 3"/>')
        if levels:
            pts = " ".join(f"{sx(float(lv['sparsity'])):.1f},{sy(float(lv['empirical_risk'])):.1f}" for lv in levels)
            out.append(f'<polyline class="risk" data-criterion="{name}" points="{pts}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.8"/>')
        for lv in levels:
            x, r = float(lv["sparsity"]), float(lv["empirical_risk"])
            fill = colour if lv.get("rejected") else "#fff"
            tip = (f"{crit.get('criterion')} at sparsity {x:.2%}: risk {r:.4g}, upper bound "
                   f"{_fmt(_num(lv.get('upper_bound')))}, p = {_fmt(_num(lv.get('p_value')), 3)}, "
                   f"{'rejected (safe)' if lv.get('rejected') else 'not rejected'}")
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(r):.1f}" r="2.6" fill="{fill}" stroke="{colour}">'
                       f'<title>{e(tip)}</title></circle>')
    out.append(f'<line class="epsilon" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{sy(epsilon):.1f}" '
               f'y2="{sy(epsilon):.1f}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="7 4"/>')
    if is_certified:
        assert certified is not None
        out.append(f'<line class="lambda-hat" x1="{sx(certified):.1f}" x2="{sx(certified):.1f}" y1="{TOP}" '
                   f'y2="{TOP + PLOT_H}" stroke="#1e8449" stroke-width="1.5"/>')
    out.append("</g>")
    out.append(f'<text class="halo" x="{LEFT + 6}" y="{sy(epsilon) - 5:.1f}" fill="#c0392b">ε = {epsilon:g}</text>')
    if cut:
        out.append(f'<text class="cut-note halo" x="{LEFT + PLOT_W - 4}" y="{TOP + PLOT_H - 6}" text-anchor="end" '
                   f'fill="#5d6d7e">values above {y_hi:.3g} are cut off (see the table of levels)</text>')
    if is_certified:
        assert certified is not None
        anchor = "end" if sx(certified) > LEFT + PLOT_W - 90 else "start"
        dx = -5 if anchor == "end" else 5
        out.append(f'<text class="halo" x="{sx(certified) + dx:.1f}" y="{TOP + 14}" text-anchor="{anchor}" '
                   'fill="#1e8449" '
                   f'font-weight="600">λ̂ = {certified:.2%}</text>')

    # Legend.
    ly = TOP + 8
    for i, crit in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        name = e(crit.get("criterion"))
        out.append(f'<line x1="{LEGEND_X}" x2="{LEGEND_X + 24}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="1.8"/><text x="{LEGEND_X + 30}" y="{ly + 4}">{name}: empirical risk</text>')
        ly += 17
        delta = _num(crit.get("delta"))
        conf = f"{(1 - delta) * 100:.3g}% " if delta is not None else ""
        out.append(f'<line x1="{LEGEND_X}" x2="{LEGEND_X + 24}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="1.4" stroke-dasharray="5 3"/>'
                   f'<text x="{LEGEND_X + 30}" y="{ly + 4}">{name}: {e(conf)}upper bound</text>')
        ly += 22
    out.append(f'<line x1="{LEGEND_X}" x2="{LEGEND_X + 24}" y1="{ly}" y2="{ly}" stroke="#c0392b" '
               f'stroke-width="1.5" stroke-dasharray="7 4"/><text x="{LEGEND_X + 30}" y="{ly + 4}">'
               f'tolerance ε = {epsilon:g}</text>')
    ly += 20
    if is_certified:
        out.append(f'<line x1="{LEGEND_X}" x2="{LEGEND_X + 24}" y1="{ly}" y2="{ly}" stroke="#1e8449" '
                   f'stroke-width="1.5"/><text x="{LEGEND_X + 30}" y="{ly + 4}">certified λ̂</text>')
        ly += 20
    out.append(f'<circle cx="{LEGEND_X + 12}" cy="{ly}" r="3" fill="#566573" stroke="#566573"/>'
               f'<text x="{LEGEND_X + 30}" y="{ly + 4}">rejected: safe</text>')
    ly += 17
    out.append(f'<circle cx="{LEGEND_X + 12}" cy="{ly}" r="3" fill="#fff" stroke="#566573"/>'
               f'<text x="{LEGEND_X + 30}" y="{ly + 4}">not rejected</text>')
    out.append("</svg>")
    return "".join(out)


def plain_words(result: dict[str, Any]) -> str:
    """The guarantee once more, for someone who has never heard of Learn then Test."""
    eps = _num(result.get("epsilon"))
    delta = _num(result.get("delta"))
    s = _num(result.get("certified_sparsity"))
    if not result.get("certified") or not s or eps is None or delta is None:
        return ("No tested sparsity passed the test, so nothing could be removed with the requested confidence: "
                "the downloadable model is the original one. A larger tolerance ε, a larger δ or more "
                "calibration samples can change that.")
    risk = result.get("risk")
    if risk == "accuracy_drop":
        cost = f"loses at most {eps * 100:g} percentage points of accuracy compared with the original"
    elif risk == "disagreement":
        cost = f"changes the original model's prediction on at most {eps:.2%} of inputs"
    elif risk == "error_rate":
        cost = f"gets at most {eps:.2%} of inputs wrong"
    else:
        cost = f"has a {e(risk)} of at most {eps:g}"
    return (f"In plain words: setting {s:.0%} of the prunable weights to zero, the pruned model {cost}, on data like "
            f"the calibration set. We are {1 - delta:.0%} sure of this; the {delta:.0%} left over is the chance that "
            "an unluckily drawn calibration set made a harmful level look safe.")


def _cards(result: dict[str, Any], model_bytes: int | None) -> str:
    dense, pruned = _num(result.get("dense_accuracy")), _num(result.get("pruned_accuracy"))
    delta = _num(result.get("delta"))
    acc = f"{_pct(dense, 1)} → {_pct(pruned, 1)}" if dense is not None else "— (no labels)"
    size = human_bytes(result.get("artifact_bytes"))
    size_note = f"upload {human_bytes(model_bytes)}" if model_bytes is not None else "pruned TorchScript file"
    cards = [
        ("Certified sparsity", _pct(result.get("certified_sparsity"), 0),
         f"of prunable weights, criterion {e(result.get('criterion'))}"),
        ("Accuracy, dense → pruned", e(acc), "on the calibration samples"),
        ("Weights set to zero", _int(result.get("zeroed_parameters")),
         f"of {_int(result.get('prunable_parameters'))} prunable"),
        ("Artifact size", size, e(size_note)),
        ("Tolerance ε / confidence",
         f"{_fmt(result.get('epsilon'))} / {_pct(1 - delta if delta is not None else None, 0)}",
         e(str(result.get("risk") or "").replace("_", " "))),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{label}</div><div class="value{" long" if len(value) > 10 else ""}">'
        f'{value}</div><div class="muted">{note}</div></div>' for label, value, note in cards) + "</div>"


def _criteria_table(result: dict[str, Any]) -> str:
    criteria = [c for c in (result.get("criteria") or []) if isinstance(c, dict)]
    if not criteria:
        return ""
    chosen = result.get("criterion")
    chosen_row = ' class="chosen"'
    rows = "".join(
        f'<tr{chosen_row if c.get("criterion") == chosen else ""}><td>{e(c.get("criterion"))}'
        f'{" (used)" if c.get("criterion") == chosen else ""}</td>'
        f'<td class="num">{e(_fmt(_num(c.get("delta")), 3))}</td>'
        f'<td class="num">{_pct(c.get("certified_sparsity"))}</td><td>{e(_fmt(bool(c.get("certified"))))}</td>'
        f'<td class="num">{len(_evaluated(c.get("levels") or []))}</td></tr>'
        for c in criteria)
    note = ("Each criterion was tested with its share of δ (Bonferroni), so the guarantee holds for the one "
            "that certified the most.") if len(criteria) > 1 else ""
    return (f'<h2>Criteria</h2><table id="criteria"><thead><tr><th>criterion</th><th class="num">δ share</th>'
            f'<th class="num">certified sparsity</th><th>certified</th><th class="num">levels evaluated</th></tr>'
            f'</thead><tbody>{rows}</tbody></table><p class="muted">{note}</p>')


def _layers_table(result: dict[str, Any]) -> str:
    layers = [lyr for lyr in (result.get("layers") or []) if isinstance(lyr, dict)]
    if not layers:
        return ""
    rows = []
    for lyr in layers:
        frac = min(max(_num(lyr.get("sparsity")) or 0.0, 0.0), 1.0)
        rows.append(f'<tr><td><code>{e(lyr.get("name"))}</code></td><td>{e(lyr.get("type"))}</td>'
                    f'<td class="num">{_int(lyr.get("parameters"))}</td><td class="num">{_int(lyr.get("zeroed"))}</td>'
                    f'<td class="num">{frac:.1%}</td><td><span class="bar"><span style="width:{frac * 100:.1f}%">'
                    f'</span></span></td></tr>')
    return ('<h2>Sparsity per layer</h2><table id="layers"><thead><tr><th>weight</th><th>type</th>'
            '<th class="num">parameters</th><th class="num">zeroed</th><th class="num">sparsity</th><th></th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _model_table(result: dict[str, Any], model_bytes: int | None) -> str:
    rows = [
        ("accuracy of the original model", _pct(result.get("dense_accuracy"))),
        ("accuracy of the pruned model", _pct(result.get("pruned_accuracy"))),
        ("prunable parameters", _int(result.get("prunable_parameters"))),
        ("zeroed parameters", _int(result.get("zeroed_parameters"))),
        ("all parameters of the model", _int(result.get("total_parameters"))),
        ("uploaded model file", human_bytes(model_bytes) if model_bytes is not None else None),
        ("pruned model file (artifact)", human_bytes(result.get("artifact_bytes"))),
    ]
    body = "".join(f'<tr><th>{label}</th><td class="num">{e(value)}</td></tr>' for label, value in rows
                   if value is not None)
    return (f'<h2>Accuracy, parameters and files</h2><table id="model">{body}</table>'
            '<p class="muted">Accuracy is measured on the calibration samples (when they have labels). Zeros are '
            'baked into the weights and the file stays dense, so its size barely changes: smaller files and '
            'faster inference need a sparse format or runtime.</p>')


def _settings_table(result: dict[str, Any]) -> str:
    keys = ["risk", "epsilon", "delta", "bound", "procedure", "criterion", "scope", "pattern", "n_calibration",
            "n_tune", "seed", "bn_recalibration", "device", "precision", "levels_evaluated"]
    body = "".join(f"<tr><th>{e(k.replace('_', ' '))}</th><td>{e(_fmt(result.get(k)))}</td></tr>"
                   for k in keys if k in result)
    rec = result.get("reconstruction")
    if isinstance(rec, dict):
        what = (f"unavailable, plain masks: {rec['unavailable']}" if rec.get("unavailable")
                else f"{len(rec.get('layers') or [])} layers reconstructed on the tuning split, "
                     f"{len(rec.get('skipped') or {})} masked only")
        body += f"<tr><th>reconstruction</th><td>{e(what)}</td></tr>"
    more = result.get("more_data")
    if isinstance(more, dict) and _num(more.get("sparsity")) is not None:
        needed = more.get("n_calibration_needed")
        what = (f"{_pct(more['sparsity'])} was not certified with {_fmt(more.get('n_calibration'))} samples; "
                + (f"about {needed:,} would likely certify it at its observed risk (an estimate for planning, "
                   "not part of the guarantee)" if isinstance(needed, int) else
                   "at its observed risk, more data alone would not certify it"))
        body += f"<tr><th>next level</th><td>{e(what)}</td></tr>"
    total_s = _num((result.get("timings") or {}).get("total_s")) if isinstance(result.get("timings"), dict) else None
    if total_s is not None:
        body += f"<tr><th>time</th><td>{total_s:.1f} s</td></tr>"
    return f'<h2>Settings</h2><table id="settings">{body}</table>'


def _levels_table(result: dict[str, Any]) -> str:
    levels = [lv for lv in (result.get("levels") or []) if isinstance(lv, dict)]
    rows = "".join(
        '<tr{cls}><td class="num">{s}</td><td class="num">{r}</td><td class="num">{u}</td><td class="num">{p}</td>'
        "<td>{rej}</td></tr>".format(
            cls=' class="ok"' if lv.get("rejected") else "", s=e(_pct(lv.get("sparsity"))),
            r=e(_fmt(_num(lv.get("empirical_risk")))), u=e(_fmt(_num(lv.get("upper_bound")))),
            p=e(_fmt(_num(lv.get("p_value")), 3)),
            rej="yes" if lv.get("rejected") else ("no" if lv.get("evaluated", True) else "not evaluated"))
        for lv in levels)
    return (f'<details><summary>All {len(levels)} levels of the grid for {e(result.get("criterion"))}</summary>'
            '<table id="levels"><thead><tr><th class="num">sparsity</th><th class="num">empirical risk</th>'
            '<th class="num">upper bound</th><th class="num">p-value</th><th>rejected (safe)</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></details>")


def render_report(job_id: str, result: dict[str, Any], *, model_bytes: int | None = None) -> str:
    """The whole page. ``model_bytes``: the size of the uploaded model, when the caller knows it."""
    certified = bool(result.get("certified")) and bool(_num(result.get("certified_sparsity")))
    s = _num(result.get("certified_sparsity"))
    verdict = (f"Certified: {s:.0%} of the prunable weights can be set to zero" if certified and s is not None
               else "Nothing certified: the downloadable model is the original")
    job = quote(str(job_id), safe="")
    artifact_url = f"/v1/jobs/{job}/artifact"
    sha = result.get("artifact_sha256")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{e(REPORT_CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>certiprune report {e(job_id)}</title>
<style>{BASE_CSS}{REPORT_CSS}</style></head><body>
<nav><a href="/">← all jobs</a> · job <code>{e(job_id)}</code> ·
<a href="/v1/jobs/{e(job)}" type="application/json">job as JSON</a></nav>
<h1>{e(verdict)}</h1>
<p class="guarantee{'' if certified else ' none'}" id="guarantee">{e(result.get("guarantee", ""))}</p>
<p class="plain">{e(plain_words(result))}</p>
{_cards(result, model_bytes)}
<div class="download"><a class="button" id="download" data-artifact href="{e(artifact_url)}"
download="{e(str(job_id) + '-pruned.pt')}">Download the pruned model
({e(human_bytes(result.get("artifact_bytes")))})</a>
<span class="muted">TorchScript, same inputs and outputs as the upload.<br>
sha256 <code>{e(sha or "—")}</code></span></div>
<h2>Risk against sparsity</h2>
{risk_plot_svg(result)}
<p class="muted">Each sparsity was tested on the calibration set. A level is certified safe (“rejected”)
when the test of the hypothesis “risk &gt; ε” rejects it: with the fixed-sequence procedure, when its upper
confidence bound (dashed) lies under ε. λ̂ is the largest sparsity the procedure certified
({e(result.get("procedure"))}).</p>
{_criteria_table(result)}
{_layers_table(result)}
{_model_table(result, model_bytes)}
{_settings_table(result)}
{_levels_table(result)}
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


__all__ = ["BASE_CSS", "REPORT_CSP", "human_bytes", "plain_words", "prefers_html", "render_report", "risk_plot_svg"]
