"""What the host-side passes over a job's inputs cost, serial against split across threads (issue 17).

Before a GPU job's first forward, its calibration set is passed over several times on the CPU: the supervisor
hashes every input (SHA-256) before the child may read it, the child reads the .npz into its arrays, checks
the floats are finite, and gathers the two splits. Each is one thread today. This times each pass on a file of
``--gb`` GB in the page cache, serially and in ``--threads`` threads over 64 MiB chunks (hashlib, os.preadv and
numpy release the GIL), so a change is predicted before it is made.

    python bench/io_parallel.py --gb 1.2 --threads 16
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 64 << 20


def best_of(fn, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    size = int(args.gb * 1e9) // 4 * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        data = np.random.default_rng(0).standard_normal(size // 4, dtype=np.float32)
        data.tofile(path)
        del data
        with open(path, "rb") as fh:  # into the page cache
            while fh.read(CHUNK):
                pass
        ranges = [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]
        pool = ThreadPoolExecutor(args.threads)

        def sha_serial() -> None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)

        fd = os.open(path, os.O_RDONLY)

        def sha_chunk(r: tuple[int, int]) -> str:
            h = hashlib.sha256()
            buf = bytearray(1 << 22)
            view = memoryview(buf)
            offset, length = r
            end = offset + length
            while offset < end:
                n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
                h.update(view[:n])
                offset += n
            return h.hexdigest()

        def sha_threads() -> None:
            list(pool.map(sha_chunk, ranges))

        def read_serial() -> np.ndarray:
            out = np.empty(size, dtype=np.uint8)
            with open(path, "rb") as fh:
                fh.readinto(memoryview(out))
            return out

        def read_threads() -> np.ndarray:
            out = np.empty(size, dtype=np.uint8)
            view = memoryview(out)
            list(pool.map(lambda r: os.preadv(fd, [view[r[0]:r[0] + r[1]]], r[0]), ranges))
            return out

        x = read_serial().view(np.float32)
        parts = np.array_split(x, len(ranges))

        def finite_serial() -> bool:
            return bool(np.isfinite(x).all())

        def finite_threads() -> bool:
            return all(pool.map(lambda a: bool(np.isfinite(a).all()), parts))

        rows = x.reshape(2000, -1) if x.size % 2000 == 0 else x.reshape(1, -1)
        order = np.random.default_rng(1).permutation(rows.shape[0])

        def gather_serial() -> np.ndarray:
            return rows[order]

        def gather_threads() -> np.ndarray:
            out = np.empty_like(rows)
            blocks = np.array_split(np.arange(rows.shape[0]), args.threads)
            list(pool.map(lambda b: np.take(rows, order[b], axis=0, out=out[b[0]:b[-1] + 1]) if b.size else None,
                          blocks))
            return out

        print(f"{size / 1e9:.2f} GB in the page cache, {args.threads} threads, {os.cpu_count()} CPUs")
        for name, serial, threaded in (("sha256", sha_serial, sha_threads), ("read", read_serial, read_threads),
                                       ("isfinite", finite_serial, finite_threads),
                                       ("gather rows", gather_serial, gather_threads)):
            s, t = best_of(serial), best_of(threaded)
            print(f"{name:<12} serial {s:6.3f} s ({size / s / 1e9:5.2f} GB/s)   threads {t:6.3f} s "
                  f"({size / t / 1e9:5.2f} GB/s)")
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
