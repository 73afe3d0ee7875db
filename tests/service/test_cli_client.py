"""The certiprune command: submit --wait --out against a real server, jobs listing, serve's safety check."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_harness import FAST_CONFIG, REPO, SLOW_CONFIG, Inputs, Server

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_waits_downloads_and_verifies_the_pruned_model(worker_server: Server, inputs: Inputs,
                                                              tmp_path: Path) -> None:
    out, report = tmp_path / "pruned.pt", tmp_path / "report.json"
    run = cli("submit", str(inputs.model), "--data", str(inputs.data), "--config", json.dumps(FAST_CONFIG),
              "--criterion", "magnitude", "--server", worker_server.url, "--wait", "--quiet", "--out", str(out),
              "--report", str(report))
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip().splitlines()[0]
    result = json.loads(report.read_text())
    assert hashlib.sha256(out.read_bytes()).hexdigest() == result["artifact_sha256"]
    assert "verified" in run.stderr and "With probability" in run.stderr
    more = result["more_data"]
    if more is not None:  # the level that stopped the test, with its planning estimate
        assert f"next level {more['sparsity']:.0%}" in run.stderr

    listing = cli("jobs", "--server", worker_server.url, "--limit", "5")
    assert listing.returncode == 0 and job_id in listing.stdout


def test_submit_reports_server_errors_by_code(worker_server: Server, inputs: Inputs) -> None:
    run = cli("submit", str(inputs.model), "--data", str(inputs.data), "--epsilon", "3", "--server",
              worker_server.url)
    assert run.returncode == 1 and "invalid_config" in run.stderr


def test_serve_refuses_a_public_interface_without_api_keys(tmp_path: Path) -> None:
    run = cli("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d"), timeout=30)
    assert run.returncode == 2 and "API keys" in run.stderr


def test_certify_dispatches_to_the_offline_command() -> None:
    run = cli("certify", "--help", timeout=60)
    assert run.returncode == 0 and "--data" in run.stdout


def test_a_separate_worker_process_runs_jobs_queued_by_an_api_only_server(make_server, inputs: Inputs,
                                                                          tmp_path: Path) -> None:
    import os
    import signal

    from service_harness import submit, wait_for, wait_terminal

    data_dir = tmp_path / "data"
    server = make_server(data_dir, executor="none")
    with server.client() as c:
        job_id = submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
        time.sleep(1.0)
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # nobody runs it yet
        env = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--data-dir", str(data_dir),
                                   "--log-level", "warning"], cwd=REPO, env=env)
        try:
            job = wait_terminal(c, job_id, timeout=60)
            assert job["status"] == "succeeded", job
            slow = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
            wait_for(c, slow, lambda j: j["status"] == "running", 30, "running")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
        job = c.get(f"/v1/jobs/{slow}").json()
        assert (job["status"], job["attempts"]) == ("queued", 0)  # an orderly stop hands the job back
