"""The job store on SQLite and on a real PostgreSQL alike: the store tests, racing claimers, migrations.

PostgreSQL comes from ``pg.py`` (a throwaway server per module, a fresh database per test); its
cases skip, saying why, only where a server truly cannot start on this machine.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pg import PostgresServer, PostgresUnavailable

# The backend-independent JobStore tests, collected here once more against every backend (the
# ``store`` fixture below replaces test_store.py's SQLite-only one).
from test_store import (  # noqa: F401
    add,
    test_a_stale_run_is_told_to_stop,
    test_an_interrupted_job_with_a_cancel_request_ends_cancelled,
    test_cancel_queued_is_immediate_running_is_requested,
    test_claims_are_fair_between_owners_and_fifo_within_one,
    test_counts_by_status_lists_every_status,
    test_datasets_are_per_owner,
    test_datasets_list_per_owner_and_are_deleted_unless_an_active_job_reads_them,
    test_graceful_requeue_does_not_count_an_attempt,
    test_interrupted_jobs_are_requeued_then_failed_after_max_attempts,
    test_list_is_newest_first_paginated_and_per_owner,
    test_live_workers_keep_their_jobs_until_the_heartbeat_goes_stale,
    test_only_finished_jobs_are_deleted_and_only_by_their_owner,
    test_only_the_claiming_run_can_progress_or_finish,
)

from service.migrations import HEAD_REVISION, current_revision, head_revision, schema_diff, script_head, upgrade
from service.store import JobStore, make_engine, make_worker_id, new_job_id, utcnow
from service.tables import Base

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot run here: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(store_url)
    yield s
    s.close()


def test_racing_claimers_take_every_job_exactly_once(store_url: str) -> None:
    seed = JobStore.from_url(store_url)
    ids = [add(seed) for _ in range(60)]
    claims: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer(n: int) -> None:
        store = JobStore.from_url(store_url, migrate=False)  # its own engine: like separate worker processes
        start.wait()
        while (claim := store.claim_next(worker_id=make_worker_id())) is not None:
            with lock:
                claims.append((n, claim.job_id))
        store.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = Counter(job_id for _, job_id in claims)
    assert set(claimed) == set(ids) and max(claimed.values()) == 1  # every job, none twice
    assert {j.status for j in seed.list(owner=None, limit=100)[0]} == {"running"}
    assert len({j.run_id for j in seed.list(owner=None, limit=100)[0]}) == 60
    seed.close()


def test_postgres_claimers_skip_a_job_another_claimer_has_locked(postgres: PostgresServer) -> None:
    """FOR UPDATE SKIP LOCKED (SQLite has no row locks: it serialises writers instead)."""
    store_url = postgres.create_database()
    store = JobStore.from_url(store_url)
    first, second = add(store), add(store)
    engine = make_engine(store_url)
    with engine.begin() as conn:  # another claimer, in the middle of claiming the oldest job
        conn.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": first})
        claim = store.claim_next(worker_id="w")  # must neither wait for that lock nor take the locked job
        assert claim is not None and claim.job_id == second
    assert store.claim_next(worker_id="w").job_id == first
    engine.dispose()
    store.close()


def test_the_spelled_out_head_is_alembics_head() -> None:
    assert script_head() == HEAD_REVISION, "a revision was added: set service.migrations.HEAD_REVISION to it"


def test_the_migrated_schema_matches_the_models(store_url: str) -> None:
    from service.migrations.__main__ import main

    engine = make_engine(store_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert schema_diff(conn) == []
    assert main(["check", "--database-url", store_url]) == 0
    engine.dispose()


def test_concurrent_first_upgrades_serialise(store_url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def migrate() -> None:
        engine = make_engine(store_url)
        start.wait()
        try:
            upgrade(engine)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert current_revision(make_engine(store_url)) == head_revision()


def test_a_database_made_before_migrations_is_adopted(store_url: str) -> None:
    """Tables made by create_all (no alembic_version) and missing a newer column keep their rows."""
    legacy = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        sa.Table(table.name, legacy, *[c._copy() for c in table.columns if c.name != "placement"])  # with indexes
    engine = make_engine(store_url)
    legacy.create_all(engine)
    job_id = new_job_id()
    with engine.begin() as conn:
        conn.execute(legacy.tables["jobs"].insert().values(
            id=job_id, owner="a", status="queued", created_at=utcnow(), config={}, model_path="m", data_path="d",
            model_sha256="0" * 64, data_sha256="1" * 64, progress_done=0, progress_total=0, cancel_requested=False,
            attempts=0))
    store = JobStore.from_url(store_url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert schema_diff(conn) == []
    claim = store.claim_next(worker_id="w")
    assert claim.job_id == job_id
    assert store.record_placement(job_id=job_id, run_id=claim.run_id, placement={"pid": 1})
    assert store.get(job_id=job_id).placement == {"pid": 1}
    store.close()
    engine.dispose()


def test_placement_is_recorded_only_by_the_current_run(store: JobStore) -> None:
    job_id = add(store)
    claim = store.claim_next(worker_id="w")
    assert not store.record_placement(job_id=job_id, run_id="stale", placement={"pid": 1})
    assert store.record_placement(job_id=job_id, run_id=claim.run_id, placement={"pid": 2, "gpu_ids": ["1"]})
    assert store.get(job_id=job_id).placement == {"pid": 2, "gpu_ids": ["1"]}
    store.requeue_run(job_id=job_id, run_id=claim.run_id, message="shutdown")
    store.claim_next(worker_id="w")
    assert store.get(job_id=job_id).placement is None  # a new run starts without the old one's placement


def test_a_store_at_an_older_revision_is_upgraded_in_place(store_url: str) -> None:
    """0001 → head (the fair-claims index, the uncertainty file's sha256, the inputs' chunk digests) on a database
    that already holds a job, which survives."""
    engine = make_engine(store_url)
    upgrade(engine, "0001")
    assert current_revision(engine) == "0001"
    with engine.connect() as conn:
        assert any("ix_jobs_owner_started_at" in str(d) for d in schema_diff(conn))  # what 0002 adds
    job_id = new_job_id()
    jobs_at_0001 = sa.Table("jobs", sa.MetaData(), autoload_with=engine)  # the columns that revision has
    with engine.begin() as conn:
        conn.execute(jobs_at_0001.insert().values(
            id=job_id, owner="a", status="queued", created_at=utcnow().replace(tzinfo=None), config={},
            model_path="m", data_path="d", model_sha256="0" * 64, data_sha256="1" * 64, progress_done=0,
            progress_total=0, cancel_requested=False, attempts=0))
    store = JobStore.from_url(store_url)
    assert current_revision(engine) == head_revision() == "0004"
    with engine.connect() as conn:
        assert schema_diff(conn) == []
        assert {"uncertainty_sha256", "input_chunks"} <= {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
        assert "chunks" in {c["name"] for c in sa.inspect(conn).get_columns("datasets")}
    old = store.get(job_id=job_id)
    assert old.uncertainty_sha256 is None  # admitted before 0003: hashed when it runs
    assert old.input_chunks is None  # admitted before 0004: checked against the whole-file sha256
    assert store.claim_next(worker_id="w").job_id == job_id
    store.close()
    engine.dispose()
