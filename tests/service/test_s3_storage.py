"""Storage on S3 (a local moto server): atomic uploads, fresh listings, and datasets → job → artifact end to end.

The server under test keeps its data dir at ``s3://bucket/prefix`` and its job store in SQLite;
its worker processes reach the same bucket through CERTIPRUNE_S3_ENDPOINT_URL.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service_harness import FAST_CONFIG, REPO, Inputs, Server, assert_error, submit, wait_terminal, wait_until_up

from service.storage import Storage, UploadTooLarge, storage_options

pytest.importorskip("s3fs", reason="S3 storage needs s3fs")
boto3 = pytest.importorskip("boto3", reason="the S3 tests need boto3")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")

pytestmark = pytest.mark.timeout(180)

DATA_BUCKET, CAL_BUCKET, OTHER_BUCKET = "certiprune-data", "calibration-sets", "someone-elses"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3:
    endpoint: str
    client: Any  # boto3 S3 client

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def pending_uploads(self, bucket: str) -> list[Any]:
        return self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in (DATA_BUCKET, CAL_BUCKET, OTHER_BUCKET):
            client.create_bucket(Bucket=bucket)
        try:
            yield S3(endpoint=endpoint, client=client)
        finally:
            server.stop()


def s3_storage(s3: S3) -> tuple[Storage, str]:
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    url = f"s3://{DATA_BUCKET}/{prefix}"
    return Storage(url, options=storage_options(url, s3_endpoint_url=s3.endpoint)), prefix


def test_uploads_land_whole_under_their_final_key(s3: S3) -> None:
    storage, prefix = s3_storage(s3)
    payload = os.urandom(6 * 1024 * 1024 + 7)  # more than one multipart part
    stored = storage.write_stream(io.BytesIO(payload), "jobs/job_1/model.pt", limit=10 * 1024 * 1024)
    assert stored.sha256 == hashlib.sha256(payload).hexdigest() and stored.size == len(payload)
    assert s3.keys(DATA_BUCKET, prefix) == [f"{prefix}/jobs/job_1/model.pt"]  # no temporary key left behind
    with storage.fetch_local("jobs/job_1/model.pt") as local:
        assert local.read_bytes() == payload


def test_an_oversize_or_broken_upload_leaves_nothing_and_keeps_the_old_object(s3: S3) -> None:
    storage, prefix = s3_storage(s3)
    with pytest.raises(UploadTooLarge):
        storage.write_stream(io.BytesIO(b"y" * 5000), "datasets/ds_1.npz", limit=4096)
    storage.write_stream(io.BytesIO(b"old"), "a/file.bin")

    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 6 * 1024 * 1024:
                raise OSError("connection lost")
            return super().read(n)

    with pytest.raises(OSError, match="connection lost"):
        storage.write_stream(Broken(os.urandom(8 * 1024 * 1024)), "a/file.bin")
    assert s3.keys(DATA_BUCKET, prefix) == [f"{prefix}/a/file.bin"]
    with storage.open("a/file.bin") as fh:
        assert fh.read() == b"old"
    assert s3.pending_uploads(DATA_BUCKET) == []  # the multipart upload was aborted, not left to bill


def test_put_file_and_remove_tree(s3: S3, tmp_path: Path) -> None:
    storage, prefix = s3_storage(s3)
    local = tmp_path / ".artifact-x.pt"
    local.write_bytes(b"pruned")
    stored = storage.put_file(local, "jobs/job_2/artifact.pt")
    assert stored.sha256 == hashlib.sha256(b"pruned").hexdigest()
    assert s3.keys(DATA_BUCKET, prefix) == [f"{prefix}/jobs/job_2/artifact.pt"]
    assert storage.writable()
    storage.remove_tree("jobs/job_2")
    assert s3.keys(DATA_BUCKET, prefix) == []


def test_objects_written_elsewhere_are_seen_at_once(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """No stale directory listings: the API must see an artifact a worker process just uploaded."""
    storage, prefix = s3_storage(s3)
    storage.write_stream(io.BytesIO(b"m"), "jobs/job_3/model.pt")
    assert storage.fs.ls(f"{storage.root}/jobs/job_3", detail=False)  # a listing a cache would keep
    assert not storage.exists("jobs/job_3/artifact.pt")
    s3.client.put_object(Bucket=DATA_BUCKET, Key=f"{prefix}/jobs/job_3/artifact.pt", Body=b"x")
    assert storage.exists("jobs/job_3/artifact.pt")
    # A Storage built from the data dir alone (as in a worker process) finds the endpoint in the environment.
    monkeypatch.setenv("CERTIPRUNE_S3_ENDPOINT_URL", s3.endpoint)
    assert Storage(f"s3://{DATA_BUCKET}/{prefix}").exists("jobs/job_3/artifact.pt")


@dataclass
class S3Server(Server):
    """``certiprune serve`` with an s3:// data dir (the harness's Server passes a local folder)."""

    data_url: str = ""

    def start(self, timeout: float = 60.0) -> S3Server:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", self.data_url, "--log-level", "warning"],
            cwd=REPO, env={**inherited, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )
        wait_until_up(self.proc, f"{self.url}/readyz", timeout, self.log)
        return self


