"""Certificate → human-readable summary and the risk-vs-sparsity plot."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2%}"


def candidate_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """How the candidates were built beyond masking (BN statistics, fine-tuning), for the text and HTML reports."""
    rows: list[tuple[str, str]] = []
    bn = result.get("bn_statistics")
    if isinstance(bn, dict) and isinstance(bn.get("chosen"), dict):
        chosen = ", ".join(f"{k} {v}" for k, v in bn["chosen"].items() if isinstance(v, int) and v)
        math = f"; built in {bn['math'].upper()} math" if isinstance(bn.get("math"), str) else ""
        if bn.get("mode") == "choose":
            rows.append(("BN statistics", f"per level, the better on a held-out half of the tuning split "
                                          f"({bn.get('n_check', '?')} samples): {chosen or 'no level built'}{math}"))
        else:
            rows.append(("BN statistics", f"re-estimated on the tuning split at every level ({chosen or 'none'})"
                                          f"{math}"))
    ft = result.get("finetune")
    if isinstance(ft, dict):
        rows.append(("fine-tuning", f"up to {ft.get('steps')} steps per level"
                                    f"{' (chained: each level from the one below)' if ft.get('chain') else ''} "
                                    f"on {ft.get('n_train')} tuning samples, "
                                    f"the step kept by {ft.get('n_held_out')} held out, "
                                    f"{ft.get('loss_description', ft.get('loss'))}, mask fixed "
                                    f"(lr {ft.get('lr')} relative, batch {ft.get('batch_size')}"
                                    + (f", {ft['math'].upper()} math" if isinstance(ft.get("math"), str) else "")
                                    + ")"))
    return rows


def format_summary(result: dict[str, Any], *, max_rows: int = 12) -> str:
    """A short plain-text report for terminals: the guarantee, the numbers, the tested levels."""
    lines = [
        "certiprune certificate",
        "=" * 22,
        result["guarantee"],
        "",
        f"certified sparsity : {_pct(result['certified_sparsity'])}  (certified: {str(result['certified']).lower()})",
        f"criterion / scope  : {result['criterion']} / {result.get('scope', 'global')}",
        f"risk, ε, δ         : {result['risk']}, {result['epsilon']}, {result['delta']}",
        f"bound / procedure  : {result['bound']} / {result['procedure']}",
        f"samples            : {result['n_calibration']} calibration, {result['n_tune']} tuning",
        f"accuracy           : dense {_pct(result.get('dense_accuracy'))} → pruned {_pct(result.get('pruned_accuracy'))}",
        f"zeroed weights     : {result['zeroed_parameters']:,} of {result['prunable_parameters']:,} prunable",
        f"BN re-estimation   : {result.get('bn_recalibration', 'n/a')}",
    ]
    cand = result.get("prunable_weights")
    if cand:
        lines.insert(-1, f"candidate weights  : {cand['count']} of {cand['of_count']} weight matrices "
                         f"({cand['params']:,} of {cand['of_params']:,} parameters, {cand['fraction_params']:.1%})")
    reconstruction = result.get("reconstruction")
    if reconstruction:
        lines.append("reconstruction     : " + (f"unavailable, plain masks ({reconstruction['unavailable']})"
                                                if reconstruction.get("unavailable") else
                                                f"{len(reconstruction['layers'])} of "
                                                f"{reconstruction.get('of_layers', len(reconstruction['layers']))} "
                                                f"layers reconstructed, {len(reconstruction['skipped'])} masked only"))
    lines += [f"{label:<19}: {text}" for label, text in candidate_rows(result)]
    if result.get("bound_note"):
        lines.append(f"note on the bound   : {result['bound_note']}")
    more = result.get("more_data")
    if more:
        needed = more.get("n_calibration_needed")
        lines.append(f"next level         : {_pct(more['sparsity'])} not certified at n = {more['n_calibration']:,}; "
                     + (f"≈ {needed:,} calibration samples would likely certify it (an estimate, not a guarantee)"
                        if needed else "its observed risk is too high for more data to help"))
    if len(result.get("criteria", [])) > 1:
        lines.append("per criterion      : " + ", ".join(
            f"{c['criterion']} {_pct(c['certified_sparsity'])} (δ={c['delta']:.3g})" for c in result["criteria"]))
    evaluated = [lvl for lvl in result["levels"] if lvl["evaluated"]]
    if evaluated:
        lines += ["", f"{'sparsity':>9} {'risk':>9} {'UCB':>9} {'p-value':>10}  rejected"]
        shown = evaluated if len(evaluated) <= max_rows else evaluated[-max_rows:]
        if len(shown) < len(evaluated):
            lines.append(f"   … {len(evaluated) - len(shown)} earlier levels")
        for lvl in shown:
            ucb = lvl.get("upper_bound")
            lines.append(f"{lvl['sparsity']:>9.2%} {lvl['empirical_risk']:>9.4f} "
                         f"{(ucb if ucb is not None else float('nan')):>9.4f} {lvl['p_value']:>10.3g}  "
                         f"{'yes' if lvl['rejected'] else 'no'}")
    return "\n".join(lines)


RISK_LABELS = {
    "accuracy_drop": "accuracy drop (dense − pruned)",
    "disagreement": "disagreement with the dense model",
    "error_rate": "error rate",
    "token_disagreement": "fraction of token positions whose top-1 differs from the dense model's",
    "token_accuracy_drop": "token accuracy drop (dense − pruned)",
}
#: Series colours: matplotlib's default cycle, so the PNG and the page's SVG colour criteria alike.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
EPSILON_COLOUR = "#c0392b"
LAMBDA_COLOUR = "#1e8449"


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool), else None: what a result field
    read for a plot or a page may hold (JSON gives ints, floats, null; older results may lack a field)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per criterion (the winner first when there are several): name, δ share and levels; a result without
    ``criteria`` is one series."""
    criteria = [c for c in (result.get("criteria") or []) if isinstance(c, dict)]
    if criteria:
        return criteria
    return [{"criterion": result.get("criterion"), "delta": result.get("delta"),
             "certified_sparsity": result.get("certified_sparsity"), "levels": result.get("levels") or []}]


