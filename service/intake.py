"""Intake: store uploaded files and validate them in the API process without running them.

The model is only checked structurally (``calibration.archive.check_archive``): a TorchScript
archive is a program, so loading it is left to the sandboxed worker process. Data is parsed
with ``allow_pickle=False``. Every failure becomes an ``ApiError`` with the calibration code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

import httpx

from calibration.config import LABELLED_RISKS, CertifyConfig, validate_config
from calibration.data import load_calibration
from calibration.errors import CalibrationError
from calibration.archive import check_archive
from calibration.signature import archive_forward_signature, match_inputs

from .errors import ApiError
from .middleware import too_large_message
from .storage import Storage, StoredFile, UploadTooLarge, open_uri


@dataclass(frozen=True)
class DataSummary:
    n: int
    x_shape: list[int]
    has_labels: bool
    input_names: list[str] | None = None  # the input arrays ('x', or forward-argument names); None: not known here
    labels_ndim: int | None = None  # 1: class labels (N,), 2: per-position labels (N, T); None: not known here


#: HTTP status of a ``calibration`` error by its code (the science knows no HTTP): every bad input the
#: science refuses is 422 Unprocessable Content unless listed here (none is, today).
HTTP_STATUS_BY_CODE: dict[str, int] = {}


def calibration_error(exc: CalibrationError) -> ApiError:
    return ApiError(HTTP_STATUS_BY_CODE.get(exc.code, 422), exc.code, str(exc))


def parse_config(raw: str | None) -> CertifyConfig:
    """The ``config`` form field: a JSON object, validated by ``calibration.validate_config``."""
    if raw is None or not raw.strip():
        return validate_config({})
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_config_json",
                       f"The 'config' field must be a JSON object; it is not valid JSON ({exc.msg} at "
                       f"position {exc.pos}).") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_config", f"The 'config' field must be a JSON object; got {type(value).__name__}.")
    try:
        return validate_config(value)
    except CalibrationError as exc:
        raise calibration_error(exc) from exc


def data_extension(head: bytes) -> str:
    return "npz" if head[:2] == b"PK" else "safetensors"


def save_stream(storage: Storage, src: BinaryIO, relpath: str, limit: int) -> StoredFile:
    try:
        return storage.write_stream(src, relpath, limit=limit)
    except UploadTooLarge as exc:
        raise ApiError(413, "upload_too_large", too_large_message(exc.limit)) from exc


def peek(src: BinaryIO, n: int = 8) -> bytes:
    head = src.read(n)
    src.seek(0)
    return head


def check_model(storage: Storage, relpath: str) -> None:
    with storage.fetch_local(relpath) as path:
        try:
            check_archive(path)
        except CalibrationError as exc:
            raise calibration_error(exc) from exc


def check_data(storage: Storage, relpath: str, *, max_inflated_bytes: int | None = None) -> DataSummary:
    with storage.fetch_local(relpath) as path:
        try:
            data = load_calibration(path, max_inflated_bytes=max_inflated_bytes)
        except CalibrationError as exc:
            raise calibration_error(exc) from exc
    return DataSummary(n=data.n, x_shape=[int(d) for d in data.x.shape], has_labels=data.has_labels,
                       input_names=data.input_names, labels_ndim=None if data.y is None else int(data.y.ndim))


def check_inputs_for_model(storage: Storage, model_relpath: str, summary: DataSummary) -> None:
    """The data's input arrays against the model's forward arguments, read from the archive's code text
    (no torch, nothing unpickled; calibration.signature). A signature that cannot be read here is left to
    the worker, which checks the same rule on the loaded module."""
    if summary.input_names is None:
        return
    with storage.fetch_local(model_relpath) as path:
        signature = archive_forward_signature(path)
    if signature is None:
        return
    try:
        match_inputs(signature, summary.input_names)
    except CalibrationError as exc:
        raise calibration_error(exc) from exc


def check_uncertainty(storage: Storage, relpath: str) -> None:
    """Header-only check of a safetensors file (the worker checks it against the model)."""
    with storage.open(relpath) as fh:
        head = fh.read(8)
        size_ok = len(head) == 8
        header_len = int.from_bytes(head, "little") if size_ok else 0
        body = fh.read(min(header_len, 100 * 1024**2)) if 2 <= header_len <= 100 * 1024**2 else b""
    try:
        header = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ApiError(422, "invalid_uncertainty",
                       "The 'uncertainty' file is not a .safetensors file (its header could not be read). Save the "
                       "training statistics with the certiprune recorder helper.")


def check_labels_for_risk(config: CertifyConfig, summary: DataSummary) -> None:
    if config.risk in LABELLED_RISKS and not summary.has_labels:
        raise ApiError(422, "labels_required",
                       f"The risk {config.risk!r} needs labels, but the data set has no 'y' array. Upload labels "
                       "or use risk 'disagreement', which certifies without labels.")
    if summary.labels_ndim is not None and config.risk != "token_disagreement":
        sequence = config.risk == "token_accuracy_drop"  # the labelled sequence risk
        if summary.labels_ndim == 2 and not sequence:
            raise ApiError(422, "data_bad_labels",
                           "'y' has shape (n_samples, T): labels per position are for the sequence risks. Use risk "
                           "'token_accuracy_drop' (or 'token_disagreement'), or give one class label per sample, "
                           "shape (n_samples,).")
        if summary.labels_ndim == 1 and sequence:
            raise ApiError(422, "data_bad_labels",
                           "The risk 'token_accuracy_drop' needs a label per position, 'y' of shape (n_samples, T) "
                           "(-100: ignored); the data set has one label per sample.")


def _is_within(uri: str, root: str) -> bool:
    if root.endswith("/"):
        return uri.startswith(root)
    return uri == root or uri.startswith(root + "/")


#: Schemes a dataset URI may use when a configured root allows its location (others only when a root names them).
READABLE_SCHEMES = frozenset({"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _non_global_address(host: str) -> str | None:
    """The first address ``host`` is or resolves to that is not on the public internet (loopback,
    private, link-local such as 169.254.169.254, reserved...), else None."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except (OSError, UnicodeError):
            return None  # unresolvable: opening it fails later with dataset_unreadable
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        if not address.is_global:
            return str(address)
    return None


