"""Helpers for the service tests: a real ``certiprune serve`` subprocess, submitting, polling, error checks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")
KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-9876543210"


@dataclass
class Inputs:
    model: Path  # small scripted MLP trained on digits: jobs finish in about a second
    data: Path  # held-out digits, x float32 (n, 64), y int64
    big_model: Path  # wide MLP: a full 100-level curve on big_data takes tens of seconds (slow jobs)
    big_data: Path
    x_cal: np.ndarray
    y_cal: np.ndarray


#: A job that takes about a minute on 2 CPU cores and checks for cancellation between batches.
SLOW_CONFIG = {"full_curve": True, "epsilon": 0.05, "batch_size": 2048}
FAST_CONFIG = {"sparsities": [round(0.1 * i, 1) for i in range(1, 10)], "epsilon": 0.05}


def pid_gone(pid: int, timeout: float = 15.0) -> bool:
    """True once process ``pid`` has exited (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not come up in {timeout} s:\n{log()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A ``certiprune serve`` subprocess on 127.0.0.1."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    args: list[str] = field(default_factory=list)  # more `certiprune serve` flags
    prefix: list[str] = field(default_factory=list)  # a command that execs the server (e.g. in a namespace)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        self.log_path = self.data_dir.parent / f"server-{self.port}-{int(time.time() * 1000)}.log"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}  # hermetic
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--log-level", "warning", *self.args],
            cwd=REPO, env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )
        wait_until_up(self.proc, f"{self.url}/healthz", timeout, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path and self.log_path.exists() else ""

    def worker_pids(self, *, idle_too: bool = False) -> list[int]:
        """Live worker processes of the server that hold a job (named ``certiprune-job``); ``idle_too``: also the
        workers started ahead that still wait for one (``certiprune-idle``, or not named yet). The resource
        tracker is never counted."""
        assert self.proc is not None
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(c) for c in children)
        workers = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if "resource_tracker" not in cmd and (idle_too or comm == "certiprune-job"):
                workers.append(pid)
        return workers

    def idle_workers(self, timeout: float = 30.0) -> list[int]:
        """The workers started ahead and waiting for a job (``certiprune-idle``), once at least one is."""
        deadline = time.monotonic() + timeout
        while True:
            idle = [p for p in self.worker_pids(idle_too=True) if _comm(p) == "certiprune-idle"]
            if idle or time.monotonic() > deadline:
                return idle
            time.sleep(0.05)

    def workers_left(self, timeout: float = 20.0) -> list[int]:
        """Worker pids still alive after ``timeout`` s: a worker records its terminal status before it has
        finished exiting and being reaped, so "none left" is only meaningful after a grace period."""
        deadline = time.monotonic() + timeout
        while (pids := self.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pids

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def module_server(tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("srv") / "data"
    env = {f"CERTIPRUNE_{k.upper()}": str(v) for k, v in settings.items()}
    server = Server(data_dir=data_dir, env=env).start()
    try:
        yield server
    finally:
        code = server.stop(signal.SIGTERM, timeout=20)
        if code not in (0, None, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after a clean shutdown
            print(server.log())


def submit(client: httpx.Client, model: Path, *, data: Path | None = None, dataset: str | None = None,
           config: dict[str, Any] | None = None, extra_files: dict[str, Any] | None = None) -> httpx.Response:
    import json

    files: dict[str, Any] = {"model": ("model.pt", model.read_bytes(), "application/octet-stream")}
    form: dict[str, str] = {}
    if data is not None:
        files["data"] = (data.name, data.read_bytes(), "application/octet-stream")
    if dataset is not None:
        form["dataset"] = dataset
    if config is not None:
        form["config"] = json.dumps(config)
    files.update(extra_files or {})
    return client.post("/v1/jobs", files=files, data=form)


def wait_for(client: httpx.Client, job_id: str, predicate: Callable[[dict[str, Any]], bool],
             timeout: float = 90.0, what: str = "condition") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if predicate(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} on {job_id}; last state: {job}")


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    return wait_for(client, job_id, lambda j: j["status"] in TERMINAL, timeout, "a final status")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The §3 error body: {"error": {"code": snake_case, "message": non-empty}}."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and err["code"] == err["code"].lower() and " " not in err["code"], err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    if code is not None:
        assert err["code"] == code, err
    return err


def token_classifier(vocab: int) -> Any:
    """A two-input token model (``input_ids``, ``attention_mask``) with a dict output: the embedding is not
    a candidate, ``fc`` and ``head`` are; mean-pooled over the unmasked positions. Random weights."""
    import torch
    from torch import nn

    class TokenClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 16)
            self.fc = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            h = torch.relu(self.fc(self.emb(input_ids)))
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            return {"logits": self.head(pooled), "pooled": pooled}

    return TokenClassifier().eval()
