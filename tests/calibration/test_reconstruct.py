"""Layer-input probing of TorchScript graphs and weight reconstruction (Brain Surgeon) on D_tune."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from calibration import ConfigError, ModelError, certify, validate_config
from service.cli.offline import certify_config, parse_certify
from calibration.data import split_tune_cal
from calibration.graph_probe import build_probe
from calibration.masks import NestedMasks
from calibration.model import find_prunable
from calibration.reconstruct import Reconstructor, layer_rows, solve_exact, solve_obs

pytestmark = pytest.mark.timeout(120)


def _eager_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inputs of every Linear/Conv of the eager model, by weight name, through forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, sub in model.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(sub.register_forward_hook(
                lambda mod, inp, out, name=f"{path}.weight": seen.setdefault(name, []).append(inp[0].detach())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def _compiled(kind: str, eager: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    return torch.jit.script(eager) if kind == "scripted" else torch.jit.trace(eager, example)


@pytest.mark.parametrize("kind", ["scripted", "traced"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_probe_returns_the_inputs_eager_forward_hooks_see(kind, net, digits, mlp_eager, cnn_eager):
    eager = mlp_eager if net == "mlp" else cnn_eager
    x = torch.from_numpy(digits.x_cal[:37])
    if net == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    module = _compiled(kind, eager, x[:4])
    weights = find_prunable(module)
    probe = build_probe(module, weights)
    out, captured = probe(x)
    expected = _eager_inputs(eager, x)
    assert probe.unprobed == {}
    assert sorted(captured) == sorted(expected) == sorted(w.name for w in weights)
    for name, calls in captured.items():
        assert len(calls) == len(expected[name]) == 1
        torch.testing.assert_close(calls[0].x, expected[name][0], rtol=0, atol=0)
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)


class _Geometry(nn.Module):
    """Convolutions with stride, dilation, groups, 'same' padding, 1-d and 3-d; one layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(4, 8, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, stride=2)
        self.c4 = nn.Conv2d(4, 6, 4, padding="same")
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.c1(x[:, :, 0, :, 0]).sum(), self.c2(x[:, :, :, :, 0]).sum(), self.c3(x[:, :2]).sum(),
             self.c4(x[:, :, :, :, 1]).sum(), self.fc(x[:, 0, 0, 0]).sum(), self.fc(x[:, 1, 1, 1]).sum()]
        return torch.stack(y).unsqueeze(0)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_unfolded_rows_times_weight_reproduce_every_layer_output(kind):
    torch.manual_seed(0)
    eager = _Geometry().eval()
    x = torch.randn(3, 4, 9, 10, 5)
    module = _compiled(kind, eager, x)
    weights = find_prunable(module)
    _, captured = build_probe(module, weights)(x)
    assert len(captured["fc.weight"]) == 2  # a layer called twice yields both inputs
    subs = dict(eager.named_modules())
    for w in weights:
        for call in captured[w.name]:
            rows = layer_rows(call, w.param.shape)
            g = call.groups
            out_g, d = w.param.shape[0] // g, rows.shape[1] // g
            wv = w.param.detach().reshape(g, out_g, d)
            got = torch.cat([rows[:, i * d:(i + 1) * d] @ wv[i].T for i in range(g)], dim=1)
            sub = subs[w.name[: -len(".weight")]]
            with torch.no_grad():
                ref = sub(call.x) - sub.bias.view(1, -1, *([1] * (call.x.dim() - 2)))
            torch.testing.assert_close(got, ref.movedim(1, -1).reshape(-1, w.param.shape[0]), rtol=1e-5, atol=1e-5)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            x = self.a(x)
        return self.b(x)


class _AllBranchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return self.a(x)
        return -self.a(x)


