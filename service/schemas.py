"""Pydantic models of the HTTP API (SPEC §3), named by role: JobPublic, JobsPublic, DatasetPublic, ErrorBody."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from .store import Dataset, Job

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable reason, snake_case.", examples=["job_not_found"])
    message: str = Field(description="What went wrong and how to fix it, for a person.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ProgressPublic(BaseModel):
    stage: str | None = Field(description="queued|starting|loading|scoring|dense|testing|saving|<final status>")
    done: int
    total: int
    fraction: float = Field(ge=0.0, le=1.0)
    message: str | None = None


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    config: dict[str, Any]
    progress: ProgressPublic
    result: dict[str, Any] | None = Field(description="The certificate (§3 result) once succeeded.")
    error: JobError | None = Field(description="Why the job failed.")
    # Additions beyond §3 (allowed: add, never rename).
    dataset: str | None = Field(None, description="The ds_ id the job reads, when it was submitted with one.")
    cancel_requested: bool = False
    attempts: int = Field(0, description="Runs lost to a dead or restarted worker so far.")
    model_sha256: str | None = None
    data_sha256: str | None = None

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        done, total = job.progress_done, job.progress_total
        if job.status == "succeeded":
            fraction = 1.0
        else:
            fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            config=job.config,
            progress=ProgressPublic(stage=job.progress_stage, done=done, total=total, fraction=fraction,
                                    message=job.progress_message),
            result=job.result if job.status == "succeeded" else None,
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.status == "failed" and job.error_code else None,
            dataset=job.dataset_id,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            model_sha256=job.model_sha256,
            data_sha256=job.data_sha256,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Total number of jobs visible to the caller (all pages).")


class DatasetPublic(BaseModel):
    id: str
    n: int
    x_shape: list[int]
    has_labels: bool
    sha256: str
    # Additions beyond §3.
    size: int | None = None
    created_at: datetime | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> DatasetPublic:
        return cls(id=ds.id, n=ds.n, x_shape=ds.x_shape, has_labels=ds.has_labels, sha256=ds.sha256,
                   size=ds.size, created_at=ds.created_at)


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int = Field(description="Total number of datasets visible to the caller (all pages).")


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


__all__ = ["DatasetPublic", "ErrorBody", "ErrorDetail", "HealthPublic", "JobError", "JobPublic", "JobsPublic",
           "JobStatus", "ProgressPublic"]
