"""A token-id model with two inputs and a dict output, end to end through the HTTP API (issue 13, items 1–2)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import Server, submit, token_classifier, wait_terminal

pytestmark = pytest.mark.timeout(120)

VOCAB, T, N = 40, 10, 120


@pytest.fixture
def client(worker_server: Server) -> httpx.Client:
    with worker_server.client() as c:
        yield c


def _token_model(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    example = (torch.zeros(2, T, dtype=torch.long), torch.ones(2, T, dtype=torch.long))
    torch.jit.save(torch.jit.trace(token_classifier(VOCAB), example, strict=False), str(path))


def test_token_model_with_two_inputs_and_a_dict_output(client: httpx.Client, tmp_path: Path) -> None:
    import torch

    _token_model(tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (N, T)).astype(np.int64)
    mask = (np.arange(T)[None] < rng.integers(2, T + 1, N)[:, None]).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    config = {"sparsities": [0.1, 0.2], "epsilon": 0.3, "delta": 0.2, "batch_size": 40}
    r = submit(client, tmp_path / "m.pt", data=tmp_path / "d.npz", config=config)
    assert r.status_code == 202, r.text
    job = wait_terminal(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    art = client.get(f"/v1/jobs/{job['id']}/artifact")
    assert art.status_code == 200
    (tmp_path / "pruned.pt").write_bytes(art.content)
    dense, pruned = torch.jit.load(str(tmp_path / "m.pt")), torch.jit.load(str(tmp_path / "pruned.pt"))
    assert str(pruned.forward.schema) == str(dense.forward.schema)  # same input names, dtypes and output type
    out = pruned(torch.from_numpy(ids[:4]), torch.from_numpy(mask[:4]))
    assert set(out) == {"logits", "pooled"} and tuple(out["logits"].shape) == (4, 3)

    # Bad combinations are refused at admission (the signature read from the archive's code, no torch): 422.
    for arrays, code, words in [({"input_ids": ids}, "data_missing_inputs", "attention_mask"),
                                ({"x": ids}, "data_missing_inputs", "2 inputs"),
                                ({"input_ids": ids, "attention_mask": mask, "token_type_ids": mask},
                                 "data_unexpected_arrays", "token_type_ids")]:
        np.savez(tmp_path / "bad.npz", **arrays)
        r = submit(client, tmp_path / "m.pt", data=tmp_path / "bad.npz", config=config)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"], r.text


def test_a_causal_lm_with_token_disagreement(client: httpx.Client, tmp_path: Path) -> None:
    """Logits (N, T, V) through the API: the sequence risk, its bound in the guarantee, the artifact's signature."""
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            self.mlp = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, VOCAB)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(input_ids)
            return self.lm_head(h + torch.relu(self.mlp(h)))

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyLM().eval()), str(tmp_path / "lm.pt"))
    ids = np.random.default_rng(1).integers(0, VOCAB, (N, T)).astype(np.int64)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    np.savez(tmp_path / "d.npz", input_ids=ids, y=labels)
    config = {"sparsities": [0.1, 0.2], "epsilon": 0.3, "delta": 0.2, "risk": "token_disagreement"}
    job = wait_terminal(client, submit(client, tmp_path / "lm.pt", data=tmp_path / "d.npz", config=config).json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["risk"] == "token_disagreement" and result["bound"] == "wsr"
    assert not result["certified"] or "Waudby-Smith" in result["guarantee"]
    (tmp_path / "pruned.pt").write_bytes(client.get(f"/v1/jobs/{job['id']}/artifact").content)
    pruned = torch.jit.load(str(tmp_path / "pruned.pt"))
    assert str(pruned.forward.schema) == str(torch.jit.load(str(tmp_path / "lm.pt")).forward.schema)
    assert tuple(pruned(torch.from_numpy(ids[:2])).shape) == (2, T, VOCAB)
    # Per-position labels with a classifier risk are refused at admission.
    r = submit(client, tmp_path / "lm.pt", data=tmp_path / "d.npz", config={**config, "risk": "accuracy_drop"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "data_bad_labels", r.text
