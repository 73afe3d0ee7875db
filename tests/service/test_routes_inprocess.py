"""The routes that need no worker, in process: FastAPI's TestClient over the app ``create_app`` builds.

Each test gets its own app on a fresh data dir with a real SQLite store and the executor ``none``
(the API-only setting of ``certiprune serve --executor none``), so a submitted job simply stays
queued: nothing claims it. The models are real TorchScript archives (``torch.jit.script`` of tiny
modules), the data real ``.npz`` files. What needs processes — running jobs, cancelling running
ones, restarts, faults — stays with the real-server tests (``service_harness``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_harness import KEY_A, KEY_B, REPO, assert_error

from service.app import create_app
from service.auth import key_hash
from service.settings import Settings
from service.supervisor import Outcome, record_outcome

pytestmark = pytest.mark.timeout(120)

KEY_C = "tenant-c-key-5555555555"  # a third tenant: its job list holds only what a test gives it
UPLOAD_LIMIT = 256 * 1024
FAST = {"sparsities": [0.1, 0.5], "epsilon": 0.05}


# -- files -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Files:
    model: bytes  # scripted Linear(4, 3): a valid upload
    forbidden: bytes  # scripted, but its forward calls print (refused by the operator allowlist)
    checkpoint: bytes  # torch.save of a state dict: a pickle, not TorchScript
    data: bytes  # x (24, 4) float32, y in 0..2


def npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


X = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
Y = (np.arange(24) % 3).astype(np.int64)


@pytest.fixture(scope="module")
def files() -> Files:
    import torch
    from torch import nn

    class Talks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print("hello from an uploaded model")
            return self.fc(x)

    def scripted(module: nn.Module) -> bytes:
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(module.eval()), buf)
        return buf.getvalue()

    torch.manual_seed(0)
    checkpoint = io.BytesIO()
    torch.save(nn.Linear(4, 3).state_dict(), checkpoint)
    return Files(model=scripted(nn.Sequential(nn.Linear(4, 3))), forbidden=scripted(Talks()),
                 checkpoint=checkpoint.getvalue(), data=npz(x=X, y=Y))


# -- the app ---------------------------------------------------------------------------------------

@dataclass
class Api:
    client: TestClient
    data_dir: Path
    settings: Settings

    def get(self, path: str, key: str | None = KEY_A, **kw: Any) -> Any:
        return self.client.get(path, headers=auth(key), **kw)

    def post(self, path: str, key: str | None = KEY_A, **kw: Any) -> Any:
        return self.client.post(path, headers={**auth(key), **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, key: str | None = KEY_A) -> Any:
        return self.client.delete(path, headers=auth(key))

    def submit(self, files: Files, key: str | None = KEY_A, *, dataset: str | None = None,
               config: dict[str, Any] = FAST) -> Any:
        """POST /v1/jobs: the good model, with the good data or a stored dataset's id."""
        parts: dict[str, Any] = {"model": ("model.pt", files.model)}
        form = {"config": json.dumps(config)}
        if dataset is None:
            parts["data"] = ("data.npz", files.data)
        else:
            form["dataset"] = dataset
        return self.post("/v1/jobs", key, files=parts, data=form)

    def queued_job(self, files: Files, key: str = KEY_A, **kw: Any) -> dict[str, Any]:
        r = self.submit(files, key, **kw)
        assert r.status_code == 202, r.text
        return r.json()

    def stored(self) -> set[str]:
        """Everything under jobs/ and datasets/ (what a refused request must not leave behind)."""
        return {str(p.relative_to(self.data_dir)) for sub in ("jobs", "datasets") if (self.data_dir / sub).exists()
                for p in (self.data_dir / sub).rglob("*")}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    for name in [n for n in os.environ if n.startswith("CERTIPRUNE_")]:  # hermetic: only what is given here
        monkeypatch.delenv(name)
    settings = Settings(data_dir=str(tmp_path / "data"), executor="none", api_keys=[KEY_A, KEY_B, KEY_C],
                        max_upload_bytes=UPLOAD_LIMIT)
    app = create_app(settings)
    with TestClient(app) as client:  # runs the lifespan: with executor 'none' nothing claims a job
        assert app.state.executor is None
        yield Api(client=client, data_dir=tmp_path / "data", settings=settings)


