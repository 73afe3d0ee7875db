"""Data-driven criteria (mu, obd) and the training-statistics format, on real data.

A 64-64-10 MLP is trained on scikit-learn's digits (8×8 images, 10 classes) while a
TrainingStatsRecorder records its weights; the model is scripted, saved and loaded through
``calibration.model.load_model`` like an upload.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from calibration.criteria import ScoreContext, get_criterion
from calibration.criteria import mu as mu_criterion
from calibration.criteria import obd as obd_criterion
from calibration.errors import ConfigError, UncertaintyError
from calibration.model import find_prunable, load_model
from calibration.uncertainty import FORMAT, TrainingStatsRecorder, load_uncertainty

N_TRAIN, N_TUNE = 1000, 400


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, tune, test = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_TUNE], order[N_TRAIN + N_TUNE:]
    return {"x_train": x[train], "y_train": y[train], "x_tune": x[tune], "y_tune": y[tune],
            "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Train with SGD + momentum for 10 epochs, recording the second half of the updates."""
    torch.manual_seed(0)
    eager = _mlp()
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(N_TRAIN / 32)
    recorder = TrainingStatsRecorder(eager, start_after=5 * steps_per_epoch)
    for _ in range(10):
        for batch in torch.randperm(N_TRAIN).split(32):
            loss = nn.functional.cross_entropy(eager(digits["x_train"][batch]), digits["y_train"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recorder.update()
    eager.eval()
    folder = tmp_path_factory.mktemp("trained")
    model_path = folder / "model.pt"
    stats_path = folder / "uncertainty.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(eager), str(model_path))
    recorder.save(stats_path)
    return {"eager": eager, "recorder": recorder, "model_path": model_path, "stats_path": stats_path}


@pytest.fixture()
def scripted(trained):
    """A fresh load per test, so one test's pruning cannot leak into another."""
    module = load_model(trained["model_path"])
    return module, find_prunable(module)


def _context(module, weights, digits, **kw) -> ScoreContext:
    return ScoreContext(module=module, weights=weights, tune_x=digits["x_tune"], tune_y=digits["y_tune"], **kw)


def _accuracy(module, digits) -> float:
    with torch.no_grad():
        return (module(digits["x_test"]).argmax(1) == digits["y_test"]).float().mean().item()


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- TrainingStatsRecorder ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recorder_welford_matches_numpy_over_recorded_iterates(dtype):
    torch.manual_seed(1)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    recorder = TrainingStatsRecorder(layer, names=["weight", "bias"], start_after=4, dtype=dtype)
    iterates: dict[str, list[np.ndarray]] = {"weight": [], "bias": []}
    for step in range(30):
        x, y = torch.randn(8, 3), torch.randn(8, 2)
        loss = ((layer(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.update()
        if step >= 4:
            for name, p in layer.named_parameters():
                iterates[name].append(p.detach().double().numpy().copy())
    assert recorder.count == 26 and recorder.calls == 30
    variance, mean = recorder.variance(), recorder.mean()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name, values in iterates.items():
        stack = np.stack(values)
        np.testing.assert_allclose(variance[name].double().numpy(), stack.var(axis=0, ddof=1), rtol=1e-6, atol=tol)
        np.testing.assert_allclose(mean[name].double().numpy(), stack.mean(axis=0), rtol=1e-6, atol=tol)


def test_recorder_tracks_weights_of_two_or_more_dims_by_default(trained):
    assert trained["recorder"].names == ["0.weight", "2.weight"]


def test_recorder_refuses_variance_before_two_updates(tmp_path):
    recorder = TrainingStatsRecorder(_mlp())
    recorder.update()
    with pytest.raises(ValueError, match="at least 2"):
        recorder.variance()
    with pytest.raises(ValueError, match="at least 2"):
        recorder.save(tmp_path / "u.safetensors")


def test_recorder_rejects_unknown_parameter_names():
    with pytest.raises(ValueError, match="nope"):
        TrainingStatsRecorder(_mlp(), names=["nope"])


def test_scripted_and_traced_parameter_names_equal_eager_names():
    eager = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Sequential(nn.Linear(4 * 6 * 6, 10)))
    eager.eval()
    names = [n for n, _ in eager.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(eager)
        traced = torch.jit.trace(eager, torch.randn(2, 1, 8, 8))
    assert [n for n, _ in scripted.named_parameters()] == names
    assert [n for n, _ in traced.named_parameters()] == names
    assert [w.name for w in find_prunable(scripted)] == ["0.weight", "4.0.weight"]


# --- the safetensors format -----------------------------------------------------------------


def test_saved_statistics_round_trip_through_load_uncertainty(trained, scripted):
    _, weights = scripted
    recorder = trained["recorder"]
    loaded = load_uncertainty(trained["stats_path"], weights)
    assert sorted(loaded) == ["0.weight", "2.weight"]
    expected = recorder.variance()
    for w in weights:
        assert loaded[w.name].dtype == torch.float32 and loaded[w.name].shape == w.param.shape
        torch.testing.assert_close(loaded[w.name], expected[w.name].float(), rtol=1e-6, atol=0)
    raw = load_file(str(trained["stats_path"]))
    torch.testing.assert_close(raw["0.weight.mean"], recorder.mean()["0.weight"].float(), rtol=1e-6, atol=0)
    from safetensors import safe_open

    with safe_open(str(trained["stats_path"]), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert f.metadata()["count"] == str(recorder.count)
    assert recorder.count == 5 * math.ceil(N_TRAIN / 32)


def _valid_tensors(trained) -> dict[str, torch.Tensor]:
    return dict(load_file(str(trained["stats_path"])))


def _write(path, tensors, count="10", fmt=FORMAT):
    metadata = {"count": count}
    if fmt is not None:
        metadata["format"] = fmt
    save_file(tensors, str(path), metadata=metadata)
    return path


def _missing(t):
    del t["2.weight.var"]


def _wrong_shape(t):
    t["2.weight.var"] = torch.ones(10, 63)


def _nan(t):
    t["0.weight.var"][3, 5] = float("nan")


def _negative(t):
    t["0.weight.var"][0, 0] = -1.0


@pytest.mark.parametrize(
    ("corrupt", "code", "named"),
    [
        (_missing, "uncertainty_missing_parameter", ["2.weight"]),
        (_wrong_shape, "uncertainty_shape_mismatch", ["[10, 63]", "[10, 64]"]),
        (_nan, "uncertainty_not_finite", ["0.weight"]),
        (_negative, "uncertainty_not_finite", ["0.weight", "negative"]),
    ],
    ids=["missing", "wrong_shape", "nan", "negative"],
)
def test_load_uncertainty_rejects_statistics_that_do_not_fit(trained, scripted, tmp_path, corrupt, code, named):
    tensors = _valid_tensors(trained)
    corrupt(tensors)
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(UncertaintyError) as info:
        load_uncertainty(path, scripted[1])
    assert info.value.code == code
    for text in named:
        assert text in str(info.value)


def test_load_uncertainty_rejects_a_file_that_is_not_safetensors(scripted, tmp_path):
    path = tmp_path / "stats.safetensors"
    np.savez(path.with_suffix(".npz"), x=np.zeros(3))
    path.write_bytes(path.with_suffix(".npz").read_bytes())
    with pytest.raises(UncertaintyError) as info:
        load_uncertainty(path, scripted[1])
    assert info.value.code == "uncertainty_malformed"


@pytest.mark.parametrize(("fmt", "count", "code"), [
    (None, "10", "uncertainty_malformed"),
    ("certiprune-uncertainty/0", "10", "uncertainty_malformed"),
    (FORMAT, "ten", "uncertainty_malformed"),
    (FORMAT, "1", "uncertainty_too_few_updates"),
], ids=["no_format", "wrong_format", "count_not_int", "count_one"])
def test_load_uncertainty_checks_metadata(trained, scripted, tmp_path, fmt, count, code):
    path = _write(tmp_path / "u.safetensors", _valid_tensors(trained), count=count, fmt=fmt)
    with pytest.raises(UncertaintyError) as info:
        load_uncertainty(path, scripted[1])
    assert info.value.code == code


def test_load_uncertainty_accepts_names_recorded_under_a_ddp_wrapper(trained, scripted, tmp_path):
    tensors = {"module." + k: v for k, v in _valid_tensors(trained).items()}
    path = _write(tmp_path / "ddp.safetensors", tensors)
    loaded = load_uncertainty(path, scripted[1])
    torch.testing.assert_close(loaded["2.weight"], tensors["module.2.weight.var"])


# --- mu -------------------------------------------------------------------------------------


def _moderated_wald_numpy(ws: list[np.ndarray], variances: list[np.ndarray]) -> list[np.ndarray]:
    """Independent formula: |w| / (σ̂ + s0), s0 = the largest σ̂ of all the layers together."""
    sigmas = [np.sqrt(v.astype(np.float64)) for v in variances]
    s0 = max(float(s.max()) for s in sigmas)
    return [np.abs(w.astype(np.float64)) / (s + s0) for w, s in zip(ws, sigmas)]


def test_mu_from_uploaded_statistics_equals_independent_formula(trained, scripted, digits):
    module, weights = scripted
    uncertainty = load_uncertainty(trained["stats_path"], weights)
    scores = get_criterion("mu")(_context(module, weights, digits, uncertainty=uncertainty))
    variance = trained["recorder"].variance()
    expected = _moderated_wald_numpy([w.param.numpy() for w in weights],
                                     [variance[w.name].numpy() for w in weights])
    for w, s, e in zip(weights, scores, expected):
        assert s.shape == w.param.shape and s.dtype == torch.float32
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-5)


def test_mu_moderation_is_one_constant_for_all_layers():
    """One s0 (the largest σ̂ of every layer) for all layers, not one per layer.

    Layer b's weights have 10× layer a's |w| and σ̂. A per-layer s0 would make both layers' scores
    identical (each layer's statistic is scale invariant); the shared s0 keeps magnitude's order
    between layers, and σ̂ changes a score by at most a factor of 2.
    """
    wa = torch.tensor([0.1, 0.2, 0.3, 0.4])
    sa = torch.tensor([0.01, 0.04, 0.02, 0.03])
    wb, sb = 10 * wa, 10 * sa
    a, b = mu_criterion.wald_scores([wa, wb], [sa, sb])
    s0 = 0.4  # max σ̂ over both layers
    torch.testing.assert_close(a, wa / (sa + s0))
    torch.testing.assert_close(b, wb / (sb + s0))
    assert (b > a).all()
    for w, s in ((wa, a), (wb, b)):
        assert (s <= w / s0).all() and (s >= w / (2 * s0)).all()
    # the same per layer (one tensor): each layer's own s0, as before
    torch.testing.assert_close(mu_criterion.wald_scores(wb, sb), mu_criterion.wald_scores(wa, sa))


def test_mu_from_training_statistics_keeps_about_the_accuracy_magnitude_keeps(trained, scripted, digits):
    """On real training statistics mu is about as good as magnitude one-shot (bench/mu_study.py).

    Mean accuracy over 80/85/90 % global sparsity within 1.5 points of magnitude's. The plain Wald
    statistic divides by a spread that is largest where the loss is most sensitive (here ≈ 0.28),
    and the earlier per-layer fudge (90th percentile of each layer's σ̂) fell 3.7 points behind.
    """
    module, weights = scripted
    uncertainty = load_uncertainty(trained["stats_path"], weights)
    mu = get_criterion("mu")(_context(module, weights, digits, uncertainty=uncertainty))
    magnitude = [w.param.detach().abs() for w in weights]
    plain = mu_criterion.wald_scores([w.param.detach() for w in weights],
                                     [uncertainty[w.name].sqrt() for w in weights], fudge_quantile=None)
    levels = (0.8, 0.85, 0.9)

    def mean_accuracy(scores):
        return sum(_accuracy_after_pruning(module, weights, scores, digits, lam) for lam in levels) / len(levels)

    by_mu, by_magnitude, by_plain = mean_accuracy(mu), mean_accuracy(magnitude), mean_accuracy(plain)
    assert by_mu >= by_magnitude - 0.015, (by_mu, by_magnitude)
    assert by_mu > by_plain + 0.3, (by_mu, by_plain)


def test_mu_uploaded_statistics_need_no_tune_data(trained, scripted):
    module, weights = scripted
    uncertainty = load_uncertainty(trained["stats_path"], weights)
    scores = mu_criterion.scores(ScoreContext(module=module, weights=weights, uncertainty=uncertainty))
    assert all(torch.isfinite(s).all() for s in scores)


def test_mu_ranks_unmoved_weights_by_magnitude_above_moved_ones_and_is_scale_invariant():
    w = torch.tensor([0.5, -0.5, 0.2, 0.9, 0.0, 0.3, 0.3])
    sigma = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.05, 0.2])
    s = mu_criterion.wald_scores(w, sigma)
    assert s[0] > s[1]  # same |w|: the weight that never moved ranks higher
    assert s[3] > s[0] > s[2] > s[4]  # unmoved weights: by |w|
    assert s[4] == 0 and torch.isfinite(s).all()
    assert s[5] > s[6]  # same |w|: smaller spread ranks higher
    torch.testing.assert_close(mu_criterion.wald_scores(1e-3 * w, 1e-3 * sigma), s, rtol=1e-5, atol=0)
    plain = mu_criterion.wald_scores(w, sigma, fudge_quantile=None)
    torch.testing.assert_close(plain[5], w[5].abs() / sigma[5], rtol=1e-5, atol=0)


def test_mu_rejects_statistics_without_a_prunable_weight(scripted):
    module, weights = scripted
    with pytest.raises(UncertaintyError) as info:
        mu_criterion.scores(ScoreContext(module=module, weights=weights,
                                         uncertainty={"0.weight": torch.zeros(64, 64)}))
    assert info.value.code == "uncertainty_missing_parameter"


def test_mu_trajectory_restores_weights_bit_for_bit_and_is_deterministic(scripted, digits):
    module, weights = scripted
    before = _snapshot(module)
    first = mu_criterion.scores(_context(module, weights, digits, seed=3))
    after = _snapshot(module)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not any(p.requires_grad for p in module.parameters())
    assert not module.training
    for w, s in zip(weights, first):
        assert s.shape == w.param.shape and torch.isfinite(s).all() and (s >= 0).all()
    second = mu_criterion.scores(_context(module, weights, digits, seed=3))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other_seed = mu_criterion.scores(_context(module, weights, digits, seed=4))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))


def test_mu_trajectory_runs_on_a_traced_module(trained, digits, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(trained["eager"], digits["x_tune"][:2]), str(tmp_path / "traced.pt"))
    module = load_model(tmp_path / "traced.pt")
    weights = find_prunable(module)
    before = _snapshot(module)
    scores = mu_criterion.scores(_context(module, weights, digits, mu_steps=8))
    assert all(torch.isfinite(s).all() for s in scores)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


@pytest.mark.parametrize("criterion", ["mu", "obd"])
def test_data_criteria_refuse_to_run_without_tune_data(scripted, criterion):
    module, weights = scripted
    with pytest.raises(ConfigError) as info:
        get_criterion(criterion)(ScoreContext(module=module, weights=weights))
    assert info.value.code == "criterion_needs_tune_data"
    assert "tune_fraction" in str(info.value)


# --- obd ------------------------------------------------------------------------------------


def test_obd_equals_half_fisher_times_w_squared_from_per_sample_grads(trained, scripted, digits):
    module, weights = scripted
    eager = trained["eager"]
    x, y = digits["x_tune"][:24], digits["y_tune"][:24]
    scores = obd_criterion.scores(ScoreContext(module=module, weights=weights, tune_x=x, tune_y=y, obd_samples=64))

    params = {n: p.detach() for n, p in eager.named_parameters()}

    def loss_one(p, xi, yi):
        logits = torch.func.functional_call(eager, p, (xi[None],))
        return nn.functional.cross_entropy(logits, yi[None])

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for w, s in zip(weights, scores):
        fisher = per_sample[w.name].pow(2).mean(0)
        torch.testing.assert_close(s, 0.5 * fisher * params[w.name].pow(2), rtol=1e-4, atol=1e-12)


def test_obd_uses_at_most_obd_samples_and_restores_the_model(scripted, digits):
    module, weights = scripted
    before = _snapshot(module)
    few = obd_criterion.fisher_diagonal(_context(module, weights, digits, obd_samples=5))
    again = obd_criterion.fisher_diagonal(_context(module, weights, digits, obd_samples=5))
    many = obd_criterion.fisher_diagonal(_context(module, weights, digits, obd_samples=N_TUNE))
    assert all(torch.equal(a, b) for a, b in zip(few, again))
    assert not all(torch.allclose(a, b) for a, b in zip(few, many))
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert not any(p.requires_grad or p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("criterion", ["mu", "obd"])
def test_data_criteria_work_when_called_under_inference_mode(scripted, digits, criterion):
    module, weights = scripted
    with torch.inference_mode():
        ctx = _context(module, weights, {k: v.clone() for k, v in digits.items()}, mu_steps=4, obd_samples=8)
        inside = get_criterion(criterion)(ctx)
    outside = get_criterion(criterion)(_context(module, weights, digits, mu_steps=4, obd_samples=8))
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))
    assert not any(p.requires_grad for p in module.parameters())


