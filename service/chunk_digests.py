"""SHA-256 per 64 MiB chunk of an input, recorded at admission beside its sha256, so staging re-checks it on every core.

SHA-256 is sequential: re-checking a 1.2 GB calibration set against its one recorded digest takes 1.1 s on one
core of an H200 host, before every job (issue 17). So admission also records the digests of the file's 64 MiB
chunks and its size. They are computed from exactly the bytes the whole-file sha256 is computed from — the same
upload stream, hashed per chunk in a second thread beside the first (hashlib releases the GIL) — so recording
them costs the upload no time on a machine with two cores.

Why the check is the same check: a staged file whose size equals the recorded size and whose every chunk has
its recorded digest holds exactly the admitted bytes (finding other bytes with the same SHA-256 for any chunk
is a second preimage of SHA-256), so it also has the recorded sha256. The chunks are independent, so they are
checked in parallel threads (``os.pread`` and hashlib release the GIL). A job whose row predates the chunk
digests (store revision 0004) is checked against its whole-file sha256 as before.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .sandbox import usable_cpus

CHUNK_BYTES = 64 << 20
READ_BYTES = 4 << 20  # one pread: large enough that hashing it releases the GIL for long
MAX_THREADS = 16  # a 16 GB input on a 128-core host does not need 128 threads (16 reach ≈ 10 GB/s)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ChunkDigests:
    """A file's size and the SHA-256 of each ``chunk_bytes`` chunk, in order (the last may be shorter)."""

    size: int
    chunk_bytes: int
    sha256: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "chunk_bytes": self.chunk_bytes, "sha256": list(self.sha256)}

    @classmethod
    def from_json(cls, value: Any) -> ChunkDigests | None:
        """The recorded digests, or None when there are none or they are not well formed (the whole-file
        sha256 is checked then): a bad record can make the check slower, never weaker."""
        if not isinstance(value, dict):
            return None
        size, chunk, digests = value.get("size"), value.get("chunk_bytes"), value.get("sha256")
        if not (isinstance(size, int) and isinstance(chunk, int) and isinstance(digests, list)) \
                or isinstance(size, bool) or isinstance(chunk, bool) or size < 0 or chunk <= 0:
            return None
        if len(digests) != -(-size // chunk) or not all(
                isinstance(d, str) and len(d) == 64 and set(d) <= _HEX for d in digests):
            return None
        return cls(size, chunk, tuple(digests))


class StreamChunkHasher:
    """Hashes the bytes fed to it per chunk, in a helper thread, while the caller does its own work with them.

    Feed every piece of the stream in order with :meth:`update` (``bytes``: immutable, so the thread may read
    them later), then :meth:`result`. Used as a context manager, so an upload that fails stops the thread."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, max_pending: int = 64) -> None:
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self._pending: queue.Queue[bytes | None] = queue.Queue(max_pending)
        self._digests: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="certiprune-chunk-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        digest, filled = hashlib.sha256(), 0
        try:
            while (data := self._pending.get()) is not None:
                view = memoryview(data)
                while view:
                    take = min(len(view), self.chunk_bytes - filled)
                    digest.update(view[:take])
                    filled, view = filled + take, view[take:]
                    if filled == self.chunk_bytes:
                        self._digests.append(digest.hexdigest())
                        digest, filled = hashlib.sha256(), 0
            if filled:
                self._digests.append(digest.hexdigest())
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self._error = exc
            while self._pending.get() is not None:  # let the feeder finish
                pass

    def update(self, data: bytes) -> None:
        if data:
            self.size += len(data)
            self._pending.put(bytes(data))

    def result(self) -> ChunkDigests:
        self._pending.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return ChunkDigests(self.size, self.chunk_bytes, tuple(self._digests))

    def __enter__(self) -> StreamChunkHasher:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()


def _chunk_sha256(fd: int, offset: int, length: int) -> str:
    digest, buf = hashlib.sha256(), bytearray(min(READ_BYTES, max(length, 1)))
    view, end = memoryview(buf), offset + length
    while offset < end:
        got = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
        if got <= 0:
            break  # the file shrank under us: its digest will not match
        digest.update(view[:got])
        offset += got
    return digest.hexdigest()


def mismatch(path: str | os.PathLike, expected: ChunkDigests, threads: int | None = None) -> str | None:
    """None when the file at ``path`` holds exactly the bytes ``expected`` describes; else what differs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != expected.size:
            return f"{size} bytes where {expected.size} were admitted"
        ranges = [(o, min(expected.chunk_bytes, size - o)) for o in range(0, size, expected.chunk_bytes)]
        workers = max(1, min(len(ranges), threads or min(usable_cpus(), MAX_THREADS)))
        if workers == 1:
            actual = [_chunk_sha256(fd, o, n) for o, n in ranges]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="certiprune-verify") as pool:
                actual = list(pool.map(lambda r: _chunk_sha256(fd, *r), ranges))
    finally:
        os.close(fd)
    for index, (got, want) in enumerate(zip(actual, expected.sha256)):
        if got != want:
            return f"chunk {index + 1} of {len(ranges)} (bytes {index * expected.chunk_bytes}…) differs"
    return None


__all__ = ["CHUNK_BYTES", "ChunkDigests", "StreamChunkHasher", "mismatch"]
