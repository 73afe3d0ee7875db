"""TorchScript's graph optimisation only where it can pay for itself (issue 17): the rule, the predictor's
per-thread flag (set for its life, restored), the engine's use of it, and unchanged predictions."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration import certify
from calibration.engine import expected_batch_forwards
from calibration.config import CertifyConfig
from calibration.fast_eval import (
    GRAPH_OPTIMIZE_COST_BATCHES,
    GRAPH_OPTIMIZE_GAIN,
    Predictor,
    graph_optimization_rule,
)


def test_threshold_is_where_the_expected_saving_exceeds_the_optimisation() -> None:
    edge = round(GRAPH_OPTIMIZE_COST_BATCHES / GRAPH_OPTIMIZE_GAIN)  # saves exactly what optimising costs
    assert graph_optimization_rule(edge) is False
    assert graph_optimization_rule(edge + 1) is True
    assert graph_optimization_rule(None) is True  # unknown size: torch's default


def test_the_benchmark_jobs() -> None:
    # ResNet-50 / LM jobs of the benchmarks: 84 batch forwards (n = 2000, 20 levels) → as traced;
    # bench/gpu_speed.py's full curves (10,000 samples, 100 levels, batch 500) → optimised.
    small = CertifyConfig(sparsities=tuple(round(0.05 * i, 2) for i in range(20)), batch_size=500)
    assert graph_optimization_rule(expected_batch_forwards(small, 1500, 500, True, 54)) is False
    big = CertifyConfig(sparsities=tuple(round(0.01 * i, 2) for i in range(100)), batch_size=500)
    assert graph_optimization_rule(expected_batch_forwards(big, 7500, 2500, True, 54)) is True


@pytest.mark.parametrize("wanted", [False, True])
def test_the_predictor_sets_the_flag_for_its_life_and_restores_it(wanted: bool) -> None:
    module = torch.jit.script(torch.nn.Linear(4, 2))
    before = torch._C._get_graph_executor_optimize()
    seen_elsewhere: list[bool] = []
    with pytest.raises(RuntimeError, match="inside"):
        with Predictor(module, 8, device="cpu", graph_optimization=wanted) as pred:
            assert torch._C._get_graph_executor_optimize() is wanted
            assert pred.describe()["graph_optimization"] is wanted
            assert pred.warmup == (3 if wanted else 1)  # nothing to profile: one warm-up run
            thread = threading.Thread(target=lambda: seen_elsewhere.append(torch._C._get_graph_executor_optimize()))
            thread.start()
            thread.join()
            raise RuntimeError("inside")  # restored on the way out, whatever happened
    assert torch._C._get_graph_executor_optimize() is before
    assert seen_elsewhere == [True]  # the flag is the thread's own: other threads keep torch's default


def test_predictions_do_not_depend_on_the_setting(files: dict[str, Path]) -> None:
    x = torch.from_numpy(np.load(files["data_img"])["x"][:300])
    out = {}
    for wanted in (True, False):
        module = torch.jit.load(str(files["cnn"])).eval()
        with Predictor(module, 64, device="cpu", graph_optimization=wanted) as pred:
            out[wanted] = pred.predict(x).numpy()
    np.testing.assert_array_equal(out[True], out[False])


def test_a_small_job_runs_its_graph_as_traced(files: dict[str, Path], tmp_path: Path) -> None:
    cert = certify(str(files["mlp"]), str(files["data_flat"]), {"sparsities": [0.2, 0.5], "epsilon": 0.1},
                   out=str(tmp_path / "a.pt"))
    assert cert.to_dict()["evaluator"]["graph_optimization"] is False
    assert torch._C._get_graph_executor_optimize() is True  # restored after the job


def test_the_engine_tells_its_predictor_the_rule() -> None:
    engine = Path(__file__).resolve().parents[2] / "calibration" / "engine.py"
    calls = [node for node in ast.walk(ast.parse(engine.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "Predictor" and any(k.arg == "precision" for k in node.keywords)]
    assert calls
    for call in calls:
        keyword = next((k for k in call.keywords if k.arg == "graph_optimization"), None)
        assert keyword is not None and "graph_optimization_rule" in ast.unparse(keyword.value), ast.unparse(call)
