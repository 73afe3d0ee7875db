"""Weight reconstruction after masking: the kept weights of each layer absorb the pruned ones.

The modern form of Optimal / Combinatorial Brain Surgeon (Hassibi & Stork 1993; Yu et al.,
arXiv 2203.04466; Frantar & Alistarh, OBC arXiv 2208.11580 and SparseGPT arXiv 2301.00774).
For one layer with dense weight W (rows = output units, columns = the d inputs of a row; a
convolution is a matrix product on ``unfold``-ed patches) and its inputs X (d, n) on D_tune,
every row is solved on its own, with its mask fixed:

    Ŵ_row = argmin ‖W_row X − Ŵ_row X‖²  subject to  Ŵ_row[pruned] = 0,
    Ŵ_row[keep] = W_row · H[:, keep] · H[keep, keep]⁻¹,   H = X Xᵀ + λ·mean(diag H)·I,

λ = ``damp`` (0.01 as in SparseGPT); the damping also keeps weights of dead inputs where they are.

Two solvers, both deterministic:
- ``exact``: the formula above for every row, as batched solves of the kept block
  H[K, K] — or, when fewer weights are pruned than kept, of the equivalent pruned block
  H⁻¹[P, P] (OBS's multi-weight removal: Ŵ = W − W[P] (H⁻¹[P, P])⁻¹ H⁻¹[P, :]). Cost
  ≈ rows·min(|K|, |P|)³/3 per layer and level.
- ``obs``: SparseGPT's column-by-column Optimal-Brain-Surgeon sweep with the mask fixed (error of
  each pruned column pushed onto the columns to its right through the Cholesky factor of H⁻¹).
  Cost ≈ rows·d² — an approximation of ``exact`` (a clearly worse one with a magnitude mask: on
  the digits MLP at 80% sparsity it removes 2–10× less of the output error), used by ``auto`` only
  for layers too large for ``exact`` (see ``EXACT_FLOP_BUDGET``).

Inputs come from the **dense** model (not SparseGPT's sequential mode): H then does not depend
on the mask, is computed once from one pass over D_tune and reused at every level, and each
level's weights are a pure function of (W, mask, H) — the final artifact recomputes exactly the
weights that were tested. Zeros stay zeros: only kept weights change.

Guarantee (SPEC §1): H is built from D_tune only. D_cal is never seen here; it enters only the
p-values of the reconstructed models, whose candidates are all fixed before D_cal is looked at.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ModelError
from .graph_probe import LayerInput, build_probe
from .model import PrunableWeight

DAMP = 0.01
#: ``auto`` solves a layer exactly when rows·(d/2)³/3 (the worst case per level) stays under this many
#: flops on the device type, else with ``obs``: ~1 s of float64 work on a CPU, ~0.1–1 s on a Hopper GPU.
EXACT_FLOP_BUDGET = {"cpu": 1e11, "cuda": 5e12}
_CHUNK_ELEMENTS = 1 << 24  # batched systems per chunk: at most this many float64 numbers (128 MiB)
_ROWS_PER_SOLVE = 32  # rows sorted by system size, solved in batches of this many (little padding)
_PROBE_BYTES = 1 << 30  # layer inputs held at once while probing: the probe batch is cut to fit


def patches(layer: LayerInput, kernel: tuple[int, ...]) -> torch.Tensor:
    """Convolution input → im2col rows, shape (n_positions, C·prod(kernel)), channel-major.

    Row order matches ``weight.reshape(out, -1)`` of a (out, C/groups, *kernel) weight, so that
    conv(x, W) at every output position equals ``patches @ W.reshape(out, -1).T`` (one group).
    Works for 1-, 2- and 3-d convolutions (``Tensor.unfold`` on each spatial dim).
    """
    x = layer.x
    n_sp = x.dim() - 2
    if layer.padding == "same":
        pads = []
        for k, d in zip(kernel, layer.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = list(layer.padding)  # type: ignore[arg-type]
    flat_pad = [p for pair in reversed(pads) for p in pair]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    for i in range(n_sp):
        span = layer.dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, layer.stride[i])
        if layer.dilation[i] > 1:
            x = x[..., :: layer.dilation[i]]
    c = x.shape[1]
    order = [0, *range(2, 2 + n_sp), 1, *range(2 + n_sp, 2 + 2 * n_sp)]
    return x.permute(*order).reshape(-1, c * math.prod(kernel))


def layer_rows(layer: LayerInput, weight_shape: torch.Size) -> torch.Tensor:
    """The layer's input as rows of X, shape (n_rows, groups · d) with d the width of one weight row."""
    if layer.kind in ("linear", "linear_t"):
        return layer.x.reshape(-1, layer.x.shape[-1])
    return patches(layer, tuple(weight_shape[2:]))


