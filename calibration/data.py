"""Load and validate calibration sets (SPEC §4); split them once into D_tune and D_cal.

The guarantee assumes the n samples are i.i.d. from the deployment distribution; the split
is made with a recorded seed, before any p-value is computed, and never revisited.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

MAX_SAMPLES = 10_000_000
MAX_ELEMENTS = 4 * 1024**3  # x may hold at most this many numbers (16 GiB in fp32)


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs ``x`` of shape (n_samples, *input_shape) as float32; labels ``y`` (n_samples,) int64 or None."""

    x: np.ndarray
    y: np.ndarray | None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.y is not None


@dataclass(frozen=True)
class Split:
    """Indices of D_tune and D_cal; ``cal`` is in the (seeded) shuffled order WSR needs."""

    tune: np.ndarray
    cal: np.ndarray
    seed: int


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path.name!r} is not a valid .npz archive (not a zip file).", code="data_malformed")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            unknown = [k for k in names if k not in ("x", "y")]
            out = {}
            for key in ("x", "y"):
                if key in names:
                    out[key] = archive[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise DataError(
                "The .npz holds pickled (object) arrays, which are refused for safety. Save plain numeric "
                "arrays: np.savez(path, x=x.astype('float32'), y=y.astype('int64')).",
                code="data_pickled",
            ) from exc
        raise DataError(f"The .npz archive could not be read: {exc}", code="data_malformed") from exc
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise DataError(f"The .npz archive is corrupt or truncated: {exc}", code="data_malformed") from exc
    if unknown:
        raise DataError(f"Unexpected array(s) {unknown} in the .npz; only 'x' and optional 'y' are allowed.",
                        code="data_unexpected_arrays")
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, Exception) as exc:  # safetensors raises several types
        raise DataError(f"The .safetensors file could not be read: {exc}", code="data_malformed") from exc
    unknown = [k for k in tensors if k not in ("x", "y")]
    if unknown:
        raise DataError(f"Unexpected tensor(s) {unknown} in the .safetensors; only 'x' and optional 'y' are allowed.",
                        code="data_unexpected_arrays")
    return tensors


def sniff_format(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK":
        return "npz"
    if len(head) == 8:
        header_len = int.from_bytes(head, "little")
        if 2 <= header_len < 100 * 1024**2:
            with open(path, "rb") as fh:
                fh.seek(8)
                if fh.read(1) == b"{":
                    return "safetensors"
    if head[:1] == b"\x80":
        raise DataError("The data file is a Python pickle, which is refused for safety. Use .npz or .safetensors.",
                        code="data_pickled")
    raise DataError("Unrecognised data format: upload an .npz (arrays 'x', optional 'y') or a .safetensors "
                    "file (tensors 'x', optional 'y').", code="data_unsupported_format")


def validate_arrays(arrays: dict[str, np.ndarray]) -> CalibrationSet:
    """Check shapes, dtypes, finiteness and labels; return the cleaned set."""
    if "x" not in arrays:
        raise DataError("The data file has no array 'x' (the inputs, first axis = samples).", code="data_missing_x")
    x = arrays["x"]
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise DataError(f"'x' must be a numeric array; got dtype {x.dtype}.", code="data_bad_dtype")
    if x.ndim < 2:
        raise DataError(f"'x' must have shape (n_samples, *input_shape) with at least 2 axes; got shape {list(x.shape)}.",
                        code="data_bad_shape")
    n = x.shape[0]
    if n == 0:
        raise DataError("The data set is empty (x has 0 samples).", code="data_empty")
    if n > MAX_SAMPLES or x.size > MAX_ELEMENTS:
        raise DataError(f"The data set is too large: shape {list(x.shape)}.", code="data_too_large")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(n, -1).any(axis=1).sum())
        raise DataError(f"'x' contains NaN or infinite values in {bad} sample(s); clean or drop them.",
                        code="data_not_finite")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = arrays.get("y")
    if y is not None:
        if y.dtype == object or y.dtype.kind not in "biuf":
            raise DataError(f"'y' must hold integer class labels; got dtype {y.dtype}.", code="data_bad_labels")
        if y.ndim != 1:
            raise DataError(f"'y' must have shape (n_samples,); got shape {list(y.shape)}.", code="data_bad_labels")
        if y.shape[0] != n:
            raise DataError(f"'x' has {n} samples but 'y' has {y.shape[0]} labels; they must match.",
                            code="data_length_mismatch")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.all(y == np.round(y)):
                raise DataError("'y' must hold integer class labels; it contains non-integer values.",
                                code="data_bad_labels")
        y = y.astype(np.int64)
        if (y < 0).any():
            raise DataError(f"Labels must be ≥ 0; found {int(y.min())}.", code="data_labels_out_of_range")
    return CalibrationSet(x=x, y=y)


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """Read an .npz (allow_pickle=False) or .safetensors calibration set and validate it."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise DataError("The data file is missing or empty.", code="data_empty")
    fmt = sniff_format(p)
    arrays = _read_npz(p) if fmt == "npz" else _read_safetensors(p)
    return validate_arrays(arrays)


def check_labels(y: np.ndarray | None, n_classes: int) -> None:
    """Labels must index the model's logits."""
    if y is not None and y.size and int(y.max()) >= n_classes:
        raise DataError(
            f"Labels out of range: the model outputs {n_classes} classes (labels 0..{n_classes - 1}) "
            f"but 'y' contains {int(y.max())}.",
            code="data_labels_out_of_range",
        )


def split_tune_cal(n: int, tune_fraction: float, seed: int) -> Split:
    """One seeded permutation: the first ⌊n·f⌋ go to D_tune, the rest (in that order) to D_cal."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_tune = int(np.floor(n * tune_fraction))
    if n - n_tune < 1:
        raise DataError(f"tune_fraction={tune_fraction} leaves no calibration samples out of {n}.",
                        code="data_too_small")
    return Split(tune=np.sort(order[:n_tune]), cal=order[n_tune:], seed=seed)


__all__ = ["CalibrationSet", "Split", "check_labels", "load_calibration", "split_tune_cal", "validate_arrays"]
