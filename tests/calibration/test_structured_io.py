"""Token-id inputs, several named inputs, tuple/dict outputs (issue 13, items 1–2).

Every model here is built with random weights in the test, scripted or traced; each test fails on the
code before integer inputs stayed int64, before named arrays fed several forward arguments, and before
tuple/dict outputs were accepted.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration import certify
from calibration.data import load_calibration
from calibration.errors import ConfigError, DataError, ModelError
from calibration.config import validate_config

VOCAB, T, N, CLASSES = 50, 12, 96, 4
CFG = {"sparsities": [0.1, 0.3], "epsilon": 0.3, "delta": 0.2, "batch_size": 32, "device": "cpu"}


def _ids(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, T)).astype(np.int64)


def _mask(n: int = N, seed: int = 1) -> np.ndarray:
    lengths = np.random.default_rng(seed).integers(3, T + 1, size=n)
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)


def _save(model: nn.Module, path, example, *, script: bool, strict: bool = True):
    torch.manual_seed(0)
    model.eval()
    m = torch.jit.script(model) if script else torch.jit.trace(model, example, strict=strict)
    torch.jit.save(m, str(path))
    return path


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.head(h[:, -1])


class MeanPool(nn.Module):
    """Two inputs: token ids and an attention mask (mean over the unmasked positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, CLASSES)
        self.aux = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(self.emb(input_ids))).mean(1)
        return self.head(h), self.aux(h)


