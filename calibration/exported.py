"""torch.export programs (``.pt2``) in the engine: load, find prunable weights, save (issue 13, item 5).

Loading (only in the sandboxed worker, like TorchScript). ``torch.export.load`` would unpickle
``use_pickle`` weights and constants with ``weights_only=False``, fall back to ``weights_only=False``
for the sample inputs, and ``ep.module()`` ``exec``s the archive's ``guards_code``. So
:func:`load_exported`:

1. checks the archive with :func:`calibration.pt2_archive.check_pt2` on Python's ``zipfile`` *and* on
   the records torch's own zip reader (``PyTorchFileReader``, miniz) returns — entries, pickled
   payloads, op targets, symbolic expressions, names (see that module);
2. reads the weights and constants through torch's ``_load_state_dict``/``_load_constants``, which take
   the raw-bytes path only (every entry was checked to be ``use_pickle: false`` and a ``tensor_``/
   ``weight_`` file, so no ``torch.load`` and no object unpickling is reachable);
3. loads the sample inputs itself with ``torch.load(weights_only=True)`` (dropped when that refuses);
4. deserializes the program with ``ExportedProgramDeserializer`` given those dicts (so
   ``deserialize_torch_artifact`` never sees bytes), and builds the module with
   ``check_guards=False`` (``guards_code`` is kept for the artifact, never executed here).

The module is ``ep.module()``: an FX ``GraphModule`` with the parameters under their original names.
Its graph is specialised to eval mode (admission refuses training-mode exports), so ``train()``/``eval()``
only set flags (torch's versions raise). The program stays attached (CPU) for :func:`save_exported`.

Prunable weights come from the graph (:func:`graph_uses`): the same op tables as TorchScript discovery
(:mod:`calibration.discovery`), followed through views from each ``get_attr`` of a parameter.
"""

from __future__ import annotations

import io
import os
import types
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ModelError, exception_summary
from .pt2_archive import ACCEPTED, check_pt2

#: Attribute of the loaded module holding its (CPU) ExportedProgram, for saving.
PROGRAM_ATTR = "_certiprune_exported_program"

NOT_RECONSTRUCTED = ("an exported (.pt2) program: its layer inputs are not probed (the graph probe reads "
                     "TorchScript graphs), so the weights are masked, not reconstructed")
BN_NOT_REESTIMATED = ("an exported (.pt2) graph is specialised to eval mode: its BatchNorm layers cannot run in "
                      "train mode, so their statistics stay dense")


class _TorchReader:
    """The records as torch's ``PyTorchFileReader`` (the reader torch.export.load uses) returns them."""

    def __init__(self, path: Path) -> None:
        try:
            self.reader = torch._C.PyTorchFileReader(str(path))
            self.names = list(self.reader.get_all_records())
        except Exception as exc:
            raise ModelError(f"The .pt2 archive cannot be read by torch: {exception_summary(exc)}",
                             code="model_corrupt") from exc

    def _size(self, name: str) -> int:
        size_of = getattr(self.reader, "get_record_size", None)  # absent before torch 2.12: read to measure
        return int(size_of(name)) if size_of else len(self.reader.get_record(name))

    def records(self) -> dict[str, int]:
        return {n: self._size(n) for n in self.names}

    def read(self, name: str, limit: int) -> bytes:
        if self._size(name) > limit:
            raise ModelError(f"The .pt2 archive's {name!r} is too large (limit {limit // 1024**2} MiB).",
                             code="model_too_large")
        return bytes(self.reader.get_record(name))


def is_exported(module: Any) -> bool:
    """A module loaded by :func:`load_exported`."""
    return hasattr(module, PROGRAM_ATTR)


def _train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """Flags only: the exported graph is specialised to eval mode whatever ``training`` says."""
    return torch.nn.Module.train(self, mode)


def _eval(self: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Module.train(self, False)


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The checked archive as a GraphModule on ``device`` (see the module docstring for what is checked)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive import _package as package

    path = Path(path)
    first = check_pt2(path)
    torch_reader = _TorchReader(path)
    summary = check_pt2(path, reader=torch_reader)
    if summary.model != first.model or set(torch_reader.names) != set(_zip_records(path)):
        raise ModelError("The .pt2 archive reads differently with two zip readers; certiprune refuses it.",
                         code="model_corrupt")
    model = summary.model
    try:
        with package.PT2ArchiveReader(str(path)) as archive:
            version = archive.read_string("archive_version") if "archive_version" in torch_reader.names else "0"
            if version.strip() != "0":
                raise ModelError(f"The .pt2 archive has version {version.strip()[:20]!r}; this worker reads version "
                                 "0 (torch.export.save of torch 2.x).", code="model_unsupported_format")
            state_dict = package._load_state_dict(archive, model)  # raw bytes only (use_pickle checked false)
            constants = package._load_constants(archive, model)  # tensor_ files only (checked)
            if not isinstance(state_dict, dict) or not isinstance(constants, dict):
                raise ModelError("The .pt2 archive uses the legacy pickled weight format.",
                                 code="model_unsupported_format")
            sample = None
            name = f"data/sample_inputs/{model}.pt"
            if name in torch_reader.names:
                try:
                    sample = torch.load(io.BytesIO(archive.read_bytes(name)), weights_only=True)
                except Exception:
                    sample = None
                if not (isinstance(sample, tuple) and len(sample) == 2):
                    sample = None
            serialized = _bytes_to_dataclass(schema.ExportedProgram, archive.read_bytes(f"models/{model}.json"))
        program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, sample)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"The torch.export archive could not be loaded: {exception_summary(exc)}",
                         code="model_load_failed") from exc
    try:
        running = program
        if torch.device(device).type != "cpu":
            from torch.export.passes import move_to_device_pass

            running = move_to_device_pass(program, torch.device(device))
        module = running.module(check_guards=False)
    except Exception as exc:
        raise ModelError(f"The exported program could not be made into a module: {exception_summary(exc)}",
                         code="model_load_failed") from exc
    module.train = types.MethodType(_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_eval, module)  # type: ignore[method-assign]
    object.__setattr__(module, PROGRAM_ATTR, program)
    if not list(module.parameters()):
        raise ModelError("Cannot prune the exported program: it has no parameters (were they exported as "
                         "constants?). " + ACCEPTED, code="model_frozen")
    return module


