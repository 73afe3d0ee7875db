"""Scores → nested masks at every sparsity, from one sort.

Each weight gets a rank (0 = pruned first). Level λ zeroes the k(λ) = round(λ·N) lowest-ranked
weights, so masks are nested (a weight pruned at λ stays pruned at every λ' > λ) and the
achieved sparsity equals the requested one exactly: ties are broken by position (stable sort),
never by a threshold that would sweep a whole block of equal scores in at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


def n_zero(sparsity: float, numel: int) -> int:
    """Weights to zero for a requested sparsity (round half up, clipped to the tensor)."""
    return min(numel, max(0, int(math.floor(sparsity * numel + 0.5))))


def _ranks(flat_scores: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(flat_scores, stable=True)
    dtype = torch.int32 if flat_scores.numel() < 2**31 - 1 else torch.int64
    ranks = torch.empty(flat_scores.numel(), dtype=dtype, device=flat_scores.device)
    ranks[order] = torch.arange(flat_scores.numel(), dtype=dtype, device=flat_scores.device)
    return ranks


@dataclass
class NestedMasks:
    """Per-layer rank tensors; ``scope`` global ranks across layers, layerwise within each."""

    ranks: list[torch.Tensor]
    scope: str

    @classmethod
    def from_scores(cls, scores: list[torch.Tensor], scope: str = "global") -> "NestedMasks":
        if scope not in ("global", "layerwise"):
            raise ConfigError(f"Unknown scope {scope!r}. Valid scopes: 'global', 'layerwise'.")
        for s in scores:
            if not torch.isfinite(s).all():
                raise ConfigError("A criterion produced non-finite scores; cannot rank weights.",
                                  code="criterion_not_finite")
        if scope == "layerwise":
            return cls([_ranks(s.detach().float().flatten()).view(s.shape) for s in scores], scope)
        sizes = [s.numel() for s in scores]
        flat = torch.cat([s.detach().float().flatten() for s in scores])
        ranks = _ranks(flat)
        return cls([r.view(s.shape) for r, s in zip(torch.split(ranks, sizes), scores)], scope)

    @property
    def numel(self) -> int:
        return sum(r.numel() for r in self.ranks)

    def keep_masks(self, sparsity: float) -> list[torch.Tensor]:
        """Boolean keep-masks (True = kept) for one level."""
        if self.scope == "global":
            k = n_zero(sparsity, self.numel)
            return [r >= k for r in self.ranks]
        return [r >= n_zero(sparsity, r.numel()) for r in self.ranks]

    def zeroed_per_layer(self, sparsity: float) -> list[int]:
        if self.scope == "global":
            k = n_zero(sparsity, self.numel)
            return [int((r < k).sum()) for r in self.ranks]
        return [n_zero(sparsity, r.numel()) for r in self.ranks]


@torch.no_grad()
def apply_masks(params: list[torch.Tensor], originals: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Write original·mask into the live parameters, in place (no model copies)."""
    for p, w0, m in zip(params, originals, masks):
        torch.where(m, w0, torch.zeros((), dtype=w0.dtype, device=w0.device), out=p.data)


@torch.no_grad()
def restore(params: list[torch.Tensor], originals: list[torch.Tensor]) -> None:
    for p, w0 in zip(params, originals):
        p.data.copy_(w0)


__all__ = ["NestedMasks", "apply_masks", "n_zero", "restore"]
