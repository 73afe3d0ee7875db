"""Load TorchScript models, find their prunable weights, save the pruned artifact.

Uploaded archives are untrusted code (a TorchScript archive is a program): the service only
calls these functions inside a worker process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import ModelError, exception_summary
from .op_allowlist import scan_archive

#: Module types whose ``weight`` is prunable (SPEC §2). Names are TorchScript ``original_name``s.
PRUNABLE_TYPES = frozenset(
    {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"}
)
BATCHNORM_TYPES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable weight tensor: ``name`` is the parameter name (``features.0.weight``)."""

    name: str
    module_path: str
    module_type: str
    param: torch.nn.Parameter

    @property
    def numel(self) -> int:
        return self.param.numel()


def _module_type(module: torch.nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)


@contextlib.contextmanager
def quiet_torchscript_warnings() -> Iterator[None]:
    """TorchScript is deprecated in new torch; users should not see that on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.*")
        yield


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


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript archive in eval mode; refuse what cannot be pruned.

    The operator allowlist is checked again here, on the bytes torch's reader will hand to the
    compiler, because ``torch.jit.load`` already runs the archive's ``__setstate__`` code."""
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


def find_prunable(module: torch.nn.Module, *, exclude_first_last: bool = False) -> list[PrunableWeight]:
    """Weights of Conv*/ConvTranspose*/Linear modules, in module order (biases never)."""
    found: list[PrunableWeight] = []
    for path, sub in module.named_modules():
        mtype = _module_type(sub)
        if mtype not in PRUNABLE_TYPES:
            continue
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        name = f"{path}.weight" if path else "weight"
        found.append(PrunableWeight(name=name, module_path=path, module_type=mtype, param=weight))
    if exclude_first_last and len(found) > 2:
        found = found[1:-1]
    if not found:
        raise ModelError(
            "The model has no prunable weights (Conv*, ConvTranspose*, Linear modules with a weight "
            "of two or more dimensions)" + (" besides the first and last layer" if exclude_first_last else "") + ".",
            code="model_no_prunable_weights",
        )
    return found


def batchnorm_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for _, m in module.named_modules() if _module_type(m) in BATCHNORM_TYPES]


def is_traced(module: torch.nn.Module) -> bool:
    return "Traced" in type(module).__name__


def save_model(module: torch.jit.ScriptModule, path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename): a half-written artifact is never visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        with quiet_torchscript_warnings():
            module.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    "PrunableWeight",
    "batchnorm_modules",
    "check_archive",
    "find_prunable",
    "is_traced",
    "load_model",
    "resolve_device",
    "save_model",
]
