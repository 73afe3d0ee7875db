"""Load and validate calibration sets (SPEC §4); split them once into D_tune and D_cal.

The guarantee assumes the n samples are i.i.d. from the deployment distribution; the split
is made with a recorded seed, before any p-value is computed, and never revisited.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .risks import IGNORE_INDEX

MAX_SAMPLES = 10_000_000
MAX_ELEMENTS = 4 * 1024**3  # x may hold at most this many numbers (16 GiB in fp32)
MAX_INPUTS = 16  # named input arrays (forward arguments) at most
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


def _is_input_name(key: str) -> bool:
    return key != "y" and _NAME.fullmatch(key) is not None


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs ``x`` of shape (n_samples, *input_shape): float32, or int64 for integer data (token ids), or bool;
    labels ``y`` (n_samples,) int64 or None.

    ``inputs``: every input array by name, in file order: ``{"x": x}`` for a single input, or arrays named
    after the model's forward arguments (``input_ids``, ``attention_mask``, …; matched to the model by
    ``calibration.inputs.bind_inputs``). ``x`` is then the first of them.
    """

    x: np.ndarray
    y: np.ndarray | None
    inputs: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            object.__setattr__(self, "inputs", {"x": self.x})

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)  # type: ignore[arg-type]  (set by __post_init__)

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


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a .npy stream, reading the header only (no array data)."""
    from numpy.lib import format as npy

    version = npy.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = npy.read_array_header_2_0(fh)
    else:  # 3.0 only serves structured dtypes with non-Latin-1 field names: never numeric data
        raise DataError(f".npy format version {version} is not supported; save plain numeric arrays with np.savez.",
                        code="data_malformed")
    return tuple(int(d) for d in shape), dtype, fh.tell()


def _check_npz_members(path: Path, max_inflated_bytes: int | None = None) -> None:
    """Refuse pickles, absurd shapes and inconsistent sizes from the .npy headers, before any array is allocated.

    A header is a few bytes that may declare any shape (10^12 elements in a 1 KiB upload), and a
    deflated member may expand far beyond the upload: what numpy would allocate is checked first.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(i.file_size for i in zf.infolist())
            if max_inflated_bytes is not None and inflated > max_inflated_bytes:
                raise DataError(
                    f"The .npz inflates to {inflated:,} bytes ({path.stat().st_size:,} bytes compressed), more than "
                    f"the server accepts for a calibration set ({max_inflated_bytes:,} bytes, the upload limit "
                    "CERTIPRUNE_MAX_UPLOAD_BYTES). Upload a smaller calibration set.", code="data_too_large")
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if key != "y" and not _is_input_name(key):
                    continue  # refused by name once the archive is read
                with zf.open(info) as fh:
                    shape, dtype, header_len = _npy_header(fh)
                if dtype.hasobject:
                    raise DataError(
                        f"Array {key!r} in the .npz holds pickled Python objects (dtype {dtype}), which are refused "
                        "for safety. Save plain numeric arrays: np.savez(path, x=x.astype('float32'), "
                        "y=y.astype('int64')).", code="data_pickled")
                count = math.prod(shape)
                samples = shape[0] if shape else 1
                if samples > MAX_SAMPLES or count > MAX_ELEMENTS:
                    raise DataError(
                        f"Array {key!r} declares shape {list(shape)} ({count:,} numbers); at most {MAX_SAMPLES:,} "
                        f"samples and {MAX_ELEMENTS:,} numbers are accepted. Subsample the calibration set.",
                        code="data_too_large")
                expected = header_len + count * dtype.itemsize
                if info.file_size != expected:
                    raise DataError(
                        f"Array {key!r} declares shape {list(shape)} of {dtype} ({count * dtype.itemsize:,} bytes) "
                        f"but the archive holds {max(info.file_size - header_len, 0):,} bytes of data: the file is "
                        "truncated or corrupt. Save it again with np.savez.", code="data_malformed")
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, RuntimeError) as exc:
        raise DataError(f"The .npz archive is corrupt or not made of .npy arrays: {exc}",
                        code="data_malformed") from exc


#: Passes over a large input array are split into pieces of this many bytes, one thread each (issue 17):
#: reading from the page cache and ``np.isfinite`` run at a few GB/s on one core.
PARALLEL_PIECE_BYTES = 64 << 20
MAX_IO_THREADS = 16  # the sandbox counts threads against its process limit (64 + 4 per CPU)


