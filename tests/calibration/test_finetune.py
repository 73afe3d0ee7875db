"""Masked fine-tuning on D_tune and BN statistics that cannot hurt (calibration.finetune, calibration.candidates).

Real TorchScript models (scripted and traced, with and without BatchNorm) trained on scikit-learn's
digits; the certify calls run the whole engine.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration import certify
from service.cli.offline import certify_config, parse_certify
from calibration.config import FinetuneConfig, validate_config
from calibration.data import split_tune_cal
from calibration.errors import ConfigError
from calibration.model import find_prunable

GRID = [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97]
FAST = {"steps": 60, "batch_size": 64}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _cal_predictions(model_path, data_path, seed: int, tune_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(data_path)
    split = split_tune_cal(len(data["y"]), tune_fraction, seed)
    module = torch.jit.load(str(model_path))
    with torch.no_grad():
        pred = module(torch.from_numpy(data["x"][split.cal])).argmax(1).numpy()
    return pred, data["y"][split.cal]


@pytest.mark.parametrize("model_key, data_key, loss", [
    ("mlp", "data_flat", "labels"),      # traced, no BatchNorm
    ("cnn", "data_img", "distill"),      # scripted, BatchNorm
    ("cnn_traced", "data_img", "labels"),  # traced, BatchNorm baked into the graph
])
def test_finetuned_artifact_is_the_tested_candidate_with_pruned_weights_exactly_zero(model_key, data_key, loss,
                                                                                     files, tmp_path):
    out = tmp_path / "pruned.pt"
    cfg = {"epsilon": 0.03, "seed": 3, "sparsities": GRID, "finetune": {**FAST, "loss": loss}}
    r = certify(files[model_key], files[data_key], cfg, out=out).result
    assert r["certified"] and r["finetune"]["loss"] == ("labels" if loss == "labels" else "soft")
    pruned, original = torch.jit.load(str(out)), torch.jit.load(str(files[model_key]))
    zeros = sum(int((w.param == 0).sum()) for w in find_prunable(pruned))
    assert zeros == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * r["prunable_parameters"] + 0.5))
    # Kept weights were trained (unless the held-out check kept the masked candidate: step 0).
    # Pruned ones are exactly zero (counted above).
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"])
    assert level["rejected"] and level["finetune_loss"] >= 0 and 0 <= level["finetune_step"] <= 60
    moved = [bool((a.param != b.param)[a.param != 0].any()) for a, b in zip(find_prunable(pruned),
                                                                           find_prunable(original))]
    assert all(moved) if level["finetune_step"] > 0 else not any(moved)
    assert any(lv.get("finetune_step", 0) > 0 for lv in r["levels"])
    # The artifact reproduces the tested risk on D_cal exactly.
    dense_pred, y = _cal_predictions(files[model_key], files[data_key], 3)
    pred, _ = _cal_predictions(out, files[data_key], 3)
    assert float(np.mean(pred == y)) == r["pruned_accuracy"]
    assert float(np.mean(pred != y) - np.mean(dense_pred != y)) == pytest.approx(level["empirical_risk"], abs=1e-12)
    assert "fine-tuned for up to 60 steps on the tuning split per level, each level continuing" in r["guarantee"]
    assert r["finetune"]["chain"] is True


def test_candidates_never_see_d_cal(files, tmp_path, digits):
    """Change every D_cal row (inputs and labels): the candidates — and so the artifact — are bit-identical."""
    data = np.load(files["data_img"])
    x, y = data["x"].copy(), data["y"].copy()
    split = split_tune_cal(len(y), 0.25, 11)
    rng = np.random.default_rng(0)
    x_other, y_other = x.copy(), y.copy()
    x_other[split.cal] = rng.normal(size=x[split.cal].shape).astype(np.float32)
    y_other[split.cal] = rng.integers(0, 10, size=split.cal.size)
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    np.savez(paths[0], x=x, y=y)
    np.savez(paths[1], x=x_other, y=y_other)
    # ε close to 1 certifies the top level for both data sets, so both artifacts are the same level's candidate.
    # On the CPU: CUDA kernels (a conv's weight gradient, cuDNN's algorithm choice) need not be bit-reproducible
    # from run to run, which would hide what this test is about.
    cfg = {"risk": "disagreement", "epsilon": 0.99, "seed": 11, "sparsities": [0.0, 0.6, 0.9], "reconstruct": True,
           "finetune": {**FAST, "loss": "labels"}, "device": "cpu"}
    shas = []
    for i, path in enumerate(paths):
        out = tmp_path / str(i) / "pruned.pt"  # same file name: the archive's inner folder is named after it
        r = certify(files["cnn"], path, cfg, out=out).result
        assert r["certified_sparsity"] == 0.9 and r["bn_statistics"]["mode"] == "choose"
        shas.append(_sha(out))
    assert shas[0] == shas[1]


@pytest.mark.parametrize("chain", [True, False])
def test_candidates_never_see_d_cal_with_chained_or_independent_fine_tuning(chain, files, tmp_path):
    data = np.load(files["data_flat"])
    x, y = data["x"].copy(), data["y"].copy()
    split = split_tune_cal(len(y), 0.25, 12)
    x[split.cal] = np.random.default_rng(1).random(x[split.cal].shape).astype(np.float32)
    paths = [files["data_flat"], tmp_path / "b.npz"]
    np.savez(paths[1], x=x, y=y)
    cfg = {"risk": "disagreement", "epsilon": 0.99, "seed": 12, "sparsities": [0.0, 0.5, 0.7, 0.9], "device": "cpu",
           "finetune": {**FAST, "chain": chain}}
    results = [certify(files["mlp"], path, cfg, out=tmp_path / str(i) / "pruned.pt").result
               for i, path in enumerate(paths)]
    assert [r["certified_sparsity"] for r in results] == [0.9, 0.9] and results[0]["finetune"]["chain"] is chain
    assert results[0]["artifact_sha256"] == results[1]["artifact_sha256"]
    assert [lv.get("finetune_loss") for lv in results[0]["levels"]] == [lv.get("finetune_loss") for lv in results[1]["levels"]]


def test_chained_fine_tuning_continues_from_the_level_below(files, tmp_path):
    """Level j starts from level j−1's fine-tuned weights: the first pruned level (nothing below it) is the
    independent candidate, the next one is not."""
    grid = [0.0, 0.5, 0.8]
    base = {"epsilon": 0.99, "risk": "disagreement", "seed": 2, "device": "cpu", "sparsities": grid}
    chained = certify(files["mlp"], files["data_flat"], {**base, "finetune": FAST}, out=tmp_path / "a" / "m.pt").result
    independent = certify(files["mlp"], files["data_flat"], {**base, "finetune": {**FAST, "chain": False}},
                          out=tmp_path / "b" / "m.pt").result
    assert chained["certified_sparsity"] == independent["certified_sparsity"] == 0.8
    assert chained["levels"][1]["finetune_loss"] == independent["levels"][1]["finetune_loss"]
    assert chained["levels"][2]["finetune_loss"] != independent["levels"][2]["finetune_loss"]
    assert chained["artifact_sha256"] != independent["artifact_sha256"]
    assert certify(files["mlp"], files["data_flat"], {**base, "reconstruct": True,
                                                     "finetune": FAST}).result["finetune"]["chain"] is False


def test_fine_tuning_is_deterministic_from_the_seed(files, tmp_path):
    """Same seed, same bytes (on the CPU; on CUDA the engine keeps the tested weights instead)."""
    cfg = {"epsilon": 0.03, "seed": 4, "sparsities": [0.0, 0.8, 0.9], "finetune": FAST, "device": "cpu"}
    a, b, c = (certify(files["mlp"], files["data_flat"], {**cfg, "seed": seed}, out=tmp_path / name / "m.pt").result
               for name, seed in (("a", 4), ("b", 4), ("c", 5)))
    assert a["artifact_sha256"] == b["artifact_sha256"] and a["levels"] == b["levels"]
    assert c["artifact_sha256"] != a["artifact_sha256"]


def test_fine_tuning_lifts_the_certified_sparsity(files):
    base = {"epsilon": 0.02, "seed": 5, "sparsities": GRID, "tune_fraction": 0.25}
    plain = certify(files["mlp"], files["data_flat"], base).result
    tuned = certify(files["mlp"], files["data_flat"], {**base, "finetune": {"steps": 150}}).result
    assert tuned["certified_sparsity"] > plain["certified_sparsity"], (plain["certified_sparsity"],
                                                                     tuned["certified_sparsity"])


def test_held_out_check_keeps_the_masked_candidate_when_training_only_hurts(files):
    """A learning rate far too large: at low sparsity no step improves the held-out loss, so those levels
    keep their masked candidate (step 0) and the certificate is at least the one-shot one."""
    base = {"epsilon": 0.02, "seed": 5, "sparsities": GRID, "tune_fraction": 0.25, "full_curve": True}
    plain = certify(files["mlp"], files["data_flat"], base).result
    wild = certify(files["mlp"], files["data_flat"], {**base, "finetune": {"steps": 20, "lr": 1.0}}).result
    # Where masking alone loses little (≤ 80 %), no step of such a run helps on held-out data: the masked
    # candidate is kept and tested exactly as the one-shot job tests it.
    low = [j for j, s in enumerate(GRID) if 0 < s <= 0.8]
    assert [wild["levels"][j]["finetune_step"] for j in low] == [0] * len(low)
    assert [wild["levels"][j]["empirical_risk"] for j in low] == [plain["levels"][j]["empirical_risk"] for j in low]
    assert wild["certified_sparsity"] >= plain["certified_sparsity"]
    assert wild["finetune"]["n_held_out"] == round(0.25 * wild["n_tune"])


def test_distillation_needs_no_labels(files, tmp_path):
    data = np.load(files["data_flat"])
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=data["x"])
    r = certify(files["mlp"], unlabelled, {"sparsities": GRID, "epsilon": 0.05, "finetune": FAST}).result
    assert r["risk"] == "disagreement" and r["finetune"]["loss"] == "soft" and r["certified"]
    with pytest.raises(ConfigError, match="needs labels") as info:
        certify(files["mlp"], unlabelled, {"sparsities": GRID, "finetune": {"loss": "labels"}})
    assert info.value.code == "labels_required"


def test_finetune_without_tune_data_is_refused(files):
    with pytest.raises(ConfigError, match="fine-tuning needs tuning data") as info:
        certify(files["mlp"], files["data_flat"], {"finetune": True, "tune_fraction": 0.0})
    assert info.value.code == "tune_data_required"


def test_finetune_config_and_cli_flags():
    assert validate_config({}).finetune is None
    assert validate_config({"finetune": True}).finetune == FinetuneConfig()
    assert validate_config({"finetune": 70}).finetune == FinetuneConfig(steps=70)
    assert validate_config({"finetune": {"chain": False}}).finetune == FinetuneConfig(chain=False)
    assert validate_config({"finetune": {"lr": 0.05, "loss": "distill"}}).finetune == FinetuneConfig(lr=0.05,
                                                                                                   loss="distill")
    assert validate_config({"finetune": True}).resolved_tune_fraction(False) == 0.25
    round_trip = validate_config({"finetune": {"steps": 7}})
    assert validate_config(round_trip.to_dict()) == round_trip
    for bad, what in [("yes", "finetune"), ({"steps": -1}, "finetune.steps"), ({"lr": 0}, "finetune.lr"),
                      ({"loss": "mse"}, "finetune.loss"), ({"epochs": 3}, "Unknown key"),
                      ({"chain": "yes"}, "finetune.chain")]:
        with pytest.raises(ConfigError, match=what):
            validate_config({"finetune": bad})
    parse = parse_certify
    assert certify_config(parse(["m.pt", "--data", "d.npz", "--out", "o.pt", "--finetune"]))["finetune"] == {}
    assert certify_config(parse(["m.pt", "--data", "d", "--out", "o", "--finetune", "30", "--finetune-loss",
                                 "distill"]))["finetune"] == {"steps": 30, "loss": "distill"}
    assert "finetune" not in certify_config(parse(["m.pt", "--data", "d.npz", "--out", "o.pt"]))


# ------------------------------------------------------------------ BatchNorm statistics that cannot hurt

class _WideBN(nn.Module):
    """Linear → BatchNorm1d → ReLU → Linear: per-feature statistics, noisy from a handful of samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.bn = nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture(scope="module")
