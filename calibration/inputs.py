"""What a model is fed and what of its output is taken as logits (SPEC §4; issue 13, items 1–2).

Inputs. A data file holds either one input array ``x`` (the model's only, or first, forward
argument), or arrays named after the model's forward arguments (``input_ids``, ``attention_mask``,
…), matched to ``module.forward.schema``. Integer arrays stay int64 end to end (token ids), floats
are float32, booleans stay bool. Several inputs travel together as :class:`ModelInputs`, which
slices, gathers and moves every input with the same rows, so batches are always consistent.

Outputs. A tensor is the logits; a tuple/list gives its first tensor, a dict its ``logits`` entry;
the config field ``output`` (an index or a key) picks another entry. Anything else is refused with
``model_bad_output`` naming what the model returned.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data import take_rows
from .errors import ModelError
from .signature import match_inputs


class ModelInputs:
    """Several forward arguments of the same samples (first axis), moved and sliced together."""

    __slots__ = ("names", "tensors")

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        self.names = tuple(names)
        self.tensors = tuple(tensors)

    # --- tensor-like surface used by the evaluation loops (first axis = samples)
    def __getitem__(self, index: Any) -> "ModelInputs":
        return ModelInputs(self.names, [t[index.to(t.device) if isinstance(index, torch.Tensor) else index]
                                        for t in self.tensors])

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.tensors[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def dim(self) -> int:
        return self.tensors[0].dim()

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def element_size(self) -> int:
        return self.tensors[0].element_size()

    def is_floating_point(self) -> bool:
        return False  # never reformatted as one image batch (channels_last) nor rounded as one tensor

    def to(self, *args: Any, **kwargs: Any) -> "ModelInputs":
        return ModelInputs(self.names, [t.to(*args, **kwargs) for t in self.tensors])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        return ModelInputs(self.names, [fn(t) for t in self.tensors])

    def clone(self) -> "ModelInputs":
        return self.map(torch.Tensor.clone)

    def contiguous(self, **kwargs: Any) -> "ModelInputs":
        return self

    def copy_(self, other: "ModelInputs") -> "ModelInputs":
        for dst, src in zip(self.tensors, other.tensors):
            dst.copy_(src)
        return self

    def describe(self) -> str:
        return ", ".join(f"{n} {_tensor_text(t)}" for n, t in zip(self.names, self.tensors))

    def __repr__(self) -> str:
        return f"ModelInputs({self.describe()})"


def _tensor_text(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"


def call(fn: Callable[..., Any], xb: Any) -> Any:
    """``fn(xb)``, or ``fn(*inputs)`` for several inputs."""
    if isinstance(xb, ModelInputs):
        return fn(*xb.tensors)
    return fn(xb)


def describe_batch(xb: Any) -> str:
    if isinstance(xb, ModelInputs):
        return xb.describe()
    return f"shape {_tensor_text(xb)}"


# ---------------------------------------------------------------- forward signature

def forward_arguments(module: torch.nn.Module) -> list[tuple[str, bool]] | None:
    """(name, has_default) of each forward argument after ``self``; None when it cannot be read."""
    from .exported import forward_arguments as exported_arguments, is_exported

    if is_exported(module):  # a torch.export program: its user inputs (calibration.exported)
        return exported_arguments(module)
    try:
        schema = module.forward.schema  # type: ignore[union-attr]
        args = list(schema.arguments)
    except Exception:
        return None
    if args and (args[0].name == "self" or isinstance(args[0].type, torch._C.ClassType)):
        args = args[1:]  # the module itself, whatever its parameter is called
    return [(a.name, bool(a.has_default_value())) for a in args]


def bind_inputs(module: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Check the data's input arrays against the forward signature; the names in call order
    (the rule: :func:`calibration.signature.match_inputs`)."""
    return match_inputs(forward_arguments(module), names)


def gather(inputs: dict[str, np.ndarray], order: Sequence[str], rows: np.ndarray) -> Any:
    """The host tensors of ``rows``: one tensor, or :class:`ModelInputs` in call ``order``."""
    tensors = [torch.from_numpy(take_rows(inputs[n], rows)) for n in order]
    if len(tensors) == 1:
        return tensors[0]
    return ModelInputs(order, tensors)


# ---------------------------------------------------------------- outputs

def describe_output(v: Any) -> str:
    """What a model returned, for error messages: types, keys and shapes (the first 8 entries)."""
    if isinstance(v, torch.Tensor):
        return f"Tensor{_tensor_text(v)}"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__} of {len(v)} [" + ", ".join(describe_output(e) for e in list(v)[:8]) + \
            (", …" if len(v) > 8 else "") + "]"
    if isinstance(v, dict):
        items = list(v.items())[:8]
        return "dict {" + ", ".join(f"{k!r}: {describe_output(e)}" for k, e in items) + \
            (", …" if len(v) > 8 else "") + "}"
    return type(v).__name__


def select_output(out: Any, output: int | str | None = None) -> Any:
    """The logits tensor of a model's output (see the module docstring); ModelError otherwise."""
    if isinstance(out, torch.Tensor) and output is None:
        return out
    if isinstance(out, dict):
        key = "logits" if output is None else output
        if not isinstance(key, str):
            raise ModelError(f"The config's output={output!r} is an index but the model returned a "
                             f"{describe_output(out)}; set output to one of its keys.", code="model_bad_output")
        if key not in out:
            raise ModelError(
                f"The model returned a {describe_output(out)} with no {key!r} entry; set the config's 'output' "
                f"to the key of the logits (one of {sorted(map(str, out))}).", code="model_bad_output")
        value = out[key]
    elif isinstance(out, (tuple, list)):
        if output is None:
            value = next((e for e in out if isinstance(e, torch.Tensor)), None)
            if value is None:
                raise ModelError(f"The model returned a {describe_output(out)} holding no tensor.",
                                 code="model_bad_output")
            return value
        if not isinstance(output, int):
            raise ModelError(f"The config's output={output!r} is a key but the model returned a "
                             f"{describe_output(out)}; set output to an index.", code="model_bad_output")
        if not -len(out) <= output < len(out):
            raise ModelError(f"The config's output={output} is out of range: the model returned a "
                             f"{describe_output(out)}.", code="model_bad_output")
        value = out[output]
    else:
        if output is not None:
            raise ModelError(f"The config sets output={output!r} but the model returned a "
                             f"{describe_output(out)}, not a tuple, list or dict.", code="model_bad_output")
        return out
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"The selected output ({output if output is not None else 'default'}) of the model is "
                         f"{describe_output(value)}, not a tensor of logits; the model returned "
                         f"{describe_output(out)}.", code="model_bad_output")
    return value


__all__ = ["ModelInputs", "bind_inputs", "call", "describe_batch", "describe_output", "forward_arguments",
           "gather", "select_output"]