class DictOut(TupleOut):
    def forward(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        h = torch.relu(self.fc(self.emb(input_ids))).mean(1)
        return {"hidden": h, "logits": self.head(h), "aux_logits": self.aux(h)}


@pytest.mark.parametrize("script", [True, False], ids=["scripted", "traced"])
def test_token_ids_stay_int64_for_an_lstm_classifier(tmp_path, script):
    ids = _ids()
    model = _save(LSTMClassifier(), tmp_path / "m.pt", torch.from_numpy(ids[:2]), script=script)
    np.savez(tmp_path / "d.npz", x=ids)
    assert load_calibration(tmp_path / "d.npz").x.dtype == np.int64
    cert = certify(model, tmp_path / "d.npz", CFG, out=tmp_path / "o.pt")
    assert cert.result["risk"] == "disagreement"
    pruned = torch.jit.load(str(tmp_path / "o.pt"))
    assert pruned(torch.from_numpy(ids[:3])).shape == (3, CLASSES)


@pytest.mark.parametrize("script", [True, False], ids=["scripted", "traced"])
def test_two_inputs_from_named_arrays(tmp_path, script):
    ids, mask = _ids(), _mask()
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    model = _save(MeanPool(), tmp_path / "m.pt", example, script=script)
    y = np.random.default_rng(2).integers(0, CLASSES, N)
    # Saved in the other order: matched to the forward signature by name, not by file order.
    np.savez(tmp_path / "d.npz", attention_mask=mask, input_ids=ids, y=y)
    cert = certify(model, tmp_path / "d.npz", {**CFG, "criterion": ["obd"], "tune_fraction": 0.25},
                   out=tmp_path / "o.pt")
    assert cert.result["risk"] == "accuracy_drop"
    pruned = torch.jit.load(str(tmp_path / "o.pt"))
    assert pruned(*example).shape == (2, CLASSES)
    # Slicing keeps rows aligned: the dense accuracy equals the one computed by hand on D_cal.
    dense = torch.jit.load(str(model))
    with torch.no_grad():
        preds = dense(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(1).numpy()
    from calibration.data import split_tune_cal
    split = split_tune_cal(N, 0.25, 0)
    assert cert.result["dense_accuracy"] == pytest.approx(float(np.mean(preds[split.cal] == y[split.cal])))


@pytest.mark.parametrize("kind", ["tuple_scripted", "tuple_traced", "dict_scripted", "dict_traced"])
def test_tuple_and_dict_outputs(tmp_path, kind):
    ids = _ids()
    cls = TupleOut if kind.startswith("tuple") else DictOut
    model = _save(cls(), tmp_path / "m.pt", torch.from_numpy(ids[:2]), script=kind.endswith("scripted"),
                  strict=False)
    np.savez(tmp_path / "d.npz", input_ids=ids)
    cert = certify(model, tmp_path / "d.npz", CFG, out=tmp_path / "o.pt")
    assert cert.result["certified"] in (True, False)
    out = torch.jit.load(str(tmp_path / "o.pt"))(torch.from_numpy(ids[:2]))
    assert isinstance(out, tuple if kind.startswith("tuple") else dict)


def test_output_selects_another_entry(tmp_path):
    ids = _ids()
    x = torch.from_numpy(ids[:2])
    tuple_model = _save(TupleOut(), tmp_path / "t.pt", x, script=True)
    dict_model = _save(DictOut(), tmp_path / "d.pt", x, script=True)
    y = np.random.default_rng(3).integers(0, 3, N)  # 3 classes: only the auxiliary head has them
    np.savez(tmp_path / "d.npz", x=ids, y=y)
    c1 = certify(tuple_model, tmp_path / "d.npz", {**CFG, "output": 1})
    c2 = certify(dict_model, tmp_path / "d.npz", {**CFG, "output": "aux_logits"})
    with torch.no_grad():
        aux = torch.jit.load(str(tuple_model))(torch.from_numpy(ids))[1].argmax(1).numpy()
    from calibration.data import split_tune_cal
    cal = split_tune_cal(N, 0.0, 0).cal
    assert c1.result["dense_accuracy"] == pytest.approx(float(np.mean(aux[cal] == y[cal])))
    assert c2.result["dense_accuracy"] == pytest.approx(c1.result["dense_accuracy"])


def test_output_that_is_not_logits_is_refused(tmp_path):
    ids = _ids()

    class Odd(TupleOut):
        def forward(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
            h = torch.relu(self.fc(self.emb(input_ids))).mean(1)
            return {"ids": input_ids, "scores": self.head(h).sum(1)}

    model = _save(Odd(), tmp_path / "m.pt", None, script=True)
    np.savez(tmp_path / "d.npz", x=ids)
    with pytest.raises(ModelError) as info:
        certify(model, tmp_path / "d.npz", CFG)  # no 'logits' key
    assert info.value.code == "model_bad_output"
    assert "'ids': Tensor[32, 12] int64" in str(info.value) and "'scores'" in str(info.value)
    with pytest.raises(ModelError) as info:
        certify(model, tmp_path / "d.npz", {**CFG, "output": "scores"})  # (N,) is not (N, classes)
    assert info.value.code == "model_bad_output"
    with pytest.raises(ModelError) as info:
        certify(model, tmp_path / "d.npz", {**CFG, "output": 0})  # an index into a dict
    assert info.value.code == "model_bad_output" and "index" in str(info.value)


def test_tuple_index_out_of_range_and_no_tensor(tmp_path):
    ids = _ids()
    model = _save(TupleOut(), tmp_path / "m.pt", None, script=True)
    np.savez(tmp_path / "d.npz", x=ids)
    with pytest.raises(ModelError) as info:
        certify(model, tmp_path / "d.npz", {**CFG, "output": 5})
    assert info.value.code == "model_bad_output"
    assert "tuple of 2 [Tensor[32, 4] float32, Tensor[32, 3] float32]" in str(info.value)


@pytest.mark.parametrize("arrays, code, words", [
    ({"input_ids": "ids"}, "data_missing_inputs", "attention_mask"),
    ({"x": "ids"}, "data_missing_inputs", "2 inputs"),
    ({"input_ids": "ids", "attention_mask": "mask", "token_type_ids": "mask"}, "data_unexpected_arrays",
     "token_type_ids"),
    ({"x": "ids", "attention_mask": "mask"}, "data_unexpected_arrays", "'x'"),
    ({"input_ids": "ids", "attention_mask": "short"}, "data_length_mismatch", "same first dimension"),
    ({"input_ids": "float_ids", "attention_mask": "mask"}, "model_forward_failed", "float32"),
])
def test_bad_input_combinations(tmp_path, arrays, code, words):
    ids, mask = _ids(), _mask()
    pool = {"ids": ids, "mask": mask, "short": mask[:-1], "float_ids": ids.astype(np.float32) + 0.5}
    model = _save(MeanPool(), tmp_path / "m.pt", None, script=True)
    np.savez(tmp_path / "d.npz", **{k: pool[v] for k, v in arrays.items()})
    with pytest.raises((DataError, ModelError)) as info:
        certify(model, tmp_path / "d.npz", CFG)
    assert info.value.code == code, str(info.value)
    assert words in str(info.value)


def test_x_as_a_named_argument_and_bad_names(tmp_path):
    """``forward(self, x, mask)`` takes arrays x and mask; an extra array is refused, naming it."""

    class XMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.head((self.emb(x) * mask.unsqueeze(-1).float()).mean(1))

    model = _save(XMask(), tmp_path / "m.pt", None, script=True)
    np.savez(tmp_path / "a.npz", x=_ids(), mask=_mask())
    assert certify(model, tmp_path / "a.npz", CFG).result["n_calibration"] == N
    np.savez(tmp_path / "c.npz", x=_ids(), mask=_mask(), secret=_mask())
    with pytest.raises(DataError) as info:
        certify(model, tmp_path / "c.npz", CFG)
    assert info.value.code == "data_unexpected_arrays" and "'secret'" in str(info.value)
    np.savez(tmp_path / "b.npz", **{"input ids": _ids()})
    with pytest.raises(DataError) as info:
        load_calibration(tmp_path / "b.npz")
    assert info.value.code == "data_unexpected_arrays"


def test_output_config_is_validated():
    assert validate_config({"output": 1}).output == 1
    assert validate_config({"output": "logits"}).output == "logits"
    for bad in (True, 1.5, "", ["logits"], 1000):
        with pytest.raises(ConfigError) as info:
            validate_config({"output": bad})
        assert "'output'" in str(info.value)


def test_reconstruction_and_criteria_probe_every_input(tmp_path):
    """The graph probe (reconstruction) and the D_tune criteria run the model on all of its inputs."""
    ids, mask = _ids(), _mask()
    model = _save(MeanPool(), tmp_path / "m.pt", (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
                  script=False)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    cert = certify(model, tmp_path / "d.npz", {**CFG, "criterion": ["mu"], "mu_steps": 2, "reconstruct": True,
                                               "tune_fraction": 0.25})
    assert cert.result["reconstruction"]["reconstructed_layers"] == 2, cert.result["reconstruction"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_inputs_on_cuda_with_graphs(tmp_path, precision):
    """On the GPU, integer inputs are never rounded to bf16 and the CUDA graph copies every input."""
    from calibration.fast_eval import Predictor
    from calibration.inputs import ModelInputs

    ids, mask = _ids(), _mask()
    model = torch.jit.script(MeanPool().eval()).cuda()
    x = ModelInputs(["input_ids", "attention_mask"], [torch.from_numpy(ids), torch.from_numpy(mask)])
    with Predictor(model, 32, device="cuda", precision=precision) as p:
        p.decide_resident(x, None)
        xr = p.resident(x).to("cuda")
        assert [t.dtype for t in xr.tensors] == [torch.int64, torch.int64]
        preds = p.predict(xr)
        assert p.graph_replays > 0, p.graph_error
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ref = model(*[t.cuda() for t in x.tensors]).argmax(1)
    assert torch.equal(preds, ref)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    torch.jit.save(torch.jit.script(MeanPool().eval()), str(tmp_path / "m.pt"))
    cert = certify(tmp_path / "m.pt", tmp_path / "d.npz", {**CFG, "device": "cuda", "precision": precision})
    assert cert.result["certified"] in (True, False)


def test_cli_output_flag():
    from service.cli.offline import certify_config, parse_certify

    def parse(*extra):
        return certify_config(parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", *extra]))

    assert parse("--output", "1")["output"] == 1
    assert parse("--output", "-1")["output"] == -1
    assert parse("--output", "aux_logits")["output"] == "aux_logits"
    assert "output" not in parse()
    assert validate_config(parse("--output", "2")).output == 2
