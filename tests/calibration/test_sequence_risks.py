"""Sequence risks over (N, T, V) logits (issue 13, item 3): token_disagreement and token_accuracy_drop.

Tiny causal-LM-shaped models with random weights, scripted and traced; the p-values of the bounded
per-position losses are checked for validity by simulation (HB with the factor e, and WSR).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration import certify
from calibration.data import split_tune_cal
from calibration.errors import ConfigError, ModelError
from calibration.p_values import p_value, upper_confidence_bound, wsr_p_value_batch
from calibration.risks import per_sample_losses

V, T, N = 64, 9, 160
CFG = {"sparsities": [0.1, 0.3, 0.5], "epsilon": 0.3, "delta": 0.2, "batch_size": 40, "device": "cpu"}


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.mlp = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(input_ids)
        h = h + torch.relu(self.mlp(h)) * attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.lm_head(h)}


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (N, T)).astype(np.int64)
    mask = (np.arange(T)[None] < rng.integers(2, T + 1, N)[:, None]).astype(np.int64)
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
    return ids, mask, labels


def _model(tmp_path, script: bool):
    torch.manual_seed(0)
    m = TinyLM().eval()
    ids, mask, _ = _data()
    sm = torch.jit.script(m) if script else torch.jit.trace(m, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
                                                              strict=False)
    path = tmp_path / "lm.pt"
    torch.jit.save(sm, str(path))
    return path


@pytest.mark.parametrize("script", [True, False], ids=["scripted", "traced"])
def test_token_disagreement_counts_only_unmasked_positions(tmp_path, script):
    ids, mask, _ = _data()
    model = _model(tmp_path, script)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    cert = certify(model, tmp_path / "d.npz", {**CFG, "risk": "token_disagreement", "full_curve": True},
                   out=tmp_path / "o.pt")
    r = cert.result
    assert r["risk"] == "token_disagreement" and r["bound"] == "wsr"
    assert "Waudby-Smith" in r["guarantee"] or not r["certified"]
    # The reported risk of the certified (or last) level is the mean over samples of the fraction of their
    # unmasked positions whose top-1 differs from the dense model's.
    cal = split_tune_cal(N, 0.0, 0).cal
    x = (torch.from_numpy(ids[cal]), torch.from_numpy(mask[cal]))
    with torch.no_grad():
        dense = torch.jit.load(str(model))(*x)["logits"].argmax(-1).numpy()
        pruned = torch.jit.load(str(tmp_path / "o.pt"))(*x)["logits"].argmax(-1).numpy()
    m = mask[cal] == 1
    expected = np.mean(((dense != pruned) & m).sum(1) / m.sum(1))
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"]) if r["certified"] else None
    if level is not None:
        assert level["empirical_risk"] == pytest.approx(expected)
    assert all(lv["empirical_risk"] is None or 0.0 <= lv["empirical_risk"] <= 1.0 for lv in r["levels"])


def test_token_accuracy_drop_with_labels_and_ignored_positions(tmp_path):
    ids, mask, labels = _data()
    model = _model(tmp_path, True)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask, y=labels)
    cert = certify(model, tmp_path / "d.npz", {**CFG, "risk": "token_accuracy_drop", "bound": "hb"})
    r = cert.result
    assert r["risk"] == "token_accuracy_drop" and r["bound"] == "hb"
    cal = split_tune_cal(N, 0.0, 0).cal
    with torch.no_grad():
        dense = torch.jit.load(str(model))(torch.from_numpy(ids[cal]), torch.from_numpy(mask[cal]))["logits"]
    valid = labels[cal] != -100
    acc = ((dense.argmax(-1).numpy() == labels[cal]) & valid).sum() / valid.sum()
    assert r["dense_accuracy"] == pytest.approx(acc)
    assert all(lv["empirical_risk"] is None or -1.0 <= lv["empirical_risk"] <= 1.0 for lv in r["levels"])
    if r["certified"]:
        assert "Hoeffding–Bentkus" in r["guarantee"]


def test_bad_combinations(tmp_path):
    ids, mask, labels = _data()
    model = _model(tmp_path, True)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask, y=labels)
    with pytest.raises(ConfigError) as info:  # 0/1 bounds are not valid for fractions of positions
        certify(model, tmp_path / "d.npz", {**CFG, "risk": "token_disagreement", "bound": "binomial"})
    assert info.value.code == "bound_not_valid_for_risk"
    np.savez(tmp_path / "n.npz", input_ids=ids, attention_mask=mask)
    with pytest.raises(ModelError) as info:  # a classifier risk on (N, T, V) logits
        certify(model, tmp_path / "n.npz", {**CFG, "risk": "disagreement"})
    assert info.value.code == "model_bad_output" and "token_disagreement" in str(info.value)


def test_per_sample_losses_by_hand():
    pruned = np.array([[1, 2, 3, 4], [1, 1, 1, 1]])
    dense = np.array([[1, 0, 3, 0], [1, 1, 1, 1]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert per_sample_losses("token_disagreement", pruned, dense, None, mask).tolist() == [1 / 3, 0.0]
    y = np.array([[1, 0, -100, 4], [1, 2, 1, 1]])
    # sample 0: valid = positions 0, 1 (2 masked by label, 3 by the mask): dense 2/2 right, pruned 1/2
    # sample 1: valid = positions 0, 1: dense 1/2, pruned 1/2
    assert per_sample_losses("token_accuracy_drop", pruned, dense, y, mask).tolist() == [0.5, 0.0]


@pytest.mark.parametrize("bound", ["hb", "wsr"])
@pytest.mark.parametrize("risk", ["token_disagreement", "token_accuracy_drop"])
def test_bounded_loss_p_values_are_valid_by_simulation(bound, risk):
    """Under the null (the risk equals ε) P(p ≤ δ) ≤ δ for losses that are fractions of positions."""
    rng = np.random.default_rng(7)
    eps, delta, n, draws, m = 0.1, 0.1, 200, 2000 if bound == "wsr" else 600, 8
    if risk == "token_disagreement":  # j/m with j ~ Bin(m, ε): mean ε
        losses = rng.binomial(m, eps, (draws, n)) / m
    else:  # D = a − b over positions: a ~ Bin(m, ε + 0.2)/m, b ~ Bin(m, 0.2)/m: mean ε
        losses = (rng.binomial(m, eps + 0.2, (draws, n)) - rng.binomial(m, 0.2, (draws, n))) / m
    if bound == "wsr":
        x01 = losses if risk == "token_disagreement" else (losses + 1) / 2
        eps01 = eps if risk == "token_disagreement" else (1 + eps) / 2
        ps = wsr_p_value_batch(x01, eps01, delta_ref=delta)
        assert np.allclose(ps[:5], [p_value(bound, risk, row, eps, alpha=delta) for row in losses[:5]])
    else:
        ps = np.array([p_value(bound, risk, row, eps, alpha=delta) for row in losses])
    rate = float(np.mean(ps <= delta))
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / draws), rate
    # Power where the risk is well below ε, and the confidence bound covers the observed risk.
    n_power = 2000  # HB on (D + 1)/2 against (1 + ε)/2 is weak: more samples for the power check
    low = rng.binomial(m, 0.02, n_power) / m
    if risk == "token_accuracy_drop":
        low = low - rng.binomial(m, 0.02, n_power) / m
    assert p_value(bound, risk, low, eps, alpha=delta) <= delta
    ucb = upper_confidence_bound(bound, risk, low, delta)
    assert low.mean() <= ucb <= eps


def test_planned_procedure_with_a_sequence_risk(tmp_path):
    ids, mask, _ = _data()
    model = _model(tmp_path, True)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    cert = certify(model, tmp_path / "d.npz", {**CFG, "risk": "token_disagreement", "procedure": "planned"})
    assert cert.result["procedure"] == "planned" and cert.result["risk"] == "token_disagreement"
