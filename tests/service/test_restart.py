"""Jobs survive API restarts: SIGKILL or SIGTERM the server with one job running and others queued.

Nothing is lost, the interrupted job runs again (or fails clearly once out of attempts), no job
is left 'running', and no orphaned worker keeps computing after its server died.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from service_harness import (
    pid_gone,
    FAST_CONFIG,
    SLOW_CONFIG,
    Inputs,
    submit,
    wait_for,
    wait_terminal,
)

from service.store import JobStore

pytestmark = pytest.mark.timeout(240)




def test_kill_and_restart_loses_nothing_and_leaves_nothing_running(make_server, inputs: Inputs,
                                                                   tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = {"max_attempts": 2, "cancel_grace_s": 2}
    s1 = make_server(data_dir, **settings)
    with s1.client() as c:
        done = wait_terminal(c, submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"])
        assert done["status"] == "succeeded"
        slow = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
        queued = [submit(c, inputs.model, data=inputs.data, config=FAST_CONFIG).json()["id"] for _ in range(2)]
        wait_for(c, slow, lambda j: j["progress"]["stage"] == "testing", 60, "the testing stage")
        workers = s1.worker_pids(idle_too=True)
        assert workers
    s1.stop(signal.SIGKILL)
    assert all(pid_gone(p) for p in workers), "a worker outlived its killed server"

    s2 = make_server(data_dir, **settings)
    with s2.client() as c:
        listed = {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert set(listed) == {done["id"], slow, *queued}  # nothing lost
        assert listed[done["id"]]["status"] == "succeeded"
        artifact = c.get(f"/v1/jobs/{done['id']}/artifact")
        assert artifact.status_code == 200
        assert artifact.headers["x-checksum-sha256"] == done["result"]["artifact_sha256"]
        # The interrupted job is the oldest queued one: it runs again, its lost run counted.
        job = wait_for(c, slow, lambda j: j["status"] == "running" and j["attempts"] == 1, 30, "the re-run")
        assert all(listed[q]["status"] == "queued" for q in queued)
        assert job["progress"]["stage"] in ("starting", "loading", "dense", "scoring", "testing")
    s2.stop(signal.SIGTERM)  # orderly: the running job goes back to the queue, no attempt counted

    store = JobStore.from_url(f"sqlite:///{data_dir.resolve() / 'certiprune.db'}")
    jobs = {j.id: j for j in store.list(owner=None, limit=100)[0]}
    store.close()
    assert not [j for j in jobs.values() if j.status == "running"]
    assert (jobs[slow].status, jobs[slow].attempts) == ("queued", 1)

    s3 = make_server(data_dir, **settings)
    with s3.client() as c:
        assert c.post(f"/v1/jobs/{slow}/cancel").status_code == 200
        assert wait_terminal(c, slow, timeout=30)["status"] == "cancelled"
        for q in queued:
            assert wait_terminal(c, q, timeout=60)["status"] == "succeeded"


def test_a_job_interrupted_on_its_last_attempt_fails_clearly(make_server, inputs: Inputs, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s1 = make_server(data_dir, max_attempts=1)
    with s1.client() as c:
        slow = submit(c, inputs.big_model, data=inputs.big_data, config=SLOW_CONFIG).json()["id"]
        wait_for(c, slow, lambda j: j["status"] == "running", 60, "running")
    s1.stop(signal.SIGKILL)
    s2 = make_server(data_dir, max_attempts=1)
    with s2.client() as c:
        job = c.get(f"/v1/jobs/{slow}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_interrupted"
    assert "restart" in job["error"]["message"]
