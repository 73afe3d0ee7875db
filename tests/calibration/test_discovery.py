"""Discovery by what a weight is (issue 13 item 4): models built here with random weights, scripted and traced.

Every test names the exact list of weights it expects; the name-based discovery that came before found
only Conv*/Linear modules by their exact ``original_name`` and fails each of them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from calibration import batchnorm, certify
from calibration.errors import ModelError
from calibration.masks import NestedMasks, apply_masks
from calibration.model import batchnorm_modules, discover_prunable, find_prunable
from calibration.reconstruct import Reconstructor

pytestmark = pytest.mark.timeout(300)


# --- local stand-ins for the library classes (no transformers / timm dependency) ------------------------------

class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: a linear layer whose weight is (in, out), applied as x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return h.reshape(x.shape[0], -1, self.nf)


class GPT2Block(nn.Module):
    """GPT-2's attention and MLP projections as Conv1D (c_attn, c_proj, c_fc, mlp c_proj), then a head."""

    def __init__(self, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.d = d
        self.ln = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.c_fc = Conv1D(4 * d, d)
        self.mlp_proj = Conv1D(d, 4 * d)
        self.score = nn.Linear(d, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln(x)).split(self.d, dim=2)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 3.0, dim=-1)
        x = x + self.c_proj(torch.matmul(att, v))
        x = x + self.mlp_proj(F.gelu(self.c_fc(x)))
        return self.score(x.mean(1))


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: a Conv2d subclass with its own forward (pad, then conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [1, 1, 1, 1])
        return F.conv2d(x, self.weight, self.bias, self.stride, [0, 0], self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass that applies its activation itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.relu(x)


class SameConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3)
        self.bn1 = BatchNormAct2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv(self.bn1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class EncoderClassifier(nn.Module):
    """A small ``nn.TransformerEncoder`` (MultiheadAttention's in_proj_weight and out_proj) and a head."""

    def __init__(self, d: int = 16, layers: int = 2, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class AttentionOnly(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


class LSTMTextClassifier(nn.Module):
    """Embedding → two-layer LSTM → Linear; the embedding is looked up by index, never pruned by default."""

    def __init__(self, vocab: int = 50, d: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tokens))
        return self.fc(out[:, -1])


class GRUClassifier(nn.Module):
    """Float sequences (N, T, F) → GRU → Linear."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


class LSTMFloat(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class TiedLM(nn.Module):
    """A language-model head tied to the token embedding (GPT-2's lm_head.weight is wte.weight)."""

    def __init__(self, vocab: int = 40, d: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mid(self.wte(tokens))).mean(1))


# --- helpers --------------------------------------------------------------------------------------------------

def _roundtrip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], how: str) -> torch.jit.ScriptModule:
    """Scripted or traced, then saved and loaded (what a user uploads)."""
    torch.manual_seed(0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example, check_trace=False)
        return _roundtrip(exported)


def _names(module: torch.nn.Module, **kw) -> list[str]:
    return [w.name for w in find_prunable(module, **kw)]


BOTH = pytest.mark.parametrize("how", ["script", "trace"])
ENCODER_WEIGHTS = [f"encoder.layers.{i}.{n}" for i in range(2)
                   for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                             "linear2.weight")] + ["head.weight"]


# --- discovery --------------------------------------------------------------------------------------------------

@BOTH
def test_transformer_encoder_in_proj_and_out_proj_are_found(how):
    torch.manual_seed(0)
    module = _export(EncoderClassifier(), (torch.randn(2, 5, 16),), how)
    assert _names(module) == ENCODER_WEIGHTS
    d = discover_prunable(module).summary()
    # Every weight matrix is a candidate (norms and biases are 1-d and not weight matrices).
    assert d["count"] == d["of_count"] == 9 and d["params"] == d["of_params"]
    assert d["of_params"] == 2 * (3 * 16 * 16 + 16 * 16 + 2 * 16 * 32) + 4 * 16


