"""Per-parameter training statistics for the ``mu`` criterion: record, save, load and validate.

M&U (Ko, Oehmcke, Gieseke, arXiv 1912.04845) scores a weight by |w| / σ̂(w), where σ̂ is the
spread of the weight over successive optimisation updates (a pseudo-bootstrap). Users record
that spread in their own training loop with :class:`TrainingStatsRecorder` and upload the file
it writes; the worker reads it back with :func:`load_uncertainty`.

File format ``certiprune-uncertainty/1`` (safetensors):

- for every recorded parameter ``<name>`` (its name in ``model.named_parameters()``, which is
  also its name after ``torch.jit.script`` / ``torch.jit.trace``): a tensor ``<name>.var``, the
  sample variance (ddof = 1) of the weight over the recorded updates, and ``<name>.mean``, its
  mean; both float32 with the parameter's shape;
- metadata ``{"format": "certiprune-uncertainty/1", "count": "<number of recorded updates>"}``
  (plus ``"ddof": "1"`` and ``"start_after"`` for information).

Only ``.var`` is needed for scoring; extra parameters are ignored.

The recorder uses nothing but torch and safetensors, so it can be copied into a training script
that does not install certiprune.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .errors import UncertaintyError

if TYPE_CHECKING:
    from .model import PrunableWeight

FORMAT = "certiprune-uncertainty/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DataParallel/DDP (``.module``) and torch.compile (``._orig_mod``) wrappers.

    Their parameter names carry a prefix that the exported model does not have.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if type(model).__name__ in ("DataParallel", "DistributedDataParallel") and isinstance(
            getattr(model, "module", None), torch.nn.Module
        ):
            model = model.module
            continue
        return model


class TrainingStatsRecorder:
    """Running mean and variance (Welford) of parameters over optimiser updates.

    Usage, in your own training loop::

        rec = TrainingStatsRecorder(model, start_after=100)
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            rec.update()
        rec.save("uncertainty.safetensors")

    Parameters
    ----------
    model : the eager ``nn.Module`` being trained (DataParallel/DDP/torch.compile wrappers are
        unwrapped so that names match the exported model).
    names : parameter names to track; default every parameter with ``dim() >= 2`` (the weights
        of Linear and Conv layers, i.e. everything certiprune may prune, and some more).
    start_after : number of ``update()`` calls to ignore first, to skip the early transient of
        training (the spread there reflects the descent, not the uncertainty at the end).
    dtype : accumulator dtype; float64 (default) or float32 to halve the memory. Accumulators
        live on each parameter's device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        names: Iterable[str] | None = None,
        start_after: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(start_after, bool) or not isinstance(start_after, int) or start_after < 0:
            raise ValueError(f"start_after must be an integer >= 0. Got {start_after!r}.")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32. Got {dtype!r}.")
        params = dict(_unwrap(model).named_parameters())
        if names is None:
            chosen = [n for n, p in params.items() if p.dim() >= 2]
        else:
            chosen = list(names)
            unknown = [n for n in chosen if n not in params]
            if unknown:
                raise ValueError(
                    f"Unknown parameter name(s) {unknown}. The model's parameters are: {sorted(params)}."
                )
        if not chosen:
            raise ValueError("No parameters to record: the model has no parameter with dim() >= 2; pass names=.")
        self._params = {n: params[n] for n in chosen}
        self._mean = {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in self._params.items()}
        self._m2 = {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in self._params.items()}
        self.start_after = start_after
        self.calls = 0  # update() calls, including skipped ones
        self.count = 0  # updates that entered the statistics

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def update(self) -> None:
        """Add the current parameter values; call once after every ``optimizer.step()``."""
        self.calls += 1
        if self.calls <= self.start_after:
            return
        self.count += 1
        for name, param in self._params.items():
            x = param.detach().to(self._mean[name].dtype)
            delta = x - self._mean[name]
            self._mean[name].add_(delta, alpha=1.0 / self.count)
            self._m2[name].add_(delta * (x - self._mean[name]))

    def mean(self) -> dict[str, torch.Tensor]:
        """Running mean of each parameter over the recorded updates."""
        return {n: m.clone() for n, m in self._mean.items()}

    def variance(self) -> dict[str, torch.Tensor]:
        """Sample variance (ddof = 1) of each parameter; needs at least two recorded updates."""
        if self.count < 2:
            raise ValueError(
                f"The variance needs at least 2 recorded updates; got {self.count} "
                f"({self.calls} update() calls, start_after={self.start_after}). "
                "Call rec.update() after every optimizer.step()."
            )
        return {n: (m2 / (self.count - 1)).clamp_(min=0.0) for n, m2 in self._m2.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``certiprune-uncertainty/1`` safetensors file (float32, CPU tensors)."""
        from safetensors.torch import save_file

        var = self.variance()
        tensors: dict[str, torch.Tensor] = {}
        for name in self._params:
            tensors[f"{name}.var"] = var[name].to(device="cpu", dtype=torch.float32).contiguous()
            tensors[f"{name}.mean"] = self._mean[name].to(device="cpu", dtype=torch.float32).contiguous()
        metadata = {"format": FORMAT, "count": str(self.count), "ddof": "1", "start_after": str(self.start_after)}
        save_file(tensors, os.fspath(path), metadata=metadata)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_uncertainty(path: str | os.PathLike, weights: list[PrunableWeight]) -> dict[str, torch.Tensor]:
    """Read a ``certiprune-uncertainty/1`` file; return prunable weight name → variance tensor.

    Each returned tensor is float32 with the weight's shape, on the weight's device. Raises
    ``UncertaintyError`` (codes ``uncertainty_malformed``, ``uncertainty_missing_parameter``,
    ``uncertainty_shape_mismatch``, ``uncertainty_not_finite``, ``uncertainty_too_few_updates``)
    when the file does not fit the model. Names recorded under a DataParallel/DDP (``module.``)
    or torch.compile (``_orig_mod.``) wrapper are accepted.
    """
    from safetensors import safe_open

    fname = os.path.basename(os.fspath(path))
    hint = (f"Record the statistics with calibration.uncertainty.TrainingStatsRecorder and upload the file "
            f"written by rec.save() (format {FORMAT}).")
    try:
        handle = safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError with its own text
        raise UncertaintyError(
            f"The uncertainty file {fname!r} is not a readable safetensors file "
            f"({str(exc).replace(os.fspath(path), fname)}). {hint}",  # no server paths in messages
            code="uncertainty_malformed",
        ) from exc
    with handle as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise UncertaintyError(
                f"The uncertainty file's metadata 'format' must be {FORMAT!r}. Got {metadata.get('format')!r}. {hint}",
                code="uncertainty_malformed",
            )
        raw_count = metadata.get("count")
        try:
            count = int(raw_count)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UncertaintyError(
                f"The uncertainty file's metadata 'count' must be an integer (the number of recorded "
                f"updates). Got {raw_count!r}. {hint}",
                code="uncertainty_malformed",
            ) from None
        if count < 2:
            raise UncertaintyError(
                f"The uncertainty file records {count} update(s); a variance needs at least 2. Call "
                "rec.update() after every optimizer.step() and train for more steps before rec.save().",
                code="uncertainty_too_few_updates",
            )
        stored: dict[str, str] = {}
        for key in f.keys():
            if key.endswith(".var"):
                stored.setdefault(_strip_wrappers(key[: -len(".var")]), key)
        out: dict[str, torch.Tensor] = {}
        for w in weights:
            key = stored.get(w.name)
            if key is None:
                raise UncertaintyError(
                    f"The uncertainty file has no variance for the prunable weight {w.name!r} "
                    f"(expected a tensor named {w.name + '.var'!r}; the file has "
                    f"{len(stored)} '.var' tensor(s)). Record every Linear/Conv weight: "
                    "TrainingStatsRecorder(model) does by default.",
                    code="uncertainty_missing_parameter",
                )
            var = f.get_tensor(key)
            if tuple(var.shape) != tuple(w.param.shape):
                raise UncertaintyError(
                    f"The variance {key!r} has shape {list(var.shape)} but the model's weight {w.name!r} "
                    f"has shape {list(w.param.shape)}. Upload statistics recorded on this model.",
                    code="uncertainty_shape_mismatch",
                )
            if not var.is_floating_point():
                raise UncertaintyError(
                    f"The variance {key!r} must be a floating-point tensor. Got dtype {var.dtype}.",
                    code="uncertainty_malformed",
                )
            var = var.to(torch.float32)
            finite = torch.isfinite(var)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise UncertaintyError(
                    f"The variance {key!r} has {bad} NaN or infinite entr{'y' if bad == 1 else 'ies'}. "
                    "Check the training run for divergence.",
                    code="uncertainty_not_finite",
                )
            if bool((var < 0).any()):
                lowest = float(var.min())
                raise UncertaintyError(
                    f"The variance {key!r} has negative entries (lowest {lowest:.3g}); a variance is >= 0.",
                    code="uncertainty_not_finite",
                )
            out[w.name] = var.to(w.param.device)
    return out


__all__ = ["FORMAT", "TrainingStatsRecorder", "load_uncertainty"]
