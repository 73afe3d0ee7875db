"""torch.export ``.pt2`` archives beside TorchScript (issue 13, item 5).

Every model is built here with random weights and exported with ``torch.export``; hostile archives are
real ones rewritten entry by entry (a crafted ``model.json`` is what an attacker would write). Each test
fails on the code before ``.pt2`` was accepted ("not a TorchScript archive").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

from calibration import certify
from calibration.archive import check_archive
from calibration.errors import DataError, ModelError
from calibration.exported import is_exported
from calibration.model import discover_prunable, load_model, save_model
from calibration.pt2_archive import check_pt2, is_pt2
from calibration.signature import archive_forward_signature, match_inputs

CFG = {"sparsities": [0.02, 0.05, 0.1], "epsilon": 0.3, "delta": 0.2, "batch_size": 32, "device": "cpu"}
VOCAB, T = 40, 10


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(h.mean((2, 3)))


class TokenModel(nn.Module):
    """Two inputs (token ids, attention mask), a dict output with the logits and a hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        h = torch.tanh(self.proj(self.emb(input_ids))) * m
        pooled = h.sum(1) / m.sum(1).clamp(min=1.0)
        return {"hidden": h, "logits": self.head(pooled)}


def export(model: nn.Module, example: tuple, path: Path) -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model.eval(), example, dynamic_shapes=tuple({0: batch} for _ in example))
    torch.export.save(ep, str(path))
    return path


def random_model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    m = cls()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):  # non-trivial statistics
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture()
def mlp_pt2(tmp_path: Path) -> tuple[Path, Path, nn.Module]:
    m = random_model(MLP)
    path = export(m, (torch.randn(2, 16),), tmp_path / "mlp.pt2")
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=m(torch.from_numpy(x)).argmax(1).numpy())
    return path, tmp_path / "d.npz", m