@BOTH
def test_bare_multihead_attention(how):
    x = torch.randn(2, 5, 8)
    module = _export(AttentionOnly(), (x,), how)
    assert _names(module) == ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]


class FastPathAttention(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("model,shape,fused,expected", [
    (FastPathAttention, (5, 8), "aten::_native_multi_head_attention",
     ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]),
    (EncoderClassifier, (5, 16), "aten::_transformer_encoder_layer_fwd", ENCODER_WEIGHTS),
])
def test_fused_attention_fast_paths_traced_under_no_grad(model, shape, fused, expected):
    """Traced in eval mode without grad, torch records its fused kernels: the weights are their arguments."""
    torch.manual_seed(0)
    x = torch.randn(3, *shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model().eval(), (x,), check_trace=False)
    assert fused in {n.kind() for n in traced.inlined_graph.nodes()}
    module = _roundtrip(traced)
    weights = find_prunable(module)
    assert [w.name for w in weights] == expected
    dense = module(x)
    params = [w.param for w in weights]
    apply_masks(params, [p.detach().clone() for p in params],
                NestedMasks.from_scores([p.abs() for p in params]).keep_masks(0.5))
    assert not torch.allclose(module(x), dense)


@BOTH
def test_lstm_text_classifier_weights_found_embedding_kept(how):
    module = _export(LSTMTextClassifier(), (torch.randint(0, 50, (2, 7)),), how)
    assert _names(module) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
                              "fc.weight"]
    d = discover_prunable(module)
    assert d.not_candidates == {"emb.weight": "an embedding (looked up by index)"}
    assert [w.kind for w in d.weights] == ["rnn"] * 4 + ["linear"]


@BOTH
def test_gru_weights_found(how):
    module = _export(GRUClassifier(), (torch.randn(2, 5, 6),), how)
    assert _names(module) == ["gru.weight_ih_l0", "gru.weight_hh_l0", "fc.weight"]


@BOTH
def test_gpt2_style_conv1d(how):
    module = _export(GPT2Block(), (torch.randn(2, 5, 8),), how)
    assert _names(module) == ["c_attn.weight", "c_proj.weight", "c_fc.weight", "mlp_proj.weight", "score.weight"]
    assert [w.kind for w in find_prunable(module)] == ["matmul"] * 4 + ["linear"]


@BOTH
def test_conv2d_subclass_and_batchnorm_subclass(how):
    module = _export(SameConvNet(), (torch.randn(2, 3, 8, 8),), how)
    assert _names(module) == ["stem.weight", "conv.weight", "fc.weight"]
    assert [w.kind for w in find_prunable(module)] == ["conv", "conv", "linear"]
    assert [m is module.bn1 or m is module.bn2 for m in batchnorm_modules(module)] == [True, True]
    assert len(batchnorm_modules(module)) == 2


@BOTH
def test_batchnorm_subclass_is_reestimated(how):
    torch.manual_seed(1)
    module = _export(SameConvNet(), (torch.randn(2, 3, 8, 8),), how)
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    forward = batchnorm.train_mode_forward(module)
    assert batchnorm.reestimate(module, x, 64, forward, None if forward is None else 1.0)
    with torch.no_grad():
        pre = module.stem(x)  # the input of bn1 (BatchNormAct2d)
    torch.testing.assert_close(module.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.bn1.running_var, pre.var((0, 2, 3)), atol=1e-4, rtol=1e-3)


@BOTH
def test_tied_embedding_head_not_pruned_by_default_nor_through_the_head(how):
    module = _export(TiedLM(), (torch.randint(0, 40, (2, 6)),), how)
    assert _names(module) == ["mid.weight"]
    d = discover_prunable(module)
    assert d.tied == {"wte.weight": ["lm_head.weight"]}
    assert "tied to lm_head.weight" in d.not_candidates["wte.weight"]
    assert d.summary()["of_count"] == 2  # one tensor under two names is one weight matrix
    # Opting in by either name prunes the one tensor, under its first name, together.
    for pattern in ("lm_head.*", "wte.weight"):
        (w,) = find_prunable(module, include=[pattern])
        assert (w.name, w.tied, w.kind) == ("wte.weight", ("lm_head.weight",), "embedding")
    masks = NestedMasks.from_scores([w.param.abs()]).keep_masks(0.5)
    apply_masks([w.param], [w.param.detach().clone()], masks)
    assert int((module.lm_head.weight == 0).sum()) == int((module.wte.weight == 0).sum()) == 40 * 8 // 2
    # Excluding any of its names leaves it alone.
    assert _names(module, include=["*"], exclude=["lm_head.weight"]) == ["mid.weight"]


