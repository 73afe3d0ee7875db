"""2:4 semi-structured sparsity: the pattern, the nested layer grid, and certify(pattern='2:4')."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration import ConfigError, certify, validate_config
from service.cli.offline import certify_config, parse_certify
from calibration.model import find_prunable
from calibration.patterns import (
    PatternMasks,
    eligible,
    semi_structured_speedup,
    two_four_keep,
)

pytestmark = pytest.mark.timeout(120)


def _groups_along_input(t: torch.Tensor) -> torch.Tensor:
    """(out, in, *k) → (…, 4): consecutive groups of 4 along the input (channel) dimension."""
    return (t.movedim(1, -1) if t.dim() > 2 else t).reshape(-1, 4)


@pytest.mark.parametrize("shape", [(6, 8), (5, 12, 3, 3), (4, 8, 3)])
def test_two_four_keeps_exactly_the_two_highest_scores_of_every_group_of_four(shape):
    torch.manual_seed(0)
    scores = torch.rand(shape)
    keep = two_four_keep(scores)
    assert keep.shape == scores.shape
    groups, kept = _groups_along_input(scores), _groups_along_input(keep)
    assert bool((kept.sum(dim=1) == 2).all())
    top2 = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)


def test_two_four_ties_keep_the_count_exact():
    keep = two_four_keep(torch.ones(3, 16))
    assert int((~keep).sum()) == 3 * 16 // 2


def test_layers_whose_input_dim_is_not_a_multiple_of_four_are_ineligible():
    assert eligible(torch.Size([10, 64]), "Linear")
    assert not eligible(torch.Size([10, 6]), "Linear")
    assert not eligible(torch.Size([16, 1, 3, 3]), "Conv2d")  # one input channel
    assert not eligible(torch.Size([8, 4, 3, 3]), "ConvTranspose2d")


def test_pattern_levels_are_nested_and_their_sparsity_is_the_zeroed_fraction():
    torch.manual_seed(1)
    scores = [torch.rand(16, 1, 3, 3), torch.rand(32, 16, 3, 3), torch.rand(10, 6), torch.rand(10, 128) * 0.1]
    types = ["Conv2d", "Conv2d", "Linear", "Linear"]
    masks = PatternMasks.from_scores(scores, "global", types)
    total = sum(s.numel() for s in scores)
    assert masks.sparsities[0] == 0.0 and len(masks.sparsities) == 3  # dense + the two eligible layers
    assert all(b > a for a, b in zip(masks.sparsities, masks.sparsities[1:]))
    assert masks.order == [3, 1]  # the layer whose removed scores are smallest goes first
    previous = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    for level, sparsity in enumerate(masks.sparsities):
        keep = masks.keep_masks(sparsity)
        assert sum(int((~k).sum()) for k in keep) / total == sparsity
        assert sum(masks.zeroed_per_layer(sparsity)) == sum(int((~k).sum()) for k in keep)
        for k, p in zip(keep, previous):
            assert not bool((k & ~p).any()), "a weight pruned at a level must stay pruned at every later level"
        for i, k in enumerate(keep):
            if i in masks.made_two_four(sparsity):
                assert bool((_groups_along_input(k).sum(dim=1) == 2).all())
            else:
                assert bool(k.all())
        assert len(masks.made_two_four(sparsity)) == level
        previous = keep
    with pytest.raises(ConfigError, match="not a level"):
        masks.keep_masks(0.123)


def test_a_model_without_eligible_layers_is_refused():
    with pytest.raises(ConfigError, match="multiple of 4") as info:
        PatternMasks.from_scores([torch.rand(4, 3), torch.rand(2, 6)], "global")
    assert info.value.code == "pattern_not_applicable"


@pytest.mark.parametrize("reconstruct", [False, True])
def test_certify_with_pattern_writes_a_two_four_artifact(reconstruct, files, tmp_path):
    out = tmp_path / "pruned24.pt"
    cfg = {"epsilon": 0.05, "delta": 0.1, "seed": 2, "pattern": "2:4", "reconstruct": reconstruct}
    r = certify(files["mlp"], files["data_flat"], cfg, out=out).result
    assert r["pattern"] == "2:4" and r["certified"]
    pruned = torch.jit.load(str(out))
    weights = find_prunable(pruned)
    made = set(r["pattern_layers"])
    assert made and len(r["levels"]) == 1 + sum(eligible(w.param.shape, w.module_type) for w in weights)
    zeros = 0
    for w in weights:
        z = w.param == 0
        zeros += int(z.sum())
        if w.name in made:
            assert bool((_groups_along_input(z).sum(dim=1) == 2).all()), w.name
        else:
            assert not bool(z.any()), w.name
    assert zeros == r["zeroed_parameters"]
    assert r["certified_sparsity"] == zeros / r["prunable_parameters"]
    # The grid (levels and their sparsities) is fixed by the model, not by the calibration data drawn.
    other = certify(files["mlp"], files["data_flat"], {**cfg, "seed": 9, "full_curve": True}).result
    assert [lv["sparsity"] for lv in other["levels"]] == [lv["sparsity"] for lv in r["levels"]]


def test_pattern_config_validation_and_cli_flag():
    assert validate_config({"pattern": "2:4"}).pattern == "2:4"
    assert validate_config({"pattern": None}).pattern is None
    with pytest.raises(ConfigError, match="'pattern' parameter must be one of '2:4'"):
        validate_config({"pattern": "4:8"})
    with pytest.raises(ConfigError, match="'sparsities' parameter must be left at its default"):
        validate_config({"pattern": "2:4", "sparsities": [0.0, 0.5]})
    args = parse_certify(["m.pt", "--data", "d.npz", "--out", "o.pt", "--pattern", "2:4"])
    assert certify_config(args)["pattern"] == "2:4"


def test_semi_structured_speedup_runs_on_cuda_only():
    result = semi_structured_speedup((128, 128), 64, torch.float16)
    if not torch.cuda.is_available():
        assert result is None
        pytest.skip("semi-structured kernels need a CUDA device; measured on the device machine")
    assert result["speedup"] > 0 and result["max_abs_diff"] < 1e-1
    assert np.isfinite(result["dense_ms"]) and np.isfinite(result["sparse_ms"])
