"""The HTTP contract without running jobs (executor 'none'): error bodies, auth, uploads, datasets, listing.

A real uvicorn server in a subprocess, configured with two API keys and a 2 MiB upload limit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_harness import (
    KEY_A,
    KEY_B,
    Inputs,
    Server,
    assert_error,
    module_server,
    submit,
)

pytestmark = pytest.mark.timeout(120)

UPLOAD_LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed-root")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dataset_root: Path) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, executor="none", api_keys=f"{KEY_A},{KEY_B}",
                             max_upload_bytes=UPLOAD_LIMIT, allowed_dataset_roots=str(dataset_root))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# -- routing and framework errors -----------------------------------------------------------

def test_unknown_route_is_404_in_the_error_body(a: httpx.Client) -> None:
    assert_error(a.get("/v1/nothing-here"), 404, "not_found")


def test_wrong_method_is_405_in_the_error_body(a: httpx.Client) -> None:
    assert_error(a.delete("/v1/jobs"), 405, "method_not_allowed")


def test_unknown_job_is_404_job_not_found(a: httpx.Client) -> None:
    for r in (a.get("/v1/jobs/job_doesnotexist"), a.post("/v1/jobs/job_doesnotexist/cancel"),
              a.get("/v1/jobs/job_doesnotexist/artifact"), a.get("/v1/jobs/job_doesnotexist/report")):
        assert_error(r, 404, "job_not_found")


def test_bad_query_parameter_is_422_validation_error(a: httpx.Client) -> None:
    err = assert_error(a.get("/v1/jobs", params={"limit": 0}), 422, "validation_error")
    assert "limit" in err["message"]


def test_unknown_query_parameter_is_422_naming_it(a: httpx.Client) -> None:
    err = assert_error(a.get("/v1/jobs", params={"limt": 5}), 422, "unknown_query_parameter")
    assert "'limt'" in err["message"] and "limit" in err["message"]
    assert_error(a.get("/v1/jobs/job_x", params={"": "null"}), 422, "unknown_query_parameter")
    assert a.get("/v1/jobs", params={"limit": 1, "offset": 0}).status_code == 200


# -- auth -----------------------------------------------------------------------------------

def test_missing_or_wrong_key_is_401(server: Server, inputs: Inputs) -> None:
    with server.client() as anon, server.client("not-a-valid-key") as wrong:
        assert_error(anon.get("/v1/jobs"), 401, "unauthorized")
        assert_error(wrong.get("/v1/jobs"), 401, "unauthorized")
        r = submit(anon, inputs.model, data=inputs.data)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(anon.post("/v1/datasets", files={"file": ("d.npz", inputs.data.read_bytes())}), 401,
                     "unauthorized")
        assert anon.get("/healthz").status_code == 200  # probes need no key


def test_a_tenant_cannot_see_or_touch_another_tenants_job(a: httpx.Client, b: httpx.Client, inputs: Inputs) -> None:
    job = submit(a, inputs.model, data=inputs.data).json()
    for r in (b.get(f"/v1/jobs/{job['id']}"), b.post(f"/v1/jobs/{job['id']}/cancel"),
              b.get(f"/v1/jobs/{job['id']}/artifact"), b.get(f"/v1/jobs/{job['id']}/report")):
        assert_error(r, 404, "job_not_found")
    assert job["id"] not in [j["id"] for j in b.get("/v1/jobs", params={"limit": 1000}).json()["data"]]
    assert a.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # B's cancel did nothing


def test_a_tenant_cannot_use_another_tenants_dataset(a: httpx.Client, b: httpx.Client, inputs: Inputs) -> None:
    ds = a.post("/v1/datasets", files={"file": ("d.npz", inputs.data.read_bytes())}).json()
    assert_error(submit(b, inputs.model, dataset=ds["id"]), 404, "dataset_not_found")


# -- submission: parts, config, data, model -------------------------------------------------

def test_accepted_job_is_202_with_location_and_full_config(a: httpx.Client, inputs: Inputs) -> None:
    r = submit(a, inputs.model, data=inputs.data, config={"epsilon": 0.05, "sparsities": [0.1, 0.5]})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert set(job) >= {"id", "status", "created_at", "started_at", "finished_at", "config", "progress", "result",
                        "error"}
    assert set(job["progress"]) == {"stage", "done", "total", "fraction", "message"}
    assert job["config"]["epsilon"] == 0.05 and job["config"]["sparsities"] == [0.1, 0.5]
    assert job["config"]["delta"] == 0.1  # defaults are filled in and shown
    assert job["result"] is None and job["error"] is None
    assert a.get(job["id"] and f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


@pytest.mark.parametrize("parts, code", [
    ({}, "missing_model"),
    ({"model": True}, "missing_data"),
    ({"model": True, "data": True, "dataset": "ds_abc"}, "conflicting_data"),
])
def test_missing_or_conflicting_parts_are_422(a: httpx.Client, inputs: Inputs, parts: dict, code: str) -> None:
    files = {}
    if parts.get("model"):
        files["model"] = ("m.pt", inputs.model.read_bytes())
    if parts.get("data"):
        files["data"] = ("d.npz", inputs.data.read_bytes())
    form = {"dataset": parts["dataset"]} if "dataset" in parts else {}
    assert_error(a.post("/v1/jobs", files=files or None, data=form or None), 422, code)


@pytest.mark.parametrize("config, code", [
    ("{not json", "invalid_config_json"),
    ("[1, 2]", "invalid_config"),
    (json.dumps({"epsilon": 1.5}), "invalid_config"),
    (json.dumps({"sparsities": [0.5, 0.2]}), "invalid_config"),
    (json.dumps({"criterion": "nonsense"}), "invalid_config"),
    (json.dumps({"epsilonn": 0.1}), "unknown_config_field"),
])
def test_bad_config_is_422_naming_the_problem(a: httpx.Client, inputs: Inputs, config: str, code: str) -> None:
    r = a.post("/v1/jobs", files={"model": ("m.pt", inputs.model.read_bytes()),
                                  "data": ("d.npz", inputs.data.read_bytes())}, data={"config": config})
    assert_error(r, 422, code)


def test_bad_data_is_422_with_the_calibration_code(a: httpx.Client, inputs: Inputs) -> None:
    x = inputs.x_cal[:50].copy()
    cases = {
        "data_not_finite": npz_bytes(x=np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x).astype(np.float32),
                                     y=inputs.y_cal[:50]),
        "data_length_mismatch": npz_bytes(x=x, y=inputs.y_cal[:49]),
        "data_pickled": npz_bytes(x=np.array([{"a": 1}], dtype=object)),
        "data_unsupported_format": b"this is not an array file",
        "data_missing_x": npz_bytes(y=inputs.y_cal[:50]),
    }
    for code, payload in cases.items():
        r = a.post("/v1/jobs", files={"model": ("m.pt", inputs.model.read_bytes()), "data": ("d.npz", payload)})
        err = assert_error(r, 422, code)
        assert len(err["message"]) > 20


def test_labelled_risk_without_labels_is_422(a: httpx.Client, inputs: Inputs) -> None:
    r = a.post("/v1/jobs", files={"model": ("m.pt", inputs.model.read_bytes()),
                                  "data": ("d.npz", npz_bytes(x=inputs.x_cal[:50]))},
               data={"config": json.dumps({"risk": "error_rate"})})
    assert_error(r, 422, "labels_required")


def test_bad_model_files_are_422(a: httpx.Client, inputs: Inputs, tmp_path: Path) -> None:
    import torch

    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "ckpt.pt")  # a pickle checkpoint, not TorchScript
    for payload, code in ((b"definitely not a zip", "model_not_torchscript"),
                          ((tmp_path / "ckpt.pt").read_bytes(), "model_is_pickle_checkpoint"),
                          (b"", "model_not_torchscript")):
        r = a.post("/v1/jobs", files={"model": ("m.pt", payload), "data": ("d.npz", inputs.data.read_bytes())})
        assert_error(r, 422, code)


def test_uncertainty_without_mu_is_422(a: httpx.Client, inputs: Inputs) -> None:
    r = submit(a, inputs.model, data=inputs.data,
               extra_files={"uncertainty": ("u.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}")})
    assert_error(r, 422, "uncertainty_without_mu")


def test_dataset_uri_outside_allowed_roots_is_422(a: httpx.Client, inputs: Inputs) -> None:
    for uri in (str(inputs.data), f"file://{inputs.data}", "s3://bucket/cal.npz"):
        assert_error(submit(a, inputs.model, dataset=uri), 422, "dataset_not_allowed")
    assert_error(submit(a, inputs.model, dataset="ds_unknown"), 404, "dataset_not_found")


def test_dataset_uri_under_an_allowed_root_is_snapshotted(a: httpx.Client, inputs: Inputs, dataset_root: Path,
                                                          tmp_path: Path) -> None:
    import hashlib
    import shutil

    inside = dataset_root / "team" / "cal.npz"
    inside.parent.mkdir(exist_ok=True)
    shutil.copy(inputs.data, inside)
    r = submit(a, inputs.model, dataset=str(inside))
    assert r.status_code == 202, r.text
    assert r.json()["data_sha256"] == hashlib.sha256(inside.read_bytes()).hexdigest()
    assert submit(a, inputs.model, dataset=f"file://{inside}").status_code == 202
    # No way out of the root: '..' and symlinks are resolved before the check.
    assert_error(submit(a, inputs.model, dataset=f"{dataset_root}/team/../../{inputs.data.name}"), 422,
                 "dataset_not_allowed")
    link = dataset_root / "link.npz"
    link.symlink_to(inputs.data)
    assert_error(submit(a, inputs.model, dataset=str(link)), 422, "dataset_not_allowed")
    assert_error(submit(a, inputs.model, dataset=f"{dataset_root}-sibling/cal.npz"), 422, "dataset_not_allowed")


def test_oversize_upload_is_413_while_streaming(a: httpx.Client, inputs: Inputs, server: Server) -> None:
    big = inputs.big_data.read_bytes()
    assert len(big) > UPLOAD_LIMIT
    assert_error(a.post("/v1/datasets", files={"file": ("d.npz", big)}), 413, "upload_too_large")
    assert_error(submit(a, inputs.model, data=inputs.big_data), 413, "upload_too_large")

    # Without a Content-Length the limit is enforced on the bytes as they arrive.
    def chunks():
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n" + boundary + b"--\r\n"

    r = a.post("/v1/datasets", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert_error(r, 413, "upload_too_large")
    assert a.get("/healthz").status_code == 200  # the server is fine afterwards


def test_rejected_submissions_leave_no_files(server: Server, a: httpx.Client, inputs: Inputs) -> None:
    jobs_dir = server.data_dir / "jobs"
    before = set(jobs_dir.iterdir()) if jobs_dir.exists() else set()
    assert_error(a.post("/v1/jobs", files={"model": ("m.pt", b"nope"), "data": ("d.npz", inputs.data.read_bytes())}),
                 422)
    assert_error(submit(a, inputs.model, data=inputs.data, config={"epsilon": 7}), 422)
    after = set(jobs_dir.iterdir()) if jobs_dir.exists() else set()
    assert after == before


# -- datasets -------------------------------------------------------------------------------

def test_dataset_upload_is_201_with_its_summary(a: httpx.Client, inputs: Inputs) -> None:
    import hashlib

    payload = inputs.data.read_bytes()
    r = a.post("/v1/datasets", files={"file": ("digits.npz", payload)})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_")
    assert (ds["n"], ds["x_shape"], ds["has_labels"]) == (len(inputs.y_cal), [len(inputs.y_cal), 64], True)
    assert ds["sha256"] == hashlib.sha256(payload).hexdigest()
    job = submit(a, inputs.model, dataset=ds["id"])
    assert job.status_code == 202 and job.json()["dataset"] == ds["id"]


def test_bad_dataset_upload_is_422(a: httpx.Client) -> None:
    assert_error(a.post("/v1/datasets", files={"file": ("d.npz", b"garbage")}), 422, "data_unsupported_format")
    assert_error(a.post("/v1/datasets", files={"other": ("d.npz", b"garbage")}), 422, "missing_file")


# -- queued jobs: list, cancel, artifact before success -------------------------------------

def test_list_is_newest_first_and_paginates(server: Server, inputs: Inputs) -> None:
    with server.client("tenant-c-key-for-listing") as c:
        assert_error(c.get("/v1/jobs"), 401)  # not a configured key
    with server.client(KEY_B) as b:
        total_before = b.get("/v1/jobs").json()["count"]
        ids = [submit(b, inputs.model, data=inputs.data).json()["id"] for _ in range(3)]
        page = b.get("/v1/jobs", params={"limit": 2}).json()
        assert page["count"] == total_before + 3
        assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
        page2 = b.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
        assert page2["data"][0]["id"] == ids[0]
        b.post(f"/v1/jobs/{ids[1]}/cancel")
        cancelled = b.get("/v1/jobs", params={"status": "cancelled"}).json()
        assert ids[1] in [j["id"] for j in cancelled["data"]] and ids[0] not in [j["id"] for j in cancelled["data"]]
        assert_error(b.get("/v1/jobs", params={"status": "sleeping"}), 422, "validation_error")


def test_artifact_and_report_are_409_until_succeeded(a: httpx.Client, inputs: Inputs) -> None:
    job = submit(a, inputs.model, data=inputs.data).json()
    assert_error(a.get(f"/v1/jobs/{job['id']}/artifact"), 409, "job_not_finished")
    assert_error(a.get(f"/v1/jobs/{job['id']}/report"), 409, "job_not_finished")
    cancelled = a.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert a.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    assert_error(a.get(f"/v1/jobs/{job['id']}/artifact"), 409, "job_not_succeeded")


# -- operations -----------------------------------------------------------------------------

def test_health_ready_metrics_and_docs(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "data_dir": "ok"}
        assert_error(c.get("/metrics"), 401, "unauthorized")  # with keys configured, metrics need one
    with server.client(KEY_A) as c:
        metrics = c.get("/metrics").text
        assert 'certiprune_jobs{status="queued"}' in metrics
        assert 'certiprune_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics
        assert c.get("/docs").status_code == 200
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/artifact",
                "/v1/jobs/{job_id}/report", "/v1/datasets", "/healthz", "/readyz", "/metrics"} <= set(paths)
