"""certify() on real models and data: artifacts reload, zeros match, outputs match masking."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from calibration import certify
from calibration.data import split_tune_cal
from calibration.model import find_prunable

pytestmark = pytest.mark.timeout(300)


def _prunable_zeros(module: torch.nn.Module) -> tuple[int, int]:
    ws = find_prunable(module)
    return sum(int((w.param == 0).sum()) for w in ws), sum(w.numel for w in ws)


def _global_magnitude_mask(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Independent re-computation: zero the round(λN) smallest |w| over all layers."""
    flat = torch.cat([w.abs().flatten() for w in weights])
    k = int(np.floor(sparsity * flat.numel() + 0.5))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return list(torch.split(keep, [w.numel() for w in weights]))


def test_traced_mlp_certifies_and_artifact_equals_masked_original(files, digits, tmp_path):
    out = tmp_path / "pruned.pt"
    cert = certify(files["mlp"], files["data_flat"], {"epsilon": 0.03, "delta": 0.1, "seed": 3}, out=out)
    r = cert.result
    assert r["certified"] and r["certified_sparsity"] >= 0.2
    assert r["risk"] == "accuracy_drop" and r["bound"] == "paired_exact"
    assert r["n_calibration"] == len(digits.y_cal) and r["n_tune"] == 0
    assert r["artifact_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    pruned = torch.jit.load(str(out))
    zeros, total = _prunable_zeros(pruned)
    assert total == r["prunable_parameters"]
    assert zeros == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * total + 0.5))

    original = torch.jit.load(str(files["mlp"]))
    ws = [w.param.detach() for w in find_prunable(original)]
    with torch.no_grad():
        for w, keep in zip(ws, _global_magnitude_mask(ws, r["certified_sparsity"])):
            w.mul_(keep.view(w.shape))
        x = torch.from_numpy(digits.x_cal)
        torch.testing.assert_close(pruned(x), original(x), rtol=0, atol=0)
    # The reported level list is consistent with fixed-sequence testing.
    tested = [lvl for lvl in r["levels"] if lvl["evaluated"]]
    assert all(lvl["rejected"] for lvl in tested[:-1])
    assert max(lvl["sparsity"] for lvl in r["levels"] if lvl["rejected"]) == r["certified_sparsity"]


def test_scripted_cnn_with_batchnorm_reestimates_and_masks_weights(files, digits, tmp_path):
    out = tmp_path / "cnn_pruned.pt"
    cfg = {"epsilon": 0.05, "delta": 0.1, "sparsities": [round(0.1 * i, 1) for i in range(10)], "seed": 1}
    r = certify(files["cnn"], files["data_img"], cfg, out=out).result
    assert r["bn_recalibration"] == "on" and r["n_tune"] == int(len(digits.y_cal) * 0.25)
    pruned = torch.jit.load(str(out))
    zeros, total = _prunable_zeros(pruned)
    assert zeros == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * total + 0.5))
    # Prunable weights equal the masked originals; biases untouched; only BN statistics may differ.
    original = torch.jit.load(str(files["cnn"]))
    ws = [w.param.detach() for w in find_prunable(original)]
    masks = _global_magnitude_mask(ws, r["certified_sparsity"])
    pw = {w.name: w.param for w in find_prunable(pruned)}
    for w, keep, name in zip(ws, masks, [w.name for w in find_prunable(original)]):
        torch.testing.assert_close(pw[name], w * keep.view(w.shape), rtol=0, atol=0)
    orig_params = dict(original.named_parameters())
    for name, p in pruned.named_parameters():
        if name not in pw:
            torch.testing.assert_close(p, orig_params[name], rtol=0, atol=0)
    # The artifact is the model that was tested: its BN statistics are those of the certified level,
    # so its accuracy on D_cal is the reported one and reproduces the level's empirical risk.
    assert any(not torch.equal(a, b) for a, b in zip(pruned.buffers(), original.buffers()))
    data = np.load(files["data_img"])
    split = split_tune_cal(len(data["y"]), 0.25, 1)
    assert split.cal.size == r["n_calibration"]
    with torch.no_grad():
        pred = pruned(torch.from_numpy(data["x"][split.cal])).argmax(1).numpy()
    assert float(np.mean(pred == data["y"][split.cal])) == r["pruned_accuracy"]
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"])
    assert r["dense_accuracy"] - r["pruned_accuracy"] == pytest.approx(level["empirical_risk"], abs=1e-12)


def test_batchnorm_reestimation_rescues_pruned_cnn(files, digits):
    """At a high fixed sparsity, re-estimated BN statistics give a lower disagreement with the dense model."""
    base = {"epsilon": 0.5, "delta": 0.1, "sparsities": [0.0, 0.7], "risk": "disagreement", "tune_fraction": 0.3}
    with_bn = certify(files["cnn"], files["data_img"], {**base, "bn_recalibration": True}).result
    without = certify(files["cnn"], files["data_img"], {**base, "bn_recalibration": False}).result
    assert with_bn["bn_recalibration"] == "on" and without["bn_recalibration"] == "off"
    assert with_bn["levels"][1]["empirical_risk"] < without["levels"][1]["empirical_risk"]