def layer_row_chunks(layer: LayerInput, weight_shape: torch.Size) -> Iterator[torch.Tensor]:
    """:func:`layer_rows` in pieces of at most ~``_CHUNK_ELEMENTS`` numbers (im2col of big images is huge)."""
    if layer.kind in ("linear", "linear_t"):
        rows = layer_rows(layer, weight_shape)
        step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
        yield from rows.split(step)
        return
    per_sample = layer_rows(replace(layer, x=layer.x[:1]), weight_shape).numel()
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    for start in range(0, layer.x.shape[0], step):
        yield layer_rows(replace(layer, x=layer.x[start:start + step]), weight_shape)


@torch.no_grad()
def accumulate_hessian(h: torch.Tensor | None, rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Add Xᵀ X of ``rows`` (n, groups·d) to ``h`` (groups, d, d), in float64."""
    r = rows.to(torch.float64)
    d = r.shape[1] // groups
    blocks = r.view(r.shape[0], groups, d).transpose(0, 1)  # (groups, n, d)
    update = blocks.transpose(1, 2) @ blocks
    return update if h is None else h.add_(update)


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp·mean(diag H)·I per group (identity·damp for an all-zero H)."""
    diag_mean = torch.diagonal(h, dim1=-2, dim2=-1).mean(dim=-1)
    scale = torch.where(diag_mean > 0, diag_mean, torch.ones_like(diag_mean)) * damp
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + scale[:, None, None] * eye


@torch.no_grad()
def solve_exact(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
    """Masked least squares per row: ``w``, ``keep`` (rows, d), damped ``h`` (d, d) → Ŵ (rows, d).

    Each row solves the smaller of two equivalent systems: the kept block,
    H[K, K] Ŵ[K] = (W H)[K]; or the pruned block (OBS's multi-weight removal),
    Ŵ = W − W[P] (H⁻¹[P, P])⁻¹ H⁻¹[P, :]. Rows are sorted by system size and solved in
    batches padded to the largest in the batch (padding = identity rows, solution 0).
    ``hinv`` (= H⁻¹) is computed when needed and not given.
    """
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    out = torch.where(keep, w, zero)
    n_keep = keep.sum(dim=1)
    d = w.shape[1]
    todo = (n_keep > 0) & (n_keep < d)  # untouched (or emptied) rows stay bit-exact
    kept_form = n_keep <= d - n_keep
    for use_kept in (True, False):
        rows = torch.nonzero(todo & (kept_form if use_kept else ~kept_form)).flatten()
        if rows.numel() == 0:
            continue
        sizes = n_keep[rows] if use_kept else d - n_keep[rows]
        sizes, order = torch.sort(sizes, stable=True)
        rows = rows[order]
        if not use_kept and hinv is None:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        mat = h if use_kept else hinv
        start = 0
        while start < rows.numel():
            width = int(sizes[min(start + _ROWS_PER_SOLVE, rows.numel()) - 1])
            stop = min(start + max(1, _CHUNK_ELEMENTS // (width * d)), start + _ROWS_PER_SOLVE, rows.numel())
            width = int(sizes[stop - 1])
            r = rows[start:stop]
            start = stop
            m = keep[r] if use_kept else ~keep[r]
            idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :width]  # the row's K (or P) first
            v = (torch.arange(width, device=w.device)[None, :] < m.sum(dim=1, keepdim=True)).to(h.dtype)
            eye = torch.eye(width, dtype=h.dtype, device=h.device)
            a = mat.reshape(-1)[idx[:, :, None] * d + idx[:, None, :]]  # mat[K, K] per row (one flat gather)
            a = a * (v[:, :, None] * v[:, None, :]) + eye * (1 - v)[:, None, :]
            rhs = torch.gather(w[r] @ h if use_kept else w[r], 1, idx) * v
            # LU, not Cholesky: A is SPD, and batched LAPACK getrf is several times faster than potrf on CPUs.
            sol = torch.linalg.solve(a, rhs.unsqueeze(-1)).squeeze(-1) * v
            full = torch.zeros_like(w[r]).scatter_(1, idx, sol)  # padding entries carry 0 (v = 0)
            new = full if use_kept else w[r] - full @ hinv  # δ = −y · H⁻¹[P, :]
            out[r] = torch.where(keep[r], new, zero)
    return out


@torch.no_grad()
def solve_obs(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, block: int = 128) -> torch.Tensor:
    """SparseGPT's OBS sweep with a fixed mask (Frantar & Alistarh 2023, Alg. 1): (rows, d) → (rows, d)."""
    w = w.clone()
    d = w.shape[1]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = ~keep
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.where(pruned[:, i1 + i], torch.zeros_like(col), col)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def choose_solver(method: str, rows: int, d: int, device: torch.device) -> str:
    """``exact`` or ``obs`` for a layer group of ``rows`` × ``d`` (``auto``: by ``EXACT_FLOP_BUDGET``)."""
    if method != "auto":
        return method
    budget = EXACT_FLOP_BUDGET.get(device.type, EXACT_FLOP_BUDGET["cpu"])
    return "exact" if rows * (d / 2) ** 3 / 3 <= budget else "obs"


@dataclass
class Reconstructor:
    """Per-layer damped H from the dense model on D_tune; ``apply`` reconstructs masked weights.

    ``hessians``: index into the prunable weights → damped H of shape (groups, d, d), float64.
    ``skipped``: weight name → why it is only masked, not reconstructed.
    ``unavailable``: why nothing is reconstructed at all (the graph could not be probed); the levels
    are then plain masks, and the report says so.
    """

    hessians: dict[int, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)
    method: str = "auto"
    n_tune: int = 0
    damp: float = DAMP
    solvers: dict[int, str] = field(default_factory=dict)  # layer index → "exact" | "obs"
    unavailable: str | None = None
    transposed: set[int] = field(default_factory=set)  # layers stored (in, out), used as x @ W (HF Conv1D)
    _hinv: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    @torch.no_grad()
    def from_tune(cls, module: torch.jit.ScriptModule, weights: list[PrunableWeight], x_tune: torch.Tensor,
                  batch_size: int, *, damp: float = DAMP, method: str = "auto") -> Reconstructor:
        """One pass of the dense ``module`` over ``x_tune`` (D_tune only, (n_tune, *input_shape))."""
        if method not in ("auto", "exact", "obs"):
            raise ValueError(f"Unknown reconstruction method {method!r}. Valid methods: 'auto', 'exact', 'obs'.")
        if x_tune.shape[0] == 0:
            raise ModelError("Weight reconstruction needs tuning data (D_tune) but it is empty.",
                             code="tune_data_required")
        from .exported import NOT_RECONSTRUCTED, is_exported

        if is_exported(module):  # no graph probe for FX graphs: every layer is masked, with the reason
            return cls(hessians={}, skipped={w.name: NOT_RECONSTRUCTED for w in weights}, method=method,
                       n_tune=int(x_tune.shape[0]), damp=damp, unavailable=NOT_RECONSTRUCTED)
        try:
            probe = build_probe(module, weights)
        except ModelError as exc:
            if exc.code != "model_not_probeable":
                raise
            # Fall back to plain masking, layer by layer, with the reason in the report.
            return cls(hessians={}, skipped={w.name: str(exc) for w in weights}, method=method,
                       n_tune=int(x_tune.shape[0]), damp=damp, unavailable=str(exc))
        skipped = dict(probe.unprobed)
        index = {w.name: i for i, w in enumerate(weights)}
        sums: dict[int, torch.Tensor] = {}
        transposed: set[int] = set()
        kinds: dict[int, set[str]] = {}
        # All probed layer inputs of a batch are alive at once: cut the batch so they fit in _PROBE_BYTES.
        _, one = probe(x_tune[:1])
        per_sample = sum(c.x.numel() * c.x.element_size() for calls in one.values() for c in calls)
        batch_size = max(1, min(batch_size, _PROBE_BYTES // max(1, per_sample)))
        for start in range(0, x_tune.shape[0], batch_size):
            _, captured = probe(x_tune[start:start + batch_size])
            for name, calls in captured.items():
                i = index[name]
                shape = weights[i].param.shape
                for call in calls:
                    if call.kind == "conv_transpose":
                        skipped[name] = "transposed convolutions are masked, not reconstructed"
                        break
                    kinds.setdefault(i, set()).add(call.kind)
                    if call.kind == "linear_t":
                        transposed.add(i)
                    groups = call.groups if call.kind == "conv" else 1
                    for rows in layer_row_chunks(call, shape):
                        sums[i] = accumulate_hessian(sums.get(i), rows, groups)
        for i, ks in kinds.items():
            if "linear_t" in ks and len(ks) > 1:
                skipped[weights[i].name] = "used both as x @ W and as a linear layer's weight: masked only"
        for w in weights:
            if w.kind == "rnn":
                skipped[w.name] = ("an RNN weight: its inputs at every time step stay inside the fused RNN op, "
                                   "which cannot be probed; masked, not reconstructed")
            elif w.tied:  # its inputs at the other names' uses are not in H: masked only
                skipped[w.name] = (f"tied to {', '.join(w.tied)}: one tensor used in several places, "
                                   "masked, not reconstructed")
            elif w.name not in skipped and index[w.name] not in sums:
                skipped[w.name] = f"a {w.kind} weight: only linear and convolution layers are reconstructed"
        hessians = {i: damped(h, damp) for i, h in sums.items() if weights[i].name not in skipped}
        solvers = {i: choose_solver(method, weights[i].param.numel() // h.shape[0] // h.shape[-1], h.shape[-1],
                                    h.device)
                   for i, h in hessians.items()}
        return cls(hessians=hessians, skipped=skipped, method=method, n_tune=int(x_tune.shape[0]), damp=damp,
                   solvers=solvers, transposed=transposed & set(hessians))

    @torch.no_grad()
    def reconstruct(self, i: int, original: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Reconstructed weight of layer ``i`` (same shape and dtype as ``original``), zero where ~keep."""
        if i in self.transposed:  # W (in, out) used as x @ W: its rows are the columns of Wᵀ
            return self._reconstruct(i, original.t(), keep.t()).t()
        return self._reconstruct(i, original, keep)

    def _reconstruct(self, i: int, original: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.hessians[i]
        groups, d = h.shape[0], h.shape[1]
        w = original.reshape(groups, -1, d).to(h.dtype)  # output rows are grouped contiguously
        k = keep.reshape(groups, -1, d)
        solver = self.solvers.get(i) or choose_solver(self.method, w.shape[1], d, h.device)
        if solver == "exact":
            if i not in self._hinv:  # H⁻¹ for the pruned-block form, once per layer
                self._hinv[i] = torch.cholesky_inverse(torch.linalg.cholesky(h))
            out = torch.stack([solve_exact(w[g], k[g], h[g], self._hinv[i][g]) for g in range(groups)])
        else:
            out = torch.stack([solve_obs(w[g], k[g], h[g]) for g in range(groups)])
        out = out.reshape(original.shape).to(original.dtype)
        return torch.where(keep, out, torch.zeros((), dtype=original.dtype, device=original.device))

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor], originals: list[torch.Tensor], keep_masks: list[torch.Tensor]) -> None:
        """Write the reconstructed weights into the live ``params`` in place (masked layers only)."""
        for i in self.hessians:
            if bool(keep_masks[i].all()):
                continue  # nothing pruned in this layer: apply_masks already wrote the original
            params[i].data.copy_(self.reconstruct(i, originals[i], keep_masks[i]))

    def summary(self, weights: list[PrunableWeight]) -> dict[str, Any]:
        """JSON-ready description for the result object."""
        return {
            "method": self.method,
            "damp": self.damp,
            "inputs": "dense model on D_tune",
            "n_tune": self.n_tune,
            "layers": [weights[i].name for i in sorted(self.hessians)],
            "solver": {weights[i].name: self.solvers[i] for i in sorted(self.hessians)},
            "skipped": dict(sorted(self.skipped.items())),
            "unavailable": self.unavailable,
            # How many of the candidate layers were really reconstructed, and why the others were not.
            "reconstructed_layers": len(self.hessians),
            "of_layers": len(weights),
            "not_reconstructed": {w.name: self.skipped.get(w.name, "not probed")
                                  for i, w in enumerate(weights) if i not in self.hessians},
        }


__all__ = ["DAMP", "Reconstructor", "accumulate_hessian", "choose_solver", "damped", "layer_row_chunks", "layer_rows", "patches",
           "solve_exact", "solve_obs"]
