"""BN re-estimation equals the definition (batch-size-weighted average of per-batch statistics),
for scripted and traced graphs alike, with dropout left in eval mode."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from calibration import batchnorm


class Net(nn.Module):
    def __init__(self, momentum: float | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn1 = nn.BatchNorm2d(6, momentum=momentum)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn2 = nn.BatchNorm1d(5, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.fc(self.drop(h).flatten(1)))


def _roundtrip(m: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(m, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _expected(net: Net, x: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Independent computation: per batch, the batch mean and unbiased variance of each BN input in a
    forward where earlier BN layers normalise with that batch's statistics; weighted by batch size."""
    sums = [[torch.zeros(6), torch.zeros(6)], [torch.zeros(5), torch.zeros(5)]]
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch]
        a = net.conv(xb)
        m1, v1 = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=True)
        h = torch.relu((a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(a.var((0, 2, 3), unbiased=False,
                       keepdim=True) + net.bn1.eps) * net.bn1.weight.view(1, -1, 1, 1) + net.bn1.bias.view(1, -1, 1, 1))
        f = net.fc(h.flatten(1))
        m2, v2 = f.mean(0), f.var(0, unbiased=True)
        for acc, (m, v) in zip(sums, [(m1, v1), (m2, v2)]):
            acc[0] += m * xb.shape[0]
            acc[1] += v * xb.shape[0]
    return [(m / x.shape[0], v / x.shape[0]) for m, v in sums]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["scripted", "traced"])
@torch.no_grad()
def test_reestimation_matches_the_definition(kind: str, momentum: float | None) -> None:
    torch.manual_seed(0)
    net = Net(momentum).eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(70, 3, 6, 6) * 2 + 0.3
    module = torch.jit.script(net) if kind == "scripted" else torch.jit.trace(net, x[:4])
    module = _roundtrip(module).eval()
    forward = batchnorm.train_mode_forward(module)
    assert (forward is None) == (kind == "scripted")  # only the traced graph needs the rewritten copy
    assert batchnorm.reestimate(module, x, 32, forward, momentum=None if forward is None else 1.0)
    bns = batchnorm.batchnorm_modules(module)
    for bn, (mean, var) in zip(bns, _expected(net, x, 32)):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert not bn.training
    # The module's own graph is untouched: eval mode, deterministic (dropout off), per-sample outputs.
    torch.testing.assert_close(module(x[:8])[:2], module(x[:2]), rtol=1e-5, atol=1e-5)


def test_traced_graph_without_the_rewrite_cannot_reestimate() -> None:
    """The detection still works: a traced graph run as it is never updates its statistics."""
    net = Net(0.1).eval()
    x = torch.randn(40, 3, 6, 6)
    module = _roundtrip(torch.jit.trace(net, x[:4])).eval()
    before = [b.clone() for b in module.buffers()]
    assert not batchnorm.reestimate(module, x, 16)
    assert all(torch.equal(a, b) for a, b in zip(before, module.buffers()))