def evaluated_levels(levels: Any) -> list[dict[str, Any]]:
    """The levels that were tested and have a risk (older results may lack ``evaluated``: tested)."""
    return [lv for lv in (levels or []) if isinstance(lv, dict) and lv.get("evaluated", True)
            and finite_number(lv.get("sparsity")) is not None
            and finite_number(lv.get("empirical_risk")) is not None]


def plot_ranges(result: dict[str, Any]) -> tuple[float, float, float, float, bool]:
    """(x_lo, x_hi, y_lo, y_hi, cut): the y range shows ε and every level up to each criterion's first
    failure; what lies far above (a full curve rising to 0.5, bounds shooting to 1) is cut off, ``cut``
    says so, so that the region around ε — where the decision is made — stays readable."""
    epsilon = finite_number(result.get("epsilon")) or 0.0
    xs, risks, values, decisive = [], [], [], []
    for crit in _series(result):
        failed = False
        for lv in evaluated_levels(crit.get("levels")):
            x, r, u = float(lv["sparsity"]), float(lv["empirical_risk"]), finite_number(lv.get("upper_bound"))
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


def _plan_marks(crit: dict[str, Any]) -> dict[str, Any] | None:
    """What the planned procedure decided on D_tune, for the plot: the levels D_tune evaluated (the
    bisection) with their D_tune risk, and the planned sequence, each mark saying whether D_cal tested it
    (a fixed-sequence walk stops at its first failure, so the tail of a plan may stay untested). None for
    the other procedures."""
    plan = crit.get("plan")
    if not isinstance(plan, dict):
        return None
    tested = {float(lv["sparsity"]) for lv in evaluated_levels(crit.get("levels"))}
    tune = [{"sparsity": float(x), "risk": float(r)} for x, r in zip(plan.get("tune_sparsities") or [],
                                                                       plan.get("tune_risks") or [])
            if finite_number(x) is not None and finite_number(r) is not None]
    sequence = [{"sparsity": float(x), "tested": float(x) in tested} for x in (plan.get("sparsities") or [])
                if finite_number(x) is not None]
    return {"tune": tune, "sequence": sequence}


def risk_plot_data(result: dict[str, Any]) -> dict[str, Any]:
    """What the risk-vs-sparsity plot shows, independent of how it is drawn: the one source of both the PNG
    (:func:`risk_curve_figure`, matplotlib) and the HTML report's inline SVG (``service/report_page.py``).

    Per criterion (``series``): name, colour, δ share, its confidence as a label, and the evaluated levels
    (sparsity, empirical risk, upper bound or None, p-value, rejected), and for the planned procedure its
    plan (``_plan_marks``: D_tune's estimates and the planned levels); the tolerance ε, the certified
    sparsity λ̂ (``certified`` is False when nothing was certified: no λ̂ marker), the axis ranges of
    :func:`plot_ranges` and whether values were cut off above the y range.

    Why shared data rather than one matplotlib figure saved as SVG for the page: the API process would pay
    matplotlib's import (about a second cold) and a figure per report request, its SVG draws text as glyph
    paths (no selectable text, 100+ KB) and carries none of the page's hooks (classes, ``data-criterion``,
    per-point tooltips) that the page and its tests rely on. So the two renderers share everything that
    decides what is shown; each only maps it to its own coordinates. Pure Python: no matplotlib, no torch.
    """
    epsilon = finite_number(result.get("epsilon")) or 0.0
    certified = finite_number(result.get("certified_sparsity"))
    is_certified = bool(result.get("certified")) and certified is not None and certified > 0
    x_lo, x_hi, y_lo, y_hi, cut = plot_ranges(result)
    series = []
    for i, crit in enumerate(_series(result)):
        delta = finite_number(crit.get("delta"))
        series.append({
            "criterion": crit.get("criterion"), "colour": PALETTE[i % len(PALETTE)], "delta": delta,
            "confidence": f"{(1 - delta) * 100:.3g}% " if delta is not None else "",
            "levels": [{"sparsity": float(lv["sparsity"]), "risk": float(lv["empirical_risk"]),
                        "upper_bound": finite_number(lv.get("upper_bound")),
                        "p_value": finite_number(lv.get("p_value")),
                        "rejected": bool(lv.get("rejected"))} for lv in evaluated_levels(crit.get("levels"))],
            "plan": _plan_marks(crit),
        })
    return {"series": series, "epsilon": epsilon, "certified": is_certified,
            "certified_sparsity": certified if is_certified else None,
            "x_range": (x_lo, x_hi), "y_range": (y_lo, y_hi), "cut": cut,
            "risk": str(result.get("risk") or "risk"), "epsilon_colour": EPSILON_COLOUR,
            "lambda_colour": LAMBDA_COLOUR}


