"""The 'ray' executor end to end: a real local Ray cluster, real servers joining it, jobs as Ray tasks.

One Ray cluster (2 CPUs, no dashboard) serves the whole module; each server connects to it with
CERTIPRUNE_RAY_ADDRESS. A Ray worker killed mid-job must not leave the job running: it is retried
from the store (attempts counted) and finishes, or fails once out of attempts. Last, the docker/
deployment of this executor is checked for consistency (docker itself cannot run here).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_harness import pid_gone, FAST_CONFIG, SLOW_CONFIG, Inputs, Server, submit, wait_for, wait_terminal

from service.store import Job, JobStore

pytestmark = pytest.mark.timeout(240)

#: Long enough to be killed in the middle (a few seconds on 2 cores), short enough to run twice.
MEDIUM_CONFIG = {"sparsities": [round(0.1 * i, 1) for i in range(1, 10)], "epsilon": 0.05, "batch_size": 2048}


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray = pytest.importorskip("ray", reason="the 'ray' executor tests need Ray (pip install 'ray[default]')")
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", namespace="certiprune-tests")
    signal.signal(signal.SIGTERM, handler)  # ray.init replaces it; pytest's own should stay
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def ray_server(make_server, ray_address: str):
    def make(**settings: Any) -> Server:
        return make_server(executor="ray", ray_address=ray_address, cancel_grace_s=2, **settings)

    return make


def stored_job(server: Server, job_id: str) -> Job:
    store = JobStore.from_url(f"sqlite:///{server.data_dir.resolve() / 'certiprune.db'}")
    try:
        job = store.get(job_id=job_id)
    finally:
        store.close()
    assert job is not None
    return job


def wait_placement(server: Server, job_id: str, exclude_pid: int | None = None, timeout: float = 60.0) -> dict:
    """The placement the job's Ray task recorded (its worker pid, node, GPU ids), once the model is being used."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stored_job(server, job_id)
        if (job.status == "running" and job.placement and job.placement["pid"] != exclude_pid
                and job.progress_stage in ("dense", "scoring", "testing")):
            return job.placement
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got busy on a Ray worker; last: {stored_job(server, job_id)}")




