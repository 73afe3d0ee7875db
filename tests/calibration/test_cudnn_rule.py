"""cuDNN's autotuner only where it can pay for itself (issue 17): the rule, the job-size count, the config field."""

from __future__ import annotations

import pytest
import torch

from calibration.config import CertifyConfig, validate_config
from calibration.engine import expected_batch_forwards
from calibration.errors import ConfigError
from calibration.fast_eval import AUTOTUNE_COST_BATCHES, AUTOTUNE_GAIN, Predictor, cudnn_benchmark_rule

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_requested_wins() -> None:
    assert cudnn_benchmark_rule(True, 1, "fp32") is True
    assert cudnn_benchmark_rule(True, 1, "bf16") is True
    assert cudnn_benchmark_rule(False, 10**9, "fp32") is False


def test_auto_is_off_for_an_ordinary_job_and_on_for_a_huge_fp32_one() -> None:
    # ResNet-50, n = 2000, batch 500, 20 levels with BN re-estimation: 84 batch forwards, tuning would cost ~200.
    assert cudnn_benchmark_rule(None, 84, "fp32") is False
    assert cudnn_benchmark_rule(None, 100_000, "fp32") is True
    assert cudnn_benchmark_rule(None, 100_000, "tf32") is True


def test_auto_threshold_is_where_the_saving_exceeds_the_tuning() -> None:
    gain = AUTOTUNE_GAIN["fp32"]
    edge = round(AUTOTUNE_COST_BATCHES / gain)  # 2000: saves exactly what the tuning costs, not more
    assert cudnn_benchmark_rule(None, edge, "fp32") is False
    assert cudnn_benchmark_rule(None, edge + 1, "fp32") is True


def test_auto_never_tunes_reduced_precision() -> None:
    # Measured: in bf16 the autotuner cost seconds and bought nothing.
    for precision in ("bf16", "fp16", "unknown"):
        assert cudnn_benchmark_rule(None, 10**9, precision) is False


def test_expected_batch_forwards_counts_dense_and_every_level() -> None:
    cfg = CertifyConfig(sparsities=tuple(round(0.05 * i, 2) for i in range(20)), batch_size=500)
    # dense: 3 (D_cal 1500) + 1 (D_tune 500); per level: 3 + 1 (BN re-estimation on D_tune)
    assert expected_batch_forwards(cfg, 1500, 500, True, 54) == 4 + 20 * 4
    assert expected_batch_forwards(cfg, 1500, 500, False, 54) == 4 + 20 * 3
    assert expected_batch_forwards(cfg, 1501, 0, False, 54) == 4 + 20 * 4  # a ragged batch counts
    two = CertifyConfig(criterion=("magnitude", "random"), sparsities=(0.1, 0.2), batch_size=100)
    assert expected_batch_forwards(two, 1000, 0, False, 3) == 10 + 2 * 2 * 10


def test_config_field() -> None:
    assert validate_config({}).cudnn_benchmark is None
    assert validate_config({"cudnn_benchmark": True}).cudnn_benchmark is True
    assert validate_config({"cudnn_benchmark": None}).cudnn_benchmark is None
    with pytest.raises(ConfigError):
        validate_config({"cudnn_benchmark": "yes"})


def test_cpu_predictor_leaves_the_flag_alone() -> None:
    old = torch.backends.cudnn.benchmark
    module = torch.nn.Linear(3, 2)
    with Predictor(module, 4, device="cpu", cudnn_benchmark=True) as pred:
        assert torch.backends.cudnn.benchmark is old
        assert pred.describe()["cudnn_benchmark"] is False


@cuda
@pytest.mark.parametrize("wanted", [False, True])
def test_cuda_predictor_sets_and_restores_the_flag(wanted: bool) -> None:
    old = torch.backends.cudnn.benchmark
    module = torch.nn.Linear(3, 2).cuda()
    with Predictor(module, 4, device="cuda", cudnn_benchmark=wanted) as pred:
        assert torch.backends.cudnn.benchmark is wanted
        assert pred.describe()["cudnn_benchmark"] is wanted
    assert torch.backends.cudnn.benchmark is old
