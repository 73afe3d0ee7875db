"""The job store's tables (SQLAlchemy models): the one schema that ``service.store`` writes and
``service.migrations`` migrates. Both import it; neither imports the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)



class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    # Fair claims (JobStore._next_owner) ask each active owner when it was last served.
    __table_args__ = (Index("ix_jobs_owner_started_at", "owner", "started_at"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # FIFO / newest-first order
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=QUEUED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model_path: Mapped[str] = mapped_column(Text)  # relative to the storage root
    data_path: Mapped[str] = mapped_column(Text)
    uncertainty_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # recorded at admission, re-checked by the supervisor before the child sees the file (NULL: a job
    # admitted before revision 0003, whose file is hashed when the run starts)
    uncertainty_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    data_sha256: Mapped[str] = mapped_column(String(64))
    # {"model"|"data"|"uncertainty": {"size", "chunk_bytes", "sha256": [...]}}: the inputs' 64 MiB chunk digests,
    # recorded at admission from the same bytes as their sha256, so the supervisor re-checks them in parallel
    # (service.chunk_digests; NULL: admitted before revision 0004, checked against the sha256 alone)
    input_chunks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    progress_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # runs lost to dead workers so far
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the current claim
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Where the current (or last) run executes, recorded by the run itself: executor, node, pid, GPU ids.
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class DatasetRow(Base):
    __tablename__ = "datasets"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    chunks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # as JobRow.input_chunks["data"]
    n: Mapped[int] = mapped_column(Integer)
    x_shape: Mapped[list[int]] = mapped_column(JSON)
    has_labels: Mapped[bool] = mapped_column(Boolean)
