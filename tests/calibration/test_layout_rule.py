"""The memory-layout trial only where it can pay for itself (issue 17): the rule, the default, the predictor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from calibration.config import CertifyConfig
from calibration.engine import expected_batch_forwards
from calibration.fast_eval import (
    LAYOUT_REGRET,
    LAYOUT_TRIAL_COST_BATCHES,
    Predictor,
    default_channels_last,
    layout_trial_rule,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_unknown_size_always_tries_both_layouts() -> None:
    assert layout_trial_rule(None, "fp32") is True
    assert layout_trial_rule(None, "bf16") is True


def test_threshold_is_where_the_expected_saving_exceeds_the_trial() -> None:
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        edge = round(LAYOUT_TRIAL_COST_BATCHES[precision] / LAYOUT_REGRET[precision])  # saves what the trial costs
        assert layout_trial_rule(edge, precision) is False
        assert layout_trial_rule(edge + 1, precision) is True


def test_the_benchmark_jobs() -> None:
    # ResNet-50, n = 2000 (1500 D_cal / 500 D_tune), batch 500, 20 levels with BN re-estimation: 84 batch forwards.
    cfg = CertifyConfig(sparsities=tuple(round(0.05 * i, 2) for i in range(20)), batch_size=500)
    job = expected_batch_forwards(cfg, 1500, 500, True, 54)
    assert job == 84
    assert layout_trial_rule(job, "fp32") is True  # a wrong fp32 default can cost half of every batch
    assert layout_trial_rule(job, "bf16") is False  # NHWC, the bf16 winner everywhere measured; its trial cost more
    assert layout_trial_rule(job // 4, "fp32") is True  # a quarter-batch trial pays for itself in fp32 from 20
    assert layout_trial_rule(job // 5, "fp32") is False
    # a two-level job on 1000 samples at batch 500: 2 + 2 × 2 = 6 forwards, far too few for a trial in any precision
    small = CertifyConfig(sparsities=(0.3, 0.6), batch_size=500)
    n = expected_batch_forwards(small, 1000, 0, False, 3)
    assert n == 6 and not layout_trial_rule(n, "fp32") and not layout_trial_rule(n, "bf16")


def test_defaults_follow_the_math() -> None:
    assert default_channels_last("bf16") and default_channels_last("fp16")
    assert not default_channels_last("fp32") and not default_channels_last("tf32")


def test_cpu_predictor_never_changes_layout() -> None:
    module = torch.nn.Conv2d(3, 4, 3)
    with Predictor(module, 4, device="cpu", expected_batches=1) as pred:
        pred.choose_layout(torch.randn(4, 3, 8, 8), "tuning split")
        assert pred.channels_last is False and pred.format_ms is None
        assert pred.describe()["layout"] is None


@cuda
@pytest.mark.parametrize("precision,expected", [("fp32", False), ("bf16", True)])
def test_a_small_job_takes_the_default_without_timing(precision: str, expected: bool) -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).cuda().eval()
    x = torch.randn(16, 3, 16, 16, device="cuda")
    with Predictor(module, 16, device="cuda", precision=precision, expected_batches=5) as pred:
        pred.choose_layout(x, "tuning split")
        assert pred.channels_last is expected
        assert pred.format_ms is None  # nothing was timed
        assert pred.describe()["layout_from"].startswith(f"default for {precision}")


@cuda
@pytest.mark.parametrize("rows,timed", [(16, 16), (100, 64), (512, 128)])
def test_a_large_job_times_both_layouts_on_a_quarter_batch(rows: int, timed: int) -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).cuda().eval()
    x = torch.randn(rows, 3, 16, 16, device="cuda")
    with Predictor(module, rows, device="cuda", precision="fp32", expected_batches=10_000) as pred:
        pred.choose_layout(x, "tuning split")
        assert pred.format_ms is not None and set(pred.format_ms) == {"rows", "nchw", "channels_last"}
        assert pred.format_ms["rows"] == timed  # a quarter of the batch, at least 64 rows (all, if fewer)
        assert pred.describe()["layout_from"] == "tuning split"


def test_the_engine_tells_its_predictor_the_job_size() -> None:
    """Without ``expected_batches`` the predictor cannot apply the rule (it always runs the trial): the hook."""
    engine = Path(__file__).resolve().parents[2] / "calibration" / "engine.py"
    calls = [node for node in ast.walk(ast.parse(engine.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "Predictor" and any(k.arg == "precision" for k in node.keywords)]
    assert calls, "the engine builds no Predictor with a precision"
    for call in calls:
        assert any(k.arg == "expected_batches" for k in call.keywords), ast.unparse(call)
