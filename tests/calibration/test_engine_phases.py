"""The engine as phases over typed results: the result's shape is frozen, one level's evaluation is the engine's.

The service, the report page, the CLI and many tests read ``Certificate.result``: a change of its keys (or of a
level's or a criterion's) must be deliberate, so these lists fail when it changes. ``evaluate_level`` is the
step the engine's grid loop, the planned procedure's plan and the benchmarks share: run on its own it must
reproduce the engine's p-value, risk and bound of a level exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import certify
from calibration.certificate import Certificate, CriterionResult, LevelResult
from calibration.config import validate_config
from calibration.engine import (Run, candidates_phase, dense_phase, evaluator, load_phase, split_phase)
from calibration.levels import LevelTest, evaluate_level
from calibration.procedures import split_delta

RESULT_KEYS = [
    "certified_sparsity", "certified", "epsilon", "delta", "risk", "bound", "bound_requested", "procedure",
    "criterion", "scope", "n_calibration", "n_tune", "seed", "dense_accuracy", "pruned_accuracy",
    "prunable_parameters", "prunable_weights", "zeroed_parameters", "total_parameters", "levels", "criteria",
    "layers", "bn_recalibration", "device", "precision", "precision_requested", "evaluator", "levels_evaluated",
    "levels_evaluated_tune", "reconstruction", "bn_statistics", "finetune", "more_data", "bound_note", "pattern",
    "pattern_layers", "guarantee", "artifact_sha256",
]
ARTIFACT_KEYS = ["artifact_bytes"]  # only when an artifact was written
LEVEL_KEYS = ["sparsity", "empirical_risk", "p_value", "rejected", "evaluated", "upper_bound"]
BN_LEVEL_KEYS = ["bn_statistics"]  # a built level's candidate with BatchNorm statistics
CRITERION_KEYS = ["criterion", "delta", "certified_sparsity", "certified", "levels"]
PLAN_KEYS = ["sequence", "tune_evaluated", "estimate", "sparsities", "tune_sparsities", "tune_risks"]
LAYER_KEYS = ["name", "type", "parameters", "zeroed", "sparsity"]
MORE_DATA_KEYS = ["sparsity", "empirical_risk", "p_value", "n_calibration", "n_calibration_needed", "note"]

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
MLP_CFG = {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID, "criterion": ["magnitude", "random"],
           "tune_fraction": 0.2, "seed": 5}


@pytest.fixture(scope="module")
def mlp_cert(files, tmp_path_factory) -> Certificate:
    return certify(files["mlp"], files["data_flat"], MLP_CFG, out=tmp_path_factory.mktemp("phases") / "mlp.pt")


def test_result_keys_are_frozen(mlp_cert):
    r = mlp_cert.result
    assert list(r) == RESULT_KEYS + ARTIFACT_KEYS + ["timings"]
    # every phase that costs time is timed, the report's planning estimate too
    assert {"load_s", "dense_s", "testing_s", "more_data_s", "save_s", "total_s"} <= set(r["timings"])
    assert [c["criterion"] for c in r["criteria"]] == ["magnitude", "random"]
    for c in r["criteria"]:
        assert list(c) == CRITERION_KEYS
        assert [lvl["sparsity"] for lvl in c["levels"]] == GRID
        for lvl in c["levels"]:
            assert list(lvl) == LEVEL_KEYS
    assert r["levels"] == next(c for c in r["criteria"] if c["criterion"] == r["criterion"])["levels"]
    assert all(list(layer) == LAYER_KEYS for layer in r["layers"])
    assert r["more_data"] is None or list(r["more_data"]) == MORE_DATA_KEYS
    assert r["bn_recalibration"] == "no_batchnorm" and r["levels_evaluated_tune"] == 0


def test_typed_results_serialise_to_the_result(mlp_cert):
    r = mlp_cert.result
    assert mlp_cert.result is r  # one dict: what a reader changes in it stays
    assert mlp_cert.to_dict() == r and mlp_cert.to_dict() is not r
    assert json.loads(json.dumps(r)) == r  # JSON-ready as it is
    assert mlp_cert.certified_sparsity == r["certified_sparsity"] == mlp_cert.winner.certified_sparsity
    assert all(isinstance(c, CriterionResult) for c in mlp_cert.criteria)
    assert all(isinstance(lvl, LevelResult) and lvl.losses is None and lvl.predictions is None
               for c in mlp_cert.criteria for lvl in c.levels)  # arrays are not kept past the selection
    assert [c.to_dict() for c in mlp_cert.criteria] == r["criteria"]
    assert r["certified"] and r["levels_evaluated"] == sum(
        lvl["evaluated"] and lvl["sparsity"] > 0 for c in r["criteria"] for lvl in c["levels"])


def test_bn_job_levels_and_plan_keys_are_frozen(files):
    r = certify(files["cnn"], files["data_img"], {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID,
                                                  "procedure": "planned"}).result
    assert list(r) == RESULT_KEYS + ["timings"]
    (c,) = r["criteria"]
    assert list(c) == CRITERION_KEYS + ["plan"] and list(c["plan"]) == PLAN_KEYS
    for lvl in c["levels"]:
        built = lvl["evaluated"] and lvl["sparsity"] > 0
        assert list(lvl) == LEVEL_KEYS + (BN_LEVEL_KEYS if built else [])
    assert r["bn_recalibration"] == "on" and r["levels_evaluated_tune"] == len(c["plan"]["tune_evaluated"]) > 0


def _phases(files, cfg):
    """The engine's phases up to the candidates, as ``certify`` runs them (the caller enters the predictor)."""
    run = Run(validate_config(cfg), None, None)
    job = load_phase(run, files["mlp"], files["data_flat"])
    splits = split_phase(run, job, None)
    return run, job, splits


