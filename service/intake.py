"""Intake: store uploaded files and validate them in the API process without running them.

The model is only checked structurally (``calibration.model.check_archive``): a TorchScript
archive is a program, so loading it is left to the sandboxed worker process. Data is parsed
with ``allow_pickle=False``. Every failure becomes an ``ApiError`` with the calibration code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

from calibration.config import LABELLED_RISKS, CertifyConfig, validate_config
from calibration.data import load_calibration
from calibration.errors import CalibrationError
from calibration.model import check_archive

from .errors import ApiError
from .middleware import too_large_message
from .storage import Storage, StoredFile, UploadTooLarge, open_uri


@dataclass(frozen=True)
class DataSummary:
    n: int
    x_shape: list[int]
    has_labels: bool


def calibration_error(exc: CalibrationError) -> ApiError:
    return ApiError(getattr(exc, "http_status", 422) or 422, exc.code, str(exc))


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


def check_data(storage: Storage, relpath: str) -> DataSummary:
    with storage.fetch_local(relpath) as path:
        try:
            data = load_calibration(path)
        except CalibrationError as exc:
            raise calibration_error(exc) from exc
    return DataSummary(n=data.n, x_shape=[int(d) for d in data.x.shape], has_labels=data.has_labels)


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


def _is_within(uri: str, root: str) -> bool:
    if root.endswith("/"):
        return uri.startswith(root)
    return uri == root or uri.startswith(root + "/")


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


def copy_dataset_uri(storage: Storage, uri: str, relpath_base: str, limit: int) -> StoredFile:
    """Snapshot an allowed dataset URI into the job folder (the job never changes under the user's feet)."""
    try:
        src = open_uri(uri.removeprefix("file://") if uri.startswith("file://") else uri)
    except (OSError, ValueError) as exc:
        raise ApiError(422, "dataset_unreadable", f"The dataset {uri!r} could not be opened: {exc}") from exc
    with src:
        head = src.read(8)
        src.seek(0)
        return save_stream(storage, src, f"{relpath_base}.{data_extension(head)}", limit)


__all__ = [
    "DataSummary", "allowed_dataset_uri", "calibration_error", "check_data", "check_labels_for_risk",
    "check_model", "check_uncertainty", "copy_dataset_uri", "data_extension", "parse_config", "peek", "save_stream",
]