def dataset_uri_problem(uri: str, roots: list[str]) -> tuple[str, str] | None:
    """Why the server refuses to read the dataset ``uri``, as (code, message); None when it may.

    A URI must lie under a configured root (after resolving local paths: no '..', no symlinks
    out), use that root's scheme, chain no fsspec protocols ('::'), and — for http(s) — name no
    user info and no host that is or resolves to a non-public address (cloud metadata at
    169.254.169.254, loopback, private networks) unless a root names that very IP address.
    """
    allowed = "; allowed: ds_ ids" + (" and URIs under " + ", ".join(repr(r) for r in roots) if roots else " only")
    if any(ord(c) < 32 for c in uri) or "::" in uri:
        return ("dataset_scheme_not_allowed",
                f"The dataset {uri!r} uses control characters or chains fsspec protocols ('::'){allowed}.")
    scheme = _scheme(uri)
    if scheme == "file" and not uri.removeprefix("file://").startswith("/"):
        return ("dataset_not_allowed",
                f"The dataset {uri!r} is neither a ds_ id nor an absolute path or URL{allowed}. Upload it with "
                "POST /v1/datasets.")
    if scheme not in READABLE_SCHEMES and scheme not in {_scheme(r) for r in roots}:
        return ("dataset_scheme_not_allowed",
                f"The dataset {uri!r} uses the scheme {scheme!r}, which this server does not read from{allowed}. "
                "Upload it with POST /v1/datasets.")
    if scheme != "file" and any(t in uri.lower() for t in ("%2e", "%2f", "%5c", "\\")):
        return ("dataset_not_allowed",
                f"The dataset URL {uri!r} contains encoded dots or slashes, which could leave the allowed location.")
    if not allowed_dataset_uri(uri, roots):
        return ("dataset_not_allowed",
                f"The dataset {uri!r} is not under a location this server allows (CERTIPRUNE_ALLOWED_DATASET_ROOTS)"
                f"{allowed}. Upload it with POST /v1/datasets.")
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        host = parts.hostname or ""
        if parts.username is not None or parts.password is not None:
            return ("dataset_not_allowed", f"The dataset URL {uri!r} must not carry user info ('user@host').")
        literal_roots = {urlsplit(r).hostname for r in roots if _scheme(r) in ("http", "https")}
        private = _non_global_address(host)
        if private is not None and not (host in literal_roots and private == host.strip("[]")):
            return ("dataset_address_not_allowed",
                    f"The dataset URL {uri!r} points at the non-public address {private}; the server does not "
                    "fetch from loopback, private or link-local addresses (e.g. cloud metadata).")
    return None


