"""A causal language model certified on a GPU: wall time, peak memory, what was certified.

A Llama-style model from Hugging Face ``transformers`` built from a config (random weights, no download;
default 12 layers × 768 wide, vocabulary 32 000, untied head: ≈ 134 M parameters), traced to TorchScript
with two inputs (``input_ids``, ``attention_mask``), and N random sequences of T tokens written as a
``.npz`` with those two named arrays, as a user would upload them. ``calibration.certify`` runs it with
``risk: token_disagreement`` (the fraction of unmasked positions whose top-1 token differs from the dense
model's; no labels), the WSR bound, in bf16 on CUDA. Random weights make every top-1 fragile, so the grid
is low and ε generous: the point is the cost of a real LM job (dense logits of N × T × V are never kept:
only the dense top-1 per position), not the sparsity.

Prints one line per run: parameters, prunable matrices found, wall time and its stages, peak CUDA memory,
levels evaluated, certified sparsity. ``--device cpu --layers 2 --hidden 64 --n 64 --seq 16`` is a smoke
run. Run on the GPU: ``python bench/lm_gpu.py`` (needs transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: calibration/


def build_lm(layers: int, hidden: int, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048,
                         tie_word_embeddings=False, torchscript=True, use_cache=False)
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n", type=int, default=1000, help="sequences")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--sparsities", default="0,0.02,0.05,0.1,0.15,0.2,0.3,0.4,0.5")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--full-curve", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)

    from calibration import certify

    tmp = Path(tempfile.mkdtemp(prefix="lm_gpu_"))
    t = time.perf_counter()
    lm = build_lm(args.layers, args.hidden, args.vocab, args.seed)
    n_params = sum(p.numel() for p in lm.parameters())
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, args.vocab, (args.n, args.seq), dtype=np.int64)
    mask = np.ones_like(ids)
    lengths = rng.integers(args.seq // 2, args.seq + 1, args.n)  # ragged sequences: padding masked out
    mask[np.arange(args.seq)[None, :] >= lengths[:, None]] = 0
    # Traced on the device it will run on: a trace records the tensors its forward creates (the causal
    # mask, position ids) with the tracing device, so a CPU trace cannot run on CUDA.
    example = (torch.from_numpy(ids[:2]).to(args.device), torch.from_numpy(mask[:2]).to(args.device))
    with torch.no_grad():
        traced = torch.jit.trace(lm.to(args.device), example, strict=False)
    model_path = tmp / "llama.pt"
    traced.save(str(model_path))
    data_path = tmp / "tokens.npz"
    np.savez(data_path, input_ids=ids, attention_mask=mask)
    build_s = time.perf_counter() - t
    print(f"model: Llama {args.layers}×{args.hidden}, vocab {args.vocab}, {n_params / 1e6:.1f} M parameters, "
          f"archive {model_path.stat().st_size / 2**20:.0f} MiB; data {args.n} × {args.seq} tokens "
          f"({int(mask.sum())} unmasked); built and traced in {build_s:.1f} s", flush=True)

    dev = torch.device(args.device)
    del lm, traced
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    config = {"risk": "token_disagreement", "epsilon": args.epsilon, "delta": 0.1, "device": args.device,
              "precision": args.precision, "batch_size": args.batch_size, "seed": args.seed,
              "sparsities": [float(v) for v in args.sparsities.split(",")], "full_curve": args.full_curve}
    t = time.perf_counter()
    cert = certify(model_path, data_path, config, out=tmp / "pruned.pt")
    wall_s = time.perf_counter() - t
    r = cert.result
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    row = {"params_M": round(n_params / 1e6, 1), "n": args.n, "seq": args.seq, "precision": r["precision"],
           "device": r["device"], "bound": r["bound"], "wall_s": round(wall_s, 2),
           "peak_cuda_GiB": None if peak is None else round(peak / 2**30, 2),
           "model_GiB_fp32": round(n_params * 4 / 2**30, 2),
           "levels_evaluated": r["levels_evaluated"], "certified_sparsity": r["certified_sparsity"],
           "prunable": r.get("prunable_weights", {}).get("count"), "of": r.get("prunable_weights", {}).get("of_count"),
           "timings": {k: round(v, 2) for k, v in (r.get("timings") or {}).items() if isinstance(v, (int, float))},
           "levels": [(lv["sparsity"], lv["empirical_risk"], lv["upper_bound"]) for lv in r["levels"]
                      if lv["evaluated"]]}
    print(json.dumps(row, indent=1))
    print(f"LM job: {row['params_M']} M params, {args.n}×{args.seq} tokens, {row['precision']} on {row['device']}: "
          f"{wall_s:.1f} s, peak {row['peak_cuda_GiB']} GiB, {row['levels_evaluated']} levels, "
          f"certified {row['certified_sparsity']:.2f} at ε = {args.epsilon} ({row['bound']}); "
          f"{row['prunable']} of {row['of']} weight matrices were candidates")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lm_gpu.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