@BOTH
def test_include_exclude_patterns_and_first_last(how):
    module = _export(EncoderClassifier(), (torch.randn(2, 5, 16),), how)
    assert _names(module, include=["*.self_attn.*"]) == [n for n in ENCODER_WEIGHTS if ".self_attn." in n]
    assert _names(module, exclude=["*linear1*", "head.*"]) == [
        n for n in ENCODER_WEIGHTS if "linear1" not in n and not n.startswith("head")]
    assert _names(module, exclude_first_last=True) == ENCODER_WEIGHTS[1:-1]
    d = discover_prunable(module, include=["encoder.layers.0.*"], exclude=["*.linear2.weight"])
    assert [w.name for w in d.weights] == ENCODER_WEIGHTS[:3]
    assert d.not_candidates["encoder.layers.0.linear2.weight"] == "excluded by prune_exclude pattern '*.linear2.weight'"
    assert d.not_candidates["head.weight"] == "not matched by prune_include"
    with pytest.raises(ModelError) as err:
        find_prunable(module, include=["decoder.*"])
    assert err.value.code == "prune_pattern_matches_nothing"
    with pytest.raises(ModelError) as err:
        find_prunable(module, exclude=["*"])
    assert err.value.code == "model_no_prunable_weights"


def test_eager_modules_use_the_same_rules():
    assert _names(EncoderClassifier()) == ENCODER_WEIGHTS
    assert _names(LSTMTextClassifier()) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                                            "lstm.weight_hh_l1", "fc.weight"]
    assert _names(TiedLM()) == ["mid.weight"]


def test_config_patterns_are_validated():
    from calibration.config import validate_config
    from calibration.errors import ConfigError

    cfg = validate_config({"prune_include": ["encoder.*"], "prune_exclude": "*.linear2.weight"})
    assert cfg.prune_include == ("encoder.*",) and cfg.prune_exclude == ("*.linear2.weight",)
    assert validate_config(cfg.to_dict()) == cfg
    from service.cli.offline import certify_config, parse_certify

    args = parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", "--prune-include", "encoder.*",
                          "head.weight", "--prune-exclude", "*.linear2.weight"])
    assert certify_config(args) == {"prune_include": ["encoder.*", "head.weight"],
                                    "prune_exclude": ["*.linear2.weight"]}
    for bad in ({"prune_include": []}, {"prune_include": [3]}, {"prune_exclude": {"a": 1}}, {"prune_exclude": [""]}):
        with pytest.raises(ConfigError):
            validate_config(bad)


# --- masks on bare parameters, save and reload ------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("model,example", [
    (LSTMTextClassifier, lambda: torch.randint(0, 50, (4, 7))),
    (EncoderClassifier, lambda: torch.randn(4, 5, 16)),
])
def test_masks_on_rnn_and_in_proj_weights_act_and_survive_a_save(how, model, example, tmp_path):
    torch.manual_seed(0)
    x = example()
    module = _export(model(), (x,), how)
    weights = find_prunable(module)
    params = [w.param for w in weights]
    originals = [p.detach().clone() for p in params]
    dense = module(x)
    keep = NestedMasks.from_scores([p.abs() for p in params]).keep_masks(0.6)
    apply_masks(params, originals, keep)
    bare = "lstm.weight_hh_l1" if model is LSTMTextClassifier else "encoder.layers.1.self_attn.in_proj_weight"
    (w,) = [w for w in weights if w.name == bare]  # a bare parameter, not a module's weight
    assert int((w.param == 0).sum()) > 0
    pruned = module(x)
    assert not torch.allclose(dense, pruned)  # the forward really reads the masked tensors (LSTM _flat_weights)
    # The pruned model with every zeroed weight restored would be the dense one: zeros are where the mask says.
    module.save(str(tmp_path / "m.pt"))
    reloaded = torch.jit.load(str(tmp_path / "m.pt"))
    zeros = sum(int((w.param == 0).sum()) for w in find_prunable(reloaded))
    assert zeros == sum(int((~k).sum()) for k in keep)
    torch.testing.assert_close(reloaded(x), pruned)


