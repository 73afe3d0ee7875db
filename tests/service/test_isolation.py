"""The trust boundary, tried as an attacker: two tenants on a real server, a real bubblewrap sandbox.

Tenant A (the victim) stores a dataset and certifies a model. Tenant B (the attacker) then runs code
in the child that runs models. The child is given *arbitrary Python* — strictly more than a
TorchScript model can do even before the operator allowlist refuses it — and tries to read and
overwrite A's dataset, model and artifact, the job store and the API-key file, to write into the
Python installation, to reach the server over the network, to see other processes, and to fill
the disk. Afterwards every file of A and of the server is bit-identical (sha256), nothing of A's
appears in what B got back, the server serves both tenants, and A's next job certifies the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from service_harness import FAST_CONFIG, KEY_A, KEY_B, REPO, Inputs, Server, assert_error, submit, wait_terminal

from service import isolation, sandbox
from service.store import JobStore
from service.supervisor import ChildSpec, Input, run_child

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(isolation.bwrap_binary() is None,
                                 reason="bubblewrap is not installed (apt-get install bubblewrap)")]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (the SQLite WAL files change with every read; they are the store's),
    except the run folders of workers started ahead (``.standby/``: the server's scratch for the next job)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(("-wal", "-shm")) and \
                path.relative_to(root).parts[0] != ".standby":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


ATTACK = textwrap.dedent('''
    import json, os, socket, sys
    targets = json.loads(sys.argv[1])
    port = int(sys.argv[2])
    report = {"uid": os.getuid(), "root": sorted(os.listdir("/")), "pids": sorted(p for p in os.listdir("/proc")
              if p.isdigit()), "read": {}, "wrote": {}, "listed": {}}
    secret_bytes = []
    for path in targets:
        try:
            with open(path, "rb") as fh:
                secret_bytes.append(fh.read(64).hex())
            report["read"][path] = True
        except OSError as exc:
            report["read"][path] = type(exc).__name__
        try:
            with open(path, "r+b") as fh:
                fh.write(b"\\0" * 16)
            report["wrote"][path] = True
        except OSError as exc:
            report["wrote"][path] = type(exc).__name__
    for folder in [os.path.dirname(t) for t in targets] + ["/root", "/home", "/work", "/etc"]:
        try:
            report["listed"][folder] = os.listdir(folder)
        except OSError as exc:
            report["listed"][folder] = type(exc).__name__
    site = [p for p in sys.path if p.endswith("site-packages")]
    for folder in site + [os.path.dirname(os.__file__)]:
        try:
            with open(os.path.join(folder, "zz_evil.pth"), "w") as fh:
                fh.write("import os; os.system('touch /tmp/pwned')")
            report["wrote"][folder] = True
        except OSError as exc:
            report["wrote"][folder] = type(exc).__name__
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2)
        report["network"] = True
    except OSError as exc:
        report["network"] = type(exc).__name__
    filled = {}
    for where in ("/tmp", "/out"):
        written = 0
        try:
            with open(os.path.join(where, "fill"), "wb") as fh:
                for _ in range(64):
                    written += fh.write(b"x" * (1 << 20))
                    fh.flush()
        except OSError as exc:
            filled[where] = [written, type(exc).__name__]
        else:
            filled[where] = [written, None]
    report["filled"] = filled
    if os.fork() == 0:  # a daemon that tries to outlive the job
        os.setsid()
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "certiprune-outlives-marker"])
    report["secrets"] = secret_bytes
    print(json.dumps(report))
''')


@pytest.fixture
def victim_server(make_server, inputs: Inputs) -> tuple[Server, dict, Path]:
    """A server with two tenants; A has a stored dataset and a finished job. Returns (server, A's state, keys file)."""
    keys_file = inputs.model.parent / "keys.txt"
    keys_file.write_text(f"{KEY_A}\n{KEY_B}\n")
    server = make_server(api_keys=f"{KEY_A},{KEY_B}", sandbox="on")
    with server.client(KEY_A) as a:
        ds = a.post("/v1/datasets", files={"file": ("cal.npz", inputs.data.read_bytes())}).json()
        job = submit(a, inputs.model, dataset=ds["id"], config=FAST_CONFIG).json()
        done = wait_terminal(a, job["id"], timeout=120)
        assert done["status"] == "succeeded", (done, server.log())
    return server, {"dataset": ds, "job": done}, keys_file


def test_code_inside_the_sandbox_reaches_nothing_of_other_tenants_or_the_server(
        victim_server: tuple[Server, dict, Path], tmp_path: Path) -> None:
    server, victim, keys_file = victim_server
    before = tree_digest(server.data_dir)
    keys_before = keys_file.read_bytes()
    targets = [str(server.data_dir / rel) for rel in before] + [str(keys_file)]
    assert any("certiprune.db" in t for t in targets) and any(t.endswith("artifact.pt") for t in targets)
    own = tmp_path / "own.npz"
    own.write_bytes(b"the attacker's own input")
    view = isolation.SandboxView(inputs={"own.npz": own}, tmp_bytes=8 << 20, out_bytes=8 << 20,
                                 env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    argv = isolation.bwrap_argv(view, [sys.executable, "-I", "-c", ATTACK, json.dumps(targets), str(server.port)])
    uid = isolation.outside_uid(view)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: isolation.drop_to(uid))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["uid"] == isolation.CHILD_UID
    # Only what the view binds shows at the root: the system, the Python install and the packages (wherever this
    # checkout lives: /work, /check, ...), /proc, /dev and the three private mounts.
    bound = {Path(p).parts[1] for p in isolation.SYSTEM_PATHS if os.path.lexists(p)}
    bound |= {folder.parts[1] for folder in isolation.python_paths()}
    bound |= {"proc", "dev", "tmp", "out", "in"}
    assert set(report["root"]) <= bound, (set(report["root"]) - bound, report["root"])
    assert len(report["pids"]) <= 3, report["pids"]  # its own PID namespace: bwrap's init, python
    assert all(v != True for v in report["read"].values()), report["read"]  # noqa: E712
    assert all(v != True for v in report["wrote"].values()), report["wrote"]  # noqa: E712
    assert report["secrets"] == []
    victim_names = {Path(t).name for t in targets} | {p.name for p in server.data_dir.rglob("*")}
    seen = {name for v in report["listed"].values() if isinstance(v, list) for name in v}
    assert not seen & victim_names, (seen & victim_names, report["listed"])
    assert report["network"] != True, report["network"]  # noqa: E712
    for where in ("/tmp", "/out"):  # each tmpfs stops at its cap (8 MiB)
        written, error = report["filled"][where]
        assert written <= 8 << 20 and error == "OSError", report["filled"]
    # Nothing it started outlives it (its PID namespace died with it).
    import time

    time.sleep(0.5)
    survivors = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and b"certiprune-outlives-marker" in _cmdline(p)]
    assert survivors == [], survivors
    # The victim's files, the store and the keys file are bit-identical; both tenants are served.
    assert tree_digest(server.data_dir) == before
    assert keys_file.read_bytes() == keys_before
    for folder in (server.data_dir / ".standby").glob("*"):  # the next job's /in: nothing of this one reached it
        assert not (folder / "in").exists() or list((folder / "in").iterdir()) == [], folder
    for key in (KEY_A, KEY_B):
        with server.client(key) as c:
            assert c.get("/v1/jobs").status_code == 200
    with server.client(KEY_A) as a:
        assert a.get(f"/v1/jobs/{victim['job']['id']}").json()["result"] == victim["job"]["result"]
    assert not any(Path(p).name == "zz_evil.pth" for p in map(str, isolation.python_paths()))
    for folder in isolation.python_paths():
        assert not list(folder.rglob("zz_evil.pth"))


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_job_runs_in_the_sandbox_and_its_output_stays_in_its_own_log(
        victim_server: tuple[Server, dict, Path], inputs: Inputs) -> None:
    server, victim, _ = victim_server
    job_id = victim["job"]["id"]
    assert f"{job_id}: child sandboxed (bubblewrap)" in server.log_path.read_text()
    assert (server.data_dir / "jobs" / job_id / "child.log").is_file()
    assert not list((server.data_dir / "jobs" / job_id).glob(".run-*"))  # the staging copy is gone
    # The artifact the supervisor stored is the one it hashed, whatever the child claimed.
    with server.client(KEY_A) as a:
        r = a.get(f"/v1/jobs/{job_id}/artifact")
        assert hashlib.sha256(r.content).hexdigest() == victim["job"]["result"]["artifact_sha256"]
        with server.client(KEY_B) as b:  # and the other tenant sees none of it
            assert_error(b.get(f"/v1/jobs/{job_id}"), 404)
            assert_error(b.get(f"/v1/datasets/{victim['dataset']['id']}"), 404)


