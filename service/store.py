"""The job store: JobStore, the only code that writes the jobs and datasets tables (``service.tables``).

State changes are conditional UPDATEs (compare-and-set on ``status`` and ``run_id``), so an API
process, several executors and stale worker processes can share one database without locks:
a job is claimed by exactly one run, and only that run may finish it. The same models serve
SQLite (one machine) and PostgreSQL (many machines; claims then also use ``FOR UPDATE SKIP
LOCKED`` so racing claimers take different jobs instead of queueing on one row). The schema is
owned by the Alembic migrations in ``service.migrations``: opening a store upgrades it.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, aliased, sessionmaker

from .tables import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL,
    Base,  # noqa: F401  (re-exported: the store's tables)
    DatasetRow,
    JobRow,
)

def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def new_dataset_id() -> str:
    return f"ds_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Job:
    """A detached snapshot of one job row (safe to use after the session closed)."""

    id: str
    owner: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    config: dict[str, Any]
    dataset_id: str | None
    model_path: str
    data_path: str
    uncertainty_path: str | None
    model_sha256: str
    data_sha256: str
    progress_stage: str | None
    progress_done: int
    progress_total: int
    progress_message: str | None
    result: dict[str, Any] | None
    artifact_sha256: str | None
    error_code: str | None
    error_message: str | None
    cancel_requested: bool
    attempts: int
    run_id: str | None
    worker_id: str | None
    heartbeat_at: datetime | None
    placement: dict[str, Any] | None = None
    uncertainty_sha256: str | None = None
    input_chunks: dict[str, Any] | None = None  # per input: its 64 MiB chunk digests (service.chunk_digests)

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Dataset:
    id: str
    owner: str
    created_at: datetime
    path: str
    size: int
    sha256: str
    n: int
    x_shape: list[int]
    has_labels: bool
    chunks: dict[str, Any] | None = None  # its 64 MiB chunk digests (service.chunk_digests)

    @classmethod
    def from_row(cls, row: DatasetRow) -> Dataset:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Claim:
    job_id: str
    run_id: str


def _enable_wal(cur: Any, attempts: int = 100) -> None:
    """Switch a SQLite database to WAL, once. The switch needs an exclusive lock and SQLite answers
    "database is locked" at once, without its busy handler, when another connection is opening the
    same new file (a server and its workers starting together): retry for a few seconds."""
    import sqlite3

    for attempt in range(attempts):
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL (readers never block the writer) and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _enable_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def this_host() -> str:
    return socket.gethostname()


def make_worker_id() -> str:
    """``host:pid:nonce`` — lets a restarted executor on the same host see that a claim's process is gone."""
    return f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_is_gone_locally(worker_id: str | None) -> bool:
    """True when ``worker_id`` names a process on this host that no longer exists (or is us, restarted)."""
    if not worker_id:
        return True
    parts = worker_id.split(":")
    if len(parts) != 3 or parts[0] != this_host():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return True  # our pid with another nonce: an earlier life of this container/process slot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobStore:
    """Persistence for jobs and datasets. Every method opens and closes its own transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # PostgreSQL: claimers skip rows another claimer has locked. SQLite has no row locks (one
        # writer at a time), so the compare-and-set UPDATE alone decides there.
        self._skip_locked = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(cls, url: str, *, migrate: bool = True) -> JobStore:
        """A store on ``url``; with ``migrate`` its schema is brought to the latest migration first."""
        store = cls(make_engine(url))
        if migrate:
            store.create_tables()
        return store

    def create_tables(self) -> None:
        """Create or upgrade the schema (Alembic, serialised across processes; a no-op when current)."""
        from .migrations import upgrade

        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- jobs: API side -------------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        owner: str,
        config: dict[str, Any],
        model_path: str,
        data_path: str,
        model_sha256: str,
        data_sha256: str,
        dataset_id: str | None = None,
        uncertainty_path: str | None = None,
        uncertainty_sha256: str | None = None,
        input_chunks: dict[str, Any] | None = None,
    ) -> Job:
        row = JobRow(
            id=job_id,
            owner=owner,
            status=QUEUED,
            created_at=utcnow(),
            config=config,
            dataset_id=dataset_id,
            model_path=model_path,
            data_path=data_path,
            uncertainty_path=uncertainty_path,
            uncertainty_sha256=uncertainty_sha256,
            model_sha256=model_sha256,
            data_sha256=data_sha256,
            input_chunks=input_chunks,
            progress_stage=QUEUED,
            progress_done=0,
            progress_total=0,
            cancel_requested=False,
            attempts=0,
        )
        with self._session() as s:
            s.add(row)
            s.flush()
            return Job.from_row(row)

    def get(self, *, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when it does not exist or belongs to another owner (when ``owner`` is given)."""
        stmt = select(JobRow).where(JobRow.id == job_id)
        if owner is not None:
            stmt = stmt.where(JobRow.owner == owner)
        with self._session() as s:
            row = s.scalars(stmt).first()
            return Job.from_row(row) if row else None

    def list(
        self, *, owner: str | None, limit: int = 20, offset: int = 0, status: str | None = None
    ) -> tuple[list[Job], int]:
        """Newest first; returns (page, total count)."""
        where = [JobRow.status == status] if status is not None else []
        return self._page(JobRow, Job, owner=owner, where=where, limit=limit, offset=offset)

    def _page(self, row: Any, snapshot: Any, *, owner: str | None, where: list[Any], limit: int,
              offset: int) -> tuple[list[Any], int]:
        """One page of ``row`` (newest first, optionally one owner's) as ``snapshot`` objects, and the total."""
        if owner is not None:
            where = [*where, row.owner == owner]
        stmt = select(row).where(*where).order_by(row.seq.desc()).limit(limit).offset(offset)
        count_stmt = select(func.count()).select_from(row).where(*where)
        with self._session() as s:
            rows = [snapshot.from_row(r) for r in s.scalars(stmt)]
            return rows, int(s.scalar(count_stmt) or 0)

    def request_cancel(self, *, job_id: str, owner: str | None = None) -> Job | None:
        """Queued jobs are cancelled at once; running ones get ``cancel_requested`` (their executor stops them)."""
        now = utcnow()
        where = [JobRow.id == job_id] + ([JobRow.owner == owner] if owner is not None else [])
        with self._session() as s:
            s.execute(
                update(JobRow)
                .where(*where, JobRow.status == QUEUED)
                .values(status=CANCELLED, cancel_requested=True, finished_at=now,
                        progress_stage=CANCELLED, progress_message="Cancelled before it started.")
            )
            s.execute(update(JobRow).where(*where, JobRow.status == RUNNING).values(cancel_requested=True))
        return self.get(job_id=job_id, owner=owner)

    def counts_by_status(self) -> dict[str, int]:
        with self._session() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: int(n) for status, n in rows})
        return counts

    def delete(self, *, job_id: str, owner: str | None = None) -> tuple[str, Job | None]:
        """Delete a finished job's row: ("deleted", job), ("not_finished", job) or ("not_found", None).

        Only succeeded, failed or cancelled jobs go (one conditional DELETE, so a job that a worker
        holds is never removed under it). The caller removes the job's files afterwards.
        """
        job = self.get(job_id=job_id, owner=owner)
        if job is None:
            return "not_found", None
        if job.status not in TERMINAL:
            return "not_finished", job
        with self._session() as s:
            gone = s.execute(delete(JobRow).where(JobRow.id == job_id, JobRow.owner == job.owner,
                                                  JobRow.status.in_(TERMINAL))).rowcount
        if gone:
            return "deleted", job
        now = self.get(job_id=job_id, owner=owner)  # changed meanwhile: deleted by another call, or requeued
        return ("not_found", None) if now is None else ("not_finished", now)

    def count_active(self, *, owner: str) -> int:
        """Queued and running jobs of ``owner`` (for the per-key quota)."""
        stmt = select(func.count()).select_from(JobRow).where(JobRow.owner == owner,
                                                              JobRow.status.in_((QUEUED, RUNNING)))
        with self._session() as s:
            return int(s.scalar(stmt) or 0)

    def finished_before(self, *, cutoff: datetime, limit: int = 100) -> list[str]:
        """Ids of jobs that ended before ``cutoff``, oldest first (for retention)."""
        stmt = (select(JobRow.id).where(JobRow.status.in_(TERMINAL), JobRow.finished_at < cutoff)
                .order_by(JobRow.seq).limit(limit))
        with self._session() as s:
            return list(s.scalars(stmt))

    # -- jobs: executor / worker side -----------------------------------------------------

    def claim_next(self, *, worker_id: str) -> Claim | None:
        """Atomically move the next queued job to running; None when the queue is empty.

        Next = fair between API keys, FIFO within one: the owner with the fewest running jobs first,
        then the owner served least recently (never served first), then the oldest job. One key
        that queues a hundred jobs cannot starve another key's one job, even with a single slot.

        Compare-and-set: the UPDATE only matches while the row is still queued, so when two
        executors race for one job exactly one sees rowcount 1; the other tries the next job.
        On PostgreSQL the candidate is read ``FOR UPDATE SKIP LOCKED``: a racing claimer skips the
        row being claimed and takes the next one instead of waiting for it.
        """
        for _ in range(20):
            with self._session() as s:
                owner = s.scalar(self._next_owner())
                if owner is None:
                    return None
                candidate = s.scalar(self._oldest_queued(owner))
                if candidate is None:  # that owner's queued jobs are being claimed by others right now
                    candidate = s.scalar(self._oldest_queued(None))
                    if candidate is None:
                        return None
                now = utcnow()
                run_id = uuid.uuid4().hex
                res = s.execute(
                    update(JobRow)
                    .where(JobRow.id == candidate, JobRow.status == QUEUED)
                    .values(status=RUNNING, run_id=run_id, worker_id=worker_id, started_at=now,
                            heartbeat_at=now, progress_stage="starting", progress_done=0, progress_total=0,
                            progress_message="Starting a worker process.", placement=None)
                )
                if res.rowcount == 1:
                    return Claim(job_id=candidate, run_id=run_id)
        return None

    def _oldest_queued(self, owner: str | None) -> Any:
        stmt = select(JobRow.id).where(JobRow.status == QUEUED)
        if owner is not None:
            stmt = stmt.where(JobRow.owner == owner)
        stmt = stmt.order_by(JobRow.seq).limit(1)
        return stmt.with_for_update(skip_locked=True) if self._skip_locked else stmt

    @staticmethod
    def _next_owner() -> Any:
        """The owner whose turn it is: fewest running jobs, then least recently served, then the oldest
        queued job. Grouped over active jobs only (and one indexed max per active owner), so a long
        queue costs one pass, not a pass per queued job."""
        is_running = case((JobRow.status == RUNNING, 1), else_=0)
        is_queued = case((JobRow.status == QUEUED, 1), else_=0)
        active = (select(JobRow.owner.label("owner"), func.sum(is_running).label("running"),
                         func.sum(is_queued).label("queued"),
                         func.min(case((JobRow.status == QUEUED, JobRow.seq))).label("first_queued"))
                  .where(JobRow.status.in_((QUEUED, RUNNING))).group_by(JobRow.owner).subquery())
        mine = aliased(JobRow)
        last_served = select(func.max(mine.started_at)).where(mine.owner == active.c.owner).scalar_subquery()
        return (select(active.c.owner).where(active.c.queued > 0)
                .order_by(active.c.running, last_served.asc().nulls_first(), active.c.first_queued).limit(1))

    def update_progress(
        self, *, job_id: str, run_id: str, stage: str, done: int, total: int, message: str | None = None
    ) -> bool:
        with self._session() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
                .values(progress_stage=stage, progress_done=int(done), progress_total=int(total),
                        progress_message=message, heartbeat_at=utcnow())
            )
            return res.rowcount == 1

    def record_placement(self, *, job_id: str, run_id: str, placement: dict[str, Any]) -> bool:
        """The run says where it executes (node, pid, GPU ids); only the run holding the claim may."""
        with self._session() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
                .values(placement=placement, heartbeat_at=utcnow())
            )
            return res.rowcount == 1

    def heartbeat(self, *, run_ids: list[str]) -> None:
        if not run_ids:
            return
        with self._session() as s:
            s.execute(
                update(JobRow).where(JobRow.run_id.in_(run_ids), JobRow.status == RUNNING).values(heartbeat_at=utcnow())
            )

    def cancel_requested(self, *, job_id: str, run_id: str | None = None) -> bool:
        """True when the job should stop: cancel asked, or (given ``run_id``) this run no longer owns it."""
        with self._session() as s:
            row = s.execute(
                select(JobRow.cancel_requested, JobRow.status, JobRow.run_id).where(JobRow.id == job_id)
            ).first()
        if row is None:
            return True
        cancel, status, current_run = row
        if run_id is not None and (status != RUNNING or current_run != run_id):
            return True
        return bool(cancel)

    def cancel_requested_runs(self, *, run_ids: list[str]) -> set[str]:
        if not run_ids:
            return set()
        with self._session() as s:
            rows = s.scalars(
                select(JobRow.run_id).where(JobRow.run_id.in_(run_ids), JobRow.cancel_requested.is_(True))
            )
            return {r for r in rows if r}

    def is_current_run(self, *, job_id: str, run_id: str) -> bool:
        with self._session() as s:
            return s.scalar(
                select(func.count()).select_from(JobRow)
                .where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
            ) == 1

    def finish(
        self,
        *,
        job_id: str,
        run_id: str,
        status: str,
        result: dict[str, Any] | None = None,
        artifact_sha256: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """End a run. Only the run that holds the claim can finish the job; returns whether it did."""
        if status not in TERMINAL:
            raise ValueError(f"finish() needs a terminal status {TERMINAL}, got {status!r}")
        total_done: dict[str, Any] = {}
        if status == SUCCEEDED:
            total_done = {"progress_done": JobRow.progress_total}
        with self._session() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
                .values(status=status, finished_at=utcnow(), result=result, artifact_sha256=artifact_sha256,
                        error_code=error_code, error_message=error_message, progress_stage=status,
                        progress_message=error_message if status == FAILED else None, **total_done)
            )
            return res.rowcount == 1

    def interrupt(
        self, *, job_id: str, run_id: str, max_attempts: int, code: str, message: str, count_attempt: bool = True
    ) -> str | None:
        """A run was lost: requeue the job, or fail it with ``code`` once it has used ``max_attempts`` runs.

        A job whose cancel was requested is cancelled instead. Returns the new status, or None when
        ``run_id`` no longer held the job.
        """
        with self._session() as s:
            row = s.scalars(
                select(JobRow).where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
            ).first()
            if row is None:
                return None
            attempts = row.attempts + (1 if count_attempt else 0)
            if row.cancel_requested:
                values: dict[str, Any] = {"status": CANCELLED, "finished_at": utcnow(), "progress_stage": CANCELLED}
            elif attempts >= max_attempts:
                values = {"status": FAILED, "finished_at": utcnow(), "error_code": code,
                          "error_message": f"{message} The job was tried {attempts} time(s) and is not retried again.",
                          "progress_stage": FAILED}
            else:
                values = {"status": QUEUED, "started_at": None, "worker_id": None, "heartbeat_at": None,
                          "progress_stage": QUEUED, "progress_done": 0, "progress_total": 0,
                          "progress_message": f"Requeued: {message}"}
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.run_id == run_id, JobRow.status == RUNNING)
                .values(attempts=attempts, **values)
            )
            return values["status"] if res.rowcount == 1 else None

    def orphaned_runs(
        self,
        *,
        stale_before: datetime | None = None,
        is_gone: Callable[[str | None], bool] | None = None,
    ) -> list[Claim]:
        """Runs left 'running' by executors that died (read only; ``service.supervisor.recover_orphans`` records them).

        A running job is orphaned when ``is_gone(worker_id)`` (default: ``worker_is_gone_locally``) says its
        process is gone, or when its heartbeat is older than ``stale_before``.
        """
        gone = worker_is_gone_locally if is_gone is None else is_gone
        with self._session() as s:
            running = s.execute(
                select(JobRow.id, JobRow.run_id, JobRow.worker_id, JobRow.heartbeat_at).where(JobRow.status == RUNNING)
            ).all()
        orphans = []
        for job_id, run_id, worker_id, heartbeat_at in running:
            stale = stale_before is not None and (heartbeat_at is None or heartbeat_at < stale_before)
            if stale or gone(worker_id):
                orphans.append(Claim(job_id=job_id, run_id=run_id or ""))
        return orphans

    def requeue_run(self, *, job_id: str, run_id: str, message: str) -> str | None:
        """Give a job back to the queue without counting an attempt (orderly shutdown)."""
        return self.interrupt(job_id=job_id, run_id=run_id, max_attempts=1 << 30, code="worker_interrupted",
                              message=message, count_attempt=False)

    # -- datasets -------------------------------------------------------------------------

    def create_dataset(
        self, *, dataset_id: str, owner: str, path: str, size: int, sha256: str, n: int,
        x_shape: list[int], has_labels: bool, chunks: dict[str, Any] | None = None,
    ) -> Dataset:
        row = DatasetRow(id=dataset_id, owner=owner, created_at=utcnow(), path=path, size=size, sha256=sha256,
                         chunks=chunks, n=n, x_shape=list(x_shape), has_labels=has_labels)
        with self._session() as s:
            s.add(row)
            s.flush()
            return Dataset.from_row(row)

    def list_datasets(self, *, owner: str | None, limit: int = 20, offset: int = 0) -> tuple[list[Dataset], int]:
        """Newest first; returns (page, total count)."""
        return self._page(DatasetRow, Dataset, owner=owner, where=[], limit=limit, offset=offset)

    def delete_dataset(self, *, dataset_id: str, owner: str | None = None) -> tuple[str, Dataset | None]:
        """("deleted", ds), ("in_use", ds) while a queued or running job reads it, or ("not_found", None)."""
        ds = self.get_dataset(dataset_id=dataset_id, owner=owner)
        if ds is None:
            return "not_found", None
        active = select(JobRow.id).where(JobRow.dataset_id == dataset_id, JobRow.status.in_((QUEUED, RUNNING)))
        with self._session() as s:
            gone = s.execute(delete(DatasetRow).where(DatasetRow.id == dataset_id, DatasetRow.owner == ds.owner,
                                                      ~exists(active))).rowcount
        if gone:
            return "deleted", ds
        return ("in_use", ds) if self.get_dataset(dataset_id=dataset_id, owner=owner) else ("not_found", None)

    def get_dataset(self, *, dataset_id: str, owner: str | None = None) -> Dataset | None:
        stmt = select(DatasetRow).where(DatasetRow.id == dataset_id)
        if owner is not None:
            stmt = stmt.where(DatasetRow.owner == owner)
        with self._session() as s:
            row = s.scalars(stmt).first()
            return Dataset.from_row(row) if row else None


def stale_cutoff(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


__all__ = [
    "CANCELLED", "FAILED", "QUEUED", "RUNNING", "STATUSES", "SUCCEEDED", "TERMINAL",
    "Claim", "Dataset", "Job", "JobStore", "make_engine", "make_worker_id", "new_dataset_id", "new_job_id",
    "stale_cutoff", "utcnow", "worker_is_gone_locally",
]