def _io_threads(nbytes: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_IO_THREADS, -(-nbytes // PARALLEL_PIECE_BYTES)))


def _read_exactly(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd`` (pread: no shared file position); the bytes read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """``_read_exactly`` in 64 MiB pieces over threads (``os.preadv`` releases the GIL, and the page faults of
    a fresh array are taken on every core); the bytes read."""
    threads = _io_threads(len(view))
    if threads == 1:
        return _read_exactly(fd, view, offset)
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, len(view), PARALLEL_PIECE_BYTES)
    with ThreadPoolExecutor(threads, thread_name_prefix="certiprune-read") as pool:
        return sum(pool.map(lambda a: _read_exactly(fd, view[a:a + PARALLEL_PIECE_BYTES], offset + a), starts))


def _all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()``, in pieces over threads for a large array (numpy releases the GIL)."""
    threads = _io_threads(x.nbytes)
    if threads == 1 or not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    from concurrent.futures import ThreadPoolExecutor

    flat, step = x.reshape(-1), max(1, PARALLEL_PIECE_BYTES // x.itemsize)
    with ThreadPoolExecutor(threads, thread_name_prefix="certiprune-check") as pool:
        return all(pool.map(lambda a: bool(np.isfinite(flat[a:a + step]).all()), range(0, flat.size, step)))


def take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` (a contiguous copy), in blocks of rows over threads for a large array: gathering a 1.2 GB
    calibration set's splits took 0.36 s on one core of an H200 host, 0.11 s over 16 (bench/io_parallel.py)."""
    threads = _io_threads(a.nbytes)
    if threads == 1 or a.ndim == 0 or rows.size < 2 * threads:
        return np.ascontiguousarray(a[rows])
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((rows.size, *a.shape[1:]), dtype=a.dtype)
    bounds = np.linspace(0, rows.size, threads + 1).astype(int)
    with ThreadPoolExecutor(threads, thread_name_prefix="certiprune-gather") as pool:
        list(pool.map(lambda i: np.take(a, rows[bounds[i]:bounds[i + 1]], axis=0, out=out[bounds[i]:bounds[i + 1]]),
                      range(threads)))
    return out


def _read_stored_members(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the .npz's uncompressed (``np.savez``) members, each read straight into its array.

    ``np.load`` reads a member through ``zipfile`` (a CRC-32 over every byte, then a copy): about 1 s for a
    1.2 GB calibration set, against 0.3 s for one ``readinto`` from the member's data offset, which is split
    over threads in 64 MiB pieces (``_read_into``). The CRC adds
    nothing here: the service verified the file's sha256 before the job could read it. Deflated, encrypted or
    Fortran-ordered members are left to ``np.load`` (not in the result). Sizes were checked by
    :func:`_check_npz_members`; a member whose bytes run short is refused.
    """
    from numpy.lib import format as npy

    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or key in out:
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise DataError(f"Array {key!r} of the .npz has a corrupt zip header.", code="data_malformed")
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            version = npy.read_magic(fh)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            if fortran or dtype.hasobject:
                continue
            if info.file_size != fh.tell() - start + math.prod(shape) * dtype.itemsize:  # never read past the member
                raise DataError(f"Array {key!r} of the .npz is truncated or corrupt.", code="data_malformed")
            array = np.empty(shape, dtype=dtype)
            view = memoryview(array).cast("B") if array.nbytes else None
            if view is not None and _read_into(fh.fileno(), view, fh.tell()) != array.nbytes:
                raise DataError(f"Array {key!r} of the .npz is truncated.", code="data_malformed")
            out[key] = array
    return out


def _read_npz(path: Path, max_inflated_bytes: int | None = None) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path.name!r} is not a valid .npz archive (not a zip file).", code="data_malformed")
    _check_npz_members(path, max_inflated_bytes)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            unknown = _unknown_names(names)
            out = {}
            if not unknown:
                out = {k: v for k, v in _read_stored_members(path).items() if k in names}
                for key in names:
                    if key not in out:
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
    except MemoryError as exc:
        raise DataError(f"Not enough memory to load the .npz ({exc}). Upload a smaller calibration set.",
                        code="data_too_large") from exc
    if unknown:
        raise DataError(f"Unexpected array(s) {unknown} in the .npz; {_ALLOWED}", code="data_unexpected_arrays")
    return out


_ALLOWED = ("allowed are 'x' (the input) and optional 'y' (labels), or, for a model with several inputs, "
            f"arrays named after its forward arguments (identifiers, at most {MAX_INPUTS}) and optional 'y'.")


def _unknown_names(names: list[str]) -> list[str]:
    """Names that cannot be arrays of a calibration set: inputs are identifiers (``x``, or forward-argument
    names: which of them the model takes is checked against its signature, ``signature.match_inputs``),
    at most MAX_INPUTS of them, beside optional 'y'."""
    bad = [k for k in names if k != "y" and not _is_input_name(k)]
    inputs = [k for k in names if k != "y"]
    if not bad and len(inputs) > MAX_INPUTS:
        return inputs[MAX_INPUTS:]
    return bad


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, Exception) as exc:  # safetensors raises several types
        raise DataError(f"The .safetensors file could not be read: {exc}", code="data_malformed") from exc
    unknown = _unknown_names(list(tensors))
    if unknown:
        raise DataError(f"Unexpected tensor(s) {unknown} in the .safetensors; {_ALLOWED}",
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


def _validate_input(key: str, x: np.ndarray, min_ndim: int) -> np.ndarray:
    """One input array: numeric, at least ``min_ndim`` axes, finite; float → float32, integer → int64."""
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise DataError(f"{key!r} must be a numeric array; got dtype {x.dtype}.", code="data_bad_dtype")
    if x.ndim < min_ndim:
        raise DataError(f"{key!r} must have shape (n_samples, *input_shape) with at least {min_ndim} axes; "
                        f"got shape {list(x.shape)}.", code="data_bad_shape")
    n = x.shape[0]
    if n == 0:
        raise DataError(f"The data set is empty ({key} has 0 samples).", code="data_empty")
    if n > MAX_SAMPLES or x.size > MAX_ELEMENTS:
        raise DataError(f"The data set is too large: {key!r} has shape {list(x.shape)}.", code="data_too_large")
    if x.dtype.kind == "f" and not _all_finite(x):
        bad = int((~np.isfinite(x)).reshape(n, -1).any(axis=1).sum())
        raise DataError(f"{key!r} contains NaN or infinite values in {bad} sample(s); clean or drop them.",
                        code="data_not_finite")
    if x.dtype.kind in "iu":  # token ids, masks: integer end to end (an embedding needs Long)
        if x.dtype.kind == "u" and x.dtype.itemsize == 8 and x.size and int(x.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{key!r} holds integers beyond int64.", code="data_bad_dtype")
        return np.ascontiguousarray(x, dtype=np.int64)
    if x.dtype.kind == "b":
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def validate_arrays(arrays: dict[str, np.ndarray]) -> CalibrationSet:
    """Check shapes, dtypes, finiteness and labels; return the cleaned set.

    Inputs: one array ``x``, or arrays named after the model's forward arguments (every name but ``y``),
    all with the same first dimension (the samples). Floats become float32, integers int64, bools stay.
    """
    names = [k for k in arrays if k != "y"]
    if not names:
        raise DataError("The data file has no array 'x' (the inputs, first axis = samples), nor input arrays "
                        "named after the model's forward arguments.", code="data_missing_x")
    unknown = _unknown_names(list(arrays))
    if unknown:
        raise DataError(f"Unexpected array(s) {unknown}; {_ALLOWED}", code="data_unexpected_arrays")
    inputs = {k: _validate_input(k, arrays[k], 2 if k == "x" else 1) for k in names}
    first = names[0]
    x = inputs[first]
    n = x.shape[0]
    for k in names[1:]:
        if inputs[k].shape[0] != n:
            raise DataError(f"Input arrays must have the same first dimension (samples): {first!r} has {n}, "
                            f"{k!r} has {inputs[k].shape[0]}.", code="data_length_mismatch")
    if sum(a.size for a in inputs.values()) > MAX_ELEMENTS:
        raise DataError("The data set is too large: the inputs hold more than "
                        f"{MAX_ELEMENTS:,} numbers together.", code="data_too_large")
    y = arrays.get("y")
    if y is not None:
        if y.dtype == object or y.dtype.kind not in "biuf":
            raise DataError(f"'y' must hold integer class labels; got dtype {y.dtype}.", code="data_bad_labels")
        if y.ndim not in (1, 2):
            raise DataError(f"'y' must have shape (n_samples,), or (n_samples, T) with a label per position for a "
                            f"sequence model; got shape {list(y.shape)}.", code="data_bad_labels")
        if y.shape[0] != n:
            raise DataError(f"{first!r} has {n} samples but 'y' has {y.shape[0]} labels; they must match.",
                            code="data_length_mismatch")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.all(y == np.round(y)):
                raise DataError("'y' must hold integer class labels; it contains non-integer values.",
                                code="data_bad_labels")
        y = y.astype(np.int64)
        # Per-position labels (n_samples, T) may mark a position ignored with -100 (Hugging Face's convention).
        negative = (y < 0) & (y != IGNORE_INDEX) if y.ndim == 2 else y < 0
        if negative.any():
            raise DataError(f"Labels must be ≥ 0{' (or -100: ignored position)' if y.ndim == 2 else ''}; found "
                            f"{int(y[negative].min())}.", code="data_labels_out_of_range")
    return CalibrationSet(x=x, y=y, inputs=inputs)


def load_calibration(path: str | os.PathLike, *, max_inflated_bytes: int | None = None) -> CalibrationSet:
    """Read an .npz (allow_pickle=False) or .safetensors calibration set and validate it.

    ``max_inflated_bytes``: refuse an .npz whose members inflate past this (a 1 MB upload can declare
    1 GiB of zeros); the service passes its upload limit, so compression never admits more than an
    uncompressed upload could.
    """
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise DataError("The data file is missing or empty.", code="data_empty")
    fmt = sniff_format(p)
    arrays = _read_npz(p, max_inflated_bytes) if fmt == "npz" else _read_safetensors(p)
    try:
        return validate_arrays(arrays)
    except MemoryError as exc:
        raise DataError(f"Not enough memory to validate the calibration set ({exc}). Upload a smaller one.",
                        code="data_too_large") from exc


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
