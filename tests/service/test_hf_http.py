"""Real Hugging Face models (built from configs, random weights, traced) end to end through the HTTP API
(issue 13): POST → poll → download; the artifact keeps the upload's ``forward.schema`` and its zero count
is the reported sparsity; the discovered weights are exactly the model's projections."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import Server, submit, wait_terminal

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(180)

VOCAB, T, N, LAYERS = 100, 12, 160, 2


@pytest.fixture
def client(worker_server: Server) -> httpx.Client:
    with worker_server.client() as c:
        yield c


def _model(kind: str, path: Path) -> list[str]:
    """Trace a tiny HF model by argument name and save it; the names of its projection matrices."""
    import torch

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, intermediate_size=64,
                  max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "bert":
        eager = transformers.BertForSequenceClassification(
            transformers.BertConfig(num_attention_heads=2, num_labels=3, **common))
        names = [f"bert.encoder.layer.{i}.{s}.weight" for i in range(LAYERS) for s in (
            "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")] + ["bert.pooler.dense.weight", "classifier.weight"]
    else:
        eager = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, use_cache=False, **common))
        names = [f"model.layers.{i}.{s}_proj.weight" for i in range(LAYERS) for s in (
            "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")]
        names.append("lm_head.weight")
    example = {"input_ids": torch.randint(3, VOCAB, (2, T)), "attention_mask": torch.ones(2, T, dtype=torch.long)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager.eval(), example_kwarg_inputs=example, strict=False)
    torch.jit.save(traced, str(path))
    return names


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hf_model_through_the_api(client: httpx.Client, tmp_path: Path, kind: str) -> None:
    import torch

    names = _model(kind, tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (N, T)).astype(np.int64)
    mask = (np.arange(T)[None] < rng.integers(T // 3, T + 1, N)[:, None]).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    risk = "disagreement" if kind == "bert" else "token_disagreement"
    config = {"risk": risk, "sparsities": [0.1, 0.2, 0.3], "epsilon": 0.3, "delta": 0.2}
    r = submit(client, tmp_path / "m.pt", data=tmp_path / "d.npz", config=config)
    assert r.status_code == 202, r.text
    job = wait_terminal(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["risk"] == risk and result["certified"] and result["certified_sparsity"] > 0, result["levels"]
    assert result["prunable_weights"]["names"] == names
    art = client.get(f"/v1/jobs/{job['id']}/artifact")
    assert art.status_code == 200
    (tmp_path / "pruned.pt").write_bytes(art.content)
    dense, pruned = torch.jit.load(str(tmp_path / "m.pt")), torch.jit.load(str(tmp_path / "pruned.pt"))
    assert str(pruned.forward.schema) == str(dense.forward.schema)
    params = dict(pruned.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    assert zeros == result["zeroed_parameters"]
    assert abs(zeros - round(result["certified_sparsity"] * total)) <= len(names)
    with torch.no_grad():
        out = pruned(torch.from_numpy(ids[:4]), torch.from_numpy(mask[:4]))
    assert set(out) == {"logits"}
    assert tuple(out["logits"].shape) == ((4, 3) if kind == "bert" else (4, T, VOCAB))
    # The signature read at admission from the archive's code (no torch in the API process): a missing
    # attention_mask is a 422, before any worker runs.
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    bad = submit(client, tmp_path / "m.pt", data=tmp_path / "bad.npz", config=config)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "data_missing_inputs", bad.text