# --- higher = keep --------------------------------------------------------------------------


def _accuracy_after_pruning(module, weights, scores, digits, sparsity=0.5) -> float:
    """Zero the lowest-scoring `sparsity` fraction of all prunable weights (one global threshold)."""
    flat = torch.cat([s.flatten() for s in scores])
    n_prune = int(sparsity * flat.numel())
    order = torch.argsort(flat, stable=True)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:n_prune]] = False
    original = [w.param.clone() for w in weights]
    with torch.no_grad():
        offset = 0
        for w in weights:
            w.param.mul_(keep[offset:offset + w.numel].view_as(w.param))
            offset += w.numel
    accuracy = _accuracy(module, digits)
    with torch.no_grad():
        for w, o in zip(weights, original):
            w.param.copy_(o)
    return accuracy


@pytest.mark.parametrize("source", ["mu_uploaded", "mu_trajectory", "obd"])
def test_pruning_half_by_scores_beats_pruning_by_reversed_scores(trained, scripted, digits, source):
    module, weights = scripted
    if source == "mu_uploaded":
        ctx = _context(module, weights, digits, uncertainty=load_uncertainty(trained["stats_path"], weights))
    else:
        ctx = _context(module, weights, digits)
    scores = get_criterion(source.split("_")[0])(ctx)
    dense = _accuracy(module, digits)
    kept = _accuracy_after_pruning(module, weights, scores, digits)
    reversed_ = _accuracy_after_pruning(module, weights, [-s for s in scores], digits)
    assert dense > 0.9
    assert kept > dense - 0.05, (kept, dense)
    assert kept > reversed_ + 0.3, (kept, reversed_)


# --- CUDA -----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mu_and_obd_on_cuda_match_cpu(trained, digits):
    cpu = load_model(trained["model_path"])
    gpu = load_model(trained["model_path"], device="cuda")
    cpu_w, gpu_w = find_prunable(cpu), find_prunable(gpu)
    before = _snapshot(gpu)
    gpu_digits = {k: v.cuda() for k, v in digits.items()}
    for name in ("mu", "obd"):
        on_cpu = get_criterion(name)(_context(cpu, cpu_w, digits))
        on_gpu = get_criterion(name)(_context(gpu, gpu_w, gpu_digits))
        for a, b in zip(on_cpu, on_gpu):
            assert b.device.type == "cuda"
            torch.testing.assert_close(b.cpu(), a, rtol=2e-2, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in gpu.named_parameters())