def test_a_stored_input_changed_after_admission_is_never_used(
        victim_server: tuple[Server, dict, Path], inputs: Inputs) -> None:
    """The attack that certified 0.99 instead of 0.32: overwrite A's stored dataset. The supervisor re-hashes what
    it hands over, so A's next job fails ``input_integrity_error`` and runs nothing."""
    server, victim, _ = victim_server
    ds = victim["dataset"]
    stored = next((server.data_dir / "datasets").rglob("*.npz"))
    original = stored.read_bytes()
    import numpy as np

    with np.load(inputs.data) as z:
        x, y = z["x"], z["y"]
    forged = stored.parent / "forged.npz"
    np.savez(forged, x=x, y=np.zeros_like(y))
    os.replace(forged, stored)
    try:
        with server.client(KEY_A) as a:
            job = submit(a, inputs.model, dataset=ds["id"], config=FAST_CONFIG).json()
            done = wait_terminal(a, job["id"], timeout=120)
            assert done["status"] == "failed" and done["error"]["code"] == "input_integrity_error", done
            assert "no longer matches the sha256" in done["error"]["message"]
            assert_error(a.get(f"/v1/jobs/{job['id']}/artifact"), 409)
        # It was caught by the chunk digests recorded at admission (the parallel re-check), which are the
        # admitted bytes' own: the job took its dataset's, and both are the original file's slices.
        store = JobStore.from_url(f"sqlite:///{server.data_dir / 'certiprune.db'}")
        try:
            recorded = store.get(job_id=job["id"]).input_chunks
            ds_chunks = store.get_dataset(dataset_id=ds["id"]).chunks
        finally:
            store.close()
        chunk = recorded["data"]["chunk_bytes"]
        assert recorded["data"] == ds_chunks == {
            "size": len(original), "chunk_bytes": chunk,
            "sha256": [hashlib.sha256(original[o:o + chunk]).hexdigest() for o in range(0, len(original), chunk)]}
        assert recorded["model"]["sha256"] == [hashlib.sha256(inputs.model.read_bytes()).hexdigest()]
    finally:
        stored.write_bytes(original)
    with server.client(KEY_A) as a:  # restored: the same certificate as before
        job = submit(a, inputs.model, dataset=ds["id"], config=FAST_CONFIG).json()
        again = wait_terminal(a, job["id"], timeout=120)
        assert again["status"] == "succeeded"
        assert again["result"]["certified_sparsity"] == victim["job"]["result"]["certified_sparsity"]
        assert again["result"]["levels"] == victim["job"]["result"]["levels"]


