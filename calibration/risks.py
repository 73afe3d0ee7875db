"""Per-sample losses on D_cal (SPEC §1): the raw material of every p-value.

Losses are kept as small integers (int8), never as floats, so that the p-values in
``p_values.py`` can work from exact integer counts (Angelopoulos et al. 2021, "Learn then
Test", arXiv 2110.01052; Bates et al. 2021, "Distribution-free, risk-controlling prediction
sets", arXiv 2101.02703).

- ``accuracy_drop`` (labels needed): D_i = 1[ŷ_λ ≠ y_i] − 1[ŷ_0 ≠ y_i] ∈ {−1, 0, 1}, so that
  E[D] = acc(dense) − acc(pruned).
- ``disagreement`` (no labels): A_i = 1[ŷ_λ ≠ ŷ_0] ∈ {0, 1}. D_i ≤ A_i for every label, so
  a bound on E[A] bounds the accuracy drop without labels.
- ``error_rate`` (labels needed): E_i = 1[ŷ_λ ≠ y_i] ∈ {0, 1}.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, DataError

RISKS: tuple[str, ...] = ("accuracy_drop", "disagreement", "error_rate")
LABELLED_RISKS: tuple[str, ...] = ("accuracy_drop", "error_rate")
# The values a per-sample loss of each risk can take (used to validate input losses).
LOSS_VALUES: dict[str, tuple[int, ...]] = {
    "accuracy_drop": (-1, 0, 1),
    "disagreement": (0, 1),
    "error_rate": (0, 1),
}


def check_risk(risk: str) -> str:
    """Return ``risk`` unchanged, or raise ConfigError naming the valid risks."""
    if not isinstance(risk, str) or risk not in RISKS:
        valid = ", ".join(repr(r) for r in RISKS)
        raise ConfigError(f"The 'risk' parameter must be one of {valid}. Got {risk!r}.")
    return risk


def _predictions(name: str, value: np.ndarray, n: int | None) -> np.ndarray:
    """Top-1 class indices as a 1-D integer array (shape (n_samples,))."""
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise DataError(
            f"'{name}' must be a 1-D array of top-1 class indices, shape (n_samples,). "
            f"Got shape {arr.shape}; take argmax over the class axis of the logits first."
        )
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"'{name}' must hold integer class indices. Got dtype {arr.dtype}.")
    if n is not None and arr.shape[0] != n:
        raise DataError(
            f"'{name}' has {arr.shape[0]} samples but the pruned predictions have {n}; "
            "all arrays must describe the same calibration samples in the same order."
        )
    return arr


def per_sample_losses(
    risk: str,
    pruned_pred: np.ndarray,
    dense_pred: np.ndarray,
    labels: np.ndarray | None,
) -> np.ndarray:
    """Per-sample losses of the model pruned at one level, int8 of shape (n_samples,).

    ``pruned_pred``, ``dense_pred`` and ``labels`` are top-1 class indices of shape
    (n_samples,). ``labels`` may be None only for ``disagreement``.
    """
    check_risk(risk)
    pruned = _predictions("pruned_pred", pruned_pred, None)
    n = pruned.shape[0]
    dense = _predictions("dense_pred", dense_pred, n)
    if risk == "disagreement":
        return (pruned != dense).astype(np.int8)
    if labels is None:
        raise ConfigError(
            f"The '{risk}' risk needs class labels (y) in the calibration data, and none were "
            "given. Upload labels, or use risk='disagreement', which needs none."
        )
    y = _predictions("labels", labels, n)
    pruned_wrong = (pruned != y).astype(np.int8)
    if risk == "error_rate":
        return pruned_wrong
    return pruned_wrong - (dense != y).astype(np.int8)  # accuracy_drop ∈ {−1, 0, 1}


def empirical_risk(losses: np.ndarray) -> float:
    """The empirical risk: the mean of the per-sample losses (shape (n_samples,)).

    Summed in int64 when the losses are integers, so the numerator is an exact count.
    """
    arr = np.asarray(losses)
    if arr.size == 0:
        raise DataError("Cannot compute the empirical risk of an empty calibration set.")
    if arr.dtype.kind in "iub":
        return float(int(arr.sum(dtype=np.int64)) / arr.size)
    return float(arr.mean())


__all__ = [
    "LABELLED_RISKS",
    "LOSS_VALUES",
    "RISKS",
    "check_risk",
    "empirical_risk",
    "per_sample_losses",
]
