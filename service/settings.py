"""Settings: the one typed configuration of the service, read from ``CERTIPRUNE_*`` variables.

Unsafe combinations are refused when the object is built (i.e. at start-up), never later:
without API keys the API is open to anyone who can reach it, so it may then only listen on
the loopback interface.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3


def _split_list(value: Any) -> Any:
    """Accept a JSON list (``'["a","b"]'``) or a comma-separated string (``a,b``) from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Configuration of the API server and its workers (environment prefix ``CERTIPRUNE_``)."""

    model_config = SettingsConfigDict(env_prefix="CERTIPRUNE_", extra="ignore")

    data_dir: str = Field(
        "./data", description="Root of datasets/ and jobs/: a local path, or an fsspec URL such as s3://bucket/prefix."
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, ...) for s3:// data dirs and dataset URIs; "
        "default: AWS. Credentials come from the usual AWS variables or files.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys; each key is one tenant. Empty: no auth, loopback only.",
    )
    max_upload_bytes: int = Field(
        2 * GIB, gt=0, description="Largest accepted request body (all files of one request together)."
    )
    allowed_dataset_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URI prefixes a job's `dataset` may point at; empty: only ds_ ids.",
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/certiprune.db")
    executor: Literal["local", "ray", "none"] = Field(
        "local",
        description="'local': spawned worker processes inside `serve`; 'ray': one Ray task per job on a Ray "
        "cluster (a GPU each when the job wants CUDA); 'none': API only (run `certiprune worker`).",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster for the 'ray' executor: 'auto', 'HOST:PORT' on a cluster node, or "
        "'ray://HOST:10001' (Ray Client). Unset: start a Ray instance on this machine.",
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the Ray instance started on this machine when no ray_address is set."
    )
    job_timeout_s: float = Field(6 * 3600, gt=0, description="Wall-clock limit of one run of a job.")
    max_attempts: int = Field(2, ge=1, description="Runs a job gets when its worker dies before it is failed.")
    max_concurrent_jobs: int | None = Field(
        None, ge=1, description="Jobs run at once by one executor; default 1 on CPU, one per GPU."
    )
    prestart_workers: bool = Field(
        True, description="Start the worker and sandboxed child of each free slot (and, on a GPU, the next one behind "
        "a running job) before a job comes (imports, CUDA start), so a job does not wait for them; still one fresh "
        "process per job. Off: start them when the job is claimed."
    )
    cancel_grace_s: float = Field(5.0, ge=0, description="Time a cancelled worker gets to stop before it is killed.")
    max_active_jobs_per_key: int | None = Field(
        None, ge=1, description="Queued plus running jobs one API key may have; more are refused (429) until one "
        "ends. Default: no limit."
    )
    job_retention_s: float | None = Field(
        None, gt=0, description="Finished jobs (row and files: uploaded model, data copy, artifact) are deleted this "
        "long after they finished; default: kept until DELETE /v1/jobs/{id}. Stored datasets are never expired."
    )
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A running job whose executor has not reported for this long is considered orphaned."
    )
    # Resource limits of a worker process (service.sandbox); None: the default shown, 0: no limit.
    sandbox: Literal["auto", "on", "off"] = Field(
        "auto", description="OS isolation of the child that runs an uploaded model (bubblewrap, service.isolation). "
        "'on': required (refuse to start without it); 'off': only rlimits (one user on loopback, their own models); "
        "'auto': on when bubblewrap works here — required anyway with API keys or a non-loopback bind."
    )
    sandbox_max_memory_bytes: int | None = Field(
        None, ge=0, description="Address space (RLIMIT_AS) of a CPU job's child; default: half the machine's "
        "physical memory. Never applied to CUDA jobs."
    )
    sandbox_max_processes: int | None = Field(
        None, ge=0, description="Processes and threads of the sandbox's uid (RLIMIT_NPROC; binds when the server runs "
        "as root and the child enters as an unprivileged uid); default: 64 + 4 × CPUs."
    )
    sandbox_tmp_bytes: int = Field(
        1 * GIB, gt=0, description="Size of the child's private /tmp (tmpfs, counted in memory)."
    )
    max_log_bytes: int = Field(
        1024**2, gt=0, description="The child's stdout/stderr kept in the job's own log (jobs/<id>/child.log); the rest "
        "is dropped. It never reaches the server log."
    )
    sandbox_max_cpu_s: float | None = Field(
        None, ge=0, description="CPU seconds (RLIMIT_CPU, all threads) of one run; default: job_timeout_s × CPUs."
    )
    sandbox_max_file_bytes: int | None = Field(
        None, ge=0, description="Largest file a worker may write (RLIMIT_FSIZE; the artifact, and appends to the "
        "SQLite store and inherited logs); default: max(4 × max_upload_bytes, 8 GiB)."
    )
    sandbox_max_open_files: int | None = Field(1024, ge=0, description="Open file descriptors (RLIMIT_NOFILE).")

    @field_validator("api_keys", "allowed_dataset_roots", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, value: list[str]) -> list[str]:
        if any(len(k) < 8 for k in value):
            raise ValueError("every API key must have at least 8 characters")
        return value

    @model_validator(mode="after")
    def _remote_data_needs_a_database(self) -> Settings:
        if self.database_url is None and "://" in self.data_dir and not self.data_dir.startswith("file://"):
            raise ValueError(
                f"The data dir {self.data_dir!r} is remote, so the job store cannot live in it: set "
                "CERTIPRUNE_DATABASE_URL (e.g. postgresql+psycopg://user:password@host/certiprune)."
            )
        return self

    @model_validator(mode="after")
    def _data_dir_outside_dataset_roots(self) -> Settings:
        if "://" in self.data_dir and not self.data_dir.startswith("file://"):
            return self
        data = Path(self.data_dir.removeprefix("file://")).expanduser().resolve()
        for root in self.allowed_dataset_roots:
            if "://" in root and not root.startswith("file://"):
                continue
            real = Path(root.removeprefix("file://")).expanduser().resolve()
            if real == data or real in data.parents or data in real.parents:
                raise ValueError(
                    f"The allowed dataset root {root!r} overlaps the data dir {str(data)!r}: a job could then name "
                    "another tenant's files or the job store as its dataset. Keep them apart."
                )
        return self

    @model_validator(mode="after")
    def _refuse_unsandboxed_tenants(self) -> Settings:
        if self.sandbox == "off" and self.sandbox_required:
            raise ValueError(
                "Refusing CERTIPRUNE_SANDBOX=off with API keys or a non-loopback bind: one tenant's model could then "
                "read and change every other tenant's files. Use 'auto' or 'on' (needs bubblewrap)."
            )
        return self

    @model_validator(mode="after")
    def _refuse_open_public_bind(self) -> Settings:
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"Refusing to listen on {self.host!r} without API keys: anyone who can reach it could run code on "
                "this machine. Set CERTIPRUNE_API_KEYS (comma-separated) or bind to 127.0.0.1."
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        if "://" in self.data_dir and not self.data_dir.startswith("file://"):
            raise ValueError("A remote data_dir needs an explicit CERTIPRUNE_DATABASE_URL.")
        root = Path(self.data_dir.removeprefix("file://")).expanduser().resolve()
        return f"sqlite:///{root / 'certiprune.db'}"

    @property
    def sandbox_required(self) -> bool:
        """API keys (several tenants) or a non-loopback bind: an uploaded model must never run unsandboxed."""
        return bool(self.api_keys) or not is_loopback(self.host)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)


__all__ = ["Settings", "is_loopback"]
