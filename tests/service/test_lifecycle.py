"""Job and dataset lifecycle: deleting finished jobs and stored datasets frees their storage (active ones are
protected, 409), finished jobs expire after the retention period, and a key over its active-job quota gets 429."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from service_harness import (
    FAST_CONFIG,
    KEY_A,
    KEY_B,
    REPO,
    SLOW_CONFIG,
    Inputs,
    Server,
    assert_error,
    module_server,
    submit,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, api_keys=f"{KEY_A},{KEY_B}")


def files_of(server: Server, job_id: str) -> list[str]:
    folder = server.data_dir / "jobs" / job_id
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_a_finished_job_is_deleted_with_its_files(server: Server, a: httpx.Client, b: httpx.Client,
                                                  inputs: Inputs) -> None:
    job_id = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
    assert wait_terminal(a, job_id, timeout=120)["status"] == "succeeded"
    assert "artifact.pt" in files_of(server, job_id)
    assert_error(b.delete(f"/v1/jobs/{job_id}"), 404, "job_not_found")  # another tenant cannot
    assert a.get(f"/v1/jobs/{job_id}").status_code == 200
    r = a.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 204 and r.content == b""
    assert files_of(server, job_id) == []
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/artifact", f"/v1/jobs/{job_id}/report"):
        assert_error(a.get(path), 404, "job_not_found")
    assert job_id not in {j["id"] for j in a.get("/v1/jobs", params={"limit": 1000}).json()["data"]}
    assert_error(a.delete(f"/v1/jobs/{job_id}"), 404, "job_not_found")  # twice: already gone


def test_an_active_job_must_be_cancelled_before_it_is_deleted(server: Server, a: httpx.Client,
                                                              inputs: Inputs) -> None:
    job_id = submit(a, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
    wait_for(a, job_id, lambda j: j["status"] == "running", 60, "the job to run")
    r = a.delete(f"/v1/jobs/{job_id}")
    assert_error(r, 409, "job_not_finished")
    assert "cancel it first" in r.json()["error"]["message"]
    assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # untouched
    assert a.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_terminal(a, job_id, timeout=60)["status"] == "cancelled"
    assert server.workers_left() == []
    assert a.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert files_of(server, job_id) == []


def test_datasets_are_listed_read_and_deleted_unless_in_use(server: Server, a: httpx.Client, b: httpx.Client,
                                                            inputs: Inputs) -> None:
    created = [a.post("/v1/datasets", files={"file": (f"d{i}.npz", inputs.data.read_bytes())}).json()
               for i in range(2)]
    big = a.post("/v1/datasets", files={"file": ("big.npz", inputs.big_data.read_bytes())}).json()
    page = a.get("/v1/datasets", params={"limit": 2}).json()
    assert page["count"] >= 3 and [d["id"] for d in page["data"]] == [big["id"], created[1]["id"]]  # newest first
    assert a.get(f"/v1/datasets/{big['id']}").json() == big
    assert b.get("/v1/datasets").json()["count"] == 0  # tenants see only their own
    assert_error(b.get(f"/v1/datasets/{big['id']}"), 404, "dataset_not_found")
    assert_error(b.delete(f"/v1/datasets/{big['id']}"), 404, "dataset_not_found")

    # In use by a running job: refused; once the job is over: deleted, and the job's result stays.
    job_id = submit(a, inputs.big_model, dataset=big["id"], config=SLOW_CONFIG).json()["id"]
    wait_for(a, job_id, lambda j: j["status"] == "running", 60, "the job to run")
    assert_error(a.delete(f"/v1/datasets/{big['id']}"), 409, "dataset_in_use")
    assert a.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_terminal(a, job_id, timeout=60)["status"] == "cancelled"
    stored = server.data_dir / "datasets"
    assert any(p.name.startswith(big["id"]) for p in stored.iterdir())
    assert a.delete(f"/v1/datasets/{big['id']}").status_code == 204
    assert not any(p.name.startswith(big["id"]) for p in stored.iterdir())
    assert_error(a.get(f"/v1/datasets/{big['id']}"), 404, "dataset_not_found")
    assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    assert_error(submit(a, inputs.model, dataset=big["id"]), 404, "dataset_not_found")
    # A finished job keeps its artifact after its dataset goes.
    done = submit(a, inputs.model, dataset=created[0]["id"], config=FAST_CONFIG).json()["id"]
    assert wait_terminal(a, done, timeout=120)["status"] == "succeeded"
    assert a.delete(f"/v1/datasets/{created[0]['id']}").status_code == 204
    r = a.get(f"/v1/jobs/{done}/artifact")
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == r.headers["x-checksum-sha256"]


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--server", server.url, "--api-key", KEY_A],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_lists_datasets_and_deletes_jobs_and_datasets(server: Server, a: httpx.Client, inputs: Inputs) -> None:
    job_id = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
    assert wait_terminal(a, job_id, timeout=120)["status"] == "succeeded"
    run = cli(server, "delete", job_id)
    assert run.returncode == 0 and f"{job_id}: deleted" in run.stdout, run.stdout + run.stderr
    again = cli(server, "delete", job_id)
    assert again.returncode != 0 and "job_not_found" in again.stdout + again.stderr
    ds = a.post("/v1/datasets", files={"file": ("d.npz", inputs.data.read_bytes())}).json()
    listed = cli(server, "datasets")
    assert listed.returncode == 0 and ds["id"] in listed.stdout and f"{ds['n']:,}" in listed.stdout, listed.stdout
    as_json = cli(server, "datasets", "--json", "--limit", "1")
    assert [d["id"] for d in json.loads(as_json.stdout)["data"]] == [ds["id"]]
    assert cli(server, "delete", ds["id"]).returncode == 0
    assert ds["id"] not in cli(server, "datasets").stdout


def test_finished_jobs_expire_after_the_retention_period(make_server, inputs: Inputs) -> None:
    server = make_server(job_retention_s=1)
    with server.client() as c:
        job_id = submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
        assert wait_terminal(c, job_id, timeout=120)["status"] == "succeeded"
        assert "artifact.pt" in files_of(server, job_id)
        slow = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
        deadline = time.monotonic() + 30  # one second of retention plus a sweep (every 5 s)
        while c.get(f"/v1/jobs/{job_id}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_error(c.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
        assert files_of(server, job_id) == []
        # A job that has not finished is never expired, however old.
        assert c.get(f"/v1/jobs/{slow}").json()["status"] in ("queued", "running")
        assert c.post(f"/v1/jobs/{slow}/cancel").status_code == 200


def test_a_key_over_its_active_job_quota_gets_429_until_one_ends(make_server, inputs: Inputs) -> None:
    server = make_server(api_keys=f"{KEY_A},{KEY_B}", max_active_jobs_per_key=2, executor="none")
    with server.client(KEY_A) as a, server.client(KEY_B) as b:
        ids = [submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"] for _ in range(2)]
        r = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG)
        assert_error(r, 429, "too_many_active_jobs")
        assert r.headers["retry-after"] == "30" and "CERTIPRUNE_MAX_ACTIVE_JOBS_PER_KEY=2" in r.json()["error"]["message"]
        assert submit(b, inputs.model, data=inputs.data, config=FAST_CONFIG).status_code == 202  # per key
        assert a.post(f"/v1/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
        assert submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).status_code == 202
    assert len(list((server.data_dir / "jobs").iterdir())) == 4  # the refused request stored nothing


def test_the_artifact_is_sent_gzip_compressed_when_the_client_accepts_it(server: Server, a: httpx.Client,
                                                                        inputs: Inputs) -> None:
    import gzip

    from service.routes.jobs import accepts_gzip

    job = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"]
    result = wait_terminal(a, job, timeout=120)["result"]
    plain = server.data_dir / "jobs" / job / "artifact.pt"
    with a.stream("GET", f"/v1/jobs/{job}/artifact", headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())  # the bytes on the wire, not decoded
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert r.headers["x-checksum-sha256"] == result["artifact_sha256"]
    decoded = gzip.decompress(raw)
    assert decoded == plain.read_bytes() and hashlib.sha256(decoded).hexdigest() == result["artifact_sha256"]
    if result["certified_sparsity"] >= 0.5:
        assert len(raw) < 0.8 * len(decoded)  # a pruned model's zeros compress
    assert len(raw) < len(decoded)
    for refuse in ("identity", "gzip;q=0, identity", "br"):
        r = a.get(f"/v1/jobs/{job}/artifact", headers={"Accept-Encoding": refuse})
        assert "content-encoding" not in r.headers and r.content == plain.read_bytes(), refuse
        assert int(r.headers["content-length"]) == plain.stat().st_size
    assert a.get(f"/v1/jobs/{job}/artifact").content == plain.read_bytes()  # httpx decodes transparently
    assert [accepts_gzip(v) for v in ("gzip", "deflate, gzip;q=0.5", "*", "GZIP;q=1.0", None, "", "gzip;q=0",
                                      "gzip;q=zero", "deflate")] == [True, True, True, True, False, False, False,
                                                                     False, False]