# -- health, readiness, metrics --------------------------------------------------------------------

def test_healthz_and_readyz_answer_without_a_key(api: Api) -> None:
    r = api.get("/healthz", key=None)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = api.get("/readyz", key=None)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "data_dir": "ok"}}


def test_readyz_is_503_naming_the_failing_check_when_the_store_is_unreachable(api: Api) -> None:
    api.client.app.state.store.engine.dispose()  # no pooled connection left: the next one opens the file again
    for path in api.data_dir.glob("certiprune.db*"):
        path.unlink()
    (api.data_dir / "certiprune.db").mkdir()  # a directory where the database was: it cannot be opened
    err = assert_error(api.get("/readyz", key=None), 503, "not_ready")
    assert err["checks"]["database"].startswith("unreachable") and err["checks"]["data_dir"] == "ok", err
    assert "database" in err["message"]
    assert api.get("/healthz", key=None).status_code == 200  # alive, just not ready


def test_metrics_need_a_key_and_count_requests_and_jobs(api: Api, files: Files) -> None:
    assert_error(api.get("/metrics", key=None), 401, "unauthorized")
    assert_error(api.get("/metrics", key="not-a-configured-key"), 401, "unauthorized")
    api.queued_job(files)
    api.get("/healthz", key=None)
    r = api.get("/metrics", key=KEY_B)  # any tenant's key: the metrics describe every tenant's load
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'certiprune_jobs{status="queued"} 1.0' in text
    assert 'certiprune_jobs{status="running"} 0.0' in text
    assert "certiprune_jobs_submitted_total 1.0" in text
    assert 'certiprune_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'certiprune_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'route="/metrics",status="401"' in text  # refusals are counted too (the metrics middleware is outermost)


# -- auth ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer not-a-configured-key", f"Basic {KEY_A}", "Bearer", f"{KEY_A}"])
def test_a_missing_or_wrong_key_is_401_on_every_api_route(api: Api, files: Files, header: str | None) -> None:
    job = api.queued_job(files)
    headers = {"Authorization": header} if header is not None else {}
    requests = [
        ("GET", "/v1/jobs", {}), ("GET", f"/v1/jobs/{job['id']}", {}), ("POST", f"/v1/jobs/{job['id']}/cancel", {}),
        ("GET", f"/v1/jobs/{job['id']}/artifact", {}), ("GET", f"/v1/jobs/{job['id']}/report", {}),
        ("DELETE", f"/v1/jobs/{job['id']}", {}), ("GET", "/v1/datasets", {}),
        ("POST", "/v1/jobs", {"files": {"model": ("m.pt", files.model), "data": ("d.npz", files.data)}}),
        ("POST", "/v1/datasets", {"files": {"file": ("d.npz", files.data)}}),
    ]
    before = api.stored()
    for method, path, kw in requests:
        r = api.client.request(method, path, headers=headers, **kw)
        assert_error(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate") == "Bearer", (method, path)
    assert api.stored() == before  # a refused upload stored nothing
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # nor did a refused cancel or delete act


def test_another_tenants_job_and_dataset_are_404_everywhere(api: Api, files: Files) -> None:
    job = api.queued_job(files, KEY_A)
    r = api.post("/v1/datasets", KEY_A, files={"file": ("d.npz", files.data)})
    assert r.status_code == 201, r.text
    ds = r.json()["id"]
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/jobs/{job['id']}/artifact"), ("GET", f"/v1/jobs/{job['id']}/report"),
                         ("DELETE", f"/v1/jobs/{job['id']}")]:
        err = assert_error(api.client.request(method, path, headers=auth(KEY_B)), 404, "job_not_found")
        assert job["id"] in err["message"]
    for method in ("GET", "DELETE"):
        assert_error(api.client.request(method, f"/v1/datasets/{ds}", headers=auth(KEY_B)), 404, "dataset_not_found")
    assert_error(api.submit(files, KEY_B, dataset=ds), 404, "dataset_not_found")  # nor can B run a job on it
    assert api.get("/v1/jobs", KEY_B).json() == {"data": [], "count": 0}
    assert api.get("/v1/datasets", KEY_B).json() == {"data": [], "count": 0}
    # A still has both, untouched by B's attempts.
    mine = api.get(f"/v1/jobs/{job['id']}", KEY_A).json()
    assert mine["status"] == "queued" and not mine["cancel_requested"]
    assert api.get(f"/v1/datasets/{ds}", KEY_A).status_code == 200
    assert [d["id"] for d in api.get("/v1/datasets", KEY_A).json()["data"]] == [ds]
    # The store holds the tenant as the key's hash.
    assert api.client.app.state.store.get(job_id=job["id"]).owner == key_hash(KEY_A)