def test_layers_inside_control_flow_are_reported_and_an_unprobeable_graph_is_refused():
    module = torch.jit.script(_Branchy().eval())
    probe = build_probe(module, find_prunable(module))
    assert set(probe.unprobed) == {"a.weight"} and "control flow" in probe.unprobed["a.weight"]
    _, captured = probe(torch.randn(3, 4))
    assert set(captured) == {"b.weight"}
    only_branches = torch.jit.script(_AllBranchy().eval())
    with pytest.raises(ModelError, match="reconstruction needs layer inputs; this graph could not be probed"):
        build_probe(only_branches, find_prunable(only_branches))


@pytest.fixture(scope="module")
def scripted_mlp(mlp_eager):
    module = torch.jit.script(mlp_eager)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _layer_output_errors(rows: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(torch.linalg.norm(rows.double() @ (w.double() - w_hat.double()).T))


@pytest.mark.parametrize("method", ["exact", "obs"])
def test_reconstruction_reduces_layer_output_error_on_d_tune_and_keeps_zeros(method, scripted_mlp, digits):
    weights = find_prunable(scripted_mlp)
    x_tune = torch.from_numpy(digits.x_train)
    rec = Reconstructor.from_tune(scripted_mlp, weights, x_tune, 256, method=method)
    assert sorted(rec.hessians) == [0, 1, 2] and rec.skipped == {}
    _, captured = build_probe(scripted_mlp, weights)(x_tune)
    keep = NestedMasks.from_scores([w.param.abs() for w in weights], "global").keep_masks(0.8)
    total_masked = total_reconstructed = 0.0
    for i, w in enumerate(weights):
        w0 = w.param.detach()
        w_hat = rec.reconstruct(i, w0, keep[i])
        assert bool((w_hat[~keep[i]] == 0).all()), "pruned weights must stay exactly zero"
        assert not torch.equal(w_hat[keep[i]], w0[keep[i]]), "kept weights should be re-fitted"
        rows = layer_rows(captured[w.name][0], w0.shape)
        masked, reconstructed = _layer_output_errors(rows, w0, w0 * keep[i]), _layer_output_errors(rows, w0, w_hat)
        assert reconstructed < masked, (w.name, masked, reconstructed)
        total_masked += masked**2
        total_reconstructed += reconstructed**2
    assert total_reconstructed < 0.75 * total_masked


def test_exact_solver_equals_the_masked_least_squares_solution_row_by_row():
    torch.manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    h = x.T @ x + 0.1 * torch.eye(12, dtype=torch.float64)
    w = torch.randn(9, 12, dtype=torch.float64)
    keep = torch.rand(9, 12) > torch.linspace(0.05, 0.95, 9)[:, None]  # rows from nearly dense to nearly empty
    keep[0] = True
    keep[1] = False
    got = solve_exact(w, keep, h)
    for r in range(9):
        k = keep[r]
        expected = torch.zeros(12, dtype=torch.float64)
        if k.any():
            expected[k] = torch.linalg.solve(h[k][:, k], (w[r] @ h)[k])
        torch.testing.assert_close(got[r], expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[0], w[0])  # an unpruned row is returned bit-exact
    assert torch.equal(solve_obs(w, torch.ones_like(keep), h), w)


def _prunable_zeros(module: torch.nn.Module) -> int:
    return sum(int((w.param == 0).sum()) for w in find_prunable(module))


@pytest.mark.parametrize("model_key, data_key", [("mlp", "data_flat"), ("cnn", "data_img")])
def test_certify_with_reconstruct_writes_the_weights_that_were_tested(model_key, data_key, files, tmp_path):
    out = tmp_path / "pruned.pt"
    grid = [0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    cfg = {"epsilon": 0.03, "delta": 0.1, "seed": 5, "reconstruct": True, "sparsities": grid}
    r = certify(files[model_key], files[data_key], cfg, out=out).result
    assert r["certified"] and r["n_tune"] > 0
    assert r["reconstruction"]["skipped"] == {} and len(r["reconstruction"]["layers"]) == len(r["layers"])
    pruned = torch.jit.load(str(out))
    total = r["prunable_parameters"]
    assert _prunable_zeros(pruned) == r["zeroed_parameters"] == int(np.floor(r["certified_sparsity"] * total + 0.5))
    # Kept weights were re-fitted (not the masked originals).
    original = torch.jit.load(str(files[model_key]))
    changed = [not torch.equal(a.param[a.param != 0], b.param[a.param != 0])
               for a, b in zip(find_prunable(pruned), find_prunable(original))]
    assert any(changed)
    # The artifact's predictions on D_cal are those of the certified level.
    data = np.load(files[data_key])
    split = split_tune_cal(len(data["y"]), 0.25, 5)
    with torch.no_grad():
        pred = pruned(torch.from_numpy(data["x"][split.cal])).argmax(1).numpy()
    accuracy = float(np.mean(pred == data["y"][split.cal]))
    assert accuracy == r["pruned_accuracy"]
    level = next(lv for lv in r["levels"] if lv["sparsity"] == r["certified_sparsity"])
    assert level["rejected"]
    assert r["dense_accuracy"] - r["pruned_accuracy"] == pytest.approx(level["empirical_risk"], abs=1e-12)


def test_reconstruction_lifts_the_certified_sparsity_over_plain_masking(files):
    grid = [round(0.05 * i, 2) for i in range(20)]
    base = {"epsilon": 0.03, "delta": 0.1, "seed": 5, "sparsities": grid, "tune_fraction": 0.25}
    plain = certify(files["mlp"], files["data_flat"], base).result
    rebuilt = certify(files["mlp"], files["data_flat"], {**base, "reconstruct": True}).result
    assert rebuilt["certified_sparsity"] > plain["certified_sparsity"]


def test_reconstruct_without_tune_data_is_refused(files):
    with pytest.raises(ConfigError, match="weight reconstruction needs tuning data") as info:
        certify(files["mlp"], files["data_flat"], {"reconstruct": True, "tune_fraction": 0.0})
    assert info.value.code == "tune_data_required"


def test_reconstruct_config_and_cli_flag():
    assert validate_config({"reconstruct": True}).reconstruct is True
    assert validate_config({"reconstruct": True}).resolved_tune_fraction(False) == 0.25
    assert validate_config({}).reconstruct is False
    with pytest.raises(ConfigError, match="'reconstruct' parameter must be true or false"):
        validate_config({"reconstruct": "yes"})
    args = parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", "--reconstruct"])
    assert certify_config(args)["reconstruct"] is True


class _BranchyMLP(nn.Module):
    """Every layer is called inside control flow: no layer input can be probed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.shape[0] > 0):
            return self.b(torch.relu(self.a(x)))
        return x[:, :10]


def test_an_unprobeable_graph_falls_back_to_plain_masks_and_says_so(files, tmp_path):
    from calibration.report import format_summary

    torch.manual_seed(0)
    model = tmp_path / "branchy.pt"
    torch.jit.script(_BranchyMLP().eval()).save(str(model))
    out = tmp_path / "pruned.pt"
    cfg = {"reconstruct": True, "risk": "disagreement", "epsilon": 0.2, "sparsities": [0.0, 0.1, 0.2, 0.3], "seed": 1}
    r = certify(model, files["data_flat"], cfg, out=out).result
    rec = r["reconstruction"]
    assert rec["unavailable"] and "could not be probed" in rec["unavailable"] and rec["layers"] == []
    assert set(rec["skipped"]) == {"a.weight", "b.weight"}
    assert "reconstructed" not in r["guarantee"]
    assert "unavailable, plain masks" in format_summary(r)
    # The artifact is the plain magnitude mask of the original weights.
    original, pruned = torch.jit.load(str(model)), torch.jit.load(str(out))
    for w0, w in zip(find_prunable(original), find_prunable(pruned)):
        kept = w.param != 0
        assert torch.equal(w.param[kept], w0.param[kept])