# --- reconstruction says what it reconstructed -----------------------------------------------------------------

@BOTH
def test_reconstruction_reports_layers_it_could_not_reconstruct(how):
    torch.manual_seed(0)
    module = _export(EncoderClassifier(), (torch.randn(2, 5, 16),), how)
    weights = find_prunable(module)
    summary = Reconstructor.from_tune(module, weights, torch.randn(32, 5, 16), 16).summary(weights)
    assert summary["of_layers"] == len(weights) == 9
    assert summary["reconstructed_layers"] == len(summary["layers"])
    assert set(summary["layers"]) | set(summary["not_reconstructed"]) == set(ENCODER_WEIGHTS)
    assert not set(summary["layers"]) & set(summary["not_reconstructed"])
    if how == "trace":  # a traced graph is straight-line: every layer, in_proj_weight included
        assert summary["layers"] == ENCODER_WEIGHTS and summary["not_reconstructed"] == {}
    else:  # scripted: the encoder layers sit in the branches of the fast-path test, and the result says so
        assert summary["layers"] == ["head.weight"]
        assert set(summary["not_reconstructed"].values()) == {
            "it is called inside control flow (an if or a loop) of the graph"}


@BOTH
def test_rnn_weights_are_masked_not_reconstructed_and_say_why(how):
    module = _export(LSTMFloat(), (torch.randn(2, 6, 6),), how)
    weights = find_prunable(module)
    summary = Reconstructor.from_tune(module, weights, torch.randn(32, 6, 6), 16).summary(weights)
    assert summary["layers"] == ["fc.weight"] and summary["reconstructed_layers"] == 1
    assert sorted(summary["not_reconstructed"]) == ["lstm.weight_hh_l0", "lstm.weight_ih_l0"]
    assert all("RNN" in why for why in summary["not_reconstructed"].values())


class OneConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = Conv1D(12, 10)
        self.score = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.c(x).mean(1))


@BOTH
def test_conv1d_weights_are_reconstructed(how):
    """x @ W with W (in, out) is reconstructed like a Linear of weight Wᵀ: the kept weights absorb the pruned."""
    torch.manual_seed(0)
    module = _export(OneConv1D(), (torch.randn(2, 4, 10),), how)
    weights = find_prunable(module)
    assert [w.name for w in weights] == ["c.weight", "score.weight"]
    x = torch.randn(64, 4, 10) @ torch.randn(10, 10)  # correlated inputs: something to absorb
    rec = Reconstructor.from_tune(module, weights, x, 16)
    assert rec.summary(weights)["layers"] == ["c.weight", "score.weight"]
    w0 = weights[0].param.detach().clone()
    keep = NestedMasks.from_scores([w0.abs()]).keep_masks(0.5)[0]
    rebuilt = rec.reconstruct(0, w0, keep)
    assert rebuilt.shape == w0.shape and bool((rebuilt[~keep] == 0).all())
    rows = x.reshape(-1, 10)
    masked_err = (rows @ (w0 * keep) - rows @ w0).norm()
    rebuilt_err = (rows @ rebuilt - rows @ w0).norm()
    assert rebuilt_err < 0.8 * masked_err


# --- end to end -----------------------------------------------------------------------------------------------

def _zeros(module: torch.nn.Module) -> tuple[int, int]:
    ws = find_prunable(module)
    return sum(int((w.param == 0).sum()) for w in ws), sum(w.numel for w in ws)


