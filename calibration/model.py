"""Load TorchScript models, find their prunable weights, save the pruned artifact.

Uploaded archives are untrusted code (a TorchScript archive is a program): the service only
calls these functions inside a worker process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import ModelError, exception_summary
from .archive import check_archive

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
