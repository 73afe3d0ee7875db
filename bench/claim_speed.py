"""How long does claiming the next job take with a long queue? Fair claims vs a naive fair query.

``JobStore.claim_next`` picks the owner whose turn it is from one grouped pass over the active jobs,
then that owner's oldest job. The naive way to write the same order — a correlated count and max per
*queued row* in ORDER BY — costs a pass per queued job. Both are timed here on SQLite (median of 5
claims) for a growing queue split over a few owners.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import aliased

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.store import QUEUED, RUNNING, JobRow, JobStore, new_job_id  # noqa: E402


def naive_next(store: JobStore) -> str | None:
    mine = aliased(JobRow)
    running = (select(func.count()).select_from(mine)
               .where(mine.owner == JobRow.owner, mine.status == RUNNING).scalar_subquery())
    last = select(func.max(mine.started_at)).where(mine.owner == JobRow.owner).scalar_subquery()
    stmt = (select(JobRow.id).where(JobRow.status == QUEUED)
            .order_by(running, last.asc().nulls_first(), JobRow.seq).limit(1))
    with store._session() as s:
        return s.scalar(stmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queues", default="100,1000,3000")
    ap.add_argument("--owners", type=int, default=3)
    args = ap.parse_args()
    print(f"{'queued':>7} {'ours ms':>8} {'naive ms':>9}")
    for n in (int(q) for q in args.queues.split(",")):
        with tempfile.TemporaryDirectory() as d:
            store = JobStore.from_url(f"sqlite:///{d}/jobs.db")
            for i in range(n + 10):
                store.create(job_id=new_job_id(), owner=f"key{i % args.owners}", config={}, model_path="m",
                             data_path="d", model_sha256="0" * 64, data_sha256="1" * 64)
            ours, naive = [], []
            for _ in range(5):
                t = time.perf_counter()
                naive_next(store)
                naive.append(time.perf_counter() - t)
                t = time.perf_counter()
                store.claim_next(worker_id="bench")
                ours.append(time.perf_counter() - t)
            store.close()
        print(f"{n:>7} {1000 * statistics.median(ours):>8.1f} {1000 * statistics.median(naive):>9.1f}", flush=True)


if __name__ == "__main__":
    main()
