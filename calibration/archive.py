"""The structural check of an uploaded model archive, without torch and without unpickling.

Two formats, told apart by content: TorchScript (``torch.jit.save``: a zip with ``code/``) and
torch.export (``torch.export.save``, ``.pt2``: a zip with ``archive_format`` = ``pt2``; checked by
:func:`calibration.pt2_archive.check_pt2`).

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
from .pt2_archive import ACCEPTED, check_pt2, is_pt2


def _first_local_name(path: Path) -> str | None:
    """The name in the zip's first local file header (offset 0), None if there is none."""
    with open(path, "rb") as fh:
        head = fh.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return None
        n = int.from_bytes(head[26:28], "little")
        return fh.read(n).decode("utf-8" if int.from_bytes(head[6:8], "little") & 0x800 else "cp437", "replace")


def check_archive(path: str | os.PathLike, *, torch_reader: bool = False) -> None:
    """Cheap check that needs no unpickling (safe in the API process): the archive's structure, then
    (a .pt2 archive: :func:`calibration.pt2_archive.check_pt2`) its TorchScript code text against the operator allowlist (``op_allowlist.scan_archive``; refused
    with ``model_uses_forbidden_op``). ``torch_reader=True`` also reads the code records with torch's
    own zip reader, as ``load_model`` does right before ``torch.jit.load``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file {p.name!r} does not exist.", code="model_not_found")
    if p.stat().st_size == 0:
        raise ModelError("The model file is empty. " + ACCEPTED, code="model_not_torchscript")
    if not zipfile.is_zipfile(p):
        with open(p, "rb") as fh:
            starts_like_zip = fh.read(4) == b"PK\x03\x04"
        if starts_like_zip:  # the central directory sits at the end: an interrupted upload or copy
            raise ModelError(
                "The model archive is truncated or corrupt: it starts like a zip file but has no central directory. "
                "Upload the complete file written by torch.jit.save or torch.export.save.",
                code="model_corrupt",
            )
        raise ModelError(
            "The model file is neither a TorchScript archive nor a torch.export archive (not a zip file). Save it "
            "with torch.jit.save(torch.jit.script(model), 'model.pt') or "
            "torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2').",
            code="model_not_torchscript",
        )
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            total = sum(i.file_size for i in zf.infolist())
            first = zf.infolist()[0] if names else None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"The model archive is corrupt or truncated: {exc}.", code="model_corrupt") from exc
    if first is not None and first.filename != _first_local_name(p):
        # the directory found is not this file's own: e.g. a truncated .pt2 whose last stored entry (a
        # torch.save zip of the sample inputs) still ends in a directory of its own
        raise ModelError(
            "The model archive is truncated or corrupt: its zip directory does not describe the file's first entry "
            "(an interrupted upload or copy?). Upload the complete file written by torch.jit.save or torch.export.save.",
            code="model_corrupt")
    if total > 16 * 1024**3:
        raise ModelError(
            f"The model archive expands to {total / 1024**3:.1f} GiB (limit 16 GiB); refusing a possible zip bomb.",
            code="model_too_large",
        )
    if is_pt2(p):
        check_pt2(p)
        if torch_reader:
            from .exported import _TorchReader

            check_pt2(p, reader=_TorchReader(p))
        return
    if not any("/code/" in n.lower() for n in names):  # torch looks records up case-insensitively
        if any(n.endswith("data.pkl") for n in names):
            raise ModelError(
                "The file is a pickled PyTorch checkpoint (torch.save), not a model archive. " + ACCEPTED,
                code="model_is_pickle_checkpoint",
            )
        raise ModelError("The zip file is neither a TorchScript archive (no code/ folder) nor a torch.export "
                         "archive (no archive_format 'pt2'). " + ACCEPTED, code="model_not_torchscript")
    scan_archive(p, torch_reader=torch_reader)
