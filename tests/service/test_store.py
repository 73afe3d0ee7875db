"""JobStore: ordering, tenancy, atomic claims, guarded finishes, cancellation and crash recovery."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from service.store import JobStore, make_worker_id, new_dataset_id, new_job_id, utcnow
from service.supervisor import recover_orphans


@pytest.fixture
def store(tmp_path) -> JobStore:
    s = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def add(store: JobStore, owner: str = "a") -> str:
    job_id = new_job_id()
    store.create(job_id=job_id, owner=owner, config={"epsilon": 0.05}, model_path=f"jobs/{job_id}/model.pt",
                 data_path=f"jobs/{job_id}/data.npz", model_sha256="0" * 64, data_sha256="1" * 64)
    return job_id


def test_ids_have_their_prefixes() -> None:
    assert new_job_id().startswith("job_") and new_dataset_id().startswith("ds_")


def test_sqlite_runs_in_wal_mode_with_busy_timeout(store: JobStore) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_list_is_newest_first_paginated_and_per_owner(store: JobStore) -> None:
    ids = [add(store) for _ in range(5)]
    add(store, owner="b")
    page, count = store.list(owner="a", limit=2, offset=1)
    assert count == 5
    assert [j.id for j in page] == [ids[3], ids[2]]
    assert store.get(job_id=ids[0], owner="b") is None  # tenancy
    assert store.get(job_id=ids[0], owner="a") is not None


def test_claims_are_fifo_and_each_job_is_claimed_once_under_contention(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    seed = JobStore.from_url(url)
    ids = [add(seed) for _ in range(30)]
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        store = JobStore.from_url(url)  # its own engine: like separate worker processes
        while (claim := store.claim_next(worker_id=make_worker_id())) is not None:
            with lock:
                claimed.append(claim.job_id)
        store.close()

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # all claimed, none twice
    assert seed.claim_next(worker_id="w") is None
    seed.close()


def test_only_the_claiming_run_can_progress_or_finish(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="w")
    assert claim and claim.job_id == job_id
    assert not store.update_progress(job_id=job_id, run_id="stale", stage="testing", done=1, total=9)
    assert store.update_progress(job_id=job_id, run_id=claim.run_id, stage="testing", done=3, total=9)
    assert not store.finish(job_id=job_id, run_id="stale", status="failed", error_code="x", error_message="y")
    assert store.finish(job_id=job_id, run_id=claim.run_id, status="succeeded", result={"ok": 1},
                        artifact_sha256="a" * 64)
    assert not store.finish(job_id=job_id, run_id=claim.run_id, status="failed")  # no second outcome
    job = store.get(job_id=job_id)
    assert job.status == "succeeded" and job.result == {"ok": 1} and job.finished_at is not None
    assert job.created_at.tzinfo is not None


def test_cancel_queued_is_immediate_running_is_requested(store: JobStore) -> None:
    first, second = add(store), add(store)
    claim = store.claim_next(worker_id="w")
    assert claim.job_id == first  # FIFO: the oldest job runs first
    assert store.request_cancel(job_id=second, owner="a").status == "cancelled"  # was queued
    job = store.request_cancel(job_id=first, owner="a")
    assert job.status == "running" and job.cancel_requested  # its executor stops it
    assert store.cancel_requested(job_id=first, run_id=claim.run_id)
    assert store.cancel_requested_runs(run_ids=[claim.run_id]) == {claim.run_id}
    assert store.request_cancel(job_id=first, owner="someone-else") is None


def test_a_stale_run_is_told_to_stop(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="w")
    assert not store.cancel_requested(job_id=job_id, run_id=claim.run_id)
    store.interrupt(job_id=job_id, run_id=claim.run_id, max_attempts=5, code="worker_died", message="gone")
    assert store.cancel_requested(job_id=job_id, run_id=claim.run_id)  # requeued: this run no longer owns it


def test_interrupted_jobs_are_requeued_then_failed_after_max_attempts(store: JobStore) -> None:
    job_id = add(store)
    dead = "some-host:1:deadbeef"
    gone = lambda w: w == dead  # noqa: E731
    claim = store.claim_next(worker_id=dead)
    assert recover_orphans(store, max_attempts=2, is_gone=gone) == {job_id: "queued"}
    job = store.get(job_id=job_id)
    assert (job.status, job.attempts, job.started_at) == ("queued", 1, None)
    claim = store.claim_next(worker_id=dead)
    assert claim.job_id == job_id
    assert recover_orphans(store, max_attempts=2, is_gone=gone) == {job_id: "failed"}
    job = store.get(job_id=job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_interrupted", 2)
    assert "2 time(s)" in job.error_message


def test_live_workers_keep_their_jobs_until_the_heartbeat_goes_stale(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="other-host:1:abc")
    alive = lambda w: False  # noqa: E731
    assert recover_orphans(store, max_attempts=2, is_gone=alive, stale_before=utcnow() - timedelta(seconds=30)) == {}
    assert recover_orphans(store, max_attempts=2, is_gone=alive, stale_before=utcnow() + timedelta(seconds=1)) == {
        job_id: "queued"}
    assert not store.is_current_run(job_id=job_id, run_id=claim.run_id)


def test_an_interrupted_job_with_a_cancel_request_ends_cancelled(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="w")
    store.request_cancel(job_id=job_id)
    assert store.requeue_run(job_id=job_id, run_id=claim.run_id, message="shutdown") == "cancelled"


def test_graceful_requeue_does_not_count_an_attempt(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="w")
    assert store.requeue_run(job_id=job_id, run_id=claim.run_id, message="shutdown") == "queued"
    assert store.get(job_id=job_id).attempts == 0


def test_datasets_are_per_owner(store: JobStore) -> None:
    ds = store.create_dataset(dataset_id=new_dataset_id(), owner="a", path="datasets/x.npz", size=10, sha256="f" * 64,
                              n=5, x_shape=[5, 64], has_labels=True)
    assert store.get_dataset(dataset_id=ds.id, owner="a").x_shape == [5, 64]
    assert store.get_dataset(dataset_id=ds.id, owner="b") is None


def test_only_finished_jobs_are_deleted_and_only_by_their_owner(store: JobStore) -> None:
    job_id = add(store)
    assert store.delete(job_id=job_id, owner="b") == ("not_found", None)
    outcome, job = store.delete(job_id=job_id, owner="a")
    assert outcome == "not_finished" and job.status == "queued"
    claim = store.claim_next(worker_id="w")
    assert store.delete(job_id=job_id)[0] == "not_finished"  # running
    store.finish(job_id=job_id, run_id=claim.run_id, status="succeeded", result={"x": 1}, artifact_sha256="a" * 64)
    outcome, job = store.delete(job_id=job_id, owner="a")
    assert outcome == "deleted" and job.id == job_id and job.status == "succeeded"
    assert store.get(job_id=job_id) is None and store.delete(job_id=job_id) == ("not_found", None)


def test_datasets_list_per_owner_and_are_deleted_unless_an_active_job_reads_them(store: JobStore) -> None:
    made = [store.create_dataset(dataset_id=new_dataset_id(), owner="a", path=f"datasets/{i}.npz", size=10,
                                 sha256="f" * 64, n=5, x_shape=[5, 64], has_labels=True) for i in range(3)]
    store.create_dataset(dataset_id=new_dataset_id(), owner="b", path="datasets/b.npz", size=1, sha256="e" * 64,
                         n=1, x_shape=[1, 2], has_labels=False)
    page, count = store.list_datasets(owner="a", limit=2)
    assert count == 3 and [d.id for d in page] == [made[2].id, made[1].id]
    assert [d.id for d in store.list_datasets(owner="a", limit=2, offset=2)[0]] == [made[0].id]
    ds = made[0]
    job_id = new_job_id()
    store.create(job_id=job_id, owner="a", config={}, model_path="m", data_path=ds.path, model_sha256="0" * 64,
                 data_sha256="1" * 64, dataset_id=ds.id)
    assert store.delete_dataset(dataset_id=ds.id, owner="b") == ("not_found", None)
    assert store.delete_dataset(dataset_id=ds.id, owner="a")[0] == "in_use"  # queued
    claim = store.claim_next(worker_id="w")
    assert store.delete_dataset(dataset_id=ds.id, owner="a")[0] == "in_use"  # running
    store.finish(job_id=job_id, run_id=claim.run_id, status="failed", error_code="x", error_message="y")
    outcome, gone = store.delete_dataset(dataset_id=ds.id, owner="a")
    assert outcome == "deleted" and gone.path == ds.path
    assert store.get_dataset(dataset_id=ds.id) is None and store.get(job_id=job_id).status == "failed"


def test_counts_by_status_lists_every_status(store: JobStore) -> None:
    add(store)
    counts = store.counts_by_status()
    assert counts["queued"] == 1 and counts["running"] == 0 and set(counts) == {
        "queued", "running", "succeeded", "failed", "cancelled"}


def test_claims_are_fair_between_owners_and_fifo_within_one(store: JobStore) -> None:
    """A key that queued many jobs does not starve another key: with one slot the owners alternate,
    with several the owner with fewer running jobs goes first; one owner's jobs stay in order."""
    a_jobs = [add(store, owner="a") for _ in range(3)]
    b_job = add(store, owner="b")
    first = store.claim_next(worker_id="w")
    assert first.job_id == a_jobs[0]  # nobody served yet: the oldest job
    store.finish(job_id=first.job_id, run_id=first.run_id, status="succeeded", result={}, artifact_sha256="0" * 64)
    second = store.claim_next(worker_id="w")
    assert second.job_id == b_job  # one slot: b has never been served, a just was
    store.finish(job_id=second.job_id, run_id=second.run_id, status="succeeded", result={}, artifact_sha256="0" * 64)
    assert store.claim_next(worker_id="w").job_id == a_jobs[1]  # b's queue is empty: a in order
    # Several slots: b's new job overtakes a's queued one while a already runs one.
    b_again = add(store, owner="b")
    assert store.claim_next(worker_id="w").job_id == b_again
    assert store.claim_next(worker_id="w").job_id == a_jobs[2]
    assert store.claim_next(worker_id="w") is None