def test_serve_refuses_to_start_with_keys_when_the_sandbox_is_unavailable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTIPRUNE_")}
    env.update(PATH=str(tmp_path), CERTIPRUNE_API_KEYS=KEY_A)  # no bwrap on this PATH
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(tmp_path / "data"),
                           "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start" in proc.stderr and "apt-get install bubblewrap" in proc.stderr
    off = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--data-dir", str(tmp_path / "data"),
                          "--sandbox", "off"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert off.returncode == 2 and "SANDBOX=off" in off.stderr, off.stderr


def test_the_supervisor_judges_a_child_by_what_it_did_not_what_it_said(tmp_path: Path, inputs: Inputs) -> None:
    """A real run through the supervisor: the outcome's artifact hash is the supervisor's own, the result has the
    result's shape, and a child that dies by the CPU limit fails ``job_timeout``."""
    model = Input(inputs.model, "model.pt", hashlib.sha256(inputs.model.read_bytes()).hexdigest())
    data = Input(inputs.data, "data.npz", hashlib.sha256(inputs.data.read_bytes()).hexdigest())
    limits = sandbox.Limits(address_space_bytes=None, cpu_seconds=600, file_bytes=64 << 20, open_files=1024)
    spec = ChildSpec(inputs=[model, data], config=FAST_CONFIG, limits=limits, isolate=True, work=tmp_path / "run",
                     log_path=tmp_path / "child.log", max_log_bytes=1 << 16, tmp_bytes=64 << 20)
    stages = []
    outcome = run_child(spec, on_progress=lambda s, d, t, m: stages.append(s), should_stop=lambda: False)
    assert outcome.status == "succeeded", outcome
    assert outcome.artifact_sha256 == hashlib.sha256(outcome.artifact.read_bytes()).hexdigest()
    assert "testing" in stages and "saving" in stages
    tight = ChildSpec(**{**spec.__dict__, "limits": sandbox.Limits(None, 1, 64 << 20, 1024),
                         "config": {"full_curve": True, "epsilon": 0.05}, "work": tmp_path / "run2"})
    slow = run_child(tight, on_progress=lambda *a: None, should_stop=lambda: False)
    assert slow.status == "failed" and slow.code == "job_timeout", slow


