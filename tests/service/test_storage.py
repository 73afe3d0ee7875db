"""Storage: atomic writes with a size limit and a sha256 computed while streaming."""

from __future__ import annotations

import hashlib
import io

import pytest

from service.storage import Storage, UploadTooLarge


def test_write_stream_hashes_and_places_the_file(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    payload = b"x" * (3 * 1024 * 1024 + 17)
    stored = storage.write_stream(io.BytesIO(payload), "jobs/job_1/model.pt", limit=10 * 1024 * 1024)
    assert stored.size == len(payload)
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "jobs/job_1/model.pt").read_bytes() == payload
    assert [p.name for p in (tmp_path / "jobs/job_1").iterdir()] == ["model.pt"]  # no temp left


def test_oversize_stream_is_rejected_and_leaves_nothing(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    with pytest.raises(UploadTooLarge):
        storage.write_stream(io.BytesIO(b"y" * 5000), "datasets/ds_1.npz", limit=4096)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_a_failed_write_keeps_the_previous_file(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    storage.write_stream(io.BytesIO(b"old"), "a/file.bin")

    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            raise OSError("connection lost")

    with pytest.raises(OSError):
        storage.write_stream(Broken(), "a/file.bin")
    assert (tmp_path / "a/file.bin").read_bytes() == b"old"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["file.bin"]


def test_paths_cannot_leave_the_root(tmp_path) -> None:
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(ValueError):
        storage.full("../escape")


def test_put_file_moves_atomically_and_reports_sha(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    work = storage.work_dir("job_2")
    tmp = work / ".artifact-x.pt"
    tmp.write_bytes(b"pruned")
    stored = storage.put_file(tmp, "jobs/job_2/artifact.pt")
    assert not tmp.exists()
    assert stored.sha256 == hashlib.sha256(b"pruned").hexdigest()
    assert storage.writable()
