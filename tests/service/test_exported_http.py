"""torch.export ``.pt2`` uploads end to end through the HTTP API (issue 13, item 5).

A real server (uvicorn, the embedded executor, the worker's sandboxed child) certifies exported models
built here with random weights; the artifact downloads as ``.pt2`` and reloads with ``torch.export.load``.
Hostile archives are refused at upload (422) by the API process, which never imports torch.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import Server, assert_error, submit, token_classifier, wait_terminal

pytestmark = pytest.mark.timeout(180)

VOCAB, T, N = 40, 10, 160
CONFIG = {"sparsities": [0.02, 0.05, 0.1], "epsilon": 0.3, "delta": 0.2}


@pytest.fixture
def client(worker_server: Server) -> httpx.Client:
    with worker_server.client() as c:
        yield c


def _export(model, example: tuple, path: Path) -> Path:
    import torch

    batch = torch.export.Dim("batch")
    ep = torch.export.export(model.eval(), example, dynamic_shapes=tuple({0: batch} for _ in example))
    torch.export.save(ep, str(path))
    return path


def _token_model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    import torch

    torch.manual_seed(0)
    example = (torch.randint(0, VOCAB, (2, T)), torch.ones(2, T, dtype=torch.int64))
    path = _export(token_classifier(VOCAB), example, tmp_path / "tok.pt2")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (N, T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < rng.integers(3, T + 1, N)[:, None]).astype(np.int64)
    return path, ids, mask


def _mlp(tmp_path: Path) -> tuple[Path, Path]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = _export(m, (torch.randn(2, 12),), tmp_path / "mlp.pt2")
    x = np.random.default_rng(0).standard_normal((N, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=m(torch.from_numpy(x)).argmax(1).numpy())
    return path, tmp_path / "d.npz"


def test_token_model_pt2_certifies_and_downloads_as_pt2(client: httpx.Client, worker_server: Server,
                                                        tmp_path: Path) -> None:
    import torch

    path, ids, mask = _token_model(tmp_path)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    job = wait_terminal(client, submit(client, path, data=tmp_path / "d.npz", config=CONFIG).json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["risk"] == "disagreement"
    assert result["prunable_weights"]["names"] == ["fc.weight", "head.weight"]
    r = client.get(f"/v1/jobs/{job['id']}/artifact")
    assert r.status_code == 200
    assert f'filename="{job["id"]}-pruned.pt2"' in r.headers["content-disposition"]
    out = tmp_path / "pruned.pt2"
    out.write_bytes(r.content)
    import hashlib

    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-checksum-sha256"] == result["artifact_sha256"]
    pruned, original = torch.export.load(str(out)), torch.export.load(str(path))
    assert [str(s) for s in pruned.graph_signature.input_specs] == [str(s) for s in original.graph_signature.input_specs]
    assert pruned.call_spec.out_spec == original.call_spec.out_spec
    params = dict(pruned.module().named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in result["prunable_weights"]["names"])
    assert zeros == result["zeroed_parameters"]
    assert zeros == pytest.approx(result["certified_sparsity"] * result["prunable_parameters"], abs=2)
    out_dict = pruned.module()(torch.from_numpy(ids[:4]), torch.from_numpy(mask[:4]))
    assert tuple(out_dict["logits"].shape) == (4, 3)
    # the API process checked the archive as data: no torch in its memory map
    maps = Path(f"/proc/{worker_server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


def test_pt2_inputs_are_checked_at_upload(client: httpx.Client, tmp_path: Path) -> None:
    path, ids, _ = _token_model(tmp_path)
    np.savez(tmp_path / "ids_only.npz", input_ids=ids)
    assert_error(submit(client, path, data=tmp_path / "ids_only.npz", config=CONFIG), 422, "data_missing_inputs")
    np.savez(tmp_path / "x.npz", x=ids)
    assert_error(submit(client, path, data=tmp_path / "x.npz", config=CONFIG), 422, "data_missing_inputs")


def _rewrite(src: Path, dst: Path, change) -> Path:
    with zipfile.ZipFile(src) as zf:
        prefix = zf.namelist()[0].split("/", 1)[0]
        entries = {n[len(prefix) + 1:]: zf.read(n) for n in zf.namelist()}
    change(entries)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in entries.items():
            zf.writestr(f"{prefix}/{name}", data)
    return dst


def test_hostile_pt2_archives_are_refused_at_upload(client: httpx.Client, tmp_path: Path) -> None:
    path, data = _mlp(tmp_path)

    def from_file(entries: dict[str, bytes]) -> None:
        doc = json.loads(entries["models/model.json"])
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.relu.default")
        node["target"] = "torch.ops.aten.from_file.default"
        entries["models/model.json"] = json.dumps(doc).encode()

    def pickled(entries: dict[str, bytes]) -> None:
        cfg = json.loads(entries["data/weights/model_weights_config.json"])
        next(iter(cfg["config"].values()))["use_pickle"] = True
        entries["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()

    def aoti(entries: dict[str, bytes]) -> None:
        entries["data/aotinductor/model/model.so"] = b"\x7fELF"

    for name, change, code in (("from_file", from_file, "model_uses_forbidden_op"),
                               ("pickled", pickled, "model_unsupported_format"),
                               ("aoti", aoti, "model_unsupported_format")):
        body = assert_error(submit(client, _rewrite(path, tmp_path / f"{name}.pt2", change), data=data,
                                   config=CONFIG), 422, code)
        assert body["message"], name
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(path.read_bytes()[:-200])
    assert_error(submit(client, cut, data=data, config=CONFIG), 422, "model_corrupt")
    # the clean archive is accepted (the refusals above are about what was changed)
    assert submit(client, path, data=data, config=CONFIG).status_code == 202