def zeros_and_total(module: nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(module.named_parameters())
    return (sum(int((params[n] == 0).sum()) for n in names), sum(params[n].numel() for n in names))


def check_artifact(out: Path, cert, original: torch.export.ExportedProgram, inputs: tuple) -> None:
    """The artifact reloads with torch.export.load, has the upload's signature, and is the tested candidate."""
    assert is_pt2(out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == cert.result["artifact_sha256"]
    loaded = torch.export.load(str(out))
    assert [str(s) for s in loaded.graph_signature.input_specs] == [str(s) for s in original.graph_signature.input_specs]
    assert [str(s) for s in loaded.graph_signature.output_specs] == [str(s) for s in original.graph_signature.output_specs]
    assert loaded.call_spec.in_spec == original.call_spec.in_spec
    assert loaded.call_spec.out_spec == original.call_spec.out_spec
    names = cert.result["prunable_weights"]["names"]
    module = loaded.module()
    zeros, total = zeros_and_total(module, names)
    assert zeros == cert.result["zeroed_parameters"]
    assert total == cert.result["prunable_parameters"]
    assert zeros == pytest.approx(cert.result["certified_sparsity"] * total, abs=len(names))
    # the weights of every non-candidate tensor are the upload's
    for name, value in original.state_dict.items():
        if name not in names:
            assert torch.equal(value, loaded.state_dict[name]), name
    # the tested candidate: the same outputs as the engine's own module after the run
    worker = load_model(out)
    with torch.no_grad():
        a, b = module(*inputs), worker(*inputs)
    a, b = (a["logits"], b["logits"]) if isinstance(a, dict) else (a, b)
    assert torch.equal(a, b)


def test_mlp_certify_save_reload(mlp_pt2, tmp_path: Path) -> None:
    path, data, eager = mlp_pt2
    assert is_pt2(path) and check_pt2(path).forward_args == ["x"]
    check_archive(path)  # admission, without torch in the API (see tests/service for the import check)
    out = tmp_path / "artifact.pt"  # the service's internal name; the content is a .pt2 archive
    cert = certify(str(path), str(data), CFG, out=str(out))
    r = cert.result
    assert r["certified"] and r["certified_sparsity"] > 0
    assert r["prunable_weights"]["names"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert r["prunable_weights"]["method"] == "exported_graph"
    assert r["bn_recalibration"] == "no_batchnorm"
    check_artifact(out, cert, torch.export.load(str(path)), (torch.randn(7, 16),))
    # pruning moved the outputs away from the dense model's (the artifact is not the upload)
    x = torch.randn(64, 16)
    assert not torch.equal(torch.export.load(str(out)).module()(x), eager(x))
    # the same run writes the same bytes (the artifact checksum is reproducible)
    again = certify(str(path), str(data), CFG, out=str(tmp_path / "again" / "artifact.pt"))
    assert again.result["artifact_sha256"] == r["artifact_sha256"]


def test_cnn_with_batchnorm_reports_dense_statistics(tmp_path: Path) -> None:
    m = random_model(CNN)
    path = export(m, (torch.randn(2, 3, 8, 8),), tmp_path / "cnn.pt2")
    x = np.random.default_rng(1).standard_normal((200, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=m(torch.from_numpy(x)).argmax(1).numpy())
    out = tmp_path / "artifact.pt"
    cert = certify(str(path), str(tmp_path / "d.npz"), {**CFG, "reconstruct": True, "tune_fraction": 0.25},
                   out=str(out))
    r = cert.result
    assert r["prunable_weights"]["names"] == ["conv1.weight", "conv2.weight", "head.weight"]
    assert r["bn_recalibration"] == "unavailable_exported_graph"
    assert r["bn_statistics"] is None
    rec = r["reconstruction"]
    assert set(rec["not_reconstructed"]) == set(r["prunable_weights"]["names"]), rec
    assert all("exported" in why for why in rec["not_reconstructed"].values())
    assert "reconstructed" not in r["guarantee"] or "0 of" in r["guarantee"] or "not" in r["guarantee"]
    original = torch.export.load(str(path))
    check_artifact(out, cert, original, (torch.randn(5, 3, 8, 8),))
    loaded = torch.export.load(str(out))
    for b in ("bn1.running_mean", "bn1.running_var"):  # BN statistics stay dense
        assert torch.equal(loaded.state_dict[b], original.state_dict[b])


def test_token_model_two_inputs_dict_output(tmp_path: Path) -> None:
    m = random_model(TokenModel)
    example = (torch.randint(0, VOCAB, (2, T)), torch.ones(2, T, dtype=torch.int64))
    path = export(m, example, tmp_path / "tok.pt2")
    assert archive_forward_signature(path) == [("input_ids", False), ("attention_mask", False)]
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, size=(240, T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < rng.integers(3, T + 1, size=240)[:, None]).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "artifact.pt"
    cert = certify(str(path), str(tmp_path / "d.npz"), {**CFG, "finetune": {"steps": 20}, "tune_fraction": 0.25},
                   out=str(out))
    r = cert.result
    assert r["risk"] == "disagreement"
    assert r["prunable_weights"]["names"] == ["proj.weight", "head.weight"]  # the embedding is a lookup table
    assert "emb.weight" in r["prunable_weights"]["not_candidates"]
    check_artifact(out, cert, torch.export.load(str(path)),
                   (torch.from_numpy(ids[:9]), torch.from_numpy(mask[:9])))
    # the data's arrays are matched to the program's inputs at admission, without torch
    with pytest.raises(DataError) as info:
        match_inputs(archive_forward_signature(path), ["input_ids"])
    assert info.value.code == "data_missing_inputs"


def test_finetune_keeps_masks_exactly_zero(mlp_pt2, tmp_path: Path) -> None:
    path, data, _ = mlp_pt2
    out = tmp_path / "artifact.pt"
    cert = certify(str(path), str(data), {**CFG, "finetune": {"steps": 30}, "tune_fraction": 0.3}, out=str(out))
    assert cert.result["finetune"] is not None
    module = torch.export.load(str(out)).module()
    zeros, total = zeros_and_total(module, cert.result["prunable_weights"]["names"])
    assert zeros == cert.result["zeroed_parameters"] > 0
    original = torch.export.load(str(path)).module()
    # fine-tuning changed kept weights (so the zeros are held by the mask, not by an untouched model)
    changed = [n for n, p in module.named_parameters() if n.endswith("weight")
               and not torch.equal(p[p != 0], dict(original.named_parameters())[n][p != 0])]
    assert changed


def test_discovery_and_loaded_module(mlp_pt2) -> None:
    path, _, eager = mlp_pt2
    module = load_model(path)
    assert is_exported(module)
    module.eval()  # torch's exported modules raise here; ours only set flags (the graph is eval-specialised)
    module.train()
    x = torch.randn(3, 16)
    assert torch.allclose(module(x), eager(x))
    found = discover_prunable(module)
    assert [w.kind for w in found.weights] == ["linear"] * 3
    assert all(w.param is dict(module.named_parameters())[w.name] for w in found.weights)
    assert not any(p.requires_grad for p in module.parameters())


def test_save_model_is_atomic_and_deterministic(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2
    module = load_model(path)
    with torch.no_grad():
        module.fc1.weight[:2] = 0
    a, b = tmp_path / "a" / "artifact.pt", tmp_path / "b" / "artifact.pt"
    save_model(module, a)
    save_model(module, b)
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in a.parent.iterdir() if p.name != "artifact.pt"]  # no temp left behind
    assert int((torch.export.load(str(a)).state_dict["fc1.weight"] == 0).sum()) >= 32


# ---------------------------------------------------------------- hostile archives

def rewrite(src: Path, dst: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of the zip ``src`` with its entries (names below the top folder) changed by ``change``."""
    with zipfile.ZipFile(src) as zf:
        prefix = zf.namelist()[0].split("/", 1)[0]
        entries = {n[len(prefix) + 1:]: zf.read(n) for n in zf.namelist()}
    change(entries)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(f"{prefix}/{name}", data)
    return dst


def edit_program(entries: dict[str, bytes], fn: Callable[[dict], None]) -> None:
    doc = json.loads(entries["models/model.json"])
    fn(doc)
    entries["models/model.json"] = json.dumps(doc).encode()


def nodes(doc: dict) -> list[dict]:
    return doc["graph_module"]["graph"]["nodes"]


def refused(path: Path, code: str) -> ModelError:
    """Refused at admission (no torch) and again by the worker's loader."""
    with pytest.raises(ModelError) as admission:
        check_archive(path)
    assert admission.value.code == code, admission.value
    with pytest.raises(ModelError) as worker:
        load_model(path)
    assert worker.value.code == code, worker.value
    return admission.value


def test_from_file_in_the_graph_is_refused(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2

    def to_from_file(doc: dict) -> None:
        relu = next(n for n in nodes(doc) if n["target"] == "torch.ops.aten.relu.default")
        relu["target"] = "torch.ops.aten.from_file.default"
        relu["inputs"] = [{"name": "filename", "arg": {"as_string": "/etc/passwd"}, "kind": 1}]

    bad = rewrite(path, tmp_path / "from_file.pt2", lambda e: edit_program(e, to_from_file))
    err = refused(bad, "model_uses_forbidden_op")
    assert "aten.from_file" in str(err) and "files" in str(err)


@pytest.mark.parametrize("target", ["torch.os.system", "torch.load", "builtins.eval", "torch.ops.myns.run.default",
                                    "torch.ops.higher_order.run_const_graph", "#custom_extension_op"])
def test_non_aten_targets_are_refused(mlp_pt2, tmp_path: Path, target: str) -> None:
    path, _, _ = mlp_pt2

    def retarget(doc: dict) -> None:
        nodes(doc)[1]["target"] = target

    err = refused(rewrite(path, tmp_path / "t.pt2", lambda e: edit_program(e, retarget)), "model_uses_forbidden_op")
    assert target.split(".")[-2 if target.endswith(".default") else -1] in str(err), str(err)  # names the op


def test_pickled_weight_is_refused(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2

    def pickle_weight(entries: dict[str, bytes]) -> None:
        cfg = json.loads(entries["data/weights/model_weights_config.json"])
        meta = cfg["config"]["fc1.weight"]
        meta["use_pickle"] = True
        buf = io.BytesIO()
        torch.save(torch.zeros(32, 16), buf)
        entries[f"data/weights/{meta['path_name']}"] = buf.getvalue()
        entries["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()

    err = refused(rewrite(path, tmp_path / "p.pt2", pickle_weight), "model_unsupported_format")
    assert "pickle" in str(err) and "fc1.weight" in str(err)


class WithConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = torch.full((3,), 2.0)  # neither parameter nor buffer: a lifted tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


@pytest.mark.parametrize("how", ["pickled_tensor", "custom_obj"])
def test_pickled_constant_is_refused(tmp_path: Path, how: str) -> None:
    path = export(WithConstant(), (torch.randn(2, 4),), tmp_path / "c.pt2")
    assert json.loads(zipfile.ZipFile(path).read("c/data/constants/model_constants_config.json"))["config"]
    load_model(path)  # the clean archive (a raw tensor constant) loads

    def poison(entries: dict[str, bytes]) -> None:
        cfg = json.loads(entries["data/constants/model_constants_config.json"])
        name, meta = next(iter(cfg["config"].items()))
        if how == "pickled_tensor":
            meta["use_pickle"] = True
        else:
            meta["path_name"] = "custom_obj_0"
            entries["data/constants/custom_obj_0"] = pickle.dumps(os.getcwd)
        entries["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()

    refused(rewrite(path, tmp_path / "bad.pt2", poison), "model_unsupported_format")


def test_aoti_archive_is_refused(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2

    def add_aoti(entries: dict[str, bytes]) -> None:
        entries["data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60
        entries["data/aotinductor/model/model_metadata.json"] = b"{}"

    err = refused(rewrite(path, tmp_path / "aoti.pt2", add_aoti), "model_unsupported_format")
    assert "AOTInductor" in str(err)


def test_truncated_archive_is_refused(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = refused(bad, "model_corrupt")
    assert "truncated" in str(err) or "corrupt" in str(err), str(err)


def test_sympy_expression_injection_is_refused(tmp_path: Path) -> None:
    path = export(random_model(MLP), (torch.randn(2, 16),), tmp_path / "dyn.pt2")
    marker = tmp_path / "owned"

    def inject(doc: dict) -> None:
        values = doc["graph_module"]["graph"]["tensor_values"]
        size = values["x"]["sizes"][0]
        assert "as_expr" in size  # the dynamic batch dimension
        size["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"

    bad = rewrite(path, tmp_path / "expr.pt2", lambda e: edit_program(e, inject))
    err = refused(bad, "model_unsupported_format")
    assert "symbolic" in str(err)
    assert not marker.exists()


def test_no_weights_only_false_unpickling(mlp_pt2, tmp_path: Path) -> None:
    """A sample-inputs pickle and guards code that would run a command under torch.export.load are never run."""
    path, _, _ = mlp_pt2
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def poison(entries: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        torch.save(((Payload(),), {}), buf)
        entries["data/sample_inputs/model.pt"] = buf.getvalue()
        doc = json.loads(entries["models/model.json"])
        doc["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        entries["models/model.json"] = json.dumps(doc).encode()

    bad = rewrite(path, tmp_path / "sample.pt2", poison)
    check_archive(bad)
    module = load_model(bad)  # loads: the sample inputs are dropped, the guards are not executed
    module(torch.randn(3, 16))
    assert not marker.exists()


def test_training_mode_export_is_refused(tmp_path: Path) -> None:
    m = random_model(CNN).train()
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, str(tmp_path / "train.pt2"))
    err = refused(tmp_path / "train.pt2", "model_exported_in_training_mode")
    assert "model.eval()" in str(err)


def test_two_models_and_other_formats(mlp_pt2, tmp_path: Path) -> None:
    path, _, _ = mlp_pt2

    def second(entries: dict[str, bytes]) -> None:
        entries["models/other.json"] = entries["models/model.json"]

    refused(rewrite(path, tmp_path / "two.pt2", second), "model_unsupported_format")
    with pytest.raises(ModelError) as info:  # neither format: the message names both
        check_archive(rewrite(path, tmp_path / "none.zip", lambda e: e.pop("archive_format")))
    assert info.value.code == "model_not_torchscript"
    assert "torch.export" in str(info.value) and "TorchScript" in str(info.value)
