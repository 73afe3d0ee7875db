"""fast_eval.Predictor: identical predictions to the eager loop; CUDA graphs see in-place masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration.data import split_tune_cal
from calibration.engine import dense_logits_checked, evaluation_precision, predict
from calibration.errors import ModelError
from calibration.fast_eval import Predictor
from calibration.masks import NestedMasks, apply_masks, restore
from calibration.model import find_prunable

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class SyncingCNN(SmallCNN):
    """Data-dependent control flow with a host sync: cannot be captured in a CUDA graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.flatten(self.features(x), 1))
        if float(out.sum()) > 1e30:
            out = out * 2.0
        return out


def _scripted(cls: type = SmallCNN, device: str = "cpu") -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    s = torch.jit.script(model).to(device)
    for p in s.parameters():
        p.requires_grad_(False)
    return s.eval()


def _levels(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], NestedMasks]:
    params = [w.param for w in find_prunable(module)]
    originals = [p.detach().clone() for p in params]
    return params, originals, NestedMasks.from_scores([p.detach().abs() for p in params], "global")


def test_cpu_predictor_equals_eager_predict_with_ragged_batch_and_masks() -> None:
    module = _scripted()
    x = torch.randn(397, 3, 12, 12, generator=torch.Generator().manual_seed(1))  # 397 = 6·64 + 13
    params, originals, masks = _levels(module)
    with Predictor(module, 64, device="cpu") as pred:
        for s in (0.0, 0.3, 0.7, 0.95):
            apply_masks(params, originals, masks.keep_masks(s))
            got = pred.predict(x)
            assert got.dtype == torch.int64 and got.shape == (397,)
            assert torch.equal(got, predict(module, x, 64))
        info = pred.describe()
    assert info["cuda_graph"] is False and info["effective_precision"] == "fp32"
    restore(params, originals)


def test_cpu_predictor_ignores_reduced_precision_and_keeps_data() -> None:
    module = _scripted()
    x = torch.randn(50, 3, 8, 8)
    with Predictor(module, 16, device="cpu", precision="bf16") as pred:
        assert pred.resident(x) is x
        assert torch.equal(pred.predict(x), predict(module, x, 16))
        assert pred.describe()["effective_precision"] == "fp32"


def test_dense_check_with_predictor_keeps_the_model_contract() -> None:
    module = _scripted()
    x = torch.randn(70, 3, 8, 8)
    preds, n_classes = dense_logits_checked(module, x, 32, None, Predictor(module, 32, device="cpu"))
    assert n_classes == 7 and torch.equal(preds, predict(module, x, 32))
    with pytest.raises(ModelError) as err:
        dense_logits_checked(module, torch.randn(5, 4, 8, 8), 32, None, Predictor(module, 32, device="cpu"))
    assert err.value.code == "model_forward_failed"


def test_empty_input() -> None:
    module = _scripted()
    with Predictor(module, 8, device="cpu") as pred:
        out = pred.predict(torch.empty(0, 3, 8, 8))
    assert out.shape == (0,) and out.dtype == torch.int64


@cuda
def test_cuda_graph_replays_see_in_place_masks_and_bn_updates() -> None:
    module = _scripted(device="cuda")
    x = torch.randn(1000, 3, 16, 16, device="cuda")  # 1000 = 7·128 + 104: ragged tail runs eagerly
    params, originals, masks = _levels(module)
    old = torch.backends.cudnn.benchmark
    # NCHW on both sides so that the historical eager loop runs the very same kernels.
    with evaluation_precision("fp32", torch.device("cuda")), \
            Predictor(module, 128, device="cuda", channels_last=False, cudnn_benchmark=True) as graphed:
        assert torch.backends.cudnn.benchmark is True  # as asked, restored on exit (checked below)
        eager = Predictor(module, 128, device="cuda", cuda_graph=False, channels_last=False)
        for s in (0.0, 0.2, 0.5, 0.8, 0.97):
            apply_masks(params, originals, masks.keep_masks(s))
            assert torch.equal(graphed.predict(x), eager.predict(x)), s
            assert torch.equal(graphed.predict(x).cpu(), predict(module, x, 128).cpu()), s
        # BN statistics changed in place (as BN re-estimation does) are seen by the replay too.
        for m in module.modules():
            if getattr(m, "original_name", "") == "BatchNorm2d":
                m.running_mean.add_(0.3)
        assert torch.equal(graphed.predict(x), eager.predict(x))
        info = graphed.describe()
    assert torch.backends.cudnn.benchmark is old
    assert info["cuda_graph"] and info["graph_replays"] > 0 and info["cuda_graph_error"] is None
    restore(params, originals)