def test_evaluate_level_reproduces_the_engines_levels_exactly(files, mlp_cert):
    r = mlp_cert.result
    run, job, splits = _phases(files, MLP_CFG)
    delta_each = split_delta(MLP_CFG["delta"], len(MLP_CFG["criterion"]))
    with evaluator(run, job, splits) as predictor:
        dense = dense_phase(run, job, splits, predictor)
        setup = candidates_phase(run, job, splits, dense, predictor, None)
        checked = 0
        for c in r["criteria"]:
            candidates = setup.of(c["criterion"], predictor)
            test = LevelTest(risk=job.risk, bound=splits.bound, epsilon=MLP_CFG["epsilon"],
                             alpha=splits.procedure.level_alpha(delta_each, len(GRID)))
            for j, lvl in reversed(list(enumerate(c["levels"]))):  # out of order: each level stands alone
                if not lvl["evaluated"]:
                    continue
                one = evaluate_level(candidates, j, lvl["sparsity"], dense.cal, test)
                assert (one.p_value, one.empirical_risk, one.upper_bound) == \
                    (lvl["p_value"], lvl["empirical_risk"], lvl["upper_bound"])
                assert one.tested == (lvl["sparsity"] > 0)  # the dense level costs no test under accuracy_drop
                if lvl["sparsity"] > 0:
                    assert one.losses.shape == (r["n_calibration"],) and one.predictions.shape == (r["n_calibration"],)
                    assert one.accuracy is not None
                if c["criterion"] == r["criterion"] and lvl["sparsity"] == r["certified_sparsity"]:
                    assert one.accuracy == r["pruned_accuracy"]
                checked += 1
            setup.builder.reset()
    assert checked == r["levels_evaluated"] + len(r["criteria"])  # + each criterion's dense level


def test_evaluate_level_on_tune_reproduces_the_plan(files):
    cfg = {"epsilon": 0.05, "delta": 0.1, "sparsities": [i / 20 for i in range(20)], "procedure": "planned",
           "tune_fraction": 0.3, "seed": 1}
    r = certify(files["mlp"], files["data_flat"], cfg).result
    plan = r["criteria"][0]["plan"]
    run, job, splits = _phases(files, cfg)
    with evaluator(run, job, splits) as predictor:
        dense = dense_phase(run, job, splits, predictor)
        setup = candidates_phase(run, job, splits, dense, predictor, None)
        test = LevelTest(risk=job.risk, bound=splits.bound, epsilon=cfg["epsilon"],
                         alpha=splits.procedure.level_alpha(cfg["delta"], len(cfg["sparsities"])))
        risks = [evaluate_level(setup.of("magnitude", predictor), j, cfg["sparsities"][j], dense.tune, test,
                                with_p_value=False).empirical_risk for j in plan["tune_evaluated"]]
    assert risks == plan["tune_risks"]
    assert np.all(np.diff(plan["sequence"]) > 0)


