"""The sandbox on a GPU: a CUDA job's child sees only its own GPU's device node (run on the device machine)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from service import isolation, sandbox  # noqa: E402
from service.supervisor import ChildSpec, Input, run_child  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(isolation.bwrap_binary() is None, reason="bubblewrap is not installed")]

SEE = """
import json, os, torch
nodes = sorted(n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit())
x = torch.ones(1024, 1024, device="cuda")
print(json.dumps({"nodes": nodes, "count": torch.cuda.device_count(), "sum": float((x @ x).sum())}))
"""


def test_a_cuda_child_sees_only_its_own_gpu_and_computes_on_it(tmp_path: Path) -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[-1] or "0"
    own = isolation.gpu_device_nodes(visible)
    assert len(own) == 1, own
    view = isolation.SandboxView(inputs={}, tmp_bytes=64 << 20, out_bytes=1 << 20, gpu_devices=own,
                                 env={"HOME": "/tmp", "CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    proc = subprocess.run(isolation.bwrap_argv(view, [sys.executable, "-I", "-c", SEE]), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == [Path(own[0]).name], (seen, own)
    assert seen["count"] == 1 and seen["sum"] == 1024.0 ** 3


def test_a_cuda_job_runs_through_the_supervisor_in_the_sandbox(tmp_path: Path) -> None:
    from torch import nn

    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 32)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    inputs = [Input(tmp_path / n, n, hashlib.sha256((tmp_path / n).read_bytes()).hexdigest())
              for n in ("model.pt", "data.npz")]
    spec = ChildSpec(inputs=inputs, config={"device": "cuda", "sparsities": [0.1, 0.3, 0.5], "epsilon": 0.05},
                     limits=sandbox.Limits(None, 600, 1 << 30, 1024), isolate=True, work=tmp_path / "run",
                     log_path=tmp_path / "child.log", max_log_bytes=1 << 20, tmp_bytes=256 << 20,
                     cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[-1] or "0")
    outcome = run_child(spec, on_progress=lambda *a: None, should_stop=lambda: False)
    assert outcome.status == "succeeded", (outcome, (tmp_path / "child.log").read_text()[-3000:])
    assert outcome.result["device"].startswith("cuda"), outcome.result.get("device")