# -- the smaller holes found with it ------------------------------------------------------------

def test_metrics_need_a_key_a_key_in_a_page_url_stays_out_of_the_log_and_zip_bombs_are_refused(
        tmp_path: Path, inputs: Inputs) -> None:
    import numpy as np

    server = Server(data_dir=tmp_path / "data", args=["--log-level", "info"],
                    env={"CERTIPRUNE_API_KEYS": f"{KEY_A},{KEY_B}", "CERTIPRUNE_MAX_UPLOAD_BYTES": str(8 << 20)}).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            assert_error(anonymous.get("/metrics"), 401, "unauthorized")
            anonymous.get("/", params={"key": KEY_B})
        with server.client(KEY_A) as a:
            assert a.get("/metrics").status_code == 200
            bomb = tmp_path / "bomb.npz"  # 64 MiB of zeros in ~70 KB
            np.savez_compressed(bomb, x=np.zeros((262144, 64), np.float32), y=np.zeros(262144, np.int64))
            assert bomb.stat().st_size < 1 << 20
            err = assert_error(a.post("/v1/datasets", files={"file": ("bomb.npz", bomb.read_bytes())}), 422,
                               "data_too_large")
            assert "inflates to" in err["message"] and "CERTIPRUNE_MAX_UPLOAD_BYTES" in err["message"]
            err = assert_error(submit(a, inputs.model, data=bomb), 422, "data_too_large")
            assert a.get("/v1/datasets").json()["count"] == 0
            # an ordinary compressed set still passes
            ok = tmp_path / "ok.npz"
            with np.load(inputs.data) as z:
                np.savez_compressed(ok, x=z["x"], y=z["y"])
            assert a.post("/v1/datasets", files={"file": ("ok.npz", ok.read_bytes())}).status_code == 201
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "GET /?key=" in log and "[redacted]" in log  # the request was logged ...
    assert KEY_B not in log  # ... without the key


