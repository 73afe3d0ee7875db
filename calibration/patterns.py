"""2:4 semi-structured sparsity: nested masks whose levels are *which layers* are made 2:4.

In a 2:4 layer every group of 4 consecutive weights along the input dimension keeps the 2 of
highest score — the pattern NVIDIA's sparse tensor cores (Ampere and later) run at up to twice
the dense speed (``torch.sparse.to_sparse_semi_structured``). Groups run along ``in_features``
for Linear and along the input channels at each kernel position for convolutions (NVIDIA ASP's
layout for channels-last implicit GEMM). Layers whose input dim (per group of a grouped
convolution) is not a multiple of 4, and transposed convolutions, are left dense.

The grid: level 0 is the dense model, level j makes the j cheapest eligible layers 2:4, so the
masks are nested. "Cheapest" orders layers by the mean score of the weights the pattern removes
(divided by the layer's mean score under ``scope='layerwise'``): the scores come from the
criterion (|w| for magnitude, D_tune statistics for mu/obd), so the order — and with it every
candidate — is fixed before D_cal is looked at (SPEC §1). A level's sparsity is the fraction of
prunable weights it zeroes; it is that number the engine reports and certifies.

:func:`semi_structured_speedup` times a dense vs a 2:4 matmul on a CUDA device (fp16/bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

PATTERNS = ("2:4",)
_N, _M = 2, 4  # keep N of every M


def _group_view(t: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) → (out, *kernel, in): input channels last, where groups of 4 are taken."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def _ungroup_view(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.movedim(-1, 1).contiguous() if len(shape) > 2 else t.contiguous()


def eligible(shape: torch.Size, module_type: str = "Linear") -> bool:
    """Whether a weight of ``shape`` can be made 2:4 (input dim a multiple of 4, not transposed)."""
    return not module_type.startswith("ConvTranspose") and len(shape) >= 2 and shape[1] % _M == 0


def two_four_keep(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask (same shape) with exactly 2 kept per 4 consecutive inputs; ties → earlier position pruned."""
    s = _group_view(scores.detach().float())
    groups = s.reshape(-1, _M)
    order = torch.argsort(groups, dim=1, stable=True)  # ascending: the first M − N are pruned
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, : _M - _N], False)
    return _ungroup_view(keep.view(s.shape), scores.shape)


