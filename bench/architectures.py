"""Real architectures, random weights, small dimensions: do they load, are their weights found, do they
certify, does the artifact round-trip? (issue 13, the architecture table)

Hugging Face ``transformers`` models are built from configs (no download); the local ``torch.nn``
models stand in for torchvision/timm-style layers (timm needs torchvision, whose PyPI wheel is a CUDA
build). Every model is saved as TorchScript — traced (HF: dict output, and ``return_dict=False``
tuple output) and scripted where TorchScript can compile it — and goes through ``calibration.certify``.

Columns:
- ``loads``: ``torch.jit.load`` and a dense forward on the calibration inputs; else the error code.
- ``weights found / expected``: the discovered candidates against a count made here from the *eager*
  model: the weight of every Linear / Conv / ConvTranspose (and subclasses) / HF ``Conv1D``, attention
  ``in_proj_weight`` (or q/k/v), RNN ``weight_ih``/``weight_hh``; not embeddings nor anything tied
  to one. ``+k`` = discovered but not expected; ``-k`` = expected but missed.
- ``certifies``: the certified sparsity (ε = 0.2, δ = 0.1, magnitude, a 5-level grid), or the error code.
- ``round-trip``: the artifact reloads with ``torch.jit.load``, has the same ``forward.schema``, gives an
  output of the same structure, and its zero count in the candidate weights equals ``zeroed_parameters``
  and the certified sparsity (within one weight per layer).
- ``s``: seconds of ``certify`` (the model built and saved before).
- ``reconstructed``: the same job with ``reconstruct: true`` (tune fraction 0.25): layers really re-fitted
  of the candidates, and the sparsity then certified (on a smaller D_cal).

Run: ``python bench/architectures.py [--only NAME ...] [--n 300]``; writes bench/results/architectures_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, T, IMG = 100, 16, 32
DEVICE = "cpu"  # where the jobs run (--device); the models are built and saved on the CPU
EPSILON, DELTA, GRID = 0.2, 0.1, [0.1, 0.2, 0.3, 0.5, 0.7]


# ----------------------------------------------------------------------------------------------- local models

class LSTMClassifier(nn.Module):
    def __init__(self, cls: type = nn.LSTM) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.rnn = cls(32, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(input_ids))
        return self.head(out[:, -1])


class GRUClassifier(LSTMClassifier):
    def __init__(self) -> None:
        super().__init__(nn.GRU)


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(input_ids)).mean(1))


class MHAClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class DepthwiseSeparableCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        for cin, cout in ((16, 32), (32, 64)):
            blocks += [nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                       nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: a Conv2d subclass that pads itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, [1, 1, 1, 1])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a BatchNorm2d subclass with its activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                   False, 0.0, self.eps))


class TimmStyleCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2)
        self.bn1 = BatchNormAct2d(16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = BatchNormAct2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv(self.bn1(self.stem(x))))
        return self.head(h.mean((2, 3)))


# ----------------------------------------------------------------------------------------------- HF models

def _hf(cls_name: str, cfg_name: str, **kw: Any) -> Callable[[bool], nn.Module]:
    def build(return_dict: bool) -> nn.Module:
        import transformers

        cfg = getattr(transformers, cfg_name)(return_dict=return_dict, **kw)
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
        return getattr(transformers, cls_name)(cfg)
    return build


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)
_LLM = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64)


@dataclass
class Arch:
    name: str
    build: Callable[..., nn.Module]
    inputs: tuple[str, ...]  # the forward arguments the data gives (the trace example, in order)
    risk: str = "disagreement"
    hf: bool = False
    modes: tuple[str, ...] = ("script", "trace")
    note: str = ""
    input_kind: str = "tokens"  # tokens | image
    eos_last: bool = False  # BART: every row ends with one eos token
    full_mask: bool = False
    decoder: int = 0  # an encoder-decoder: decoder_input_ids / decoder_attention_mask of this many positions


def _torchvision(fn: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, fn)(**kw)
    return build


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)
    return build


def vision_library_architectures() -> list[Arch]:
    """torchvision and timm models, where those libraries are installed (the H200 image has both; here the
    PyPI torchvision wheel is a CUDA build, so neither is a dependency)."""
    import importlib.util

    archs: list[Arch] = []
    if importlib.util.find_spec("torchvision") is not None:
        archs += [
            Arch("torchvision VisionTransformer (2 layers, 32 wide)", _torchvision(
                "VisionTransformer", image_size=IMG, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                mlp_dim=64, num_classes=10), ("x",), input_kind="image"),
            Arch("torchvision resnet18", _torchvision("resnet18", num_classes=10), ("x",), input_kind="image"),
            Arch("torchvision mobilenet_v3_small", _torchvision("mobilenet_v3_small", num_classes=10), ("x",),
                 input_kind="image"),
            Arch("torchvision efficientnet_b0", _torchvision("efficientnet_b0", num_classes=10), ("x",),
                 input_kind="image"),
            Arch("torchvision convnext_tiny", _torchvision("convnext_tiny", num_classes=10), ("x",),
                 input_kind="image"),
        ]
    if importlib.util.find_spec("timm") is not None:
        archs += [
            Arch("timm tf_efficientnet_b0 (Conv2dSame, BatchNormAct2d)", _timm("tf_efficientnet_b0", num_classes=10),
                 ("x",), input_kind="image"),
            Arch("timm efficientnet_b0 (BatchNormAct2d)", _timm("efficientnet_b0", num_classes=10), ("x",),
                 input_kind="image"),
            Arch("timm vit_tiny (2 blocks, 32×32)", _timm("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2,
                                                          num_classes=10), ("x",), input_kind="image"),
            Arch("timm convnext_atto", _timm("convnext_atto", num_classes=10), ("x",), input_kind="image"),
            Arch("timm resnet18", _timm("resnet18", num_classes=10), ("x",), input_kind="image"),
        ]
    return archs


def architectures() -> list[Arch]:
    hf_modes = ("script", "trace", "trace_tuple")
    return [
        Arch("HF BertForSequenceClassification", _hf("BertForSequenceClassification", "BertConfig", num_labels=3,
             **_TEXT), ("input_ids", "attention_mask"), hf=True, modes=hf_modes),
        Arch("HF DistilBertForSequenceClassification", _hf(
            "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
            hidden_dim=64, max_position_embeddings=64, num_labels=3), ("input_ids", "attention_mask"), hf=True,
             modes=hf_modes),
        Arch("HF RobertaForSequenceClassification", _hf("RobertaForSequenceClassification", "RobertaConfig",
             num_labels=3, **{**_TEXT, "max_position_embeddings": 64 + 2}), ("input_ids", "attention_mask"), hf=True,
             modes=hf_modes),
        Arch("HF AlbertForSequenceClassification", _hf("AlbertForSequenceClassification", "AlbertConfig",
             embedding_size=16, num_labels=3, **_TEXT), ("input_ids", "attention_mask"), hf=True, modes=hf_modes),
        Arch("HF ElectraForSequenceClassification", _hf("ElectraForSequenceClassification", "ElectraConfig",
             embedding_size=16, num_labels=3, **_TEXT), ("input_ids", "attention_mask"), hf=True, modes=hf_modes),
        Arch("HF BartForSequenceClassification", _hf(
            "BartForSequenceClassification", "BartConfig", vocab_size=VOCAB, d_model=32, encoder_layers=2,
            decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, num_labels=3), ("input_ids", "attention_mask"), hf=True,
             modes=hf_modes, eos_last=True, full_mask=True),
        Arch("HF T5ForTokenClassification", _hf(
            "T5ForTokenClassification", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
            num_heads=2, num_labels=5), ("input_ids", "attention_mask"), risk="token_disagreement", hf=True,
             modes=hf_modes),
        Arch("HF T5ForConditionalGeneration (encoder 16, decoder 8 tokens)", _hf(
            "T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
            num_heads=2), ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
             risk="token_disagreement", hf=True, modes=("trace",), decoder=8),
        Arch("HF GPT2LMHeadModel", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2,
             n_head=2, n_positions=64), ("input_ids", "attention_mask"), risk="token_disagreement", hf=True,
             modes=hf_modes),
        Arch("HF LlamaForCausalLM", _hf("LlamaForCausalLM", "LlamaConfig", **_LLM), ("input_ids", "attention_mask"),
             risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF MistralForCausalLM", _hf("MistralForCausalLM", "MistralConfig", **_LLM),
             ("input_ids", "attention_mask"), risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF Qwen2ForCausalLM", _hf("Qwen2ForCausalLM", "Qwen2Config", **_LLM), ("input_ids", "attention_mask"),
             risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF GemmaForCausalLM", _hf("GemmaForCausalLM", "GemmaConfig", head_dim=8, **_LLM),
             ("input_ids", "attention_mask"), risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF PhiForCausalLM", _hf("PhiForCausalLM", "PhiConfig", **_LLM), ("input_ids", "attention_mask"),
             risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF GPTNeoXForCausalLM", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
             ("input_ids", "attention_mask"), risk="token_disagreement", hf=True, modes=hf_modes),
        Arch("HF OPTForCausalLM", _hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32,
             num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
             max_position_embeddings=64), ("input_ids", "attention_mask"), risk="token_disagreement", hf=True,
             modes=hf_modes),
        Arch("HF ViTForImageClassification", _hf("ViTForImageClassification", "ViTConfig", image_size=IMG,
             patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             num_labels=10), ("x",), hf=True, modes=hf_modes, input_kind="image"),
        Arch("HF ResNetForImageClassification", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
             hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10), ("x",), hf=True,
             modes=hf_modes, input_kind="image"),
        Arch("HF ConvNextForImageClassification", _hf("ConvNextForImageClassification", "ConvNextConfig",
             num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10), ("x",), hf=True, modes=hf_modes,
             input_kind="image"),
        Arch("HF SwinForImageClassification", _hf("SwinForImageClassification", "SwinConfig", image_size=IMG,
             patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=10), ("x",),
             hf=True, modes=hf_modes, input_kind="image"),
        *vision_library_architectures(),
        Arch("LSTM text classifier", LSTMClassifier, ("input_ids",)),
        Arch("GRU text classifier", GRUClassifier, ("input_ids",)),
        Arch("nn.TransformerEncoder classifier", EncoderClassifier, ("input_ids",)),
        Arch("nn.MultiheadAttention classifier", MHAClassifier, ("input_ids",)),
        Arch("CNN with BatchNorm", BNCNN, ("x",), input_kind="image"),
        Arch("depthwise-separable CNN", DepthwiseSeparableCNN, ("x",), input_kind="image"),
        Arch("timm-style Conv2dSame + BatchNormAct2d", TimmStyleCNN, ("x",), input_kind="image"),
    ]


# ----------------------------------------------------------------------------------------------- helpers

def expected_weights(model: nn.Module) -> list[str]:
    """The weight matrices that multiply an input, counted from the eager model's module types (see the docstring)."""
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    seen: set[int] = set()
    names: list[str] = []
    for path, mod in model.named_modules():
        own: list[str] = []
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or type(mod).__name__ == "Conv1D":
            own = ["weight"]
        elif isinstance(mod, nn.MultiheadAttention):
            own = ["in_proj_weight"] if mod.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                               "v_proj_weight"]
        elif isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            own = [n for n, _ in mod.named_parameters(recurse=False) if n.startswith(("weight_ih", "weight_hh"))]
        for pname in own:
            p = getattr(mod, pname, None)
            if not isinstance(p, torch.Tensor) or p.dim() < 2:
                continue
            key = p.data_ptr()
            if key in embeddings or key in seen:
                continue
            seen.add(key)
            names.append(f"{path}.{pname}" if path else pname)
    return names


