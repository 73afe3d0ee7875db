"""Tenants: API keys are held hashed and compared in constant time; each key sees only its own jobs
and datasets (another's are 404 everywhere); ``Idempotency-Key`` makes job submission safe to retry,
per tenant.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sqlite3
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_harness import (
    FAST_CONFIG,
    KEY_A,
    KEY_B,
    Inputs,
    Server,
    assert_error,
    module_server,
    submit,
    wait_terminal,
)

from service import auth
from service.auth import KeyRing, key_hash

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, api_keys=f"{KEY_A},{KEY_B}")


def rows(server: Server) -> int:
    with sqlite3.connect(server.data_dir / "certiprune.db") as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


# -- keys ----------------------------------------------------------------------------------------

def test_keys_are_held_only_as_hashes_and_compared_in_constant_time() -> None:
    ring = KeyRing([KEY_A, KEY_B])
    held = repr(vars(ring))
    assert KEY_A not in held and KEY_B not in held
    assert ring.owner_for(f"Bearer {KEY_A}") == key_hash(KEY_A) != ring.owner_for(f"Bearer {KEY_B}")
    for bad in (None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A[:-1]}", f"Bearer {KEY_A}x"):
        assert ring.owner_for(bad) is None, bad
    # Every configured hash is compared with hmac.compare_digest, and nothing compares keys with '=='.
    tree = ast.parse(textwrap.dedent(inspect.getsource(KeyRing.owner_for)))
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    assert loops and not any(isinstance(n, (ast.Break, ast.Return)) for loop in loops for n in ast.walk(loop))
    compares = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in n.ops)]
    assert all("scheme" in c for c in compares), compares  # only the scheme name, never a key
    assert "compare_digest" in inspect.getsource(auth)


def test_the_job_store_and_the_log_never_hold_a_key(server: Server, a: httpx.Client, inputs: Inputs) -> None:
    r = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG)
    assert r.status_code == 202
    with sqlite3.connect(server.data_dir / "certiprune.db") as db:
        owners = {o for (o,) in db.execute("SELECT owner FROM jobs")}
    assert key_hash(KEY_A) in owners
    db_bytes = b"".join(p.read_bytes() for p in server.data_dir.glob("certiprune.db*"))
    assert KEY_A.encode() not in db_bytes and KEY_B.encode() not in db_bytes
    assert KEY_A not in server.log()


# -- isolation -----------------------------------------------------------------------------------

def test_another_tenants_jobs_and_datasets_are_404_everywhere(a: httpx.Client, b: httpx.Client,
                                                              inputs: Inputs) -> None:
    job = submit(a, inputs.model, data=inputs.data, config=FAST_CONFIG).json()
    done = wait_terminal(a, job["id"])
    assert done["status"] == "succeeded", done  # a finished job: its artifact and report exist
    ds = a.post("/v1/datasets", files={"file": ("d.npz", inputs.data.read_bytes())}).json()

    for response in (b.get(f"/v1/jobs/{job['id']}"), b.post(f"/v1/jobs/{job['id']}/cancel"),
                     b.get(f"/v1/jobs/{job['id']}/artifact"), b.get(f"/v1/jobs/{job['id']}/report"),
                     b.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})):
        err = assert_error(response, 404, "job_not_found")
        assert "another API key" in err["message"]
    listed = b.get("/v1/jobs", params={"limit": 1000}).json()
    assert job["id"] not in {j["id"] for j in listed["data"]}
    assert all(j["id"] not in {job["id"]} for j in b.get("/v1/jobs", params={"status": "succeeded"}).json()["data"])
    assert_error(submit(b, inputs.model, dataset=ds["id"]), 404, "dataset_not_found")

    # The owner still has everything, untouched by the other tenant's attempts.
    assert a.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    artifact = a.get(f"/v1/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200
    assert hashlib.sha256(artifact.content).hexdigest() == done["result"]["artifact_sha256"]
    assert a.get(f"/v1/jobs/{job['id']}/report").json() == done["result"]
    assert job["id"] in {j["id"] for j in a.get("/v1/jobs", params={"limit": 1000}).json()["data"]}
    assert submit(a, inputs.model, dataset=ds["id"]).status_code == 202


# -- Idempotency-Key ----------------------------------------------------------------------------

def keyed(client: httpx.Client, inputs: Inputs, key: str, *, config: dict | None = None, data: Path | None = None,
          dataset: str | None = None) -> httpx.Response:
    files = {"model": ("model.pt", inputs.model.read_bytes())}
    form = {"config": json.dumps(config if config is not None else FAST_CONFIG)}
    if dataset:
        form["dataset"] = dataset
    else:
        files["data"] = ("data.npz", (data or inputs.data).read_bytes())
    return client.post("/v1/jobs", files=files, data=form, headers={"Idempotency-Key": key})


def test_the_same_key_and_request_return_the_same_job(server: Server, a: httpx.Client, inputs: Inputs) -> None:
    first = keyed(a, inputs, "retry-1")
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    n = rows(server)
    for _ in range(2):
        again = keyed(a, inputs, "retry-1", config=dict(reversed(list(FAST_CONFIG.items()))))  # same content
        assert again.status_code == 200, again.text
        assert again.json()["id"] == job_id
        assert again.headers["location"] == f"/v1/jobs/{job_id}" and again.headers["idempotent-replayed"] == "true"
    assert rows(server) == n
    folder = server.data_dir / "jobs" / job_id
    assert len([p for p in folder.iterdir() if p.name.startswith("request-")]) == 1  # retries stored nothing

    ds = a.post("/v1/datasets", files={"file": ("d.npz", inputs.data.read_bytes())}).json()["id"]
    by_id = keyed(a, inputs, "retry-ds", dataset=ds)
    assert by_id.status_code == 202
    assert keyed(a, inputs, "retry-ds", dataset=ds).json()["id"] == by_id.json()["id"]
    for j in (job_id, by_id.json()["id"]):
        a.post(f"/v1/jobs/{j}/cancel")


def test_the_same_key_with_another_request_is_refused(server: Server, a: httpx.Client, inputs: Inputs,
                                                      tmp_path: Path) -> None:
    import numpy as np

    first = keyed(a, inputs, "reuse-1")
    assert first.status_code == 202
    n = rows(server)
    other_data = tmp_path / "other.npz"
    np.savez(other_data, x=inputs.x_cal[:100], y=inputs.y_cal[:100])
    for response, differs in ((keyed(a, inputs, "reuse-1", config={**FAST_CONFIG, "epsilon": 0.02}), "config"),
                              (keyed(a, inputs, "reuse-1", data=other_data), "data")):
        err = assert_error(response, 422, "idempotency_key_reused")
        assert first.json()["id"] in err["message"] and differs in err["message"]
    assert rows(server) == n
    assert_error(keyed(a, inputs, "k" * 201), 422, "invalid_idempotency_key")
    a.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_keys_are_scoped_per_tenant(a: httpx.Client, b: httpx.Client, inputs: Inputs) -> None:
    ra, rb = keyed(a, inputs, "shared-key"), keyed(b, inputs, "shared-key")
    assert ra.status_code == rb.status_code == 202
    assert ra.json()["id"] != rb.json()["id"]
    assert_error(b.get(f"/v1/jobs/{ra.json()['id']}"), 404, "job_not_found")
    assert keyed(b, inputs, "shared-key").json()["id"] == rb.json()["id"]
    a.post(f"/v1/jobs/{ra.json()['id']}/cancel")
    b.post(f"/v1/jobs/{rb.json()['id']}/cancel")


def test_racing_retries_with_one_key_create_one_job(server: Server, inputs: Inputs) -> None:
    n = rows(server)
    results: list[httpx.Response] = []

    def send() -> None:
        with server.client(KEY_A) as c:
            results.append(keyed(c, inputs, "race-1"))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6
    assert sorted(r.status_code for r in results) == [200] * 5 + [202], [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert rows(server) == n + 1
    job_id = results[0].json()["id"]
    folder = server.data_dir / "jobs" / job_id
    assert len([p for p in folder.iterdir() if p.name.startswith("request-")]) == 1  # the losers cleaned up
    with server.client(KEY_A) as c:
        c.post(f"/v1/jobs/{job_id}/cancel")
