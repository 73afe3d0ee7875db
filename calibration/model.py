"""Load models, find their prunable weights, save the pruned artifact.

Two formats, told apart by content: TorchScript archives and torch.export ``.pt2`` archives
(:mod:`calibration.exported`); the artifact is written in the format of the upload. Uploaded archives
are untrusted code (a TorchScript archive is a program; ``torch.export.load`` unpickles): the service
only calls these functions inside a worker process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .errors import ModelError, exception_summary
from .archive import check_archive
from .discovery import Discovery, PrunableWeight, batchnorm_modules, discover
from .exported import is_exported, load_exported, save_exported
from .pt2_archive import is_pt2

@contextlib.contextmanager
def quiet_torchscript_warnings() -> Iterator[None]:
    """TorchScript is deprecated in new torch; users should not see that on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.*")
        yield


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a TorchScript archive in eval mode, or a ``.pt2`` archive (:func:`calibration.exported.load_exported`,
    which says what it checks); refuse what cannot be pruned.

    The operator allowlist is checked again here, on the bytes torch's reader will hand to the
    compiler, because ``torch.jit.load`` already runs the archive's ``__setstate__`` code."""
    if is_pt2(path):
        check_archive(path)  # the structure and the zip-bomb limit first; load_exported re-checks with torch's reader
        module = load_exported(path, device)
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    check_archive(path, torch_reader=True)
    with quiet_torchscript_warnings():
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # torch raises RuntimeError with C++ text
            first = exception_summary(exc)
            raise ModelError(f"The TorchScript archive could not be loaded: {first}",
                             code="model_load_failed") from exc
    module.eval()
    if not list(module.parameters()):
        raise ModelError(
            "Cannot prune a frozen model: the archive has no parameters (torch.jit.freeze inlines "
            "weights as constants). Upload the model before freezing.",
            code="model_frozen",
        )
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def find_prunable(module: torch.nn.Module, *, exclude_first_last: bool = False,
                  include: list[str] | tuple[str, ...] | None = None,
                  exclude: list[str] | tuple[str, ...] = ()) -> list[PrunableWeight]:
    """The candidate weights, in module order (SPEC §2; rules in :mod:`calibration.discovery`)."""
    return discover_prunable(module, exclude_first_last=exclude_first_last, include=include,
                             exclude=exclude).weights


def discover_prunable(module: torch.nn.Module, *, exclude_first_last: bool = False,
                      include: list[str] | tuple[str, ...] | None = None,
                      exclude: list[str] | tuple[str, ...] = ()) -> Discovery:
    """:func:`calibration.discovery.discover`, refusing a model with no candidate."""
    found = discover(module, exclude_first_last=exclude_first_last, include=include, exclude=exclude)
    if not found.weights:
        why = "; ".join(f"{k}: {v}" for k, v in list(found.not_candidates.items())[:8])
        raise ModelError(
            "The model has no prunable weights (weights of linear maps, convolutions, matrix products or RNNs, "
            "of two or more dimensions, that are not embeddings)"
            + (" besides the first and last layer" if exclude_first_last else "")
            + (f". Not candidates: {why}" if why else "") + ".",
            code="model_no_prunable_weights",
        )
    return found


def is_traced(module: torch.nn.Module) -> bool:
    return "Traced" in type(module).__name__


def save_model(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename): a half-written artifact is never visible. A module loaded from a
    ``.pt2`` archive is written as one (``torch.export.save``), a TorchScript module as TorchScript.

    The archive's inner folder is named after the file, so the temporary file gets the final name inside
    a private temporary folder: the same model saved to the same name gives the same bytes (a job's
    artifact checksum does not depend on a random temporary name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        if is_exported(module):
            save_exported(module, tmp)
        else:
            with quiet_torchscript_warnings():
                module.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_dir.rmdir()


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError("The config asks for device 'cuda' but no CUDA device is available on this worker.",
                              code="cuda_unavailable")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "Discovery",
    "PrunableWeight",
    "batchnorm_modules",
    "check_archive",
    "discover_prunable",
    "find_prunable",
    "is_exported",
    "is_traced",
    "load_model",
    "resolve_device",
    "save_model",
]
