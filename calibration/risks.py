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

Sequence risks (logits (N, T, V): a prediction per position; issue 13 item 3). Positions count where
the mask is on (the input array :func:`sequence_mask_name` picks: ``decoder_attention_mask`` for an
encoder-decoder, whose logits are over the decoder's positions, else ``attention_mask``; if the data has
one) and the label is not −100
(when labels (N, T) are given); m_i is that count for sample i (a sample with m_i = 0 has loss 0):

- ``token_disagreement`` (no labels): A_i = #{t: ŷ_λ,it ≠ ŷ_0,it} / m_i ∈ [0, 1], the fraction of
  positions whose top-1 differs from the dense model's.
- ``token_accuracy_drop`` (labels (N, T)): D_i = acc_0,i − acc_λ,i ∈ [−1, 1], the drop of the
  sample's token accuracy.

They are bounded, not 0/1, losses (float64): only bounds valid for bounded losses are used for
them (``p_values``: WSR, or Hoeffding–Bentkus with the factor e).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, DataError

RISKS: tuple[str, ...] = ("accuracy_drop", "disagreement", "error_rate", "token_disagreement",
                          "token_accuracy_drop")
LABELLED_RISKS: tuple[str, ...] = ("accuracy_drop", "error_rate", "token_accuracy_drop")
#: Risks over the positions of (N, T, V) logits: bounded per-sample losses, range (low, high).
SEQUENCE_RISKS: dict[str, tuple[float, float]] = {"token_disagreement": (0.0, 1.0),
                                                  "token_accuracy_drop": (-1.0, 1.0)}
IGNORE_INDEX = -100  # a label that marks a position out of the risk (Hugging Face's convention)
#: Input arrays that mark the positions of (N, T, V) logits, the first present wins: an encoder-decoder's
#: logits are over the decoder's positions, so its ``decoder_attention_mask`` and never the encoder's mask.
SEQUENCE_MASKS: tuple[str, ...] = ("decoder_attention_mask", "attention_mask")
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
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-sample losses of the model pruned at one level, int8 of shape (n_samples,)
    (float64 for the sequence risks, whose predictions, labels and ``mask`` are (n_samples, T)).

    ``pruned_pred``, ``dense_pred`` and ``labels`` are top-1 class indices of shape
    (n_samples,). ``labels`` may be None only for ``disagreement``.
    """
    check_risk(risk)
    if risk in SEQUENCE_RISKS:
        return sequence_losses(risk, pruned_pred, dense_pred, labels, mask)
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


def sequence_mask_name(input_names) -> str | None:
    """The data's input array that masks the positions of (N, T, V) logits (see ``SEQUENCE_MASKS``), or None."""
    names = set(input_names)
    return next((n for n in SEQUENCE_MASKS if n in names), None)


def counted_positions(shape: tuple[int, ...], labels: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
    """Bool (n_samples, T): the positions a sequence risk counts — mask on (if any), label not −100 (if any)."""
    valid = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask) != 0
    if labels is not None:
        valid = valid & (np.asarray(labels) != IGNORE_INDEX)
    return valid


def sequence_losses(risk: str, pruned_pred: np.ndarray, dense_pred: np.ndarray, labels: np.ndarray | None,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Per-sample losses of a sequence risk, float64 (n_samples,): see the module docstring."""
    pruned, dense = np.asarray(pruned_pred), np.asarray(dense_pred)
    if pruned.ndim != 2 or dense.shape != pruned.shape:
        raise DataError(f"The {risk!r} risk compares top-1 predictions per position, shape (n_samples, T); got "
                        f"{list(pruned.shape)} and {list(dense.shape)}.")
    if mask is not None and np.shape(mask) != pruned.shape:
        raise DataError(f"The mask has shape {list(np.shape(mask))} but the model predicts {list(pruned.shape)} "
                        "positions (samples, positions); the mask ('attention_mask', or 'decoder_attention_mask' for "
                        "an encoder-decoder) must match the logits' first two axes.",
                        code="data_bad_shape")
    y = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != pruned.shape:
            raise DataError(f"Labels for {risk!r} must have shape (n_samples, T) = {list(pruned.shape)}, one per "
                            f"position (−100: ignored); got {list(y.shape)}.", code="data_bad_labels")
    valid = counted_positions(pruned.shape, y, mask)
    m = valid.sum(axis=1)
    denom = np.maximum(m, 1).astype(np.float64)
    if risk == "token_disagreement":
        return ((pruned != dense) & valid).sum(axis=1) / denom
    if y is None:
        raise ConfigError("The 'token_accuracy_drop' risk needs labels y of shape (n_samples, T) in the "
                          "calibration data; use 'token_disagreement', which needs none.", code="labels_required")
    dense_right = ((dense == y) & valid).sum(axis=1)
    pruned_right = ((pruned == y) & valid).sum(axis=1)
    return (dense_right - pruned_right) / denom


def prediction_accuracy(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Top-1 accuracy (for the report): over samples, or for (n, T) predictions over the positions that
    count (mask on, label not −100)."""
    pred, y = np.asarray(pred), np.asarray(labels)
    if pred.ndim == 1:
        return float(np.mean(pred == y))
    valid = counted_positions(pred.shape, y, mask)
    total = int(valid.sum())
    return float(((pred == y) & valid).sum() / total) if total else float("nan")


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
    "IGNORE_INDEX",
    "SEQUENCE_MASKS",
    "SEQUENCE_RISKS",
    "sequence_losses",
    "sequence_mask_name",
    "prediction_accuracy",
    "LABELLED_RISKS",
    "LOSS_VALUES",
    "RISKS",
    "check_risk",
    "empirical_risk",
    "per_sample_losses",
]