def test_traced_batchnorm_graph_is_reestimated_like_the_scripted_one(files, tmp_path):
    """A traced graph bakes training=False into its BN calls; re-estimation runs a copy of the graph with
    the flag turned on. Same eager model scripted and traced → same statistics, same certificate, and the
    traced artifact's own graph still evaluates in eval mode (same output for a batch of one or many)."""
    cfg = {"sparsities": [0.0, 0.3, 0.5, 0.7], "epsilon": 0.1, "seed": 3, "full_curve": True}
    traced = certify(files["cnn_traced"], files["data_img"], cfg, out=tmp_path / "t.pt").result
    scripted = certify(files["cnn"], files["data_img"], cfg, out=tmp_path / "s.pt").result
    assert traced["bn_recalibration"] == scripted["bn_recalibration"] == "on"
    assert [lv["empirical_risk"] for lv in traced["levels"]] == pytest.approx(
        [lv["empirical_risk"] for lv in scripted["levels"]], abs=1.5 / traced["n_calibration"])
    t, s = torch.jit.load(str(tmp_path / "t.pt")), torch.jit.load(str(tmp_path / "s.pt"))
    original = torch.jit.load(str(files["cnn_traced"]))
    assert traced["certified_sparsity"] == scripted["certified_sparsity"] > 0, (traced["levels"], scripted["levels"])
    moved = [not torch.allclose(a, b) for a, b in zip(t.buffers(), original.buffers()) if a.is_floating_point()]
    assert any(moved)
    for a, b in zip(t.buffers(), s.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    x = torch.from_numpy(np.load(files["data_img"])["x"][:16])
    with torch.no_grad():
        torch.testing.assert_close(t(x)[:1], t(x[:1]), rtol=1e-5, atol=1e-5)  # eval mode: no batch statistics

def test_unlabeled_data_certifies_disagreement(files, digits, tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, x=digits.x_cal)
    r = certify(files["mlp"], path, {"epsilon": 0.05, "sparsities": [0.0, 0.1, 0.2, 0.3]}).result
    assert r["risk"] == "disagreement" and r["dense_accuracy"] is None
    assert r["levels"][1]["evaluated"]


def test_several_criteria_split_delta_and_report_the_winner(files):
    r = certify(files["mlp"], files["data_flat"], {"criterion": ["magnitude", "random"], "epsilon": 0.03,
                                                   "sparsities": [round(0.05 * i, 2) for i in range(16)]}).result
    assert [c["criterion"] for c in r["criteria"]] == ["magnitude", "random"]
    assert all(c["delta"] == pytest.approx(0.05) for c in r["criteria"])
    best = max(r["criteria"], key=lambda c: c["certified_sparsity"])
    assert r["criterion"] == best["criterion"] and r["certified_sparsity"] == best["certified_sparsity"]
    assert r["criteria"][0]["certified_sparsity"] >= r["criteria"][1]["certified_sparsity"]


def test_layerwise_scope_prunes_every_layer_to_the_level(files, tmp_path):
    out = tmp_path / "lw.pt"
    r = certify(files["mlp"], files["data_flat"], {"scope": "layerwise", "epsilon": 0.05,
                                                   "sparsities": [0.0, 0.1, 0.2, 0.3]}, out=out).result
    s = r["certified_sparsity"]
    assert s > 0
    for layer in r["layers"]:
        assert abs(layer["zeroed"] - s * layer["parameters"]) <= 0.5 + 1e-9


def test_full_curve_evaluates_levels_after_the_stop(files):
    r = certify(files["mlp"], files["data_flat"], {"epsilon": 0.01, "full_curve": True,
                                                   "sparsities": [0.0, 0.3, 0.6, 0.9]}).result
    assert all(lvl["evaluated"] for lvl in r["levels"])
    assert r["levels"][-1]["empirical_risk"] > r["epsilon"]
    assert not r["levels"][-1]["rejected"]


def test_progress_callback_reports_stages_and_cancellation_stops(files):
    from calibration import CancelledError

    events = []
    certify(files["mlp"], files["data_flat"], {"sparsities": [0.0, 0.1, 0.2]}, progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "loading" and "testing" in stages and stages[-1] == "done"
    assert all(0 <= e.fraction <= 1 for e in events)
    calls = {"n": 0}

    def stop_after_a_while() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    with pytest.raises(CancelledError):
        certify(files["mlp"], files["data_flat"], {"full_curve": True}, should_stop=stop_after_a_while)


def test_cli_precision_and_bn_flags_reach_the_result(files, tmp_path):
    import json

    from service.cli import offline

    args = offline.parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", "--precision", "bf16",
                                  "--no-bn-recalibration"])
    assert offline.certify_config(args) == {"precision": "bf16", "bn_recalibration": False}
    with pytest.raises(SystemExit):
        offline.parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", "--precision", "fp8"])
    report = tmp_path / "r.json"
    code = offline.main([str(files["cnn"]), "--data", str(files["data_img"]), "--out", str(tmp_path / "p.pt"),
                         "--report", str(report), "--sparsities", "0.1,0.2", "--epsilon", "0.1",
                         "--no-bn-recalibration", "--precision", "bf16", "--device", "cpu", "--quiet"])
    result = json.loads(report.read_text())
    assert code == 0 and result["bn_recalibration"] == "off" and result["precision_requested"] == "bf16"
    # Reduced precisions exist on CUDA only: on the CPU the model was run, and so certified, in fp32.
    assert result["precision"] == result["evaluator"]["effective_precision"] == "fp32"
    assert "run in" not in result["guarantee"]


