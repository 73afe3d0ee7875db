"""File storage under the data dir through fsspec: datasets/, jobs/<id>/{model.pt,data.npz,artifact.pt}.

Writes are atomic, so a reader never sees a half-written file: on a file system, a temp name in
the same folder and then a rename; on S3 (which has no rename) the object is uploaded without
committing it and only completed once every byte arrived, or aborted, so the final key appears
whole or not at all. Sizes are limited; sha256, and the sha256 of every 64 MiB chunk (``service.chunk_digests``),
are computed while the bytes stream through.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from .chunk_digests import ChunkDigests, StreamChunkHasher

if TYPE_CHECKING:
    from .settings import Settings

CHUNK = 1024 * 1024
S3_PROTOCOLS = ("s3", "s3a")
#: Read when a Storage is built without explicit options (e.g. in a worker process that got only the
#: data dir); ``Settings.s3_endpoint_url`` reads the same variable.
S3_ENDPOINT_ENV = "CERTIPRUNE_S3_ENDPOINT_URL"


def storage_options(url: str, *, s3_endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``url``. S3: the endpoint (``s3_endpoint_url``, else $CERTIPRUNE_S3_ENDPOINT_URL),
    and no cached directory listings, since other processes write the objects this one looks for."""
    if get_protocol(url) not in S3_PROTOCOLS:
        return {}
    options: dict[str, Any] = {"use_listings_cache": False}
    endpoint = s3_endpoint_url or os.environ.get(S3_ENDPOINT_ENV)
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class UploadTooLarge(Exception):
    """The stream is longer than the allowed number of bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The upload exceeds the limit of {limit} bytes.")
        self.limit = limit


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the storage root
    size: int
    sha256: str
    chunks: ChunkDigests | None = None  # of an upload: its 64 MiB chunks' sha256, for a parallel re-check

    def chunks_json(self) -> dict[str, Any] | None:
        return None if self.chunks is None else self.chunks.to_json()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def job_dir(job_id: str) -> str:
    return f"jobs/{job_id}"


class Storage:
    """Datasets and job files below one root (local folder, or any fsspec URL such as s3://bucket/prefix)."""

    def __init__(self, root: str, *, options: dict[str, Any] | None = None) -> None:
        options = storage_options(root) if options is None else options
        self.fs, base = fsspec.core.url_to_fs(root, **options)
        if isinstance(self.fs, LocalFileSystem):
            base = str(Path(base).expanduser().resolve())
        self.root = base.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        return cls(settings.data_dir,
                   options=storage_options(settings.data_dir, s3_endpoint_url=settings.s3_endpoint_url))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_object_store(self) -> bool:
        """S3: no rename, but an upload only becomes visible once it is completed."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return any(p in S3_PROTOCOLS for p in protocols)

    def full(self, relpath: str) -> str:
        rel = relpath.lstrip("/")
        if ".." in Path(rel).parts:
            raise ValueError(f"Refusing a storage path that leaves the root: {relpath!r}")
        return f"{self.root}/{rel}"

    def local_path(self, relpath: str) -> Path:
        """The on-disk path of a stored file (local storage only)."""
        if not self.is_local:
            raise RuntimeError("local_path() needs a local data dir; use fetch_local() for remote storage")
        return Path(self.full(relpath))

    def exists(self, relpath: str) -> bool:
        return bool(self.fs.exists(self.full(relpath)))

    def size(self, relpath: str) -> int | None:
        """Bytes of a stored file, or None when it is gone."""
        try:
            return int(self.fs.size(self.full(relpath)))
        except (FileNotFoundError, OSError):
            return None

    def write_stream(self, src: BinaryIO, relpath: str, *, limit: int | None = None) -> StoredFile:
        """Copy ``src`` to ``relpath`` atomically, hashing on the way; UploadTooLarge past ``limit`` bytes."""
        target = self.full(relpath)
        parent = target.rsplit("/", 1)[0]
        digest = hashlib.sha256()
        size = 0
        chunks = StreamChunkHasher()  # the same bytes, per 64 MiB chunk, in a second thread (service.chunk_digests)

        def copy(out: BinaryIO) -> None:
            nonlocal size
            for chunk in iter(lambda: src.read(CHUNK), b""):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise UploadTooLarge(limit)
                chunks.update(chunk)
                digest.update(chunk)
                out.write(chunk)

        with chunks:
            if self.is_object_store:
                upload = self.fs.open(target, "wb", autocommit=False)  # parts stay invisible until commit()
                try:
                    with upload:
                        copy(upload)
                    digests = chunks.result()
                    upload.commit()
                except BaseException:
                    upload.discard()  # abort the multipart upload: nothing appears, an older object stays
                    raise
                return StoredFile(path=relpath, size=size, sha256=digest.hexdigest(), chunks=digests)
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open(tmp, "wb") as out:
                    copy(out)
                digests = chunks.result()
                self.fs.mv(tmp, target)
            except BaseException:
                self._remove_quietly(tmp)
                raise
            return StoredFile(path=relpath, size=size, sha256=digest.hexdigest(), chunks=digests)

    def put_file(self, local: str | os.PathLike, relpath: str, *, sha256: str | None = None) -> StoredFile:
        """Move (local storage) or upload (remote) a finished local file into place, atomically.

        ``sha256``: the file's hash, computed by the caller from exactly the bytes it wrote (the supervisor
        hashes the artifact while receiving it into its private run folder); the file is then not read again
        just to hash it. Without it, the file is hashed here.
        """
        sha = sha256 if sha256 is not None else sha256_file(local)
        size = os.path.getsize(local)
        target = self.full(relpath)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            os.replace(local, target)  # same folder: an atomic rename
        elif self.is_object_store:
            self.fs.put_file(str(local), target)  # a PUT or a multipart upload: visible only once complete
        else:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            self.fs.put_file(str(local), tmp)
            self.fs.mv(tmp, target)
        return StoredFile(path=relpath, size=size, sha256=sha)

    @contextmanager
    def open(self, relpath: str) -> Iterator[BinaryIO]:
        with self.fs.open(self.full(relpath), "rb") as fh:
            yield fh

    @contextmanager
    def fetch_local(self, relpath: str | None) -> Iterator[Path | None]:
        """A local path to read ``relpath`` from: the file itself when local, else a temporary copy."""
        if relpath is None:
            yield None
            return
        if self.is_local:
            yield self.local_path(relpath)
            return
        with tempfile.TemporaryDirectory(prefix="certiprune-") as tmp:
            dest = Path(tmp) / Path(relpath).name
            self.fs.get_file(self.full(relpath), str(dest))
            yield dest

    def work_dir(self, job_id: str) -> Path:
        """A local scratch folder for one job's run (inside the job folder when local, so renames are atomic)."""
        if self.is_local:
            path = self.local_path(job_dir(job_id))
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(tempfile.mkdtemp(prefix=f"certiprune-{job_id}-"))

    def remove_tree(self, relpath: str) -> None:
        target = self.full(relpath)
        if self.is_local:
            shutil.rmtree(target, ignore_errors=True)
        elif self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def writable(self) -> bool:
        probe = self.full(f".probe-{uuid.uuid4().hex}")
        try:
            with self.fs.open(probe, "wb") as fh:
                fh.write(b"ok")
            self.fs.rm(probe)
            return True
        except OSError:
            return False

    def _remove_quietly(self, full_path: str) -> None:
        try:
            if self.fs.exists(full_path):
                self.fs.rm(full_path)
        except OSError:
            pass


def open_uri(uri: str, options: dict[str, Any] | None = None) -> BinaryIO:
    """Open a dataset URI (any fsspec protocol) for reading; the caller checked it is allowed."""
    options = storage_options(uri) if options is None else options
    return fsspec.open(uri, "rb", **options).open()


__all__ = ["Storage", "StoredFile", "UploadTooLarge", "job_dir", "open_uri", "sha256_file", "storage_options"]
