"""A token-id model with two inputs and a dict output, end to end through the HTTP API (issue 13, items 1–2)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import Server, submit, wait_terminal

pytestmark = pytest.mark.timeout(120)

VOCAB, T, N = 40, 10, 120


@pytest.fixture
def client(worker_server: Server) -> httpx.Client:
    with worker_server.client() as c:
        yield c


def _token_model(path: Path) -> None:
    import torch
    from torch import nn

    class TokenClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.fc(self.emb(input_ids)))
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return {"logits": self.head(pooled), "pooled": pooled}

    torch.manual_seed(0)
    example = (torch.zeros(2, T, dtype=torch.long), torch.ones(2, T, dtype=torch.long))
    torch.jit.save(torch.jit.trace(TokenClassifier().eval(), example, strict=False), str(path))


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