def _zip_records(path: Path) -> list[str]:
    from .pt2_archive import Reader

    return list(Reader(path).records())


def save_exported(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """``torch.export.save`` of the upload's program with the module's current parameters and buffers.

    Same graph, signature, constants and guards as the upload: only the values change (copied, on the
    program's device). ``path`` is written as given: the caller does the atomic rename. The bytes depend on
    the values only (torch.export.save of the same program to a file object is byte-identical)."""
    program = getattr(module, PROGRAM_ATTR)
    live = dict(module.named_parameters(remove_duplicate=False))
    live.update(dict(module.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in program.state_dict.items():
            if name not in live:
                raise ModelError(f"The exported program's {name!r} is missing from the loaded module.",
                                 code="model_save_failed")
            if value is not live[name]:
                value.copy_(live[name].to(value.device))
    with open(path, "wb") as fh:  # a file object: the archive's top folder is "archive", whatever the name
        torch.export.save(program, fh)


def forward_arguments(module: torch.nn.Module) -> list[tuple[str, bool]]:
    """(name, has_default) of the program's user inputs: exported programs take exactly those."""
    program = getattr(module, PROGRAM_ATTR)
    names = [s.arg.name for s in program.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT and hasattr(s.arg, "name")]
    for entry in program.module_call_graph:
        if entry.fqn == "" and entry.signature is not None and entry.signature.forward_arg_names:
            names = list(entry.signature.forward_arg_names)
    return [(n, False) for n in names]


#: Ops whose outputs carry their inputs' parameters (views, casts); getitem picks from split/chunk.
_PASS = frozenset({"aten::alias", "aten::_to_copy", "aten::lift_fresh_copy", "aten::as_strided",
                   "aten::_unsafe_view", "aten::permute_copy", "aten::t_copy", "aten::view_copy",
                   "aten::transpose_copy", "aten::expand_copy", "aten::unsqueeze_copy", "aten::squeeze_copy",
                   "aten::slice_copy", "aten::select_copy", "aten::split_copy", "aten::split_with_sizes_copy"})


def _op_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name  # "aten::linear"
    return None


def graph_uses(module: torch.nn.Module, groups: Any) -> tuple[dict[int, set[str]], set[int]]:
    """For every parameter group (:class:`calibration.discovery._Groups`): its uses in the exported graph
    (``linear``, ``conv``, ``conv_transpose``, ``matmul``, ``rnn``, ``attention``) and the looked-up ones."""
    from . import discovery as d

    carries: dict[torch.fx.Node, frozenset[int]] = {}
    uses: dict[int, set[str]] = {}
    lookups: set[int] = set()

    def flat(args: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        for a in args:
            out.extend(flat(a) if isinstance(a, (list, tuple)) else [a])
        return out

    def carried(a: Any) -> frozenset[int]:
        if isinstance(a, (list, tuple)):
            return frozenset().union(*(carried(x) for x in a)) if a else frozenset()
        return carries.get(a, frozenset()) if isinstance(a, torch.fx.Node) else frozenset()

    def walk(gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                try:
                    value = gm.get_parameter(node.target)
                except AttributeError:
                    continue
                g = groups.group_of(value)
                if g is not None:
                    carries[node] = frozenset({g})
                continue
            if node.op != "call_function":
                continue
            if node.target is __import__("operator").getitem:
                carries[node] = carried(node.args[0])
                continue
            kind = _op_name(node.target)
            if kind is None:
                continue
            args = list(node.args)
            ins = [carried(a) for a in args]
            if not any(ins):
                continue
            if kind in d._PASS or kind in _PASS:
                carries[node] = frozenset().union(*ins)
                continue
            if kind in d._WEIGHT_AT:
                use = ("conv_transpose" if kind in d._TRANSPOSED else "conv" if kind in d._CONV
                       else "rnn" if kind in d._RNN else "linear" if kind == "aten::linear" else "matmul")
                if kind in ("aten::_convolution", "aten::convolution") and len(args) > 6 and args[6] is True:
                    use = "conv_transpose"
                d.record_weight_uses(kind, use, ins, uses)
                continue
            if "attention" in kind or "transformer" in kind:
                for g in frozenset().union(*ins):
                    if groups.tensor[g].dim() >= 2:
                        uses.setdefault(g, set()).add("attention")
                continue
            if kind in d._LOOKUP_AT:
                lookups.update(ins[d._LOOKUP_AT[kind]] if d._LOOKUP_AT[kind] < len(ins) else ())

    walk(module)
    return uses, lookups


__all__ = ["BN_NOT_REESTIMATED", "NOT_RECONSTRUCTED", "PROGRAM_ATTR", "forward_arguments", "graph_uses",
           "is_exported", "load_exported", "save_exported"]