# -- POST /v1/jobs: validation ---------------------------------------------------------------------

def _nan_x() -> np.ndarray:
    x = X.copy()
    x[3, 1] = np.nan
    return x


#: (name, what to change in the good submission, status, code, words the message must contain)
JOB_CASES: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("config not JSON", {"config": "{not json"}, 422, "invalid_config_json", "not valid JSON"),
    ("config a JSON array", {"config": "[1, 2]"}, 422, "invalid_config", "JSON object"),
    ("unknown config field", {"config": {"epsilonn": 0.1}}, 422, "unknown_config_field", "'epsilonn'"),
    ("epsilon out of range", {"config": {"epsilon": 1.5}}, 422, "invalid_config", "epsilon"),
    ("unsorted sparsities", {"config": {"sparsities": [0.5, 0.2]}}, 422, "invalid_config", "sparsities"),
    ("unknown criterion", {"config": {"criterion": "vibes"}}, 422, "invalid_config", "vibes"),
    ("model not a zip", {"model": b"definitely not a TorchScript archive"}, 422, "model_not_torchscript",
     "TorchScript"),
    ("model a torch.save checkpoint", {"model": "checkpoint"}, 422, "model_is_pickle_checkpoint", "torch.jit"),
    ("model calls a forbidden op", {"model": "forbidden"}, 422, "model_uses_forbidden_op", "print"),
    ("data a pickled npz", {"data": npz(x=np.array([{"a": 1}] * 24, dtype=object))}, 422, "data_pickled", "pickle"),
    ("data with NaN", {"data": npz(x=_nan_x(), y=Y)}, 422, "data_not_finite", "NaN"),
    ("labels out of range", {"data": npz(x=X, y=Y - 1)}, 422, "data_labels_out_of_range", "-1"),
    ("labels and inputs of different lengths", {"data": npz(x=X, y=Y[:20])}, 422, "data_length_mismatch", "20"),
    ("labelled risk without labels", {"data": npz(x=X), "config": {"risk": "accuracy_drop"}}, 422,
     "labels_required", "accuracy_drop"),
    ("data not an array file", {"data": b"this is not an array file"}, 422, "data_unsupported_format", ".npz"),
    ("no model part", {"model": None}, 422, "missing_model", "'model'"),
    ("no data part", {"data": None}, 422, "missing_data", "'data'"),
    ("data and dataset", {"dataset": "ds_000000000000000000000000", "keep_data": True}, 422, "conflicting_data",
     "not both"),
    ("unknown dataset id", {"dataset": "ds_000000000000000000000000"}, 404, "dataset_not_found",
     "ds_000000000000000000000000"),
    ("uncertainty without mu", {"extra": {"uncertainty": ("u.safetensors", b"\0" * 16)}}, 422,
     "uncertainty_without_mu", "mu"),
    ("upload over the limit", {"data": npz(x=np.zeros((UPLOAD_LIMIT // 16, 4), np.float32))}, 413,
     "upload_too_large", "upload limit"),
]


def _send_case(api: Api, files: Files, change: dict[str, Any]) -> Any:
    parts: dict[str, Any] = {}
    model = change.get("model", files.model)
    if isinstance(model, str):
        model = getattr(files, model)
    if model is not None:
        parts["model"] = ("model.pt", model)
    data = change.get("data", files.data)
    if data is not None and ("dataset" not in change or change.get("keep_data")):
        parts["data"] = ("data.npz", data)
    parts.update(change.get("extra", {}))
    form: dict[str, str] = {}
    config = change.get("config", FAST)
    form["config"] = config if isinstance(config, str) else json.dumps(config)
    if "dataset" in change:
        form["dataset"] = change["dataset"]
    return api.post("/v1/jobs", files=parts, data=form)


@pytest.mark.parametrize(("change", "status", "code", "words"), [c[1:] for c in JOB_CASES],
                         ids=[c[0] for c in JOB_CASES])
def test_a_bad_job_submission_gets_its_code_and_stores_nothing(api: Api, files: Files, change: dict[str, Any],
                                                               status: int, code: str, words: str) -> None:
    err = assert_error(_send_case(api, files, change), status, code)
    assert words in err["message"], err
    assert api.get("/v1/jobs").json() == {"data": [], "count": 0}
    assert api.stored() == set(), api.stored()


def test_a_good_submission_is_queued_with_its_location_and_normalised_config(api: Api, files: Files) -> None:
    r = api.submit(files, config={"epsilon": 0.05, "sparsities": [0.1, 0.5], "criterion": "magnitude"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["started_at"] is None and job["finished_at"] is None
    assert job["result"] is None and job["error"] is None
    assert job["progress"]["stage"] == "queued" and job["progress"]["fraction"] == 0.0
    assert job["config"]["epsilon"] == 0.05 and job["config"]["criterion"] == ["magnitude"]
    assert job["model_sha256"] == hashlib.sha256(files.model).hexdigest()
    assert job["data_sha256"] == hashlib.sha256(files.data).hexdigest()
    assert (api.data_dir / "jobs" / job["id"] / "model.pt").read_bytes() == files.model
    assert api.get(f"/v1/jobs/{job['id']}").json() == job


def test_unknown_query_parameters_and_bad_paging_are_422(api: Api) -> None:
    err = assert_error(api.get("/v1/jobs", params={"limt": 2}), 422, "unknown_query_parameter")
    assert "'limt'" in err["message"] and "limit" in err["message"]
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "ten"}, {"status": "done"}):
        err = assert_error(api.get("/v1/jobs", params=params), 422, "validation_error")
        assert next(iter(params)) in err["message"], (params, err)


# -- POST /v1/datasets -----------------------------------------------------------------------------

DATASET_CASES: list[tuple[str, bytes | None, str, str]] = [
    ("pickled npz", npz(x=np.array([[1, 2]] * 24, dtype=object)), "data_pickled", "pickle"),
    ("NaN in x", npz(x=_nan_x(), y=Y), "data_not_finite", "NaN"),
    ("negative labels", npz(x=X, y=Y - 1), "data_labels_out_of_range", "-1"),
    ("no x", npz(y=Y), "data_missing_x", "'x'"),
    ("1-D x", npz(x=X[:, 0]), "data_bad_shape", "shape"),
    ("not an array file", b"just some text", "data_unsupported_format", ".npz"),
    ("no file part", None, "missing_file", "'file'"),
]


@pytest.mark.parametrize(("payload", "code", "words"), [c[1:] for c in DATASET_CASES],
                         ids=[c[0] for c in DATASET_CASES])
def test_a_bad_dataset_gets_its_code_and_stores_nothing(api: Api, payload: bytes | None, code: str,
                                                        words: str) -> None:
    parts = {"file": ("d.npz", payload)} if payload is not None else {"other": ("d.npz", b"x")}
    err = assert_error(api.post("/v1/datasets", files=parts), 422, code)
    assert words in err["message"], err
    assert api.get("/v1/datasets").json() == {"data": [], "count": 0}
    assert api.stored() == set(), api.stored()


def test_a_stored_dataset_describes_itself_and_serves_a_job(api: Api, files: Files) -> None:
    r = api.post("/v1/datasets", files={"file": ("d.npz", files.data)})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and ds["n"] == 24 and ds["x_shape"] == [24, 4] and ds["has_labels"] is True
    assert ds["sha256"] == hashlib.sha256(files.data).hexdigest()
    assert api.get(f"/v1/datasets/{ds['id']}").json()["sha256"] == ds["sha256"]
    job = api.queued_job(files, dataset=ds["id"])
    assert job["dataset"] == ds["id"] and job["data_sha256"] == ds["sha256"]
    # A queued job reads it: it cannot be deleted until the job is over.
    assert_error(api.delete(f"/v1/datasets/{ds['id']}"), 409, "dataset_in_use")
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert_error(api.get(f"/v1/datasets/{ds['id']}"), 404, "dataset_not_found")
    assert not any(p.startswith("datasets/") and p != "datasets" for p in api.stored())


# -- GET /v1/jobs: pagination ----------------------------------------------------------------------

def test_job_list_pages_newest_first_with_the_total(api: Api, files: Files) -> None:
    api.queued_job(files, KEY_A)  # another tenant's job is never counted
    ids = [api.queued_job(files, KEY_C, config={**FAST, "seed": i})["id"] for i in range(5)]
    newest_first = ids[::-1]
    pages = []
    for offset in (0, 2, 4):
        body = api.get("/v1/jobs", KEY_C, params={"limit": 2, "offset": offset}).json()
        assert body["count"] == 5, body
        pages.append([j["id"] for j in body["data"]])
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]
    assert api.get("/v1/jobs", KEY_C, params={"offset": 10}).json() == {"data": [], "count": 5}
    assert [j["id"] for j in api.get("/v1/jobs", KEY_C).json()["data"]] == newest_first  # default limit 20
    assert [j["config"]["seed"] for j in api.get("/v1/jobs", KEY_C).json()["data"]] == [4, 3, 2, 1, 0]
    # status filter: the count is of the filtered set
    api.post(f"/v1/jobs/{ids[1]}/cancel", KEY_C)
    queued = api.get("/v1/jobs", KEY_C, params={"status": "queued", "limit": 1}).json()
    assert queued["count"] == 4 and [j["id"] for j in queued["data"]] == [ids[4]]
    cancelled = api.get("/v1/jobs", KEY_C, params={"status": "cancelled"}).json()
    assert cancelled["count"] == 1 and [j["id"] for j in cancelled["data"]] == [ids[1]]


# -- artifact, report, cancel, delete of a queued job ----------------------------------------------

def test_artifact_and_report_are_409_until_the_job_has_succeeded(api: Api, files: Files) -> None:
    job = api.queued_job(files)
    for what in ("artifact", "report"):
        err = assert_error(api.get(f"/v1/jobs/{job['id']}/{what}"), 409, "job_not_finished")
        assert "queued" in err["message"] and what in err["message"]
    api.post(f"/v1/jobs/{job['id']}/cancel")
    for what in ("artifact", "report"):
        err = assert_error(api.get(f"/v1/jobs/{job['id']}/{what}"), 409, "job_not_succeeded")
        assert "cancelled" in err["message"]
    assert_error(api.get("/v1/jobs/job_000000000000000000000000/artifact"), 404, "job_not_found")


def test_cancelling_a_queued_job_ends_it_at_once_and_it_can_then_be_deleted(api: Api, files: Files) -> None:
    job = api.queued_job(files)
    folder = api.data_dir / "jobs" / job["id"]
    assert folder.is_dir()
    err = assert_error(api.delete(f"/v1/jobs/{job['id']}"), 409, "job_not_finished")  # active: cancel first
    assert "cancel" in err["message"]
    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "cancelled" and done["cancel_requested"] is True
    assert done["finished_at"] is not None and done["started_at"] is None
    assert done["progress"]["stage"] == "cancelled" and "before it started" in done["progress"]["message"]
    assert api.get(f"/v1/jobs/{job['id']}").json() == done
    again = api.post(f"/v1/jobs/{job['id']}/cancel")  # cancelling a cancelled job is a no-op
    assert again.status_code == 200 and again.json() == done
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not folder.exists()
    assert_error(api.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
    assert_error(api.post(f"/v1/jobs/{job['id']}/cancel"), 404, "job_not_found")


def test_a_finished_job_cannot_be_cancelled(api: Api, files: Files) -> None:
    job = api.queued_job(files)
    store = api.client.app.state.store
    claim = store.claim_next(worker_id="test")  # what an executor does; then its supervisor records the end
    assert claim is not None and claim.job_id == job["id"]
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    record_outcome(store, claim, Outcome("failed", code="model_crashed",
                                         message="The process running the model exited with status 1."))
    failed = api.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "model_crashed", "message": "The process running the model exited with status 1."}
    err = assert_error(api.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_already_finished")
    assert "failed" in err["message"]
    assert_error(api.get(f"/v1/jobs/{job['id']}/artifact"), 409, "job_not_succeeded")


# -- the API process -------------------------------------------------------------------------------

def test_the_api_process_does_not_import_torch() -> None:
    code = "import sys, service.app, service.report_page; sys.exit('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"importing the API imports torch:\n{r.stderr}"
