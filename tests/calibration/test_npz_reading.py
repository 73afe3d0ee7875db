""".npz members stored uncompressed are read straight into their arrays (issue 17: no CRC pass, no second
copy); the result must equal numpy's own reader for every dtype and layout, and a short member is refused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from calibration.data import _read_npz, _read_stored_members
from calibration.errors import DataError


def numpy_reads(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.uint8, np.bool_])
def test_stored_members_equal_numpys_reading(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((37, 3, 5, 4)) * 100).astype(dtype)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=rng.integers(0, 10, 37), x_mask=np.ones((37, 4), dtype=bool))
    direct = _read_stored_members(path)
    assert set(direct) == {"x", "y", "x_mask"}  # every member was read directly
    assert same(direct, numpy_reads(path))
    assert same(_read_npz(path), numpy_reads(path))


def test_compressed_fortran_and_empty_members_fall_back_or_read_right(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, x=rng.random((20, 6)).astype(np.float32), y=np.arange(20))
    assert _read_stored_members(compressed) == {}  # deflated: left to np.load
    assert same(_read_npz(compressed), numpy_reads(compressed))
    mixed = tmp_path / "m.npz"
    np.savez(mixed, x=np.asfortranarray(rng.random((8, 3))), y=np.arange(8))
    assert set(_read_stored_members(mixed)) == {"y"}  # Fortran order: left to np.load
    assert same(_read_npz(mixed), numpy_reads(mixed))
    empty = tmp_path / "e.npz"
    np.savez(empty, x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))
    assert same(_read_stored_members(empty), numpy_reads(empty))


def test_a_member_cut_short_is_refused(tmp_path: Path) -> None:
    """A member whose bytes end early (written by hand: its zip entry says fewer bytes than the header's shape)."""
    path = tmp_path / "short.npz"
    full = tmp_path / "full.npz"
    np.savez(full, x=np.ones((100, 10), np.float32))
    with zipfile.ZipFile(full) as zf:
        member = zf.read("x.npy")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", member[:-400])
        zf.writestr("y.npy", member)  # what follows must never be read as x's bytes
    with pytest.raises(DataError) as exc:
        _read_stored_members(path)
    assert exc.value.code == "data_malformed"
    with pytest.raises(DataError) as exc:  # the size check before any read names the problem too
        _read_npz(path)
    assert exc.value.code == "data_malformed" and "truncated" in str(exc.value)


def test_a_member_larger_than_one_piece_is_read_over_threads_exactly(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Members past one 64 MiB piece are read in pieces over threads; with small pieces, an array of a few MB
    is split into many, and the bytes must land in order (the thread count is what this machine allows)."""
    from calibration import data

    monkeypatch.setattr(data, "PARALLEL_PIECE_BYTES", 1 << 16)
    monkeypatch.setattr(data, "_io_threads", lambda nbytes: 4)  # pieces over 4 threads even on one CPU
    rng = np.random.default_rng(2)
    x = rng.standard_normal((301, 3, 41, 37)).astype(np.float32)  # 5.5 MB: 84 pieces, the last one short
    path = tmp_path / "big.npz"
    np.savez(path, x=x, y=rng.integers(0, 10, 301))
    assert same(_read_stored_members(path), numpy_reads(path))
    assert data._all_finite(x)
    for at in (0, x.size // 2, x.size - 1):  # a non-finite value in the first, a middle and the last piece
        bad = x.copy().reshape(-1)
        bad[at] = np.nan if at else np.inf
        assert not data._all_finite(bad.reshape(x.shape))
        np.savez(path, x=bad.reshape(x.shape), y=rng.integers(0, 10, 301))
        with pytest.raises(DataError) as exc:
            data.load_calibration(path)
        assert exc.value.code == "data_not_finite" and "1 sample(s)" in str(exc.value)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_])
def test_rows_are_gathered_over_threads_exactly(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    """``take_rows`` in blocks over threads equals numpy's ``a[rows]``: any order, repeats, every dtype."""
    from calibration import data

    monkeypatch.setattr(data, "_io_threads", lambda nbytes: 5)
    rng = np.random.default_rng(3)
    a = (rng.random((203, 4, 6)) * 50).astype(dtype)
    for rows in (rng.permutation(203), np.sort(rng.choice(203, 57, replace=False)), rng.integers(0, 203, 300),
                 np.arange(7)):
        got = data.take_rows(a, rows)
        assert got.dtype == a.dtype and got.flags.c_contiguous and np.array_equal(got, a[rows])