@cuda
def test_cuda_graph_capture_failure_falls_back_to_eager() -> None:
    module = _scripted(SyncingCNN, device="cuda")
    x = torch.randn(300, 3, 16, 16, device="cuda")
    with Predictor(module, 64, device="cuda") as pred:
        got = pred.predict(x)
        info = pred.describe()
    assert torch.equal(got.cpu(), predict(module, x, 64).cpu())
    assert not info["cuda_graph"] and "synchronises" in info["cuda_graph_error"]
    torch.randn(8, device="cuda")  # no capture was attempted: CUDA's RNG state is intact


@cuda
def test_cuda_layout_is_chosen_once_and_graph_matches_eager_in_that_layout() -> None:
    module = _scripted(device="cuda")
    x = torch.randn(700, 3, 16, 16, device="cuda")
    params, originals, masks = _levels(module)
    with Predictor(module, 128, device="cuda") as pred:
        first = pred.predict(x)
        info = pred.describe()
        assert info["format_ms"] is not None and isinstance(pred.channels_last, bool)
        eager = Predictor(module, 128, device="cuda", cuda_graph=False, channels_last=pred.channels_last)
        assert torch.equal(first, eager.predict(x))
        apply_masks(params, originals, masks.keep_masks(0.6))
        assert torch.equal(pred.predict(x), eager.predict(x))
    restore(params, originals)


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
def test_cuda_reduced_precision_graph_equals_eager(precision: str) -> None:
    module = _scripted(device="cuda")
    x = torch.randn(520, 3, 16, 16, device="cuda")
    params, originals, masks = _levels(module)
    dev = torch.device("cuda")
    with evaluation_precision(precision, dev), Predictor(module, 128, device=dev, precision=precision) as pred:
        xr = pred.resident(x)
        if precision in ("bf16", "fp16"):
            assert xr.dtype != torch.float32 and xr.element_size() == 2
        pred.predict(xr)  # chooses the layout
        eager = Predictor(module, 128, device=dev, precision=precision, cuda_graph=False,
                          channels_last=pred.channels_last)
        for s in (0.0, 0.5, 0.9):
            apply_masks(params, originals, masks.keep_masks(s))
            assert torch.equal(pred.predict(xr), eager.predict(xr)), (precision, s)
        assert pred.describe()["cuda_graph"]
    restore(params, originals)


@cuda
def test_certify_runs_on_cuda_with_graphs(files) -> None:
    from calibration import certify

    cert = certify(files["cnn"], files["data_img"], {"device": "cuda", "epsilon": 0.05, "batch_size": 64,
                                                      "sparsities": [0.0, 0.2, 0.4, 0.6], "full_curve": True})
    r = cert.result
    assert r["device"] == "cuda" and r["evaluator"]["cuda_graph"], r["evaluator"]
    cpu = certify(files["cnn"], files["data_img"], {"device": "cpu", "epsilon": 0.05, "batch_size": 64,
                                                    "sparsities": [0.0, 0.2, 0.4, 0.6], "full_curve": True}).result
    # Same certificate on both devices (digits: no near-ties at these levels).
    assert [lv["empirical_risk"] for lv in r["levels"]] == pytest.approx(
        [lv["empirical_risk"] for lv in cpu["levels"]], abs=2 / r["n_calibration"])


@pytest.mark.timeout(180)
def test_gpu_speed_quick_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=170, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio_vs_naive=") and np.isfinite(float(last.split("=")[1])), last
    assert (tmp_path / "gpu_speed.json").is_file()