def test_chooser_math_is_tf32_only_for_fp32_on_cuda_and_restores_the_flags():
    import torch

    from calibration.engine import chooser_math, tf32_math

    assert chooser_math("fp32", torch.device("cpu")) is None
    assert chooser_math("bf16", torch.device("cuda")) is None and chooser_math("tf32", torch.device("cuda")) is None
    name, math = chooser_math("fp32", torch.device("cuda"))
    assert name == "tf32" and math is tf32_math
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(RuntimeError):
            with tf32_math():
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                raise RuntimeError("a pass that fails")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_on_cpu_the_chooser_reports_no_other_math(files):
    r = certify(files["cnn"], files["data_img"], {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID,
                                                  "device": "cpu"}).result
    assert r["bn_statistics"]["mode"] == "choose" and "math" not in r["bn_statistics"]
    from calibration.report import candidate_rows

    (row,) = candidate_rows(r)
    assert row[0] == "BN statistics" and "math" not in row[1]
    (row,) = candidate_rows({**r, "bn_statistics": {**r["bn_statistics"], "math": "tf32"}})
    assert row[1].endswith("; built in TF32 math")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_an_fp32_job_on_cuda_builds_in_tf32_and_tests_in_fp32(files, monkeypatch):
    """The chooser's passes (checks, re-estimation) see TF32 on; every pass over D_cal sees it off (spies: the
    real passes run)."""
    import torch

    from calibration import candidates, levels

    chooser: set[tuple[bool, bool]] = set()
    passes: list[tuple[int, tuple[bool, bool]]] = []  # (rows, flags) of every predict
    real_apply, real_predict = candidates.BatchNormChooser._apply, levels.Predictor.predict

    def flags() -> tuple[bool, bool]:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def apply(self):
        chooser.add(flags())
        return real_apply(self)

    def predict(self, x, *a, **k):
        passes.append((int(x.shape[0]), flags()))
        return real_predict(self, x, *a, **k)

    monkeypatch.setattr(candidates.BatchNormChooser, "_apply", apply)
    monkeypatch.setattr(levels.Predictor, "predict", predict)
    r = certify(files["cnn"], files["data_img"], {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID,
                                                  "device": "cuda", "tune_fraction": 0.25}).result
    assert r["precision"] == "fp32" and r["bn_statistics"]["math"] == "tf32"
    test_passes = {f for rows, f in passes if rows == r["n_calibration"]}
    assert chooser == {(True, True)} and test_passes == {(False, False)}, (chooser, passes)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fine_tuning_on_cuda_trains_in_tf32_whatever_the_precision(files, monkeypatch, precision):
    import torch

    from calibration import finetune

    seen: set[tuple[bool, bool]] = set()
    real_run = finetune.Finetuner._run

    def run(self, *a, **k):
        seen.add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real_run(self, *a, **k)

    monkeypatch.setattr(finetune.Finetuner, "_run", run)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    r = certify(files["cnn"], files["data_img"], {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID,
                                                  "device": "cuda", "precision": precision, "finetune": 5}).result
    assert r["finetune"]["math"] == "tf32" and seen == {(True, True)}, (r["finetune"], seen)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # as they were


def test_on_cpu_fine_tuning_reports_no_other_math(files):
    r = certify(files["cnn"], files["data_img"], {"epsilon": 0.05, "delta": 0.1, "sparsities": GRID,
                                                  "device": "cpu", "finetune": 5}).result
    assert r["finetune"]["steps"] == 5 and "math" not in r["finetune"]