def wide_bn(digits, tmp_path_factory):
    torch.manual_seed(7)
    model = _WideBN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    for _ in range(30):
        for idx in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("widebn") / "m.pt"
    torch.jit.script(model).save(str(path))
    return path


def test_re_estimated_statistics_from_a_tiny_d_tune_are_not_used_where_they_hurt(wide_bn, files):
    """With 16 tuning samples, re-estimated statistics alone change many predictions at a tiny sparsity;
    the chooser keeps the dense ones there, and certifies at least what plain re-estimation does."""
    grid = [0.0, 0.001, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8]
    base = {"risk": "disagreement", "epsilon": 0.03, "seed": 2, "sparsities": grid, "tune_fraction": 16 / 897,
            "full_curve": True}
    chosen = certify(wide_bn, files["data_flat"], base).result
    always = certify(wide_bn, files["data_flat"], {**base, "bn_statistics": "reestimate"}).result
    assert chosen["n_tune"] == always["n_tune"] == 16
    assert chosen["bn_statistics"]["mode"] == "choose" and always["bn_statistics"]["mode"] == "reestimate"
    tiny = 1
    assert chosen["levels"][tiny]["bn_statistics"] == "dense"
    assert always["levels"][tiny]["empirical_risk"] > chosen["levels"][tiny]["empirical_risk"]
    assert chosen["certified_sparsity"] >= always["certified_sparsity"]
    assert "held-out half of the tuning split" in chosen["guarantee"]
