"""BatchNorm re-estimation on D_tune after masking.

Pruning shifts every activation's mean and variance; the BN running statistics of the dense
model then normalise with the wrong numbers and one-shot pruning of conv nets collapses. We
re-estimate them on D_tune only (SPEC §1), like ``torch.optim.swa_utils.update_bn``: each BN
layer's statistics are the batch-size-weighted average of per-batch statistics.

TorchScript constants (``momentum``) cannot be changed, so per batch we zero the running buffers,
run the batch in train mode, and read the batch statistics back as running / momentum.

A scripted graph reads ``self.training``, so ``bn.train()`` is enough. A traced graph bakes
``training=False`` into every ``aten::batch_norm`` call: :func:`train_mode_forward` copies the
forward graph, turns those constants to ``True`` and runs the copy on the live module (its own
graph, and so the artifact, is untouched). Only when even that is impossible do we say so.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .model import batchnorm_modules, quiet_torchscript_warnings


def _momentum(bn: torch.nn.Module) -> float | None:
    m = getattr(bn, "momentum", 0.1)
    return None if m is None else float(m)


def snapshot(module: torch.nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Copies of every BN layer's running statistics (to restore after a level)."""
    return [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
            for bn in batchnorm_modules(module)]


@torch.no_grad()
def load_snapshot(module: torch.nn.Module, snap: list[tuple[torch.Tensor, ...]]) -> None:
    for bn, (mean, var, count) in zip(batchnorm_modules(module), snap):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.copy_(count)


def train_mode_forward(module: torch.nn.Module) -> Callable[[torch.Tensor], Any] | None:
    """A forward of ``module`` whose BatchNorm calls use batch statistics and update the running buffers.

    None when the module itself does that in train mode (scripted graphs, eager modules) or when its
    graph cannot be copied; otherwise (traced graphs) a function over a copy of the inlined graph
    with every constant ``training=False`` of ``aten::batch_norm`` turned to ``True`` and its
    momentum to 1 (pass ``momentum=1.0`` to :func:`reestimate`). It reads the live parameters and
    buffers of ``module``, like ``module(x)``.
    """
    try:
        graph = module._c._get_method("forward").graph.copy()  # type: ignore[union-attr]
        torch._C._jit_pass_inline(graph)
        baked = [n for n in graph.findAllNodes("aten::batch_norm")
                 if (flag := list(n.inputs())[5]).node().kind() == "prim::Constant" and flag.toIValue() is False]
        if not baked:
            return None
        for node in baked:
            # training=True, and momentum=1 so each batch's statistics replace the buffers outright
            # (the traced momentum is a constant, 0 where the module's momentum is None).
            for index, value in ((5, True), (6, 1.0)):
                constant = graph.insertConstant(value)
                constant.node().moveBefore(node)
                node.replaceInput(index, constant)
        with quiet_torchscript_warnings():
            fn = torch._C._create_function_from_graph("certiprune_bn_train", graph)
    except Exception:  # not a ScriptModule, or a graph torch will not copy: the module as it is
        return None
    return lambda *x: fn(module._c, *x)  # type: ignore[union-attr]


@torch.no_grad()
def reestimate(module: torch.nn.Module, x_tune: torch.Tensor, batch_size: int,
               forward: Callable[[torch.Tensor], Any] | None = None, momentum: float | None = None) -> bool:
    """Re-estimate BN statistics on ``x_tune`` (n_tune, *input_shape). False if the graph ignores train mode.

    ``forward(xb)`` runs the module on one batch (default ``module(xb)``): the engine passes the
    predictor's forward so the statistics come from the precision and memory layout that the
    levels are evaluated in (and cost one batch of activations in that precision, not fp32).
    ``momentum``: the momentum ``forward`` really uses for every BN layer, when not the modules' own.
    """
    if forward is None:
        from .inputs import call

        def forward(xb: Any) -> Any:
            return call(module, xb)
    bns = batchnorm_modules(module)
    if not bns or x_tune.shape[0] == 0:
        return False
    sums_mean = [torch.zeros_like(bn.running_mean) for bn in bns]
    sums_var = [torch.zeros_like(bn.running_var) for bn in bns]
    seen = 0
    before = snapshot(module)
    try:
        for bn in bns:
            bn.train()
        for start in range(0, x_tune.shape[0], batch_size):
            xb = x_tune[start:start + batch_size]
            if xb.shape[0] < 2 and seen:  # a batch of one has no variance; skip the tail
                continue
            for bn in bns:
                bn.running_mean.zero_()
                bn.running_var.zero_()
                bn.num_batches_tracked.zero_()
            forward(xb)
            for i, bn in enumerate(bns):
                m = momentum if momentum is not None else _momentum(bn)
                factor = 1.0 if m is None else 1.0 / m
                sums_mean[i] += bn.running_mean * factor * xb.shape[0]
                sums_var[i] += bn.running_var * factor * xb.shape[0]
            if seen == 0 and all(not bn.running_var.any() for bn in bns):
                load_snapshot(module, before)
                return False  # training flag is baked into the graph (traced model)
            seen += xb.shape[0]
    finally:
        for bn in bns:
            bn.eval()
    for i, bn in enumerate(bns):
        bn.running_mean.copy_(sums_mean[i] / seen)
        bn.running_var.copy_(sums_var[i] / seen)
        bn.num_batches_tracked.fill_(1)
    return True


__all__ = ["load_snapshot", "reestimate", "snapshot", "train_mode_forward"]
