"""Test the grid: every criterion's levels on D_cal in ascending order, the procedure deciding when to stop.

Per criterion (its share δ/C of δ, Bonferroni across criteria): with the planned procedure, D_tune first
chooses which levels D_cal tests (``plan_on_tune``); then each level is evaluated once
(``levels.evaluate_level``) while ``Procedure.continues`` says so (or every level, with ``full_curve``),
its p-value goes to the procedure, and the procedure's rejections and selection give the criterion's
certified level. ``select_phase`` picks the winner across criteria and loads its tested candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .candidates import CandidateBuilder, CandidateState
from .certificate import CriterionResult, LevelResult, more_data
from .fast_eval import Predictor
from .levels import Candidates, LevelData, LevelTest, evaluate_level
from .planned_sequence import Plan, PlannedSequence, plan_sequence, predict_pass
from .procedures import split_delta

if TYPE_CHECKING:  # the phases before this one (engine imports this module)
    from .engine import CandidateSetup, DensePass, Loaded, Run, Splits


@dataclass
class GridOutcome:
    """Phase 5: every criterion's tested grid and the candidate of the largest level rejected when tested."""

    criteria: list[CriterionResult]
    best_state: tuple[float, CandidateState] | None  # (sparsity, candidate); ties across criteria: the first
    delta_each: float
    levels_evaluated: int
    levels_evaluated_tune: int
    bn_status: str


@dataclass
class Selection:
    """Phase 6: the winning criterion and level (the live module is now exactly its tested candidate)."""

    best: int
    certified_sparsity: float
    pruned_accuracy: float | None
    more_data: dict[str, Any] | None


def plan_on_tune(candidates: Candidates, grid: list[float], tune: LevelData, test: LevelTest, n_cal: int,
                 should_stop: Callable[[], bool] | None) -> tuple[Plan, dict[int, float]]:
    """The planned procedure's sequence, from D_tune alone (calibration.planned_sequence: valid because
    D_tune ⫫ D_cal; the candidates and the sequence are fixed before D_cal is looked at). Also the risks
    D_tune showed at the levels it evaluated (shown in the report's plot, not tested)."""
    tune_risks: dict[int, float] = {}

    def passes(j: int) -> bool:
        level = evaluate_level(candidates, j, grid[j], tune, test, with_p_value=False, should_stop=should_stop)
        tune_risks[j] = float(level.empirical_risk)  # type: ignore[arg-type]
        return predict_pass(test.bound, test.risk, level.losses, n_cal, test.epsilon, test.alpha)

    plan = plan_sequence(len(grid), passes)
    candidates.builder.reset()
    return plan, tune_risks


class _Keeper:
    """The candidate of the largest level rejected when it was tested (the artifact; ties: the first seen).

    Levels are tested in ascending order and a level's rejection depends on the p-values up to it only: the
    final λ̂ is the last level rejected when it was tested, so its snapshot is the tested candidate."""

    def __init__(self) -> None:
        self.state: tuple[float, CandidateState] | None = None

    def offer(self, sparsity: float, builder: CandidateBuilder) -> None:
        if self.state is None or sparsity > self.state[0]:
            self.state = (sparsity, builder.snapshot())