@cuda
def test_cuda_bf16_certify_reestimates_bn_through_the_predictor_and_ships_the_tested_model(files, tmp_path) -> None:
    """BN re-estimation runs in the evaluation precision and layout; the artifact, evaluated the same way,
    reproduces the reported accuracy (up to cuDNN re-picking an algorithm in another process)."""
    from calibration import certify
    from calibration.data import split_tune_cal

    out = tmp_path / "pruned.pt"
    r = certify(files["cnn"], files["data_img"], {"device": "cuda", "precision": "bf16", "epsilon": 0.05,
                                                   "batch_size": 64, "seed": 2,
                                                   "sparsities": [0.0, 0.2, 0.4, 0.6, 0.8]}, out=out).result
    assert r["device"] == "cuda" and r["bn_recalibration"] == "on" and r["certified"], r
    assert r["precision"] == "bf16" and "run in bf16" in r["guarantee"], r["guarantee"]
    ev = r["evaluator"]
    data = np.load(files["data_img"])
    split = split_tune_cal(len(data["y"]), 0.25, 2)
    module = torch.jit.load(str(out), map_location="cuda").eval()
    x = torch.from_numpy(data["x"][split.cal]).cuda()
    with evaluation_precision("bf16", torch.device("cuda")), \
            Predictor(module, 64, device="cuda", precision="bf16", channels_last=ev["channels_last"]) as pred:
        accuracy = float(np.mean(pred.predict(pred.resident(x)).cpu().numpy() == data["y"][split.cal]))
    assert accuracy == pytest.approx(r["pruned_accuracy"], abs=2 / r["n_calibration"])


def test_resident_dtype_is_decided_from_the_tuning_split_not_from_d_cal() -> None:
    """Changing D_cal's values never changes the resident dtype (the rule reads D_tune only), and D_tune is
    rounded exactly like D_cal."""
    from calibration.fast_eval import resident_dtype_rule

    torch.manual_seed(0)
    tune = torch.rand(64, 3, 8, 8)
    cal = torch.rand(200, 3, 8, 8)
    cal_big = cal.clone()
    cal_big[0, 0, 0, 0] = 70000.0  # beyond fp16's range: a D_cal-driven rule would switch fp16 → fp32
    for ac in (torch.float16, torch.bfloat16):
        choices = set()
        for c in (cal, cal_big, cal * 3000):
            pred = Predictor(torch.nn.Identity(), 32, device="cpu")
            pred.autocast_dtype = ac  # as on CUDA
            pred.decide_resident(tune, c.dtype)
            r = pred.resident(c)
            choices.add(r.dtype)
            rounded_tune = pred.rounded(tune)
            assert rounded_tune.dtype == tune.dtype
            assert torch.equal(rounded_tune, tune.to(ac).to(tune.dtype))
        assert choices == {ac}
        # the rule itself: D_tune decides; without D_tune the inputs keep their dtype
        assert resident_dtype_rule(tune, torch.float32, ac) == ac
        assert resident_dtype_rule(tune * 70000, torch.float32, torch.float16) == torch.float32
        assert resident_dtype_rule(None, torch.float32, ac) == torch.float32
    assert resident_dtype_rule(tune, torch.float32, None) == torch.float32


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_dtype_and_layout_do_not_depend_on_d_cal_values(files, tmp_path: Path, precision: str) -> None:
    from calibration import certify

    data = np.load(files["data_img"])
    x, y = data["x"].copy(), data["y"]
    cfg = {"device": "cuda", "precision": precision, "epsilon": 0.05, "batch_size": 64, "tune_fraction": 0.25,
           "sparsities": [0.0, 0.2]}
    split = split_tune_cal(len(y), 0.25, 0)
    seen = []
    for changed in (False, True):
        xx = x.copy()
        rows = split.cal[:3]  # D_cal's values only
        if changed and precision == "fp32":
            xx[rows] *= 70000.0
        elif changed:  # all of D_cal integer-valued beyond bf16's exact range: a D_cal-driven rule keeps fp32
            xx[split.cal] = np.round(xx[split.cal] * 300.0)
        scale = int(changed)
        path = tmp_path / f"d{scale}.npz"
        np.savez(path, x=xx, y=y)
        r = certify(files["cnn"], path, cfg).result
        ev = r["evaluator"]
        # The layout itself is chosen by timing both on a D_tune batch: when the two run equally fast, the
        # timing noise of two runs may pick either. What must not move with D_cal is what decides it.
        seen.append((ev["resident_dtype"], ev["layout_from"], ev["resident_dtype_from"]))
        if not changed:  # the unchanged data certifies, and the sentence names the layout it was run in
            assert r["certified"] and "memory layout" in r["guarantee"]
    assert seen[0] == seen[1], seen
    # The layout comes from a D_tune batch, or, for a job too small to amortise the trial
    # (fast_eval.layout_trial_rule, from sizes fixed before D_cal is seen), from the precision's default.
    assert seen[0][1] == "tuning split" or seen[0][1].startswith(f"default for {precision}"), seen
    assert seen[0][2] == "tuning split"
