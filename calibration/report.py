"""Certificate → human-readable summary and the risk-vs-sparsity plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2%}"


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
    reconstruction = result.get("reconstruction")
    if reconstruction:
        lines.append("reconstruction     : " + (f"unavailable, plain masks ({reconstruction['unavailable']})"
                                                if reconstruction.get("unavailable") else
                                                f"{len(reconstruction['layers'])} layers, {len(reconstruction['skipped'])} "
                                                "masked only"))
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
}


def _series(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per criterion: name, δ share and levels; a result without ``criteria`` is one series."""
    return result.get("criteria") or [{"criterion": result["criterion"], "delta": result["delta"],
                                       "levels": result["levels"]}]


def _y_limits(result: dict[str, Any]) -> tuple[float, float, bool]:
    """(low, high, cut): ε and each criterion's levels up to its first failure stay in view; what rises far
    above (a full curve, bounds near 1) is cut, so the region around ε stays readable."""
    eps = float(result["epsilon"])
    risks, values, decisive = [0.0], [eps], []
    for crit in _series(result):
        failed = False
        for lvl in crit["levels"]:
            if not lvl["evaluated"] or lvl["empirical_risk"] is None:
                continue
            risks.append(lvl["empirical_risk"])
            values += [lvl["empirical_risk"]] + ([lvl["upper_bound"]] if lvl.get("upper_bound") is not None else [])
            if not failed:
                decisive.append(lvl["empirical_risk"])
                failed = not lvl["rejected"]
    high = min(max(values + [1e-3]), max(2.5 * eps, 1.15 * max(decisive, default=0.0), 1e-3))
    pad = 0.06 * (high - min(risks))
    return min(risks) - (pad if min(risks) < 0 else 0.0), high + pad, max(values) > high + pad


def risk_curve_figure(result: dict[str, Any]):  # -> matplotlib.figure.Figure
    """Empirical risk (solid) and its upper confidence bound (dashed) per tested sparsity and criterion,
    ε (red) and the certified λ̂ (green). Filled dots: levels the procedure rejected (certified safe).

    Built without pyplot, so it neither needs a display nor changes matplotlib's global backend.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for crit in _series(result):
        lv = [lvl for lvl in crit["levels"] if lvl["evaluated"] and lvl["empirical_risk"] is not None]
        if not lv:
            continue
        xs = [lvl["sparsity"] for lvl in lv]
        line, = ax.plot(xs, [lvl["empirical_risk"] for lvl in lv], label=f"{crit['criterion']}: empirical risk")
        colour = line.get_color()
        safe = [lvl for lvl in lv if lvl["rejected"]]
        unsafe = [lvl for lvl in lv if not lvl["rejected"]]
        ax.plot([lvl["sparsity"] for lvl in safe], [lvl["empirical_risk"] for lvl in safe], "o", ms=3.5,
                color=colour)
        ax.plot([lvl["sparsity"] for lvl in unsafe], [lvl["empirical_risk"] for lvl in unsafe], "o", ms=3.5,
                mfc="white", color=colour)
        ucb = [(lvl["sparsity"], lvl["upper_bound"]) for lvl in lv if lvl.get("upper_bound") is not None]
        if ucb:
            conf = f"{(1 - crit['delta']) * 100:.3g}% " if crit.get("delta") is not None else ""
            ax.plot(*zip(*ucb), linestyle="--", color=colour, label=f"{crit['criterion']}: {conf}upper bound")
    ax.axhline(result["epsilon"], color="crimson", linestyle=(0, (6, 3)), linewidth=1.2,
               label=f"tolerance ε = {result['epsilon']:g}")
    if result["certified"]:
        ax.axvline(result["certified_sparsity"], color="green", linewidth=1.2,
                   label=f"certified λ̂ = {result['certified_sparsity']:.0%} ({result['criterion']})")
    low, high, cut = _y_limits(result)
    ax.set_ylim(low, high)
    ax.set_xlim(left=0.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel(RISK_LABELS.get(result["risk"], result["risk"]))
    verdict = (f"certified {result['certified_sparsity']:.0%} sparsity" if result["certified"]
               else "nothing certified")
    ax.set_title(f"certiprune: {verdict} (ε = {result['epsilon']:g}, δ = {result['delta']:g})")
    if cut:
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


__all__ = ["format_summary", "plot_risk_curve", "risk_curve_figure"]