@pytest.fixture
def s3_server(s3: S3, tmp_path: Path) -> Iterator[tuple[S3Server, str]]:
    prefix = f"srv-{uuid.uuid4().hex[:8]}"
    env = {**CREDENTIALS, "CERTIPRUNE_S3_ENDPOINT_URL": s3.endpoint,
           "CERTIPRUNE_DATABASE_URL": f"sqlite:///{tmp_path / 'certiprune.db'}",
           "CERTIPRUNE_ALLOWED_DATASET_ROOTS": f"s3://{CAL_BUCKET}/allowed/", "CERTIPRUNE_CANCEL_GRACE_S": "2"}
    server = S3Server(data_dir=tmp_path / "unused", env=env, data_url=f"s3://{DATA_BUCKET}/{prefix}").start()
    try:
        yield server, prefix
    finally:
        server.stop()


def test_dataset_job_and_artifact_round_trip_through_s3(s3: S3, s3_server: tuple[S3Server, str],
                                                        inputs: Inputs) -> None:
    server, prefix = s3_server
    s3.client.put_object(Bucket=CAL_BUCKET, Key="allowed/digits.npz", Body=inputs.data.read_bytes())
    s3.client.put_object(Bucket=OTHER_BUCKET, Key="digits.npz", Body=inputs.data.read_bytes())
    with server.client() as c:
        r = c.post("/v1/datasets", files={"file": ("digits.npz", inputs.data.read_bytes())})
        assert r.status_code == 201, r.text
        dataset = r.json()
        by_id = submit(c, inputs.model, dataset=dataset["id"], config=FAST_CONFIG).json()["id"]
        by_uri = submit(c, inputs.model, dataset=f"s3://{CAL_BUCKET}/allowed/digits.npz", config=FAST_CONFIG)
        assert by_uri.status_code == 202, by_uri.text
        assert_error(submit(c, inputs.model, dataset=f"s3://{OTHER_BUCKET}/digits.npz", config=FAST_CONFIG), 422,
                     "dataset_not_allowed")
        for job_id in (by_id, by_uri.json()["id"]):
            job = wait_terminal(c, job_id, timeout=120)
            assert job["status"] == "succeeded", (job, server.log())
            artifact = c.get(f"/v1/jobs/{job_id}/artifact")
            assert artifact.status_code == 200
            digest = hashlib.sha256(artifact.content).hexdigest()
            assert digest == artifact.headers["x-checksum-sha256"] == job["result"]["artifact_sha256"]
            stored = s3.client.get_object(Bucket=DATA_BUCKET, Key=f"{prefix}/jobs/{job_id}/artifact.pt")["Body"]
            assert hashlib.sha256(stored.read()).hexdigest() == digest
    keys = s3.keys(DATA_BUCKET, prefix)
    assert f"{prefix}/datasets/{dataset['id']}.npz" in keys
    assert not [k for k in keys if "/.tmp-" in k or "/.artifact-" in k], keys  # nothing half-written
    assert s3.pending_uploads(DATA_BUCKET) == []
