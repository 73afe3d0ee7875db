"""calibration.report: the terminal summary and the risk-curve PNG (also as written by ``certiprune certify``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

from calibration.report import format_summary, plot_risk_curve, risk_curve_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def level(s: float, risk: float | None, ucb: float | None, rejected: bool, evaluated: bool = True) -> dict[str, Any]:
    return {"sparsity": s, "empirical_risk": risk, "upper_bound": ucb, "p_value": 0.01 if rejected else 0.5,
            "rejected": rejected, "evaluated": evaluated}


@pytest.fixture
def result() -> dict[str, Any]:
    magnitude = [level(0.0, 0.0, 0.0, True), level(0.1, 0.01, 0.02, True), level(0.2, 0.02, 0.04, True),
                 level(0.3, 0.06, 0.9, False), level(0.4, None, None, False, evaluated=False)]
    random = [level(0.0, 0.0, 0.0, True), level(0.1, 0.04, 0.07, False), level(0.2, None, None, False, False),
              level(0.3, None, None, False, False), level(0.4, None, None, False, False)]
    return {
        "certified_sparsity": 0.2, "certified": True, "epsilon": 0.05, "delta": 0.1, "risk": "accuracy_drop",
        "bound": "binomial", "procedure": "fixed_sequence", "criterion": "magnitude", "scope": "global",
        "n_calibration": 500, "n_tune": 0, "dense_accuracy": 0.95, "pruned_accuracy": 0.93,
        "prunable_parameters": 1000, "zeroed_parameters": 200, "bn_recalibration": "no_batchnorm",
        "guarantee": "With probability at least 0.9, the accuracy drop is at most 0.05.", "levels": magnitude,
        "criteria": [{"criterion": "magnitude", "delta": 0.05, "certified_sparsity": 0.2, "certified": True,
                      "levels": magnitude},
                     {"criterion": "random", "delta": 0.05, "certified_sparsity": 0.0, "certified": False,
                      "levels": random}],
    }


def test_summary_states_guarantee_accuracy_and_each_criterion(result) -> None:
    text = format_summary(result)
    assert result["guarantee"] in text
    assert "certified sparsity : 20.00%" in text and "dense 95.00% → pruned 93.00%" in text
    assert "magnitude 20.00% (δ=0.05), random 0.00% (δ=0.05)" in text
    assert "UCB" in text and "0.0400" in text  # the upper bounds are listed


def test_figure_plots_risk_and_upper_bound_per_criterion_with_epsilon_and_lambda_hat(result) -> None:
    ax = risk_curve_figure(result).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for name in ("magnitude", "random"):
        risk = lines[f"{name}: empirical risk"]
        ucb = lines[f"{name}: 95% upper bound"]
        assert len(risk.get_xdata()) == len(ucb.get_xdata())  # evaluated levels only
        assert all(u >= r for u, r in zip(ucb.get_ydata(), risk.get_ydata()))
    assert list(lines["magnitude: empirical risk"].get_xdata()) == [0.0, 0.1, 0.2, 0.3]
    eps = lines["tolerance ε = 0.05"]
    assert set(eps.get_ydata()) == {0.05}
    lam = lines["certified λ̂ = 20% (magnitude)"]
    assert set(lam.get_xdata()) == {0.2}
    low, high = ax.get_ylim()
    # ε and every decisive risk are in view; the failing level's bound of 0.9 is cut so ε stays readable.
    assert low <= 0.0 and 0.06 < high < 0.5


def test_nothing_certified_has_no_lambda_hat(result) -> None:
    result.update(certified=False, certified_sparsity=0.0)
    labels = [line.get_label() for line in risk_curve_figure(result).axes[0].get_lines()]
    assert not any("λ̂" in label for label in labels)
    assert "nothing certified" in risk_curve_figure(result).axes[0].get_title()


def test_png_is_written_without_touching_the_pyplot_backend(result, tmp_path: Path) -> None:
    backend = matplotlib.get_backend()
    out = plot_risk_curve(result, tmp_path / "curve.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert matplotlib.get_backend() == backend


def test_certify_command_writes_the_plot_beside_the_report(tmp_path: Path, capsys) -> None:
    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits

    from service.cli import offline

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x[:1000])), torch.from_numpy(y[:1000])).backward()
        opt.step()
    torch.jit.script(model.eval()).save(str(tmp_path / "model.pt"))
    np.savez(tmp_path / "cal.npz", x=x[1000:], y=y[1000:])

    report = tmp_path / "r.json"
    code = offline.main([str(tmp_path / "model.pt"), "--data", str(tmp_path / "cal.npz"), "--out",
                         str(tmp_path / "pruned.pt"), "--report", str(report), "--epsilon", "0.05",
                         "--sparsities", "0.1,0.2,0.3,0.4,0.5", "--quiet"])
    assert code == 0
    result = json.loads(report.read_text())
    png = tmp_path / "r.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"report written to {report} and {png}" in capsys.readouterr().out
    assert all(lv["upper_bound"] is not None for lv in result["levels"] if lv["evaluated"])