def certify_criterion(run: Run, index: int, name: str, candidates: Candidates, grid: list[float],
                      dense: DensePass, splits: Splits, delta_each: float, keeper: _Keeper,
                      counts: dict[str, int]) -> CriterionResult:
    """One criterion's grid on D_cal, in ascending order, at ``delta_each``; the procedure decides when to stop."""
    cfg, n_levels = run.cfg, len(grid)
    # The per-test level this procedure rejects at (δ_each for fixed-sequence, δ_each/K for Bonferroni):
    # fixed before D_cal is seen, it calibrates paired_exact and tunes wsr's bets.
    alpha = splits.procedure.level_alpha(delta_each, n_levels)
    test = LevelTest(risk=run.risk, bound=splits.bound, epsilon=cfg.epsilon, alpha=alpha)
    procedure, plan, planned, tune_risks = splits.procedure, None, None, {}
    if cfg.procedure == "planned":
        plan, tune_risks = plan_on_tune(candidates, grid, dense.tune, test, splits.n_cal, run.should_stop)
        counts["tune"] += len(plan.tune_evaluated)
        procedure, planned = PlannedSequence(plan.sequence), set(plan.sequence)
    levels: list[LevelResult] = []
    p_values = np.full(n_levels, np.nan)
    stopped = False
    for j, sparsity in enumerate(grid):
        run.report("testing", index * n_levels + j, counts["total"], f"{name}: sparsity {sparsity:.2%}")
        if (stopped and not cfg.full_curve) or (planned is not None and j not in planned):
            levels.append(LevelResult.skipped(sparsity))
            continue
        level = evaluate_level(candidates, j, sparsity, dense.cal, test, should_stop=run.should_stop)
        level.predictions = None
        if level.tested:
            counts["cal"] += 1
        if not (level.tested and level.p_value > alpha):  # type: ignore[operator]
            level.losses = None  # kept only for levels a test did not reject: for `more_data`
        p_values[j] = level.p_value
        # The procedure says whether testing goes on (fixed-sequence: not after p > δ); full_curve goes on anyway.
        stopped = stopped or not procedure.continues(float(level.p_value), delta_each)  # type: ignore[arg-type]
        levels.append(level)
        if sparsity > 0.0 and procedure.rejected(p_values, delta_each)[j]:
            keeper.offer(sparsity, candidates.builder)
    rejected = procedure.rejected(p_values, delta_each)
    for level, rej in zip(levels, rejected):
        level.rejected = bool(rej)
    chosen = procedure.select(rejected, np.asarray(grid))
    result = CriterionResult(criterion=name, delta=delta_each,
                             certified_sparsity=float(grid[chosen]) if chosen is not None else 0.0, levels=levels)
    if plan is not None:
        result.plan = {**plan.to_dict(), "sparsities": [grid[i] for i in plan.sequence],
                       "tune_sparsities": [grid[i] for i in plan.tune_evaluated],
                       "tune_risks": [tune_risks[i] for i in plan.tune_evaluated]}
    candidates.builder.reset()
    return result


def grid_phase(run: Run, job: Loaded, splits: Splits, dense: DensePass, setup: CandidateSetup,
               predictor: Predictor) -> GridOutcome:
    """Test every criterion's grid with its share of δ (Bonferroni across criteria)."""
    t = time.perf_counter()
    delta_each = split_delta(run.cfg.delta, len(run.cfg.criterion))
    counts = {"total": sum(len(g) for g in setup.grids.values()), "cal": 0, "tune": 0}
    keeper = _Keeper()
    criteria = [certify_criterion(run, ci, name, setup.of(name, predictor), setup.grids[name], dense, splits,
                                  delta_each, keeper, counts)
                for ci, name in enumerate(run.cfg.criterion)]
    # testing_s includes the candidate builder's setup, as it always has
    run.timings["testing_s"] = time.perf_counter() - t + run.timings["candidates_setup_s"]
    run.timings["testing_setup_s"] = predictor.setup_s - run.timings["dense_setup_s"]  # new shapes' warm-ups
    bn = setup.builder.bn
    bn_status = ("no_batchnorm" if not job.has_bn else "unavailable_exported_graph" if job.exported_bn
                 else "unavailable_traced_graph" if bn is not None and not bn.available  # a graph ignoring train mode
                 else "on" if splits.use_bn else "off")
    return GridOutcome(criteria, keeper.state, delta_each, counts["cal"], counts["tune"], bn_status)


def select_phase(run: Run, splits: Splits, dense: DensePass, setup: CandidateSetup, grid: GridOutcome) -> Selection:
    """The largest certified sparsity (ties → the first criterion listed); the live module becomes its tested
    candidate (weights and BN statistics, exactly), or stays dense."""
    best = max(range(len(grid.criteria)), key=lambda i: grid.criteria[i].certified_sparsity)
    winner = grid.criteria[best]
    n_levels = len(setup.grids[winner.criterion])
    t = time.perf_counter()
    more = more_data(winner, bound=splits.bound, risk=run.risk, epsilon=run.cfg.epsilon,
                     alpha=splits.procedure.level_alpha(grid.delta_each, n_levels))
    run.timings["more_data_s"] = time.perf_counter() - t  # the report's planning estimate (paired_exact: calibrations)
    for criterion in grid.criteria:
        for level in criterion.levels:
            level.losses = None
    pruned_accuracy = dense.dense_accuracy
    if winner.certified:
        j = setup.grids[winner.criterion].index(winner.certified_sparsity)
        assert grid.best_state is not None and grid.best_state[0] == winner.certified_sparsity
        setup.builder.load(grid.best_state[1])  # exactly the tested candidate: weights and BN statistics
        if winner.levels[j].accuracy is not None:
            pruned_accuracy = winner.levels[j].accuracy
    grid.best_state = None
    return Selection(best, winner.certified_sparsity, pruned_accuracy, more)


__all__ = ["GridOutcome", "Selection", "certify_criterion", "grid_phase", "plan_on_tune", "select_phase"]
