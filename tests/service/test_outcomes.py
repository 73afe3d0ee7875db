"""One writer of a run's end: ``service.supervisor.record_outcome``, on a real SQLite store.

The supervisor (the child's outcome), the dispatcher (timeout, enforced cancel, a worker that died,
shutdown), the Ray task and the orphan sweep all record through it; nothing else in ``service/``
calls the store's finishing methods. In process, no worker: a run is a claim taken from the store.
"""

from __future__ import annotations

import ast
import logging
import signal
from pathlib import Path

import pytest

from service.executors.base import DispatchingExecutor, Run, describe_exit, deterministic_failure
from service.settings import Settings
from service.store import Claim, Job, JobStore, new_job_id
from service.supervisor import INTERRUPTED, LOST, Outcome, record_outcome

SERVICE = Path(__file__).resolve().parents[2] / "service"


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def claimed(store: JobStore) -> Claim:
    job_id = new_job_id()
    store.create(job_id=job_id, owner="a", config={}, model_path=f"jobs/{job_id}/model.pt",
                 data_path=f"jobs/{job_id}/data.npz", model_sha256="0" * 64, data_sha256="1" * 64)
    claim = store.claim_next(worker_id="host:1:abc")
    assert claim is not None and claim.job_id == job_id
    return claim


def test_the_final_outcomes_are_written_once_and_only_by_the_run_holding_the_job(store: JobStore) -> None:
    ok = claimed(store)
    assert record_outcome(store, Claim(ok.job_id, "stale-run"), Outcome("failed", code="x", message="y")) is None
    assert store.get(job_id=ok.job_id).status == "running"  # a stale run wrote nothing
    assert record_outcome(store, ok, Outcome("succeeded", result={"certified": True}, artifact_sha256="a" * 64)) \
        == "succeeded"
    job = store.get(job_id=ok.job_id)
    assert (job.status, job.result, job.artifact_sha256, job.progress_stage) == (
        "succeeded", {"certified": True}, "a" * 64, "succeeded")
    assert record_outcome(store, ok, Outcome("failed", code="x", message="y")) is None  # no second end

    bad = claimed(store)
    assert record_outcome(store, bad, Outcome("failed", code="model_crashed", message="It crashed.")) == "failed"
    job = store.get(job_id=bad.job_id)
    assert (job.status, job.error_code, job.error_message, job.progress_message) == (
        "failed", "model_crashed", "It crashed.", "It crashed.")

    stop = claimed(store)
    assert record_outcome(store, stop, Outcome("cancelled")) == "cancelled"
    job = store.get(job_id=stop.job_id)
    assert (job.status, job.error_code, job.finished_at is not None) == ("cancelled", None, True)

    with pytest.raises(ValueError):
        record_outcome(store, claimed(store), Outcome("failed"))  # a failure always has a code
    with pytest.raises(ValueError):
        record_outcome(store, claimed(store), Outcome("finished"))


def test_a_lost_run_is_retried_then_failed_and_an_interrupted_one_is_requeued_for_free(store: JobStore) -> None:
    first = claimed(store)
    lost = Outcome(LOST, code="worker_died", message="The worker process was killed by SIGKILL.")
    assert record_outcome(store, first, lost, max_attempts=2) == "queued"
    job = store.get(job_id=first.job_id)
    assert (job.status, job.attempts) == ("queued", 1)
    assert job.progress_message == "Requeued: The worker process was killed by SIGKILL."
    second = store.claim_next(worker_id="host:1:abc")
    assert record_outcome(store, second, lost, max_attempts=2) == "failed"
    job = store.get(job_id=first.job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_died", 2)
    assert job.error_message.endswith("The job was tried 2 time(s) and is not retried again.")

    shut = claimed(store)
    assert record_outcome(store, shut, Outcome(INTERRUPTED, message="shutdown")) == "queued"
    assert store.get(job_id=shut.job_id).attempts == 0  # an orderly shutdown costs no attempt
    again = store.claim_next(worker_id="host:1:abc")
    assert again.job_id == shut.job_id and record_outcome(store, again, Outcome("cancelled")) == "cancelled"

    wanted = claimed(store)
    store.request_cancel(job_id=wanted.job_id)
    assert record_outcome(store, wanted, lost, max_attempts=5) == "cancelled"  # its cancel wins over a retry
    with pytest.raises(ValueError):
        record_outcome(store, claimed(store), lost)  # a lost run needs max_attempts


class _Executor(DispatchingExecutor[Run]):
    """A dispatcher whose runs are bare claims: ``_finish_run`` is all that is exercised."""

    log = logging.getLogger("test.executor")
    exitcode: int | None = -signal.SIGKILL

    def _capacity(self) -> int:
        return 1

    def _start_run(self, claim: Claim) -> Run:
        return Run(claim=claim)

    def _reap(self) -> list[Run]:
        return []

    def _kill(self, run: Run) -> None:
        pass

    def _stop_for_shutdown(self, runs: list[Run]) -> None:
        pass

    def _failure_without_retry(self, run: Run, job: Job) -> tuple[str, str] | None:
        return deterministic_failure(self.exitcode, job.progress_stage)

    def _describe_death(self, run: Run) -> str:
        return f"The worker process {describe_exit(self.exitcode)}."


@pytest.mark.parametrize(("reason", "exitcode", "status", "code", "attempts"), [
    ("timeout", -signal.SIGKILL, "failed", "job_timeout", 0),
    ("cancel", -signal.SIGKILL, "cancelled", None, 0),
    ("shutdown", -signal.SIGTERM, "queued", None, 0),
    (None, -signal.SIGKILL, "queued", None, 1),  # died: retried
    (None, -signal.SIGXCPU, "failed", "job_timeout", 0),  # the sandbox's CPU limit: a retry would repeat it
])
def test_the_dispatcher_records_a_silent_end_through_the_one_writer(
        store: JobStore, tmp_path: Path, reason: str | None, exitcode: int, status: str, code: str | None,
        attempts: int) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), executor="none", max_attempts=2, job_timeout_s=60)
    executor = _Executor(settings, store)
    executor.exitcode = exitcode
    claim = claimed(store)
    executor._finish_run(Run(claim=claim, reason=reason))
    job = store.get(job_id=claim.job_id)
    assert (job.status, job.error_code, job.attempts) == (status, code, attempts)
    if reason == "timeout":
        assert "time limit of 60 s" in job.error_message
    if reason is None and status == "queued":
        assert job.progress_message == "Requeued: The worker process was killed by SIGKILL (often the kernel's " \
                                       "out-of-memory killer)."
    executor._finish_run(Run(claim=claim, reason=reason))  # the run no longer holds the job: nothing changes
    assert store.get(job_id=claim.job_id) == job


FINISHERS = {"finish", "interrupt", "requeue_run"}


def test_nothing_else_in_the_service_ends_a_run() -> None:
    """Only ``service.supervisor`` calls the store's finishing methods (``store.py`` defines them)."""
    callers = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path.name in ("supervisor.py", "store.py") and path.parent == SERVICE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FINISHERS:
                callers.append(f"{path.relative_to(SERVICE.parent)}:{node.lineno} .{node.func.attr}()")
    assert callers == [], callers
    supervisor = ast.parse((SERVICE / "supervisor.py").read_text())
    in_record = {n.func.attr for f in ast.walk(supervisor) if isinstance(f, ast.FunctionDef) and
                 f.name == "record_outcome" for n in ast.walk(f) if isinstance(n, ast.Call) and
                 isinstance(n.func, ast.Attribute) and n.func.attr in FINISHERS}
    assert in_record == FINISHERS