def risk_curve_figure(result: dict[str, Any]):  # -> matplotlib.figure.Figure
    """Empirical risk (solid) and its upper confidence bound (dashed) per tested sparsity and criterion,
    ε (red) and the certified λ̂ (green), from :func:`risk_plot_data`. Filled dots: levels the procedure
    rejected (certified safe).

    Built without pyplot, so it neither needs a display nor changes matplotlib's global backend.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    plot = risk_plot_data(result)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for crit in plot["series"]:
        lv = crit["levels"]
        if not lv:
            continue
        name, colour = crit["criterion"], crit["colour"]
        ax.plot([p["sparsity"] for p in lv], [p["risk"] for p in lv], color=colour, label=f"{name}: empirical risk")
        for rejected, face in ((True, colour), (False, "white")):
            dots = [p for p in lv if p["rejected"] is rejected]
            ax.plot([p["sparsity"] for p in dots], [p["risk"] for p in dots], "o", ms=3.5, color=colour, mfc=face)
        plan = crit["plan"]
        if plan and plan["tune"]:
            ax.plot([p["sparsity"] for p in plan["tune"]], [p["risk"] for p in plan["tune"]], "D", ms=4,
                    color=colour, mfc="none", alpha=0.7, label=f"{name}: D_tune estimate (planning)")
        if plan and plan["sequence"]:
            for tested, face in ((True, colour), (False, "none")):
                marks = [p["sparsity"] for p in plan["sequence"] if p["tested"] is tested]
                if marks:
                    ax.plot(marks, [0.0] * len(marks), "|", ms=9, color=colour, alpha=0.9 if tested else 0.4,
                            transform=ax.get_xaxis_transform(),
                            label=f"{name}: planned levels, {'tested' if tested else 'not reached'} on D_cal")
        ucb = [(p["sparsity"], p["upper_bound"]) for p in lv if p["upper_bound"] is not None]
        if ucb:
            ax.plot(*zip(*ucb), linestyle="--", color=colour, label=f"{name}: {crit['confidence']}upper bound")
    eps = plot["epsilon"]
    ax.axhline(eps, color=plot["epsilon_colour"], linestyle=(0, (6, 3)), linewidth=1.2,
               label=f"tolerance ε = {eps:g}")
    if plot["certified"]:
        ax.axvline(plot["certified_sparsity"], color=plot["lambda_colour"], linewidth=1.2,
                   label=f"certified λ̂ = {plot['certified_sparsity']:.0%} ({result.get('criterion')})")
    low, high = plot["y_range"]
    ax.set_ylim(low, high)
    ax.set_xlim(*plot["x_range"])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel(RISK_LABELS.get(plot["risk"], plot["risk"]))
    verdict = f"certified {plot['certified_sparsity']:.0%} sparsity" if plot["certified"] else "nothing certified"
    ax.set_title(f"certiprune: {verdict} (ε = {eps:g}, δ = {finite_number(result.get('delta')) or 0:g})")
    if plot["cut"]:
        ax.annotate(f"values above {high:.3g} are cut off", xy=(0.99, 0.02), xycoords="axes fraction",
                    ha="right", fontsize=7, color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_risk_curve(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save :func:`risk_curve_figure` as a PNG at ``path``; returns the path."""
    out = Path(path)
    risk_curve_figure(result).savefig(out, format="png")
    return out


__all__ = ["candidate_rows", "evaluated_levels", "finite_number", "format_summary", "plot_ranges", "plot_risk_curve",
           "risk_curve_figure", "risk_plot_data"]
