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


def plot_risk_curve(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG of empirical risk and its upper confidence bound per tested sparsity, ε and λ̂ marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for crit in result.get("criteria") or [{"criterion": result["criterion"], "levels": result["levels"]}]:
        lv = [lvl for lvl in crit["levels"] if lvl["evaluated"]]
        xs = [lvl["sparsity"] for lvl in lv]
        line, = ax.plot(xs, [lvl["empirical_risk"] for lvl in lv], marker=".", label=f"{crit['criterion']}: empirical risk")
        ucb = [lvl.get("upper_bound") for lvl in lv]
        if all(u is not None for u in ucb):
            ax.plot(xs, ucb, linestyle="--", color=line.get_color(), label=f"{crit['criterion']}: upper bound")
    ax.axhline(result["epsilon"], color="crimson", linewidth=1, label=f"ε = {result['epsilon']}")
    if result["certified"]:
        ax.axvline(result["certified_sparsity"], color="green", linewidth=1,
                   label=f"certified λ̂ = {result['certified_sparsity']:.2f}")
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel(result["risk"])
    ax.set_title("certiprune: risk vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


__all__ = ["format_summary", "plot_risk_curve"]
