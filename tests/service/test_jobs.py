"""Jobs end to end through a real server and spawned workers: success, datasets, cancel, dead workers, timeouts."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import (
    pid_gone,
    FAST_CONFIG,
    SLOW_CONFIG,
    Inputs,
    Server,
    assert_error,
    submit,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(180)

RESULT_FIELDS = {"certified_sparsity", "certified", "epsilon", "delta", "risk", "bound", "procedure", "criterion",
                 "n_calibration", "n_tune", "dense_accuracy", "prunable_parameters", "zeroed_parameters", "levels",
                 "guarantee", "artifact_sha256"}


@pytest.fixture
def client(worker_server: Server) -> httpx.Client:
    with worker_server.client() as c:
        yield c


def prunable_zeros(path: Path) -> tuple[int, int]:
    """(zeros, total) over the weights of Linear/Conv modules of a TorchScript archive."""
    import torch

    module = torch.jit.load(str(path))
    zeros = total = 0
    for _, sub in module.named_modules():
        if getattr(sub, "original_name", "") in ("Linear", "Conv1d", "Conv2d", "Conv3d"):
            zeros += int((sub.weight == 0).sum())
            total += sub.weight.numel()
    return zeros, total


def download(client: httpx.Client, job_id: str, dest: Path) -> str:
    r = client.get(f"/v1/jobs/{job_id}/artifact")
    assert r.status_code == 200, r.text
    dest.write_bytes(r.content)
    digest = hashlib.sha256(r.content).hexdigest()
    assert r.headers["x-checksum-sha256"] == digest
    return digest


def wait_worker_pid(server: Server, timeout: float = 30.0, exclude: set[int] = frozenset()) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in server.worker_pids() if p not in exclude]
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError("no worker process appeared")


def test_job_succeeds_and_the_artifact_matches_the_certificate(client: httpx.Client, inputs: Inputs,
                                                               tmp_path: Path) -> None:
    r = submit(client, inputs.model, data=inputs.data, config=FAST_CONFIG)
    assert r.status_code == 202, r.text
    job = wait_terminal(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert job["progress"]["fraction"] == 1.0
    result = job["result"]
    assert set(result) >= RESULT_FIELDS
    assert [lv["sparsity"] for lv in result["levels"]] == FAST_CONFIG["sparsities"]
    assert result["certified"] and result["certified_sparsity"] > 0, result  # the tiny MLP prunes well at ε=0.05

    digest = download(client, job["id"], tmp_path / "pruned.pt")
    assert digest == result["artifact_sha256"]
    zeros, total = prunable_zeros(tmp_path / "pruned.pt")
    assert zeros == result["zeroed_parameters"] and total == result["prunable_parameters"]
    assert prunable_zeros(inputs.model)[0] == 0
    import torch

    pruned = torch.jit.load(str(tmp_path / "pruned.pt"))
    out = pruned(torch.from_numpy(inputs.x_cal[:5]))
    assert tuple(out.shape) == (5, 10)  # same inputs and outputs as the upload

    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.json() == result
    page = client.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html")
    assert result["guarantee"].split(",")[0] in page.text and "<svg" in page.text
    assert "uploaded model file" in page.text  # file sizes: the upload's and the artifact's
    assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_already_finished")


def test_the_api_process_never_loads_torch(client: httpx.Client, worker_server: Server, inputs: Inputs) -> None:
    """Uploaded models run only in workers; the API process checks archives as text. Its memory map after a
    whole job (admission, progress, download) must hold no torch library: that is what keeps its start fast."""
    job = wait_terminal(client, submit(client, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"])
    assert job["status"] == "succeeded", job
    assert client.get(f"/v1/jobs/{job['id']}/artifact").status_code == 200
    maps = Path(f"/proc/{worker_server.proc.pid}/maps").read_text()
    assert "site-packages/numpy" in maps  # the check reads the right process
    assert "libtorch" not in maps and "/torch/" not in maps, [ln for ln in maps.splitlines() if "torch" in ln][:3]


def test_visible_gpu_count_follows_the_driver_and_cuda_visible_devices(tmp_path: Path) -> None:
    from service.executors.local import visible_gpu_count

    driver = tmp_path / "gpus"
    assert visible_gpu_count(None, driver) == 0  # no NVIDIA driver
    driver.mkdir()
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (driver / bus).mkdir()
    assert visible_gpu_count(None, driver) == 3
    assert visible_gpu_count("", driver) == 0
    assert visible_gpu_count("2,0", driver) == 2
    assert visible_gpu_count("1,7,0", driver) == 1  # CUDA stops at the first invalid entry
    assert visible_gpu_count("-1", driver) == 0
    assert visible_gpu_count("GPU-8f2c,GPU-11aa", driver) == 2


def test_a_stored_dataset_gives_the_same_certificate_as_the_file(client: httpx.Client, inputs: Inputs) -> None:
    ds = client.post("/v1/datasets", files={"file": ("digits.npz", inputs.data.read_bytes())})
    assert ds.status_code == 201, ds.text
    via_id = submit(client, inputs.model, dataset=ds.json()["id"], config=FAST_CONFIG).json()["id"]
    via_file = submit(client, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
    by_id, by_file = wait_terminal(client, via_id), wait_terminal(client, via_file)
    assert by_id["status"] == by_file["status"] == "succeeded"
    assert by_id["data_sha256"] == by_file["data_sha256"] == ds.json()["sha256"]
    for key in ("certified_sparsity", "levels", "zeroed_parameters", "n_calibration"):
        assert by_id["result"][key] == by_file["result"][key], key


def test_data_errors_found_by_the_worker_fail_the_job_with_their_code(client: httpx.Client, inputs: Inputs,
                                                                      tmp_path: Path) -> None:
    bad = tmp_path / "labels.npz"
    np.savez(bad, x=inputs.x_cal, y=np.full(len(inputs.y_cal), 12, dtype=np.int64))  # the model has 10 classes
    job = wait_terminal(client, submit(client, inputs.model, data=bad, config=FAST_CONFIG).json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "data_labels_out_of_range" and "10 classes" in job["error"]["message"]
    assert job["result"] is None
    assert_error(client.get(f"/v1/jobs/{job['id']}/artifact"), 409, "job_not_succeeded")


def test_cancelling_a_running_job_stops_its_worker(client: httpx.Client, worker_server: Server,
                                                   inputs: Inputs) -> None:
    job_id = submit(client, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
    wait_for(client, job_id, lambda j: j["progress"]["stage"] == "testing", 60, "the testing stage")
    pid = wait_worker_pid(worker_server)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    t0 = time.monotonic()
    job = wait_terminal(client, job_id, timeout=30)
    assert job["status"] == "cancelled" and job["finished_at"]
    assert time.monotonic() - t0 < 10
    assert pid_gone(pid), f"worker {pid} is still alive"
    assert_error(client.get(f"/v1/jobs/{job_id}/artifact"), 409, "job_not_succeeded")


def test_a_killed_worker_requeues_the_job_then_fails_it_after_max_attempts(
        client: httpx.Client, worker_server: Server, inputs: Inputs) -> None:
    job_id = submit(client, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
    wait_for(client, job_id, lambda j: j["progress"]["stage"] == "testing", 60, "the testing stage")
    first = wait_worker_pid(worker_server)
    os.kill(first, signal.SIGKILL)  # mid-job, e.g. the OOM killer
    job = wait_for(client, job_id, lambda j: j["attempts"] == 1 and j["status"] == "running", 60, "the second run")
    assert job["error"] is None
    second = wait_worker_pid(worker_server, exclude={first})
    os.kill(second, signal.SIGKILL)
    job = wait_terminal(client, job_id, timeout=30)
    assert job["status"] == "failed" and job["attempts"] == 2
    assert job["error"]["code"] == "worker_died" and "SIGKILL" in job["error"]["message"]


def test_a_job_over_the_time_limit_is_killed_and_failed(make_server, inputs: Inputs) -> None:
    server = make_server(job_timeout_s=3)
    with server.client() as c:
        job_id = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
        job = wait_terminal(c, job_id, timeout=60)
    assert job["status"] == "failed" and job["error"]["code"] == "job_timeout"
    assert server.workers_left() == []
