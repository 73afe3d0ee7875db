"""The structural check of an uploaded TorchScript archive, without torch and without unpickling.

It runs in the API process at admission (which must not import torch: a cold import costs seconds
and the API never executes user code) and again in the sandboxed child right before
``torch.jit.load`` (with ``torch_reader=True``, on the bytes torch's own reader returns).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .errors import ModelError
from .op_allowlist import scan_archive


def check_archive(path: str | os.PathLike, *, torch_reader: bool = False) -> None:
    """Cheap check that needs no unpickling (safe in the API process): the archive's structure, then
    its TorchScript code text against the operator allowlist (``op_allowlist.scan_archive``; refused
    with ``model_uses_forbidden_op``). ``torch_reader=True`` also reads the code records with torch's
    own zip reader, as ``load_model`` does right before ``torch.jit.load``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file {p.name!r} does not exist.", code="model_not_found")
    if p.stat().st_size == 0:
        raise ModelError("The model file is empty. Upload a TorchScript archive (torch.jit.save).",
                         code="model_not_torchscript")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
            starts_like_zip = fh.read(4) == b"PK\x03\x04"
        if starts_like_zip:  # the central directory sits at the end: an interrupted upload or copy
            raise ModelError(
                "The model archive is truncated or corrupt: it starts like a zip file but has no central directory. "
                "Upload the complete file written by torch.jit.save.",
                code="model_corrupt",
            )
        raise ModelError(
            "The model file is not a TorchScript archive (not a zip file). Save it with "
            "torch.jit.save(torch.jit.script(model), 'model.pt').",
            code="model_not_torchscript",
        )
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"The model archive is corrupt or truncated: {exc}.", code="model_corrupt") from exc
    if total > 16 * 1024**3:
        raise ModelError(
            f"The model archive expands to {total / 1024**3:.1f} GiB (limit 16 GiB); refusing a possible zip bomb.",
            code="model_too_large",
        )
    if not any("/code/" in n.lower() for n in names):  # torch looks records up case-insensitively
        if any(n.endswith("data.pkl") for n in names):
            raise ModelError(
                "The file is a pickled PyTorch checkpoint (torch.save), not a TorchScript archive. "
                "Export it with torch.jit.save(torch.jit.script(model), 'model.pt').",
                code="model_is_pickle_checkpoint",
            )
        raise ModelError("The zip file is not a TorchScript archive (no code/ folder).",
                         code="model_not_torchscript")
    scan_archive(p, torch_reader=torch_reader)
