"""The planned testing sequence: the plan's shape, the procedure on given p-values, and validity by simulation.

Validity is checked against the definition: many independent (D_tune, D_cal) draws from known risk curves
(monotone, flat exactly at ε, non-monotone with several crossings, all null) and D_tune drawn from a
*different* curve than D_cal (a misleading plan); the frequency of certifying a level whose true risk is
≥ ε (the boundary counts as null) must stay ≤ δ within 3 Monte-Carlo standard errors.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import stats

from calibration.errors import ConfigError
from calibration.planned_sequence import Plan, PlannedSequence, plan_sequence, predict_pass

EPS, DELTA = 0.1, 0.1


def test_a_monotone_prediction_is_found_by_bisection_in_log_k_evaluations() -> None:
    for k in (1, 2, 7, 50, 100, 257):
        for crossing in sorted({0, 1, k // 3, k - 1, k}):
            calls: list[int] = []

            def passes(j: int) -> bool:
                calls.append(j)
                return j < crossing

            plan = plan_sequence(k, passes)
            assert plan.estimate == (crossing - 1 if crossing > 0 else None)
            assert len(calls) == len(set(calls)) <= math.ceil(math.log2(k + 1)) + 1
            assert list(plan.sequence) == sorted(set(plan.sequence))
            assert all(0 <= j < k for j in plan.sequence)
            if plan.estimate is not None:
                # dense around the estimate, with rungs below it
                window = set(range(max(0, plan.estimate - 6), min(k - 1, plan.estimate + 4) + 1))
                assert window <= set(plan.sequence)
            assert len(plan.sequence) <= 11 + 2 * 4


def test_the_ladder_reaches_below_the_window_and_above_it() -> None:
    plan = plan_sequence(100, lambda j: j <= 60, ladder_width=3, window_below=2, window_above=3, ladder_steps=3)
    assert plan.estimate == 60
    assert plan.sequence == (46, 52, 55, 58, 59, 60, 61, 62, 63, 66, 69, 75)
    default = plan_sequence(100, lambda j: j <= 60, ladder_width=3)  # window 54 … 64, four rungs each side
    assert default.sequence == (30, 42, 48, 51, *range(54, 65), 67, 70, 76, 88)


def test_the_procedure_rejects_a_leading_run_of_the_sequence_only() -> None:
    p = np.full(10, np.nan)
    p[[2, 4, 5, 7]] = [0.01, 0.02, 0.5, 0.001]
    proc = PlannedSequence((2, 4, 5, 7))
    rejected = proc.rejected(p, DELTA)
    assert rejected.tolist() == [False, False, True, False, True, False, False, False, False, False]
    assert proc.select(rejected, np.linspace(0, 0.9, 10)) == 4  # 7's small p comes after 5 failed
    p_all = np.zeros(10)  # every level would pass, but only the sequence is ever rejected
    assert np.flatnonzero(proc.rejected(p_all, DELTA)).tolist() == [2, 4, 5, 7]
    assert proc.select(np.zeros(10, dtype=bool), np.linspace(0, 0.9, 10)) is None
    with pytest.raises(ConfigError, match="ascending"):
        PlannedSequence((3, 1))
    with pytest.raises(ConfigError, match="needs its sequence"):
        PlannedSequence().rejected(p, DELTA)
    with pytest.raises(ConfigError, match="does not fit"):
        PlannedSequence((2, 12)).rejected(p, DELTA)


def test_predict_pass_uses_the_frequencies_at_d_cal_size() -> None:
    losses = np.zeros(200, dtype=np.int8)
    losses[:10] = 1  # 5 % observed, ε = 10 %
    assert predict_pass("binomial", "error_rate", losses, 2000, EPS, DELTA)  # 100 of 2000 vs ε = 0.1: certain
    # Independent check of that claim: P(Bin(2000, 0.1) ≤ 100) is astronomically small.
    assert stats.binom.cdf(100, 2000, EPS) < 1e-10
    losses[:30] = 1  # 15 %: never passes
    assert not predict_pass("binomial", "error_rate", losses, 100_000, EPS, DELTA)
    assert not predict_pass("binomial", "error_rate", losses[:0], 2000, EPS, DELTA)


def _draw_losses(rng: np.random.Generator, risks: np.ndarray, n: int) -> np.ndarray:
    """Per-sample 0/1 losses (n, K), each level Bernoulli(R_j), independent across levels: the harshest case for
    multiplicity (testing every level at δ without a procedure would violate in ≈ 1 − 0.9^K of the flat jobs),
    while fixed-sequence validity holds under any dependence."""
    return (rng.random((n, risks.size)) < risks[None, :]).astype(np.int8)


def _binomial_p(losses: np.ndarray) -> float:
    """Independent exact p-value for H: R ≥ ε from 0/1 losses: P(Bin(n, ε) ≤ observed)."""
    return float(stats.binom.cdf(int(losses.sum()), losses.shape[0], EPS))


def _certify(rng: np.random.Generator, tune_risks: np.ndarray, cal_risks: np.ndarray, n_tune: int,
             n_cal: int) -> tuple[int | None, int]:
    """One job: plan on D_tune, test on D_cal; (certified index or None, levels evaluated on D_cal)."""
    tune = _draw_losses(rng, tune_risks, n_tune)
    cal = _draw_losses(rng, cal_risks, n_cal)
    plan = plan_sequence(len(cal_risks), lambda j: predict_pass("binomial", "error_rate", tune[:, j], n_cal, EPS, DELTA))
    proc = PlannedSequence(plan.sequence)
    p = np.full(len(cal_risks), np.nan)
    tested = 0
    for j in plan.sequence:
        p[j] = _binomial_p(cal[:, j])
        tested += 1
        if p[j] > DELTA:
            break
    return proc.select(proc.rejected(p, DELTA), np.arange(len(cal_risks)) / len(cal_risks)), tested


K = 40
GRID = np.arange(K) / K
CURVES = {
    "monotone": 0.02 + 0.2 * GRID,                                  # crosses ε at λ = 0.4
    "flat at ε (all on the boundary)": np.full(K, EPS),
    "just inside the null everywhere": np.full(K, EPS + 0.005),
    "non-monotone, three crossings": np.where(GRID < 0.3, 0.06, np.where(GRID < 0.5, 0.14,
                                                                           np.where(GRID < 0.7, 0.095, 0.2))),
    "global null": np.full(K, 0.15),
}


@pytest.mark.parametrize("name", list(CURVES))
@pytest.mark.parametrize("tune_from", ["same", "optimistic", "pessimistic"])
def test_violation_frequency_is_at_most_delta(name: str, tune_from: str) -> None:
    """≥ 1500 jobs per case. D_tune from the same curve, from a curve of risk 0 (plans at the top of the
    grid), or from a curve of risk 1 (plans at the bottom): validity must not depend on the plan."""
    cal_risks = CURVES[name]
    tune_risks = {"same": cal_risks, "optimistic": np.zeros(K), "pessimistic": np.ones(K)}[tune_from]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{tune_from}".encode()))
    draws, violations, tested = 1500, 0, []
    for _ in range(draws):
        chosen, n_tested = _certify(rng, tune_risks, cal_risks, n_tune=200, n_cal=600)
        tested.append(n_tested)
        if chosen is not None and cal_risks[chosen] >= EPS:
            violations += 1
    freq = violations / draws
    se = math.sqrt(DELTA * (1 - DELTA) / draws)
    assert freq <= DELTA + 3 * se, (name, tune_from, freq)
    assert max(tested) <= 11 + 2 * 4  # D_cal sees the planned sequence only (window + rungs)


def test_planning_tests_far_fewer_levels_and_certifies_as_much_on_a_monotone_curve() -> None:
    """Power and cost against plain fixed-sequence over the whole grid on the same draws."""
    rng = np.random.default_rng(7)
    risks = 0.02 + 0.2 * np.arange(100) / 100  # crossing at index 40
    planned, full, planned_tested, full_tested = [], [], [], []
    for _ in range(200):
        tune = _draw_losses(rng, risks, 500)
        cal = _draw_losses(rng, risks, 2000)
        plan = plan_sequence(100, lambda j: predict_pass("binomial", "error_rate", tune[:, j], 2000, EPS, DELTA))
        for sequence, certified, tested in ((plan.sequence, planned, planned_tested), (range(100), full, full_tested)):
            last, n = -1, 0
            for j in sequence:  # fixed-sequence testing, written out: stop at the first p > δ
                n += 1
                if _binomial_p(cal[:, j]) > DELTA:
                    break
                last = j
            certified.append(last)
            tested.append(n)
    assert np.median(planned) >= np.median(full) - 1
    assert np.mean(full_tested) >= 3 * np.mean(planned_tested), (np.mean(full_tested), np.mean(planned_tested))


def test_plan_is_a_plain_record() -> None:
    plan = Plan(sequence=(1, 2), tune_evaluated=(3,), estimate=2)
    assert plan.to_dict() == {"sequence": [1, 2], "tune_evaluated": [3], "estimate": 2}


# -- through the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_job(tmp_path_factory: pytest.TempPathFactory):
    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:800]), torch.from_numpy(y[:800])
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    d = tmp_path_factory.mktemp("planned")
    torch.jit.script(model.eval()).save(str(d / "model.pt"))
    return d / "model.pt", x[800:], y[800:].astype(np.int64), d


def test_the_engine_tests_only_the_plan_and_the_plan_ignores_d_cal(digits_job) -> None:
    from calibration import certify
    from calibration.data import split_tune_cal

    model, x, y, d = digits_job
    np.savez(d / "a.npz", x=x, y=y)
    config = {"procedure": "planned", "epsilon": 0.03, "seed": 3}
    first = certify(model, d / "a.npz", config=config)
    first = first.to_dict() if hasattr(first, "to_dict") else first
    crit = first["criteria"][0]
    plan = crit["plan"]
    assert abs(first["n_tune"] - 0.1 * len(y)) <= 1  # planning's default D_tune share (magnitude, no BN)
    evaluated = [i for i, lvl in enumerate(first["levels"]) if lvl["evaluated"]]
    assert set(evaluated) <= set(plan["sequence"]) and first["levels_evaluated"] == len(evaluated) <= 19
    assert first["levels_evaluated_tune"] == len(plan["tune_evaluated"]) <= 8
    assert first["certified"], first["guarantee"]
    assert first["certified_sparsity"] in plan["sparsities"]
    # The plot's record of the plan: D_tune's risk at each level the bisection tried (λ = 0 is the dense
    # model: 0), in the order tried, at the grid's sparsities.
    assert plan["tune_sparsities"] == [first["levels"][i]["sparsity"] for i in plan["tune_evaluated"]]
    assert len(plan["tune_risks"]) == len(plan["tune_evaluated"]) and all(0 <= r <= 1 for r in plan["tune_risks"])
    if 0 in plan["tune_evaluated"]:
        assert plan["tune_risks"][plan["tune_evaluated"].index(0)] == 0.0
    assert plan["tune_risks"][plan["tune_evaluated"].index(max(plan["tune_evaluated"]))] > 0.03  # the top fails
    # Change every D_cal row (inputs and labels): the plan, made from D_tune alone, stays the same.
    split = split_tune_cal(len(y), 0.1, 3)
    x2, y2 = x.copy(), y.copy()
    x2[split.cal] = np.random.default_rng(1).random(x2[split.cal].shape, dtype=np.float32)
    y2[split.cal] = (y2[split.cal] + 1) % 10
    np.savez(d / "b.npz", x=x2, y=y2)
    second = certify(model, d / "b.npz", config=config)
    second = second.to_dict() if hasattr(second, "to_dict") else second
    assert second["criteria"][0]["plan"] == plan
    risks = lambda r: [lvl["empirical_risk"] for lvl in r["levels"] if lvl["evaluated"]]  # noqa: E731
    assert risks(second) != risks(first)  # D_cal did change what was measured on it


def test_the_plan_judges_level_zero_on_the_dense_model(digits_job) -> None:
    """Bisection tries a high level before λ = 0; λ = 0 must then be the dense model again (zero loss, so it is
    predicted to pass), not the candidate tried before it."""
    from calibration import certify

    model, x, y, d = digits_job
    np.savez(d / "c.npz", x=x, y=y)
    result = certify(model, d / "c.npz", config={"procedure": "planned", "epsilon": 0.01, "seed": 3,
                                                 "sparsities": [0.0, 0.97, 0.98, 0.99]})
    result = result.to_dict() if hasattr(result, "to_dict") else result
    plan = result["criteria"][0]["plan"]
    assert plan["tune_evaluated"][0] != 0 and 0 in plan["tune_evaluated"]  # 0 is tried after a pruned level
    assert plan["estimate"] == 0, plan