@dataclass
class PatternMasks:
    """Nested 2:4 masks over layers; the same interface as :class:`calibration.masks.NestedMasks`.

    ``layer_keep``: per prunable weight its 2:4 keep-mask, or None when ineligible.
    ``order``: eligible layer indices, cheapest first. ``sparsities``: (n_levels,) achieved
    sparsity of levels 0 … len(order), strictly increasing, level 0 = 0.0 (dense).
    """

    layer_keep: list[torch.Tensor | None]
    order: list[int]
    sparsities: tuple[float, ...]
    shapes: list[torch.Size]
    device: torch.device | None = None

    @classmethod
    def from_scores(cls, scores: list[torch.Tensor], scope: str = "global",
                    module_types: list[str] | None = None) -> PatternMasks:
        if scope not in ("global", "layerwise"):
            raise ConfigError(f"Unknown scope {scope!r}. Valid scopes: 'global', 'layerwise'.")
        types = module_types or ["Linear"] * len(scores)
        layer_keep: list[torch.Tensor | None] = []
        costs: list[tuple[float, int]] = []
        for i, (s, mtype) in enumerate(zip(scores, types)):
            if not torch.isfinite(s).all():
                raise ConfigError("A criterion produced non-finite scores; cannot rank weights.",
                                  code="criterion_not_finite")
            if not eligible(s.shape, mtype):
                layer_keep.append(None)
                continue
            keep = two_four_keep(s)
            layer_keep.append(keep)
            sf = s.detach().double()
            cost = float(sf[~keep].mean())
            if scope == "layerwise":
                cost /= max(float(sf.mean()), 1e-300)
            costs.append((cost, i))
        if not costs:
            raise ConfigError(
                "pattern '2:4' needs at least one prunable layer whose input dimension is a multiple of 4; "
                "this model has none. Use unstructured sparsity (pattern null).", code="pattern_not_applicable")
        order = [i for _, i in sorted(costs)]
        total = sum(s.numel() for s in scores)
        zeroed, grid = 0, [0.0]
        for i in order:
            zeroed += int((~layer_keep[i]).sum())  # type: ignore[operator]
            grid.append(zeroed / total)
        return cls(layer_keep, order, tuple(grid), [s.shape for s in scores], scores[0].device)

    def _level(self, sparsity: float) -> int:
        try:
            return self.sparsities.index(sparsity)
        except ValueError:
            raise ConfigError(f"Sparsity {sparsity!r} is not a level of this 2:4 grid {self.sparsities}.") from None

    def made_two_four(self, sparsity: float) -> list[int]:
        """Indices of the layers that are 2:4 at this level."""
        return self.order[: self._level(sparsity)]

    def keep_masks(self, sparsity: float) -> list[torch.Tensor]:
        """Boolean keep-masks (True = kept) for the level whose achieved sparsity is ``sparsity``."""
        chosen = set(self.made_two_four(sparsity))
        out = []
        for i, (keep, shape) in enumerate(zip(self.layer_keep, self.shapes)):
            if i in chosen and keep is not None:
                out.append(keep)
            else:
                out.append(torch.ones(shape, dtype=torch.bool, device=self.device))
        return out

    def zeroed_per_layer(self, sparsity: float) -> list[int]:
        chosen = set(self.made_two_four(sparsity))
        return [int((~k).sum()) if i in chosen and k is not None else 0 for i, k in enumerate(self.layer_keep)]

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


def semi_structured_speedup(weight_shape: tuple[int, int], batch: int, dtype: torch.dtype = torch.float16,
                            *, repeats: int = 50) -> dict[str, Any] | None:
    """Time y = x Wᵀ dense vs 2:4 (``to_sparse_semi_structured``) for W of ``weight_shape`` (out, in).

    Runs on the current CUDA device only (semi-structured kernels need an Ampere-or-newer GPU and
    fp16/bf16); returns None when CUDA is unavailable so CPU callers can skip. Returns
    ``{"dense_ms", "sparse_ms", "speedup", "backend", "weight_shape", "batch", "dtype", "device",
    "max_abs_diff"}``; times are CUDA-event means over ``repeats`` calls after 5 warm-ups.
    torch picks the backend: CUTLASS kernels exist for compute capability 8.x only, so Hopper uses
    cuSPARSELt, whose per-call overhead (~0.5 ms on an H200 with torch 2.11) only pays off for
    large products (there 11008×4096 at batch 8192: 1.0 → 0.8 ms; 4096×4096 at batch ≤ 8192: slower).
    Shapes must meet the kernels' minimums (multiples of 64 or so); torch raises otherwise.
    """
    if not torch.cuda.is_available():
        return None
    from torch.sparse import to_sparse_semi_structured

    dev = torch.device("cuda")
    out_f, in_f = weight_shape
    w = torch.randn(out_f, in_f, dtype=dtype, device=dev)
    w = w * two_four_keep(w.abs()).to(dtype)
    x = torch.randn(batch, in_f, dtype=dtype, device=dev)
    w_sparse = to_sparse_semi_structured(w)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    with torch.inference_mode():
        dense_ms = timed(lambda: torch.nn.functional.linear(x, w))
        sparse_ms = timed(lambda: torch.nn.functional.linear(x, w_sparse))
        max_err = float((torch.nn.functional.linear(x, w) - torch.nn.functional.linear(x, w_sparse)).abs().max())
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "backend": type(w_sparse).__name__, "weight_shape": [out_f, in_f], "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(dev),
            "max_abs_diff": max_err}


__all__ = ["PATTERNS", "PatternMasks", "eligible", "semi_structured_speedup", "two_four_keep"]