def allowed_dataset_uri(uri: str, roots: list[str]) -> bool:
    """``uri`` lies under one of the configured roots (after resolving local paths; no '..' tricks)."""
    if not roots:
        return False
    is_local = "://" not in uri or uri.startswith("file://")
    if is_local:
        real = os.path.realpath(uri.removeprefix("file://"))
        for root in roots:
            if "://" in root and not root.startswith("file://"):
                continue
            real_root = os.path.realpath(root.removeprefix("file://"))
            if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
                return True
        return False
    path = uri.split("://", 1)[1]
    if any(part in ("..", ".") for part in path.split("/")):
        return False
    return any(_is_within(uri, root) for root in roots if "://" in root and not root.startswith("file://"))


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (an HTTP body), for ``io.BufferedReader``."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            self._pending = next(self._chunks, b"")
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@contextlib.contextmanager
def _open_http(uri: str, roots: list[str]) -> Iterator[io.BufferedReader]:
    """GET ``uri`` (no redirects, no proxies from the environment) and check the address the connection
    *really* reached before a byte of the body is read: a host whose DNS answer changed between
    :func:`dataset_uri_problem` and this fetch (DNS rebinding) is refused like a private address."""
    host = urlsplit(uri).hostname or ""
    literal_roots = {urlsplit(r).hostname for r in roots if _scheme(r) in ("http", "https")}
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=httpx.Timeout(30.0)) as client, \
            client.stream("GET", uri) as response:
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if peer is None:
            raise OSError("the connection's peer address is unknown, so it cannot be checked")
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        if not address.is_global and not (host in literal_roots and str(address) == host.strip("[]")):
            raise ApiError(422, "dataset_address_not_allowed",
                           f"The dataset URL {uri!r} connected to the non-public address {address}; the server does "
                           "not fetch from loopback, private or link-local addresses (e.g. cloud metadata).")
        if response.status_code != 200:
            hint = " (redirects are not followed)" if response.is_redirect else ""
            raise OSError(f"HTTP {response.status_code}{hint}")
        yield io.BufferedReader(_ChunkReader(response.iter_bytes()), buffer_size=1 << 20)


def copy_dataset_uri(storage: Storage, uri: str, relpath_base: str, limit: int, roots: list[str]) -> StoredFile:
    """Snapshot an allowed dataset URI into the job folder (the job never changes under the user's feet).

    http(s) redirects are not followed: the checked URL is the one read, never a location it names;
    and the address actually connected to is checked again (see :func:`_open_http`).
    """
    if storage.is_local and ("://" not in uri or uri.startswith("file://")):
        real = os.path.realpath(uri.removeprefix("file://"))
        if real == storage.root or real.startswith(storage.root + "/"):
            # never read the server's own files (the job store: reading it through another handle can drop
            # SQLite's locks; other tenants' uploads) on behalf of a request
            raise ApiError(422, "dataset_not_allowed",
                           f"The dataset {uri!r} lies inside the server's data dir; give a ds_ id instead.")
    with contextlib.ExitStack() as stack:
        try:
            if _scheme(uri) in ("http", "https"):
                src: BinaryIO = stack.enter_context(_open_http(uri, roots))  # type: ignore[arg-type]
                head = src.peek(8)[:8]  # type: ignore[attr-defined]
            else:
                src = stack.enter_context(open_uri(uri.removeprefix("file://") if uri.startswith("file://") else uri))
                head = peek(src)
        except (OSError, ValueError, httpx.HTTPError) as exc:
            raise ApiError(422, "dataset_unreadable", f"The dataset {uri!r} could not be opened: {exc}") from exc
        try:
            return save_stream(storage, src, f"{relpath_base}.{data_extension(head)}", limit)
        except httpx.HTTPError as exc:
            raise ApiError(422, "dataset_unreadable", f"The dataset {uri!r} could not be read: {exc}") from exc


IDEMPOTENCY_KEY_MAX = 200


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: 1 to 200 visible ASCII characters (None when absent)."""
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not all(33 <= ord(c) < 127 for c in key):
        raise ApiError(422, "invalid_idempotency_key",
                       f"The Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters "
                       f"(e.g. a UUID); got {len(key)} character(s).")
    return key


def sha256_stream(src: BinaryIO) -> str:
    """sha256 of a seekable upload, leaving it at position 0."""
    digest = hashlib.sha256()
    src.seek(0)
    for chunk in iter(lambda: src.read(1024 * 1024), b""):
        digest.update(chunk)
    src.seek(0)
    return digest.hexdigest()


__all__ = [
    "DataSummary",
    "allowed_dataset_uri",
    "calibration_error",
    "check_data",
    "check_idempotency_key",
    "check_inputs_for_model",
    "check_labels_for_risk",
    "check_model",
    "check_uncertainty",
    "copy_dataset_uri",
    "data_extension",
    "dataset_uri_problem",
    "parse_config",
    "peek",
    "save_stream",
    "sha256_stream",
]
