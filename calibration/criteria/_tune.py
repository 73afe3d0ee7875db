"""D_tune plumbing shared by the data-driven criteria (mu, obd): tune data, loss, gradients on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError, ModelError
from ..inputs import call, select_output
from . import ScoreContext


def require_tune_data(ctx: ScoreContext, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.tune_x is None or ctx.tune_y is None or ctx.tune_x.shape[0] == 0:
        raise ConfigError(
            f"The '{criterion}' criterion needs tuning data (D_tune) and none was given. Set "
            "'tune_fraction' > 0 (default 0.25 for this criterion)"
            + (", or upload training statistics for 'mu'." if criterion == "mu" else "."),
            code="criterion_needs_tune_data",
        )
    return ctx.tune_x, ctx.tune_y.long()


def tune_loss(module: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor,
          device: torch.device, *, output: int | str | None = None) -> torch.Tensor:
    """Mean cross-entropy of the samples ``idx`` (indices into D_tune)."""
    x = x_all[idx.to(x_all.device)].to(device)  # a tensor, or every input of a ModelInputs, same rows
    y = y_all[idx.to(y_all.device)].to(device)
    logits = select_output(call(module, x), output)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and y.dim() == 2 and logits.shape[:2] == y.shape:
        # A sequence model: mean cross-entropy over positions (labels −100 or, unlabelled, none ignored).
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(
            f"The model must return logits of shape (batch, classes); for a batch of {x.shape[0]} it returned {shape}.",
            code="model_bad_output",
        )
    if y.numel() and int(y.max()) >= logits.shape[1]:
        raise DataError(
            f"Label {int(y.max())} is out of range for a model with {logits.shape[1]} outputs.",
            code="data_labels_out_of_range",
        )
    return F.cross_entropy(logits.float(), y)


@contextlib.contextmanager
def differentiable(module: torch.nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Eval mode and gradients on ``params`` for the block; flags and mode restored after.

    Gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is ever written.
    """
    was_training = module.training
    flags = [p.requires_grad for p in params]
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        module.train(was_training)