def make_data(arch: Arch, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if arch.input_kind == "image":
        return {"x": rng.standard_normal((n, 3, IMG, IMG)).astype(np.float32)}
    ids = rng.integers(3, VOCAB, (n, T)).astype(np.int64)
    if arch.eos_last:
        ids[:, -1] = 2  # BART's eos: one per row, the sentence representation
    mask = (np.arange(T)[None] < rng.integers(T // 2, T + 1, n)[:, None]).astype(np.int64)
    if arch.full_mask:
        mask[:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.decoder:
        out["decoder_input_ids"] = rng.integers(3, VOCAB, (n, arch.decoder)).astype(np.int64)
        out["decoder_attention_mask"] = (np.arange(arch.decoder)[None] <
                                         rng.integers(2, arch.decoder + 1, n)[:, None]).astype(np.int64)
    return {k: out[k] for k in arch.inputs}


def _short(exc: BaseException, limit: int = 90) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" + ("…" if len(text) > limit else "")


def _structure(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), str(v.dtype))
    if isinstance(v, dict):
        return {k: _structure(e) for k, e in v.items()}
    if isinstance(v, (tuple, list)):
        return tuple(_structure(e) for e in v)
    return type(v).__name__


@dataclass
class Row:
    name: str
    mode: str
    loads: str = ""
    found: str = ""
    certifies: str = ""
    round_trip: str = ""
    seconds: str = ""
    reconstructed: str = ""
    notes: list[str] = field(default_factory=list)

    def md(self) -> str:
        return (f"| {self.name} | {self.mode} | {self.loads} | {self.found} | {self.certifies} | {self.round_trip} "
                f"| {self.seconds} | {self.reconstructed} | {'; '.join(self.notes)} |")


def save_torchscript(arch: Arch, mode: str, path: Path, data: dict[str, np.ndarray], notes: list[str]) -> nn.Module:
    """Build the eager model, save it as TorchScript to ``path``; the eager model (for the expected weights)."""
    torch.manual_seed(0)
    example = {k: torch.from_numpy(data[k][:2]) for k in arch.inputs}
    if arch.hf:
        eager = arch.build(mode != "trace_tuple").eval()
        if mode == "trace_tuple":
            try:
                with torch.no_grad():
                    eager(*example.values())
            except Exception as exc:  # noqa: BLE001 - HF's own bug: the config's return_dict=False breaks forward
                notes.append(f"HF's config return_dict=False breaks its own eager forward ({type(exc).__name__}): "
                             "traced a wrapper calling forward(..., return_dict=False)")
                torch.manual_seed(0)
                eager = ReturnTuple(arch.build(True).eval(), arch.inputs).eval()
    else:
        eager = arch.build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "script":
            ts = torch.jit.script(eager)
        else:
            with torch.no_grad():
                if arch.inputs == ("x",) or not arch.hf:  # positional: the image tensor, local models
                    ts = torch.jit.trace(eager, tuple(example.values()), strict=False, check_trace=False)
                else:  # by name, as HF forwards take other arguments in between (GPT-2: past_key_values 2nd)
                    ts = torch.jit.trace(eager, example_kwarg_inputs=example, strict=False, check_trace=False)
    torch.jit.save(ts, str(path))
    return eager


class ReturnTuple(nn.Module):
    """``model(**inputs, return_dict=False)``: an HF model's tuple output where its config's flag is broken."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        if self.names == ("x",):  # an image model: its first argument is pixel_values
            return self.model(pixel_values=input_ids, return_dict=False)
        kw = {"input_ids": input_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return self.model(**kw, return_dict=False)


def run_one(arch: Arch, mode: str, n: int, work: Path) -> Row:
    from calibration import certify
    from calibration.errors import CalibrationError

    row = Row(arch.name, {"script": "scripted", "trace": "traced", "trace_tuple": "traced, tuple"}[mode])
    if not arch.hf and mode == "trace":
        row.mode = "traced"
    data = make_data(arch, n)
    model_path, data_path, out_path = work / "m.pt", work / "d.npz", work / "pruned.pt"
    for p in (model_path, out_path):
        p.unlink(missing_ok=True)
    np.savez(data_path, **data)
    try:
        eager = save_torchscript(arch, mode, model_path, data, row.notes)
    except Exception as exc:  # noqa: BLE001 - a model TorchScript cannot compile: recorded, not fatal
        row.loads = "–"
        if mode == "script" and arch.hf and "Failed to get source" in str(exc):
            row.notes.append("cannot script: TorchScript compiles the HF config's __init__ (no source): every HF "
                             "model fails so")
        else:
            row.notes.append(f"cannot {'script' if mode == 'script' else 'trace'}: {_short(exc)}")
        return row
    expected = expected_weights(eager)
    try:
        dense = torch.jit.load(str(model_path))
        batch = tuple(torch.from_numpy(data[k][:4]) for k in arch.inputs)
        with torch.no_grad():
            dense_out = dense(*batch)
            by_name = arch.hf and arch.inputs != ("x",) and not isinstance(eager, ReturnTuple)
            eager_out = eager(**dict(zip(arch.inputs, batch))) if by_name else eager(*batch)
        row.loads = "y"
        from calibration.inputs import select_output

        a, b = select_output(dense_out), select_output(eager_out)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            row.notes.append("the TorchScript file's output differs from the eager model's on the calibration rows "
                             "(a trace specialised to its example)")
    except Exception as exc:  # noqa: BLE001
        row.loads = f"n ({_short(exc, 60)})"
        return row
    cfg = {"risk": arch.risk, "epsilon": EPSILON, "delta": DELTA, "sparsities": GRID, "batch_size": 128,
           "device": DEVICE}
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = certify(model_path, data_path, cfg, out=out_path)
    except CalibrationError as exc:
        row.seconds = f"{time.perf_counter() - t:.1f}"
        row.certifies = f"n (`{exc.code}`)"
        row.notes.append(_short(exc, 160))
        if exc.code.startswith("model_"):
            row.loads = f"n (`{exc.code}`)"
        return row
    except Exception as exc:  # noqa: BLE001 - a crash is the product's fault: shown in full below the table
        row.seconds = f"{time.perf_counter() - t:.1f}"
        row.certifies = "crash"
        row.notes.append(_short(exc, 160))
        traceback.print_exc()
        return row
    row.seconds = f"{time.perf_counter() - t:.1f}"
    r = cert.result
    found = list(r["prunable_weights"]["names"])
    hit = [x for x in found if x in expected]
    extra = [x for x in found if x not in expected]
    missed = [x for x in expected if x not in found]
    row.found = f"{len(hit)} / {len(expected)}" + (f" (+{len(extra)})" if extra else "") + \
        (f" (−{len(missed)})" if missed else "")
    if missed:
        row.notes.append("missed: " + ", ".join(missed[:4]) + ("…" if len(missed) > 4 else ""))
    if extra:
        row.notes.append("extra: " + ", ".join(extra[:4]) + ("…" if len(extra) > 4 else ""))
    tied = r["prunable_weights"].get("tied") or {}
    if tied:
        row.notes.append("tied kept: " + ", ".join(f"{k}={'/'.join(v)}" for k, v in tied.items()))
    s = r["certified_sparsity"]
    row.certifies = f"{s:.2f}" + ("" if r["certified"] else " (not certified)")
    # Round trip.
    try:
        pruned = torch.jit.load(str(out_path))
        same_schema = str(pruned.forward.schema) == str(dense.forward.schema)
        with torch.no_grad():
            pruned_out = pruned(*batch)
        same_structure = _structure(pruned_out) == _structure(dense_out)
        params = dict(pruned.named_parameters())
        zeros = sum(int((params[nm] == 0).sum()) for nm in found)
        total = sum(params[nm].numel() for nm in found)
        target = round(s * total)
        zeros_ok = zeros == r["zeroed_parameters"] and abs(zeros - target) <= len(found)
        ok = same_schema and same_structure and zeros_ok
        row.round_trip = "y" if ok else "n"
        if not same_schema:
            row.notes.append(f"schema {pruned.forward.schema} ≠ {dense.forward.schema}")
        if not same_structure:
            row.notes.append("output structure differs")
        if not zeros_ok:
            row.notes.append(f"zeros {zeros} vs reported {r['zeroed_parameters']} vs {s:.2f}×{total}={target}")
    except Exception as exc:  # noqa: BLE001
        row.round_trip = f"n ({_short(exc, 60)})"
    if r.get("bn_recalibration") not in (None, "no_batchnorm"):
        row.notes.append(f"BN re-estimation {r['bn_recalibration']}")
    # The same job with weight reconstruction (OBS on D_tune): how many candidate layers were really re-fitted.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = certify(model_path, data_path, {**cfg, "reconstruct": True, "tune_fraction": 0.25}).result
        rec = rc.get("reconstruction") or {}
        row.reconstructed = (f"{rec.get('reconstructed_layers')} / {rec.get('of_layers')} "
                             f"→ {rc['certified_sparsity']:.2f}")
        reasons = sorted(set((rec.get("not_reconstructed") or {}).values()))
        if reasons:
            row.notes.append("not reconstructed: " + "; ".join(_short(Exception(x), 70).split(": ", 1)[1]
                                                               for x in reasons[:2]))
    except CalibrationError as exc:
        row.reconstructed = f"n (`{exc.code}`)"
        row.notes.append(_short(exc, 120))
    except Exception as exc:  # noqa: BLE001
        row.reconstructed = "crash"
        row.notes.append("reconstruct: " + _short(exc, 120))
        traceback.print_exc()
    return row


HEADER = ("| model | TorchScript | loads | weights found / expected | certifies (sparsity) | round-trip | s "
          "| reconstructed layers → sparsity | notes |\n"
          "|---|---|---|---|---|---|---|---|---|")


FINDINGS = """
Notes
- Every HF model fails `torch.jit.script` the same way (TorchScript tries to compile the config class's
  `__init__`): HF models reach certiprune as traces. Trace them by argument name
  (`torch.jit.trace(model, example_kwarg_inputs={"input_ids": ..., "attention_mask": ...}, strict=False)`):
  positional tracing feeds the mask to GPT-2's second argument, `past_key_values`.
- In transformers 5.x a config's `return_dict=False` breaks most models' own eager forward (the outer model
  reads `.last_hidden_state` from the inner one's tuple); BERT-family models, DistilBERT and HF ResNet are
  the exceptions. The tuple rows of the others trace a wrapper that calls `forward(..., return_dict=False)`.
- "tied kept": the embedding and the weights tied to it (GPT-2/Gemma/OPT heads, T5/BART shared tables) are
  one group, not a candidate, and the expected count excludes them too.
- Reconstruction: RNN weights and the fused fast path of `nn.TransformerEncoderLayer` / `nn.MultiheadAttention`
  (scripted: inside control flow; traced under no_grad: one fused op) are not reconstructed, and the result
  says so with the reason; HF layers are plain `linear`/`addmm` nodes and are all reconstructed.
- T5ForConditionalGeneration: the logits are over the decoder's 8 positions, so the sequence risk counts the
  positions of `decoder_attention_mask` (`calibration.risks.sequence_mask_name`), not the encoder's
  `attention_mask` (16); before that fix the job was refused (`data_bad_shape`), and with equal lengths it
  would have counted the wrong positions.
"""


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", help="substrings of architecture names")
    ap.add_argument("--n", type=int, default=300, help="calibration samples per model")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "architectures_cpu.md"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the jobs run")
    ap.add_argument("--write", action="store_true", help="write --out also with --only")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    archs = [a for a in architectures() if not args.only or any(s.lower() in a.name.lower() for s in args.only)]
    rows: list[Row] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            if arch.hf and hf_version is None:
                rows.append(Row(arch.name, "–", "–", notes=["transformers not installed"]))
                continue
            for mode in arch.modes:
                row = run_one(arch, mode, args.n, Path(tmp))
                rows.append(row)
                print(row.md(), flush=True)
    total = time.perf_counter() - t_all
    head = (f"# Architectures × certiprune (jobs on {DEVICE}, 1 thread)\n\n"
            f"torch {torch.__version__}, transformers {hf_version or 'not installed'}, "
            f"torchvision {_version('torchvision')}, timm {_version('timm')}; random weights; n = {args.n} "
            f"(T = {T} tokens, vocab {VOCAB}; images 3×{IMG}×{IMG}); magnitude, global; "
            f"ε = {EPSILON}, δ = {DELTA}, "
            f"grid {GRID}; risk `disagreement` for classifiers, `token_disagreement` for (N, T, V) outputs. "
            f"Total {total:.0f} s. Generated by `python bench/architectures.py`.\n\n")
    table = "\n".join([HEADER, *(r.md() for r in rows)])
    text = head + table + "\n" + FINDINGS
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not args.only or args.write:
        Path(args.out).write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
