"""Real Hugging Face models built from configs (random weights, no download), traced (issue 13).

A tiny BERT classifier (dict and tuple outputs, two int64 inputs), a tiny Llama causal LM (logits
(N, T, V), padded sequences) and a tiny GPT-2 (``Conv1D`` matrices, ``lm_head`` tied to the token
embedding): the discovered weights are exactly the expected list, each certifies end to end, the
artifact reloads with the same ``forward.schema``, its zero count equals the reported sparsity, and
the certified level's empirical risk is recomputed here from the artifact (masked positions only).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from calibration import certify  # noqa: E402
from calibration.discovery import discover  # noqa: E402

pytestmark = pytest.mark.timeout(120)

VOCAB, T, N, LAYERS = 100, 12, 200, 2


def _config(kind: str, return_dict: bool = True):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, intermediate_size=64,
                  max_position_embeddings=64, return_dict=return_dict)
    if kind == "bert":
        return transformers.BertConfig(num_attention_heads=2, num_labels=3, **common)
    if kind == "llama":
        return transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, use_cache=False, **common)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64,
                                       use_cache=False, return_dict=return_dict)
    raise ValueError(kind)


_CLASSES = {"bert": "BertForSequenceClassification", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _data(seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (n, T)).astype(np.int64)
    mask = (np.arange(T)[None] < rng.integers(T // 3, T + 1, n)[:, None]).astype(np.int64)  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _trace(kind: str, path: Path, *, return_dict: bool = True) -> torch.nn.Module:
    """Build from the config, trace by argument name (as HF forwards put other arguments in between), save."""
    torch.manual_seed(0)
    eager = getattr(transformers, _CLASSES[kind])(_config(kind, return_dict)).eval()
    d = _data(seed=99, n=2)
    example = {k: torch.from_numpy(v) for k, v in d.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager, example_kwarg_inputs=example, strict=False)
    torch.jit.save(traced, str(path))
    return eager


def _expected(kind: str) -> list[str]:
    """Every matrix that multiplies an input, written out by hand (not derived from the product's rules)."""
    names: list[str] = []
    for i in range(LAYERS):
        if kind == "bert":
            p = f"bert.encoder.layer.{i}."
            names += [p + "attention.self.query.weight", p + "attention.self.key.weight",
                      p + "attention.self.value.weight", p + "attention.output.dense.weight",
                      p + "intermediate.dense.weight", p + "output.dense.weight"]
        elif kind == "llama":
            p = f"model.layers.{i}."
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:  # GPT-2: Conv1D (x @ W + b), one fused q/k/v matrix
            p = f"transformer.h.{i}."
            names += [p + "attn.c_attn.weight", p + "attn.c_proj.weight", p + "mlp.c_fc.weight",
                      p + "mlp.c_proj.weight"]
    if kind == "bert":
        names += ["bert.pooler.dense.weight", "classifier.weight"]
    if kind == "llama":
        names += ["lm_head.weight"]  # Llama's head is not tied to the embedding by default
    return names


_NOT_CANDIDATES = {
    "bert": {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
             "bert.embeddings.token_type_embeddings.weight"},
    "llama": {"model.embed_tokens.weight"},
    "gpt2": {"transformer.wte.weight", "transformer.wpe.weight"},
}


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_discovered_weights_are_exactly_the_projections(tmp_path: Path, kind: str) -> None:
    eager = _trace(kind, tmp_path / "m.pt")
    d = discover(torch.jit.load(str(tmp_path / "m.pt")))
    assert [w.name for w in d.weights] == _expected(kind)
    assert set(d.not_candidates) == _NOT_CANDIDATES[kind], d.not_candidates
    assert all("embedding" in d.not_candidates[n] for n in _NOT_CANDIDATES[kind])
    # Every ≥ 2-d parameter of the eager model is accounted for: a candidate or a stated non-candidate.
    eager_matrices = {n for n, p in eager.named_parameters() if p.dim() >= 2}  # tied names once
    assert set(d.matrices) == eager_matrices
    if kind == "gpt2":  # the head is the token embedding: one tied group, never pruned through the head
        assert d.tied == {"transformer.wte.weight": ["lm_head.weight"]}
        assert {w.kind for w in d.weights} == {"matmul"}
    else:
        assert d.tied == {}


def _zeros(module: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(module.named_parameters())
    return sum(int((params[n] == 0).sum()) for n in names), sum(params[n].numel() for n in names)


def _check_artifact(model: Path, artifact: Path, result: dict, data: dict[str, np.ndarray]):
    dense, pruned = torch.jit.load(str(model)), torch.jit.load(str(artifact))
    assert str(pruned.forward.schema) == str(dense.forward.schema)  # same input names and output type
    names = result["prunable_weights"]["names"]
    zeros, total = _zeros(pruned, names)
    assert zeros == result["zeroed_parameters"]
    assert abs(zeros - round(result["certified_sparsity"] * total)) <= len(names)  # ties: ≤ 1 weight per layer
    assert _zeros(dense, names)[0] == 0
    # Nothing outside the candidates changed (embeddings, norms, biases).
    dp = dict(dense.named_parameters())
    for n, p in pruned.named_parameters():
        if n not in names:
            assert torch.equal(p, dp[n]), n
    batch = [torch.from_numpy(data[k][:4]) for k in ("input_ids", "attention_mask")]
    with torch.no_grad():
        return dense(*batch), pruned(*batch), dense, pruned


@pytest.mark.parametrize("return_dict", [True, False], ids=["dict", "tuple"])
def test_bert_classifier_certifies_end_to_end(tmp_path: Path, return_dict: bool) -> None:
    _trace("bert", tmp_path / "m.pt", return_dict=return_dict)
    data = _data()
    np.savez(tmp_path / "d.npz", **data)
    cfg = {"risk": "disagreement", "epsilon": 0.25, "delta": 0.1, "sparsities": [0.1, 0.2, 0.3, 0.5]}
    cert = certify(tmp_path / "m.pt", tmp_path / "d.npz", cfg, out=tmp_path / "pruned.pt")
    r = cert.result
    assert r["certified"] and r["certified_sparsity"] > 0, r["levels"]
    assert r["prunable_weights"]["names"] == _expected("bert")
    assert "candidates: 14 of the model's 17 weight matrices" in r["guarantee"]
    d_out, p_out, *_ = _check_artifact(tmp_path / "m.pt", tmp_path / "pruned.pt", r, data)
    if return_dict:
        assert set(p_out) == set(d_out) == {"logits"} and tuple(p_out["logits"].shape) == (4, 3)
    else:
        assert isinstance(p_out, tuple) and tuple(p_out[0].shape) == (4, 3)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_certifies_with_token_disagreement(tmp_path: Path, kind: str) -> None:
    _trace(kind, tmp_path / "m.pt")
    data = _data()
    np.savez(tmp_path / "d.npz", **data)
    cfg = {"risk": "token_disagreement", "epsilon": 0.25, "delta": 0.1, "sparsities": [0.1, 0.2, 0.3, 0.5]}
    cert = certify(tmp_path / "m.pt", tmp_path / "d.npz", cfg, out=tmp_path / "pruned.pt")
    r = cert.result
    assert r["risk"] == "token_disagreement" and r["bound"] == "wsr" and r["n_calibration"] == N
    assert r["certified"] and r["certified_sparsity"] > 0, r["levels"]
    assert "Waudby-Smith" in r["guarantee"]
    assert r["prunable_weights"]["names"] == _expected(kind)
    d_out, p_out, dense, pruned = _check_artifact(tmp_path / "m.pt", tmp_path / "pruned.pt", r, data)
    assert set(p_out) == {"logits"} and tuple(p_out["logits"].shape) == (4, T, VOCAB)
    if kind == "gpt2":  # the tied embedding is untouched: pruning the head would have zeroed it
        assert int((pruned.transformer.wte.weight == 0).sum()) == 0
    # The certified level's empirical risk, recomputed from the artifact: per sequence, the fraction of its
    # attended positions whose top-1 token differs from the dense model's (padding never counts).
    ids, mask = (torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        top_d = dense(ids, mask)["logits"].argmax(-1).numpy()
        top_p = pruned(ids, mask)["logits"].argmax(-1).numpy()
    on = data["attention_mask"] != 0
    masked = float(np.mean(((top_d != top_p) & on).sum(1) / on.sum(1)))
    unmasked = float(np.mean((top_d != top_p).mean(1)))
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"])
    assert level["empirical_risk"] == pytest.approx(masked, abs=1e-12)
    assert abs(masked - unmasked) > 1e-6  # the check can tell masked from unmasked counting


def test_lm_labels_with_minus_100_and_token_accuracy_drop(tmp_path: Path) -> None:
    """Next-token labels (shifted by the user, −100 on padding and the last position) on a real Llama."""
    _trace("llama", tmp_path / "m.pt")
    data = _data()
    y = np.roll(data["input_ids"], -1, axis=1)
    y[:, -1] = -100
    y[data["attention_mask"] == 0] = -100
    np.savez(tmp_path / "d.npz", **data, y=y)
    cfg = {"risk": "token_accuracy_drop", "epsilon": 0.2, "delta": 0.1, "sparsities": [0.1, 0.3]}
    r = certify(tmp_path / "m.pt", tmp_path / "d.npz", cfg, out=tmp_path / "pruned.pt").result
    assert r["risk"] == "token_accuracy_drop" and r["dense_accuracy"] is not None
    with torch.no_grad():
        top = torch.jit.load(str(tmp_path / "m.pt"))(*(torch.from_numpy(data[k]) for k in ("input_ids",
                                                                                        "attention_mask")))
    top = top["logits"].argmax(-1).numpy()
    valid = y != -100
    assert r["dense_accuracy"] == pytest.approx(float(((top == y) & valid).sum() / valid.sum()))


def test_sequence_mask_is_the_decoders_for_an_encoder_decoder() -> None:
    from calibration.risks import sequence_mask_name

    assert sequence_mask_name(["input_ids", "attention_mask"]) == "attention_mask"
    assert sequence_mask_name(["input_ids", "attention_mask", "decoder_input_ids",
                               "decoder_attention_mask"]) == "decoder_attention_mask"
    assert sequence_mask_name(["input_ids"]) is None


def test_encoder_decoder_lm_counts_the_decoders_positions(tmp_path: Path) -> None:
    """T5 (encoder 12 tokens, decoder 8): the logits are over the decoder's positions, so its mask counts."""
    torch.manual_seed(0)
    eager = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2, use_cache=False)).eval()
    rng = np.random.default_rng(0)
    data = _data()
    t_dec = 8
    data["decoder_input_ids"] = rng.integers(3, VOCAB, (N, t_dec)).astype(np.int64)
    data["decoder_attention_mask"] = (np.arange(t_dec)[None] < rng.integers(2, t_dec + 1, N)[:, None]).astype(np.int64)
    example = {k: torch.from_numpy(v[:2]) for k, v in data.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(eager, example_kwarg_inputs=example, strict=False), str(tmp_path / "m.pt"))
    np.savez(tmp_path / "d.npz", **data)
    cfg = {"risk": "token_disagreement", "epsilon": 0.25, "delta": 0.1, "sparsities": [0.1, 0.3]}
    r = certify(tmp_path / "m.pt", tmp_path / "d.npz", cfg, out=tmp_path / "pruned.pt").result
    dense, pruned = torch.jit.load(str(tmp_path / "m.pt")), torch.jit.load(str(tmp_path / "pruned.pt"))
    args = [torch.from_numpy(data[k]) for k in example]
    with torch.no_grad():
        top_d, top_p = (m(*args)["logits"].argmax(-1).numpy() for m in (dense, pruned))
    on = data["decoder_attention_mask"] != 0
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"])
    assert r["certified_sparsity"] > 0
    assert level["empirical_risk"] == pytest.approx(float(np.mean(((top_d != top_p) & on).sum(1) / on.sum(1))))
