"""The child imports while the supervisor stages; it gets its request only after every input is verified (issue 17).

Real bubblewrap sandbox, real child (torch, ``calibration.certify``), real SQLite store and storage: the
supervisor's run (``service.worker._run``) is called in this process, as the spawned worker calls it.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from service_harness import FAST_CONFIG, Inputs

from service import isolation, sandbox
from service.child import NO_REQUEST_LINE, READY_LINE, RECEIVED_LINE
from service.settings import Settings
from service.storage import Storage, job_dir
from service.store import JobStore, new_job_id
from service.supervisor import ChildRun, ChildSpec, Input, IntegrityError
from service.worker import SUPERVISOR_TIMINGS, _run

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(isolation.bwrap_binary() is None,
                                 reason="bubblewrap is not installed (apt-get install bubblewrap)")]

LIMITS = sandbox.Limits(address_space_bytes=None, cpu_seconds=600, file_bytes=64 << 20, open_files=1024)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_for(tmp_path: Path, inputs: list[Input]) -> ChildSpec:
    return ChildSpec(inputs=inputs, config=FAST_CONFIG, limits=LIMITS, isolate=True, work=tmp_path / "run",
                     log_path=tmp_path / "child.log", max_log_bytes=1 << 16, tmp_bytes=64 << 20)


def wait_for_line(log: Path, line: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and line in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{line!r} never appeared in the child's log: {log.read_text(errors='replace')[-2000:]}")


def test_the_child_imports_first_and_gets_its_request_only_once_the_inputs_are_verified(
        tmp_path: Path, inputs: Inputs) -> None:
    model = Input(inputs.model, "model.pt", sha256(inputs.model))
    data = Input(inputs.data, "data.npz", sha256(inputs.data))
    spec = spec_for(tmp_path, [])
    with ChildRun(spec) as child:
        child.keep_log()
        wait_for_line(spec.log_path, READY_LINE)  # the child imported torch and the engine with /in still empty
        assert list((spec.work / "in").iterdir()) == []
        held = 0.5
        time.sleep(held)  # the supervisor is "still staging": the child must wait, reading nothing
        assert RECEIVED_LINE not in spec.log_path.read_text()
        with pytest.raises(RuntimeError, match="before stage"):
            child.supervise(on_progress=lambda *a: None, should_stop=lambda: False)
        child.stage([model, data])
        assert sorted(p.name for p in (spec.work / "in").iterdir()) == ["data.npz", "model.pt"]
        outcome = child.supervise(on_progress=lambda *a: None, should_stop=lambda: False)
    assert outcome.status == "succeeded", outcome
    timings = outcome.result["timings"]
    assert timings["imports_s"] > 0 and timings["child_start_s"] >= 0
    assert timings["request_wait_s"] >= held  # it had imported, then waited at least as long as the request was held
    log = spec.log_path.read_text()
    assert log.index(READY_LINE) < log.index(RECEIVED_LINE)
    assert {"staging_s", "child_spawn_s", "child_exit_s"} <= set(outcome.timings)
    assert outcome.artifact_sha256 == sha256(outcome.artifact)


def test_an_input_failing_verification_is_never_named_to_the_child(tmp_path: Path, inputs: Inputs) -> None:
    """The staged copy that failed is removed and the child gets EOF, not a request; it exits by itself."""
    model = Input(inputs.model, "model.pt", sha256(inputs.model))
    forged = Input(inputs.data, "data.npz", "0" * 64)
    spec = spec_for(tmp_path, [])
    with pytest.raises(IntegrityError, match="no longer matches"):
        with ChildRun(spec) as child:
            child.keep_log()
            wait_for_line(spec.log_path, READY_LINE)
            child.stage([model, forged])
    assert child.proc is not None and child.proc.returncode == 0  # it exited on its own, told of nothing
    log = spec.log_path.read_text()
    assert NO_REQUEST_LINE in log and RECEIVED_LINE not in log
    assert sorted(p.name for p in (spec.work / "in").iterdir()) == ["model.pt"]  # no trace of the unverified copy


# -- through the supervisor's whole run: store, storage, child ------------------------------------

def submitted(tmp_path: Path, inputs: Inputs, *, data_sha256: str | None = None) -> tuple[Settings, JobStore, str,
                                                                                          str]:
    """A job stored and claimed as the API and the dispatcher leave it; returns (settings, store, job, run)."""
    settings = Settings(data_dir=str(tmp_path / "data"), sandbox="on")
    storage = Storage(settings.data_dir)
    store = JobStore.from_url(settings.resolved_database_url)
    job_id = new_job_id()
    folder = storage.local_path(job_dir(job_id))
    folder.mkdir(parents=True)
    shutil.copyfile(inputs.model, folder / "model.pt")
    shutil.copyfile(inputs.data, folder / "data.npz")
    store.create(job_id=job_id, owner="a", config=FAST_CONFIG, model_path=f"{job_dir(job_id)}/model.pt",
                 data_path=f"{job_dir(job_id)}/data.npz", model_sha256=sha256(inputs.model),
                 data_sha256=data_sha256 or sha256(inputs.data))
    claim = store.claim_next(worker_id="test:1:x")
    assert claim is not None and claim.job_id == job_id
    return settings, store, job_id, claim.run_id


def test_a_changed_input_fails_the_job_and_the_child_never_gets_a_request(tmp_path: Path, inputs: Inputs) -> None:
    settings, store, job_id, run_id = submitted(tmp_path, inputs, data_sha256="1" * 64)
    try:
        _run(job_id, run_id, settings, store)
        job = store.get(job_id=job_id)
    finally:
        store.close()
    assert job.status == "failed" and job.error_code == "input_integrity_error", job
    log = (Path(settings.data_dir) / job_dir(job_id) / "child.log").read_text()
    assert NO_REQUEST_LINE in log and RECEIVED_LINE not in log
    assert not list((Path(settings.data_dir) / job_dir(job_id)).glob(".run-*"))
    assert not (Path(settings.data_dir) / job_dir(job_id) / "artifact.pt").exists()


class _CountingSha256:
    """hashlib.sha256 as it is, counting the bytes each hash object is fed (a spy: the real hashing runs)."""

    fed: list[int] = []

    def __init__(self, data: bytes = b"") -> None:
        self._h = _REAL_SHA256()
        self._n = len(self.fed)
        self.fed.append(0)
        if data:
            self.update(data)

    def update(self, data: Any) -> None:
        self.fed[self._n] += len(memoryview(data).cast("B"))
        self._h.update(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)


_REAL_SHA256 = hashlib.sha256


def test_the_artifact_is_hashed_once_and_that_hash_is_what_is_stored(tmp_path: Path, inputs: Inputs,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store, job_id, run_id = submitted(tmp_path, inputs)
    _CountingSha256.fed = []
    monkeypatch.setattr(hashlib, "sha256", _CountingSha256)  # this process only: the child is another one
    try:
        _run(job_id, run_id, settings, store)
        job = store.get(job_id=job_id)
    finally:
        monkeypatch.undo()
        store.close()
    assert job.status == "succeeded", job
    artifact = Path(settings.data_dir) / job_dir(job_id) / "artifact.pt"
    size = artifact.stat().st_size
    assert sha256(artifact) == job.artifact_sha256 == job.result["artifact_sha256"]
    inputs_bytes = inputs.model.stat().st_size + inputs.data.stat().st_size
    fed = sorted(n for n in _CountingSha256.fed if n)
    # every byte hashed in the supervisor: each input once (staging) and the artifact once (while receiving it)
    assert sum(fed) == inputs_bytes + size, (fed, inputs_bytes, size)
    assert fed.count(size) == 1
    assert set(SUPERVISOR_TIMINGS) - {"worker_start_s", "standby_s", "handoff_s"} <= set(job.result["timings"])


def test_the_worker_starts_its_child_before_loading_the_store() -> None:
    """The spawned worker imports SQLAlchemy (≈ 0.15 s) only after its child is started, so the child's imports
    overlap with it; the supervisor's run states are the store's own."""
    import subprocess
    import sys

    from service import store, supervisor

    code = "import sys, service.worker; print('sqlalchemy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    assert (supervisor.SUCCEEDED, supervisor.FAILED, supervisor.CANCELLED) == \
        (store.SUCCEEDED, store.FAILED, store.CANCELLED)


def test_a_run_that_no_longer_holds_its_job_ends_its_child_without_a_request(tmp_path: Path,
                                                                             inputs: Inputs) -> None:
    settings, store, job_id, run_id = submitted(tmp_path, inputs)
    try:
        _run(job_id, "not-this-run", settings, store)
        job = store.get(job_id=job_id)
    finally:
        store.close()
    assert job.status == "running" and job.run_id == run_id  # untouched: another run holds it
    folder = Path(settings.data_dir) / job_dir(job_id)
    assert not (folder / "child.log").exists()  # the job's log (the holding run's) is not this run's to write
    assert not list(folder.glob(".run-*"))