def test_the_level_that_stopped_the_test_gets_a_calibration_size_estimate(files):
    """Fixed sequence stops at the first non-rejected level; the result says how many calibration samples
    would likely certify it (checked with scipy's binomial tail on its recorded counts) or that none would."""
    from scipy import stats

    cfg = {"sparsities": [round(0.05 * i, 2) for i in range(1, 20)], "epsilon": 0.05, "risk": "disagreement",
           "seed": 4}
    r = certify(files["mlp"], files["data_flat"], cfg).result
    more = r["more_data"]
    stop = next(lv for lv in r["levels"] if lv["evaluated"] and not lv["rejected"])
    assert more["sparsity"] == stop["sparsity"] and more["n_calibration"] == r["n_calibration"]
    needed = more["n_calibration_needed"]
    if stop["empirical_risk"] >= cfg["epsilon"]:
        assert needed is None and "would not certify" in more["note"]
    else:
        k = round(stop["empirical_risk"] * r["n_calibration"])
        assert needed > r["n_calibration"] and "not part of the guarantee" in more["note"].lower()
        # At the observed frequency the binomial tail at the estimate is below δ, and it was not at n.
        assert stats.binom.cdf(int(k * needed / r["n_calibration"]), needed, 0.05) <= 0.1 * 1.5
        assert stats.binom.cdf(k, r["n_calibration"], 0.05) > 0.1
    from calibration.report import format_summary

    assert "next level" in format_summary(r)
    everything = certify(files["mlp"], files["data_flat"], {"sparsities": [0.05], "epsilon": 0.5}).result
    assert everything["certified"] and everything["more_data"] is None  # nothing failed: nothing to plan


def test_error_rate_tests_the_dense_model_like_any_level(files, digits):
    """Under error_rate λ = 0 is not 'risk 0 by definition': its own error is tested, never claimed ≤ ε."""
    grid = [0.0, 0.1, 0.2]
    dense_err = None
    for eps in (0.005, 0.2):
        r = certify(files["mlp"], files["data_flat"], {"risk": "error_rate", "epsilon": eps, "sparsities": grid,
                                                       "full_curve": True}).result
        lvl0 = r["levels"][0]
        assert lvl0["evaluated"] and lvl0["sparsity"] == 0.0
        dense_err = 1.0 - r["dense_accuracy"]
        assert lvl0["empirical_risk"] == pytest.approx(dense_err)
        assert lvl0["upper_bound"] >= dense_err and lvl0["p_value"] > 0.0
        if eps < dense_err:  # the dense model's error exceeds ε: nothing may be claimed
            assert not lvl0["rejected"] and lvl0["upper_bound"] > eps
            assert r["certified"] is False and r["certified_sparsity"] == 0.0
            assert not any(lvl["rejected"] for lvl in r["levels"])
        else:
            assert lvl0["rejected"] and lvl0["upper_bound"] <= eps
    assert dense_err is not None and 0.005 < dense_err < 0.2
    # accuracy_drop keeps λ = 0 at risk 0 by definition (the dense model against itself)
    r = certify(files["mlp"], files["data_flat"], {"epsilon": 0.05, "sparsities": grid}).result
    assert r["levels"][0]["p_value"] == 0.0 and r["levels"][0]["empirical_risk"] == 0.0


def test_bound_note_when_hb_is_chosen_for_accuracy_drop(files):
    r = certify(files["mlp"], files["data_flat"], {"bound": "hb", "epsilon": 0.01, "sparsities": [0.0, 0.1]}).result
    assert r["bound"] == "hb" and "vacuous" in r["bound_note"]
    r = certify(files["mlp"], files["data_flat"], {"epsilon": 0.01, "sparsities": [0.0, 0.1]}).result
    assert r["bound"] == "paired_exact" and r["bound_note"] is None