def test_jobs_run_as_ray_tasks_and_artifacts_download(ray_server, inputs: Inputs) -> None:
    server = ray_server()
    with server.client() as c:
        ids = [submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"] for _ in range(2)]
        jobs = [wait_terminal(c, job_id, timeout=120) for job_id in ids]
        for job in jobs:
            assert job["status"] == "succeeded", job
            r = c.get(f"/v1/jobs/{job['id']}/artifact")
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == r.headers["x-checksum-sha256"] == \
                job["result"]["artifact_sha256"]
    for job_id in ids:
        placement = stored_job(server, job_id).placement
        assert placement["executor"] == "ray" and placement["gpu_ids"] == []  # a CPU-only cluster
        assert placement["pid"] != server.proc.pid  # the model ran in a Ray worker, not in the API


def test_a_killed_ray_worker_is_retried_from_the_store_and_finishes(ray_server, inputs: Inputs) -> None:
    server = ray_server(max_attempts=2)
    with server.client() as c:
        job_id = submit(c, inputs.big_model, data=inputs.big_data, config=MEDIUM_CONFIG).json()["id"]
        first = wait_placement(server, job_id)
        os.kill(first["pid"], signal.SIGKILL)
        assert pid_gone(first["pid"])
        retried = wait_for(c, job_id, lambda j: j["attempts"] == 1, 30, "the lost run to be counted")
        assert retried["status"] in ("queued", "running")
        job = wait_terminal(c, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert stored_job(server, job_id).placement["pid"] != first["pid"]  # a fresh worker ran it again


def test_a_job_whose_ray_worker_dies_on_its_last_attempt_fails_clearly(ray_server, inputs: Inputs) -> None:
    server = ray_server(max_attempts=1)
    with server.client() as c:
        job_id = submit(c, inputs.big_model, data=inputs.big_data, config=MEDIUM_CONFIG).json()["id"]
        os.kill(wait_placement(server, job_id)["pid"], signal.SIGKILL)
        job = wait_terminal(c, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_died", job
    assert "Ray worker" in job["error"]["message"] and "1 time(s)" in job["error"]["message"]


def test_sandbox_deaths_under_ray_fail_at_once_like_the_local_executor(ray_server, inputs: Inputs,
                                                                       hostile_models: dict[str, Path]) -> None:
    """The Ray task runs the job in a child process and reads how it ended: the CPU-time limit (SIGXCPU)
    fails the job ``job_timeout`` without a retry, instead of a crash retried until ``worker_died``."""
    server = ray_server(sandbox_max_cpu_s=6, max_attempts=3)
    with server.client() as c:
        job_id = submit(c, hostile_models["spins"], data=inputs.data,
                        config={"sparsities": [0.2, 0.5], "epsilon": 0.05}).json()["id"]
        job = wait_terminal(c, job_id, timeout=120)
        assert job["status"] == "failed" and job["error"]["code"] == "job_timeout", job
        assert job["attempts"] == 0 and "CERTIPRUNE_SANDBOX_MAX_CPU_S" in job["error"]["message"], job
        assert not (server.data_dir / "jobs" / job_id / "artifact.pt").exists()
        # The same server still runs an ordinary job to the end.
        ok = submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
        assert wait_terminal(c, ok, timeout=120)["status"] == "succeeded"
    placement = stored_job(server, job_id).placement
    assert placement["executor"] == "ray" and placement["pid"] != server.proc.pid


def test_cancel_stops_the_ray_task(ray_server, inputs: Inputs) -> None:
    server = ray_server()
    with server.client() as c:
        job_id = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
        pid = wait_placement(server, job_id)["pid"]
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_terminal(c, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert pid_gone(pid), "the Ray worker kept running a cancelled job"


def test_cuda_jobs_fail_clearly_on_a_cluster_without_gpus(ray_server, inputs: Inputs) -> None:
    server = ray_server()
    with server.client() as c:
        job = wait_terminal(c, submit(c, inputs.model, data=inputs.data,
                                      config={**FAST_CONFIG, "device": "cuda"}).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "cuda_unavailable", job
    assert "Ray cluster has no GPU" in job["error"]["message"]


@pytest.mark.parametrize(("device", "cluster_gpus", "expected"), [
    ("cpu", 4, 0), ("auto", 4, 1), ("cuda", 4, 1), ("auto", 0, 0), ("cuda", 0, None),
])
def test_gpus_per_job_follow_the_device_and_the_cluster(device: str, cluster_gpus: float,
                                                        expected: int | None) -> None:
    pytest.importorskip("ray", reason="the 'ray' executor needs Ray")
    from service.executors.ray import gpus_for

    assert gpus_for({"device": device}, cluster_gpus) == expected


# -- docker/: the scale-out deployment of this executor ------------------------------------

DOCKER = Path(__file__).resolve().parents[2] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="checking docker/compose.yaml needs PyYAML")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ${VAR:-default} / ${VAR:?message} placeholders filled in."""
    import re

    def fill(value: Any) -> str:
        return re.sub(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(2) or f"x-{m.group(1).lower()}-x",
                      str(value))

    return {k: fill(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_has_api_ray_head_gpu_workers_postgres_and_minio(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "ray-head", "gpu-worker", "postgres", "minio"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on an undefined service {dependency!r}"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in (compose.get("volumes") or {}), volume
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file(), build
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in gpu)
    assert services["api"]["build"]["args"]["RAY_VERSION"] == services["gpu-worker"]["build"]["args"]["RAY_VERSION"]


def test_compose_settings_and_commands_are_ones_certiprune_accepts(compose: dict[str, Any]) -> None:
    """Every CERTIPRUNE_* variable is a real setting, the API's configuration validates, its command parses."""
    import shlex

    from service.cli import parse
    from service.settings import Settings

    services = compose["services"]
    api_env = _env(services["api"])
    settings_env = {k.removeprefix("CERTIPRUNE_").lower(): v for k, v in api_env.items() if k.startswith("CERTIPRUNE_")}
    assert set(settings_env) <= set(Settings.model_fields), set(settings_env) - set(Settings.model_fields)
    settings = Settings(**settings_env, host="0.0.0.0", executor="ray")
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert settings.data_dir.startswith("s3://") and settings.s3_endpoint_url == "http://minio:9000"
    command = services["api"]["command"][-1].split("&&")[-1].split()
    assert command[:2] == ["exec", "certiprune"]
    name, args = parse(command[2:])
    assert (name, args["executor"], args["ray_address"], args["host"]) == ("serve", "ray", "auto", "0.0.0.0")
    for name in ("api", "gpu-worker"):
        assert _env(services[name])["RAY_AUTH_TOKEN"] == _env(services["ray-head"])["RAY_AUTH_TOKEN"]
        assert "AWS_SECRET_ACCESS_KEY" in _env(services[name])  # job processes read the bucket
    head = services["ray-head"]["command"]
    assert "--head" in head and "--num-gpus=0" in head
    assert "--address=ray-head:6379" in services["gpu-worker"]["command"]
    assert shlex.split(services["api"]["command"][-1])[:3] == ["ray", "start", "--address=ray-head:6379"]


def test_worker_image_has_a_cuda_base_and_both_images_pin_one_ray(compose: dict[str, Any]) -> None:
    worker = (DOCKER / "Dockerfile.worker").read_text()
    api = (DOCKER / "Dockerfile.api").read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:12." in worker and "FROM ${CUDA_IMAGE}" in worker
    for dockerfile in (worker, api):
        assert 'ray[default]==${RAY_VERSION}' in dockerfile and "psycopg[binary]" in dockerfile
        assert "s3fs" in dockerfile and "alembic" in dockerfile
    assert compose["x-build-args"]["RAY_VERSION"] == "${RAY_VERSION:-2.60.0}"
    assert "ARG RAY_VERSION=2.60.0" in worker and "ARG RAY_VERSION=2.60.0" in api
