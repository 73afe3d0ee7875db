"""The 64 MiB chunk digests recorded at admission, and the parallel re-check staging makes with them.

Digests are compared with ``hashlib.sha256`` over slices of the same bytes, computed here; every way an attacker
can change a stored file (one byte flipped in any chunk, bytes appended, the file cut short, the last chunk
changed) must be caught, and a bad record must only fall back to the whole-file check.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from service.chunk_digests import CHUNK_BYTES, ChunkDigests, StreamChunkHasher, mismatch
from service.storage import Storage
from service.supervisor import Input, IntegrityError, stage_inputs


def slices_sha256(data: bytes, chunk: int) -> list[str]:
    return [hashlib.sha256(data[o:o + chunk]).hexdigest() for o in range(0, len(data), chunk)]


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 4000, 12345])
@pytest.mark.parametrize("piece", [1, 7, 1000, 4096])
def test_stream_digests_are_the_slices_own_whatever_the_pieces(size: int, piece: int) -> None:
    data = os.urandom(size)
    with StreamChunkHasher(chunk_bytes=1000) as hasher:
        for o in range(0, size, piece):
            hasher.update(data[o:o + piece])
        got = hasher.result()
    assert got == ChunkDigests(size, 1000, tuple(slices_sha256(data, 1000)))
    assert len(got.sha256) == -(-size // 1000)


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("threads", [1, 4])
def test_an_unchanged_file_passes_and_every_change_is_caught(tmp_path: Path, threads: int) -> None:
    data = os.urandom(10_500)
    record = ChunkDigests(len(data), 1000, tuple(slices_sha256(data, 1000)))
    assert mismatch(write(tmp_path, data), record, threads) is None
    for at in (0, 999, 1000, 5_555, 10_499):  # a byte flipped in the first, a middle and the short last chunk
        forged = bytearray(data)
        forged[at] ^= 0x01
        problem = mismatch(write(tmp_path, bytes(forged)), record, threads)
        assert problem is not None and f"chunk {at // 1000 + 1} of 11" in problem, (at, problem)
    assert "10501 bytes where 10500" in (mismatch(write(tmp_path, data + b"\0"), record, threads) or "")
    assert "10499 bytes where 10500" in (mismatch(write(tmp_path, data[:-1]), record, threads) or "")
    swapped = data[1000:2000] + data[:1000] + data[2000:]  # the same chunks, in another order
    assert mismatch(write(tmp_path, swapped), record, threads) is not None


def test_a_record_that_is_not_well_formed_is_not_used() -> None:
    good = {"size": 2500, "chunk_bytes": 1000, "sha256": ["a" * 64] * 3}
    assert ChunkDigests.from_json(good) == ChunkDigests(2500, 1000, ("a" * 64,) * 3)
    for bad in (None, [], {"size": 2500, "chunk_bytes": 1000, "sha256": ["a" * 64] * 2},  # a chunk short
                {**good, "sha256": ["A" * 64] * 3}, {**good, "sha256": ["a" * 63] * 3},
                {**good, "size": True}, {**good, "size": -1}, {**good, "chunk_bytes": 0},
                {**good, "chunk_bytes": "1000"}, {**good, "sha256": "a" * 64}):
        assert ChunkDigests.from_json(bad) is None, bad


def test_storage_records_the_chunk_digests_of_exactly_the_bytes_it_stored(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_BYTES + 12_345)  # two chunks, the second short
    stored = Storage(str(tmp_path)).write_stream(io.BytesIO(data), "datasets/x.npz")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.chunks == ChunkDigests(len(data), CHUNK_BYTES, tuple(slices_sha256(data, CHUNK_BYTES)))
    assert ChunkDigests.from_json(stored.chunks_json()) == stored.chunks
    assert mismatch(tmp_path / "datasets" / "x.npz", stored.chunks) is None


def test_staging_checks_by_the_chunks_and_removes_a_forged_copy(tmp_path: Path) -> None:
    data = os.urandom(5_000)
    source = write(tmp_path, data)
    record = ChunkDigests(len(data), 1000, tuple(slices_sha256(data, 1000)))
    folder = tmp_path / "in"
    staged = stage_inputs([Input(source, "data.npz", hashlib.sha256(data).hexdigest(), record)], folder)
    assert staged["data.npz"].read_bytes() == data
    forged = bytearray(data)
    forged[2_500] ^= 0xFF
    source.write_bytes(bytes(forged))  # changed in storage after admission, same size
    with pytest.raises(IntegrityError, match=r"no longer matches the sha256 .*chunk 3 of 5"):
        stage_inputs([Input(source, "data.npz", hashlib.sha256(data).hexdigest(), record)], folder)
    assert not (folder / "data.npz").exists() and not list(folder.iterdir())