def test_the_data_dir_may_not_overlap_an_allowed_dataset_root(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    for root in (tmp_path, tmp_path / "data", tmp_path / "data" / "datasets"):
        with pytest.raises(ValidationError, match="overlaps the data dir"):
            Settings(data_dir=str(tmp_path / "data"), allowed_dataset_roots=[str(root)])
    Settings(data_dir=str(tmp_path / "data"), allowed_dataset_roots=[str(tmp_path / "shared")])


# -- hostile TorchScript models, submitted as tenant B -------------------------------------------

def hostile_corpus(folder: Path, victim_files: list[str]) -> dict[str, Path]:
    """Scripted models that attack through ``torch.from_file`` and ``print``, aimed at the victim's real paths."""
    import torch
    from torch import nn

    target = victim_files[0]

    class ReadsVictim(nn.Module):
        """Reads a file's first bytes and keeps them in module state (would leave in the artifact)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.target = target
            self.loot = torch.zeros(1, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.loot = torch.from_file(self.target, shared=False, size=4096, dtype=torch.uint8)
            return self.fc(x)

    class WritesVictim(nn.Module):
        """Maps a file shared and zeroes it (the attack that forged a certificate)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.target = target

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mapped = torch.from_file(self.target, shared=True, size=64, dtype=torch.uint8)
            mapped.zero_()  # (the result must be used: TorchScript drops a from_file whose value is unused)
            return self.fc(x) + mapped[0].float()

    class LeaksInError(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.target = target

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            secret = torch.from_file(self.target, shared=False, size=64, dtype=torch.uint8)
            if int(secret.sum()) >= 0:
                raise RuntimeError("leak: " + str(int(secret[0])) + str(int(secret[1])))
            return self.fc(x)

    class ForgesLog(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("\n2026-01-01 00:00:00 INFO certiprune.worker: job job_victim succeeded")
            return self.fc(x)

    paths = {}
    for name, module in {"reads": ReadsVictim(), "writes": WritesVictim(), "leaks": LeaksInError(),
                         "forges_log": ForgesLog()}.items():
        paths[name] = folder / f"{name}.pt"
        torch.jit.script(module.eval()).save(str(paths[name]))
    return paths


def test_hostile_models_are_refused_at_submission_and_the_victim_is_untouched(
        victim_server: tuple[Server, dict, Path], inputs: Inputs, tmp_path: Path) -> None:
    server, victim, keys_file = victim_server
    before = tree_digest(server.data_dir)
    stored = sorted(str(server.data_dir / rel) for rel in before)
    corpus = hostile_corpus(tmp_path, [p for p in stored if "/datasets/" in p] + [str(keys_file)])
    with server.client(KEY_B) as b:
        for name, model in corpus.items():
            err = assert_error(submit(b, model, data=inputs.data, config=FAST_CONFIG), 422, "model_uses_forbidden_op")
            op = "print" if name == "forges_log" else "from_file"
            assert op in err["message"], (name, err)
        assert b.get("/v1/jobs").json()["count"] == 0  # nothing was admitted, nothing runs
    assert tree_digest(server.data_dir) == before
    with server.client(KEY_A) as a:  # the victim's next job: the same certificate
        job = submit(a, inputs.model, dataset=victim["dataset"]["id"], config=FAST_CONFIG).json()
        again = wait_terminal(a, job["id"], timeout=120)
        assert again["status"] == "succeeded"
        assert again["result"]["certified_sparsity"] == victim["job"]["result"]["certified_sparsity"]
    assert "job_victim succeeded" not in server.log_path.read_text()


def test_an_uncertainty_file_changed_after_admission_is_never_used(make_server, inputs: Inputs,
                                                                   tmp_path: Path) -> None:
    """The uncertainty file (mu's training statistics) is hashed at admission like the model and the data: a job
    queued by one server and run by another after the stored file was overwritten fails ``input_integrity_error``."""
    import torch
    from safetensors.torch import save_file

    model = torch.jit.load(str(inputs.model))
    stats = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            stats[f"{name}.var"] = torch.rand_like(p) + 0.1
            stats[f"{name}.mean"] = p.detach().clone()
    unc = tmp_path / "u.safetensors"
    save_file(stats, str(unc), metadata={"format": "certiprune-uncertainty/1", "count": "20"})
    config = {**FAST_CONFIG, "criterion": "mu"}

    queue = make_server(executor="none", sandbox="on")
    with queue.client() as c:
        r = submit(c, inputs.model, data=inputs.data, config=config,
                   extra_files={"uncertainty": ("u.safetensors", unc.read_bytes())})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    queue.stop()
    stored = next(queue.data_dir.rglob("uncertainty.safetensors"))
    assert stored.read_bytes() == unc.read_bytes()
    forged = {k: (v * 0 + 1e-6 if k.endswith(".var") else v) for k, v in stats.items()}  # makes every weight "certain"
    save_file(forged, str(stored), metadata={"format": "certiprune-uncertainty/1", "count": "20"})

    runner = make_server(data_dir=queue.data_dir, sandbox="on")
    with runner.client() as c:
        done = wait_terminal(c, job_id, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "input_integrity_error", done
    assert "uncertainty" in done["error"]["message"]
