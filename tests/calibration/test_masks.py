"""Nested masks from one sort: exact counts under ties, nesting, scopes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.masks import NestedMasks, apply_masks, n_zero


def test_ties_do_not_change_the_achieved_sparsity():
    scores = [torch.ones(7, 5), torch.ones(3, 11)]  # every score tied
    masks = NestedMasks.from_scores(scores, "global")
    for s in np.linspace(0, 0.99, 34):
        zeroed = sum(int((~m).sum()) for m in masks.keep_masks(float(s)))
        assert zeroed == n_zero(float(s), 68)


def test_layerwise_ties_are_exact_per_layer():
    scores = [torch.zeros(10, 10), torch.ones(4, 4)]
    masks = NestedMasks.from_scores(scores, "layerwise")
    for s in (0.1, 0.33, 0.5, 0.9):
        per_layer = [int((~m).sum()) for m in masks.keep_masks(s)]
        assert per_layer == [n_zero(s, 100), n_zero(s, 16)]
        assert masks.zeroed_per_layer(s) == per_layer


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_masks_are_nested(scope):
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 4, (20, 20), generator=gen).float(), torch.rand(50, 3, generator=gen)]
    masks = NestedMasks.from_scores(scores, scope)
    prev = None
    for s in np.linspace(0, 0.95, 20):
        keep = masks.keep_masks(float(s))
        if prev is not None:
            for a, b in zip(prev, keep):
                assert not (b & ~a).any(), "a weight pruned at a lower sparsity came back"
        prev = keep


def test_global_scope_prunes_lowest_scores_first():
    scores = [torch.tensor([[5.0, 1.0], [3.0, 0.5]]), torch.tensor([[2.0, 4.0]])]
    masks = NestedMasks.from_scores(scores, "global")
    keep = masks.keep_masks(0.5)  # 3 of 6 weights: 0.5, 1.0, 2.0
    assert keep[0].tolist() == [[True, False], [True, False]] and keep[1].tolist() == [[False, True]]


def test_apply_masks_is_in_place_and_restorable():
    w = torch.nn.Parameter(torch.arange(1.0, 7.0).view(2, 3), requires_grad=False)
    orig = w.detach().clone()
    ptr = w.data_ptr()
    masks = NestedMasks.from_scores([w.abs()], "global")
    apply_masks([w], [orig], masks.keep_masks(0.5))
    assert w.data_ptr() == ptr and w.flatten().tolist() == [0, 0, 0, 4, 5, 6]
    apply_masks([w], [orig], masks.keep_masks(0.0))
    assert torch.equal(w, orig)