@pytest.mark.parametrize("model,shape,how,expected", [
    (EncoderClassifier, (5, 16), "script", ENCODER_WEIGHTS),
    (LSTMFloat, (6, 6), "trace", ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc.weight"]),
])
def test_certify_end_to_end_counts_every_candidate(model, shape, how, expected, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    _export(model(), (torch.randn(2, *shape),), how).save(str(path))
    x = np.random.default_rng(0).normal(size=(300, *shape)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    out = tmp_path / "pruned.pt"
    cfg = {"risk": "disagreement", "epsilon": 0.25, "delta": 0.2, "sparsities": [0.0, 0.01, 0.02, 0.05], "seed": 1,
           "batch_size": 64}
    r = certify(path, tmp_path / "data.npz", cfg, out=out).result
    assert [layer["name"] for layer in r["layers"]] == expected
    pw = r["prunable_weights"]
    assert pw["names"] == expected and pw["count"] == pw["of_count"] == len(expected)
    assert pw["params"] == pw["of_params"] == r["prunable_parameters"]
    assert r["certified"] and r["certified_sparsity"] > 0
    assert f"candidates: {len(expected)} of the model's {len(expected)} weight matrices" in r["guarantee"]
    pruned = torch.jit.load(str(out))
    zeros, total = _zeros(pruned)
    assert total == r["prunable_parameters"]
    assert zeros == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * total + 0.5))


def test_report_page_and_summary_show_the_candidate_fraction():
    from calibration.report import format_summary
    from service.report_page import _model_rows

    pw = {"count": 5, "params": 1200, "of_count": 6, "of_params": 1600, "fraction_count": 5 / 6,
          "fraction_params": 0.75, "names": [], "not_candidates": {}, "tied": {}, "method": "graph"}
    rows = dict(_model_rows({"prunable_weights": pw}, None))
    assert rows["candidate weight matrices"] == "5 of 6 (1,200 of 1,600 parameters)"
    result = {"guarantee": "…", "certified_sparsity": 0.1, "certified": True, "criterion": "magnitude",
              "risk": "disagreement", "epsilon": 0.1, "delta": 0.1, "bound": "binomial", "procedure": "fixed_sequence",
              "n_calibration": 10, "n_tune": 0, "zeroed_parameters": 120, "prunable_parameters": 1200, "levels": [],
              "prunable_weights": pw}
    assert "candidate weights  : 5 of 6 weight matrices (1,200 of 1,600 parameters, 75.0%)" in format_summary(result)


@pytest.mark.parametrize("model,kept", [(LSTMTextClassifier, "emb.weight"), (TiedLM, "wte.weight")])
def test_certify_token_models_never_touch_the_embedding(model, kept, tmp_path):
    """Token ids (int64) end to end: the LSTM's weights and the tied model's middle layer are pruned, the
    embedding (and the head tied to it) never."""
    torch.manual_seed(0)
    vocab = 50 if model is LSTMTextClassifier else 40
    path = tmp_path / "model.pt"
    _export(model(), (torch.randint(0, vocab, (2, 7)),), "script").save(str(path))
    np.savez(tmp_path / "tokens.npz", x=np.random.default_rng(0).integers(0, vocab, size=(300, 7)).astype(np.int64))
    out = tmp_path / "pruned.pt"
    cfg = {"risk": "disagreement", "epsilon": 0.25, "delta": 0.2, "sparsities": [0.0, 0.01, 0.02, 0.05]}
    r = certify(path, tmp_path / "tokens.npz", cfg, out=out).result
    pw = r["prunable_weights"]
    assert kept in pw["not_candidates"] and pw["of_count"] == pw["count"] + 1
    assert r["certified"]
    pruned = torch.jit.load(str(out))
    dense = torch.jit.load(str(path))
    assert torch.equal(getattr(pruned, kept.split(".")[0]).weight, getattr(dense, kept.split(".")[0]).weight)
    zeros, total = _zeros(pruned)
    assert zeros == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * total + 0.5)) > 0
