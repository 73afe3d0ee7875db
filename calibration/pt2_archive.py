"""Admission of torch.export ``.pt2`` archives without torch and without unpickling (issue 13, item 5).

A ``.pt2`` archive (``torch.export.save``) is a zip under one top folder ``<name>/`` holding
``archive_format`` (``pt2``), ``models/<model>.json`` (the serialized graph: JSON), the weights as raw
bytes described by ``data/weights/<model>_weights_config.json``, tensor constants likewise under
``data/constants/``, and ``data/sample_inputs/<model>.pt`` (a ``torch.save`` pickle). It is detected by
content (the service stores every upload as ``model.pt``), never by extension.

``torch.export.load`` is not a data reader: it unpickles weights and constants marked ``use_pickle``
with ``weights_only=False``, falls back to ``weights_only=False`` for the sample inputs, loads
TorchBind/opaque objects, runs AOTInductor shared objects, resolves each node's target by ``getattr``
from ``torch`` (``torch.os.system`` would resolve), ``sympy.sympify``s (``eval``) every symbolic shape
expression and ``exec``s the ``guards_code``. So before anything is loaded, :func:`check_pt2` refuses:

- anything but the entries above (AOTInductor ``data/aotinductor/``, shared objects, ExecuTorch, MTIA,
  legacy pickled weight files, ``custom_obj_*``/``opaque_obj_*`` constants), more than one model,
  duplicate or out-of-folder entries, and more than ``MAX_INFLATED`` bytes in all (zip bombs);
- every weight/constant with ``use_pickle: true``, a constant that is not a tensor, a tensor whose
  (sizes, strides, offset) reach past its bytes;
- every graph node (nested subgraphs included) whose target is not an ``aten``/``prims`` operator on
  the operator allowlist of :mod:`calibration.op_allowlist` (``aten.from_file`` is refused: it reads
  files), a safe Python scalar function (``_operator.getitem``, ``torch.sym_max``, ...), or one of
  ``SAFE_HIGHER_ORDER``; script objects, effect tokens, joint (training) graphs;
- a graph exported in training mode (``batch_norm``/``dropout`` with ``training=True``): its outputs
  would depend on the batch and on chance, and certiprune could not make it eval;
- symbolic expressions that are not plain arithmetic over shape symbols (checked with ``ast``: only
  numbers, symbol names, arithmetic/comparison operators and calls of sympy's shape functions);
  names of parameters, graph values and forward arguments that are not identifiers (FX writes them
  into the Python code it generates).

``guards_code`` is never executed by certiprune (the worker builds the module with
``check_guards=False``). The worker repeats these checks on the bytes torch's own zip reader returns
(:func:`check_pt2` with a torch reader) and then loads through torch's lower-level pieces, never
``weights_only=False`` (:mod:`calibration.exported`). Defense in depth: the OS sandbox is the boundary.
"""

from __future__ import annotations

import ast
import json
import keyword
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ModelError
from .op_allowlist import allowlist, denial_reason

#: Bytes the archive may expand to (weights included): the same limit as TorchScript archives.
MAX_INFLATED = 16 * 1024**3
#: ``models/<model>.json`` and the weight/constant configs are parsed in the API process.
MAX_JSON_BYTES = 256 * 1024**2

ACCEPTED = ("Upload a TorchScript archive (torch.jit.save) or a torch.export archive (torch.export.save, .pt2) "
            "of a model in eval mode.")

#: Python-level targets the deserializer resolves from ``_operator``, ``math`` and ``torch``: scalar
#: arithmetic on shapes, nothing else (``torch.<anything>`` would otherwise resolve by getattr).
SAFE_PYTHON_TARGETS = frozenset({
    *(f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg",
                                 "pos", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "abs",
                                 "invert", "lshift", "rshift")),
    *(f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")),
    *(f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                             "sym_sqrt", "_sym_sqrt", "sym_fresh_size")),
})
#: Higher-order ops whose only effect is their subgraph (which is checked like the main graph).
SAFE_HIGHER_ORDER = frozenset({
    "torch.ops.higher_order.wrap_with_set_grad_enabled",
    "torch.ops.higher_order.wrap_with_autocast",
})
#: Operator namespaces a node may use (others need native libraries or reach the world).
NAMESPACES = frozenset({"aten", "prims"})

#: op → the argument that, when true, means the graph was exported in training mode.
_TRAINING_FLAGS = {
    "aten::batch_norm": "training", "aten::native_batch_norm": "training", "aten::_native_batch_norm_legit": "training",
    "aten::cudnn_batch_norm": "training", "aten::miopen_batch_norm": "training",
    "aten::dropout": "train", "aten::feature_dropout": "train", "aten::alpha_dropout": "train",
    "aten::feature_alpha_dropout": "train", "aten::native_dropout": "train",
}
_ALWAYS_TRAINING = frozenset({"aten::_native_batch_norm_legit_functional", "aten::_batch_norm_with_update",
                              "aten::_batch_norm_with_update_functional"})

#: Names sympy may call in a shape expression (torch's serializer's ``sympy_functions`` and sympy's own).
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "Mod", "floor", "ceiling", "sqrt", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "OpaqueUnaryFn_sqrt",
})
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False", "E", "pi", "I"})
_SYMBOL_ASSUMPTIONS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
                                 "zero", "nonzero", "even", "odd"})
_SYMBOL_NAME = re.compile(r"^[a-z]{1,8}\d{1,12}$")  # s0, s77, u3, zuf0, ...
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_FQN = re.compile(r"^[A-Za-z0-9_]{1,200}(\.[A-Za-z0-9_]{1,200}){0,64}$")
_OP_TARGET = re.compile(r"^torch\.ops\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")

_FIXED = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")


@dataclass(frozen=True)
class Pt2Summary:
    """What admission learnt: the model's name, its forward arguments, the ops it uses, its weights."""

    model: str
    forward_args: list[str]
    ops: frozenset[str]
    weights: int


class Reader:
    """The archive's records by their name below the top folder, from Python's ``zipfile``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, int]:
        """record name → inflated size; refuses out-of-folder, duplicate and encrypted entries."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ModelError(f"The model archive is corrupt or truncated: {exc}.", code="model_corrupt") from exc
        if not infos:
            raise ModelError("The model archive is an empty zip file. " + ACCEPTED, code="model_not_torchscript")
        prefix = infos[0].filename.split("/", 1)[0]
        out: dict[str, int] = {}
        for info in infos:
            name = info.filename
            if info.is_dir():
                continue
            if not name.startswith(prefix + "/") or "\\" in name or "/../" in f"/{name}/":
                raise ModelError(f"The .pt2 archive has an entry {name[:200]!r} outside its top folder "
                                 f"{prefix!r}; torch.export.save writes every entry under one folder.",
                                 code="model_corrupt")
            rel = name[len(prefix) + 1:]
            if rel in out:
                raise ModelError(f"The .pt2 archive holds the entry {rel[:200]!r} twice (two zip readers could "
                                 "see different files); certiprune refuses it.", code="model_corrupt")
            if info.flag_bits & 0x1:
                raise ModelError(f"The .pt2 archive's entry {rel[:200]!r} is encrypted.", code="model_corrupt")
            out[rel] = info.file_size
        return out

    def read(self, name: str, limit: int) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            prefix = zf.infolist()[0].filename.split("/", 1)[0]
            info = zf.getinfo(f"{prefix}/{name}")
            if info.file_size > limit:
                raise _too_large(name, info.file_size, limit)
            with zf.open(info) as fh:
                data = fh.read(limit + 1)
        if len(data) > limit:
            raise _too_large(name, len(data), limit)
        return data


def _too_large(name: str, size: int, limit: int) -> ModelError:
    return ModelError(f"The .pt2 archive's {name!r} is {size / 1024**2:.0f} MiB (limit {limit // 1024**2} MiB).",
                      code="model_too_large")


def is_pt2(path: str | os.PathLike | Any) -> bool:
    """A zip whose top folder has ``archive_format`` = ``pt2`` (a path or a seekable binary file)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not infos:
                return False
            prefix = infos[0].filename.split("/", 1)[0]
            name = f"{prefix}/archive_format"
            if name not in zf.NameToInfo or zf.getinfo(name).file_size > 64:
                return False
            return zf.read(name).strip() == b"pt2"
    except Exception:
        return False


def _corrupt(what: str) -> ModelError:
    return ModelError(f"The .pt2 archive is malformed: {what}. Save it again with torch.export.save.",
                      code="model_corrupt")


def _unsupported(what: str) -> ModelError:
    return ModelError(f"The .pt2 archive {what}; certiprune refuses it. {ACCEPTED}", code="model_unsupported_format")


def _json(reader: Any, name: str) -> Any:
    raw = reader.read(name, MAX_JSON_BYTES)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(f"{name} is not valid JSON ({exc})") from exc


def _check_entries(records: dict[str, int]) -> str:
    """The model's name, after refusing every entry torch.export.save would not write for an eager model."""
    total = sum(records.values())
    if total > MAX_INFLATED:
        raise ModelError(f"The model archive expands to {total / 1024**3:.1f} GiB (limit "
                         f"{MAX_INFLATED // 1024**3} GiB); refusing a possible zip bomb.", code="model_too_large")
    for rel in records:
        low = rel.lower()
        if low.startswith("data/aotinductor/") or low.endswith((".so", ".dll", ".dylib", ".cpp", ".o", ".cubin")):
            raise _unsupported(f"holds AOTInductor-compiled native code ({rel[:200]!r}), which would run as a "
                               "shared library")
        if low.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
            raise _unsupported(f"holds {rel[:200]!r}, a payload certiprune does not read")
    if records.get("archive_version", 0) > 16:
        raise _corrupt("archive_version is too long")
    models = [r for r in records if r.startswith("models/")]
    if not models:
        raise _corrupt("it has no models/<name>.json")
    if len(models) > 1:
        raise _unsupported(f"holds {len(models)} models ({', '.join(m[:80] for m in models[:5])}); certiprune "
                           "certifies one exported program per archive")
    m = re.fullmatch(r"models/([A-Za-z0-9_.-]{1,200})\.json", models[0])
    if m is None:
        raise _corrupt(f"the model entry {models[0][:200]!r} is not models/<name>.json")
    model = m.group(1)
    allowed = {*_FIXED, f"models/{model}.json", f"data/weights/{model}_weights_config.json",
               f"data/constants/{model}_constants_config.json", f"data/sample_inputs/{model}.pt"}
    for rel in records:
        if rel in allowed or re.fullmatch(r"data/weights/weight_\d{1,9}", rel) \
                or re.fullmatch(r"data/constants/tensor_\d{1,9}", rel) or rel.startswith("extra/"):
            continue
        if rel == f"data/weights/{model}.pt" or rel == f"data/constants/{model}.pt":
            raise _unsupported(f"stores its weights in the legacy pickled format ({rel!r})")
        if re.fullmatch(r"data/constants/(custom_obj|opaque_obj)_\d+", rel):
            raise _unsupported(f"holds a script or opaque object constant ({rel!r}), which is unpickled on load")
        raise _unsupported(f"holds an entry torch.export.save does not write for a model: {rel[:200]!r}")
    for need in ("archive_format", f"data/weights/{model}_weights_config.json",
                 f"data/constants/{model}_constants_config.json"):
        if need not in records:
            raise _corrupt(f"it has no {need}")
    return model


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, dict) and set(v) == {"as_int"} and type(v["as_int"]) is int:
        return v["as_int"]
    if isinstance(v, dict) and "as_expr" in v:
        raise _unsupported(f"stores {what} as a symbolic expression")
    raise _corrupt(f"{what} is not an integer")


#: torch._export.serde.schema.ScalarType → bytes per element.
_ELEMENT_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2,
                 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}


def _check_payloads(reader: Any, records: dict[str, int], model: str) -> int:
    """Weights and constants: raw tensors only (no pickles, no objects), each inside its own bytes."""
    count = 0
    for kind, folder, prefix in (("weights", "data/weights", "weight_"), ("constants", "data/constants", "tensor_")):
        cfg = _json(reader, f"{folder}/{model}_{kind}_config.json")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("config"), dict):
            raise _corrupt(f"{folder}/{model}_{kind}_config.json has no 'config' object")
        for fqn, meta in cfg["config"].items():
            shown = str(fqn)[:200]
            if not isinstance(fqn, str) or not _FQN.match(fqn):
                raise _corrupt(f"the {kind[:-1]} name {shown!r} is not a dotted identifier")
            if not isinstance(meta, dict):
                raise _corrupt(f"the {kind[:-1]} {shown!r} has no metadata")
            if meta.get("use_pickle") is not False:
                raise _unsupported(f"stores the {kind[:-1]} {shown!r} as a pickle (use_pickle), which torch.export."
                                   "load unpickles with weights_only=False (tensor subclasses are not supported)")
            path = meta.get("path_name")
            if not isinstance(path, str) or not re.fullmatch(prefix + r"\d{1,9}", path):
                if isinstance(path, str) and path.startswith(("custom_obj_", "opaque_obj_")):
                    raise _unsupported(f"holds a script or opaque object {shown!r}, which is unpickled on load")
                raise _corrupt(f"the {kind[:-1]} {shown!r} has the file name {str(path)[:80]!r}")
            if f"{folder}/{path}" not in records:
                raise _corrupt(f"the {kind[:-1]} {shown!r} names a missing file {path!r}")
            tm = meta.get("tensor_meta")
            if not isinstance(tm, dict) or type(tm.get("dtype")) is not int:
                raise _corrupt(f"the {kind[:-1]} {shown!r} has no tensor metadata")
            if tm.get("layout") not in (None, 7):  # 7: strided
                raise _unsupported(f"stores the {kind[:-1]} {shown!r} in a non-strided layout")
            sizes = [_as_int(s, f"a size of {shown!r}") for s in tm.get("sizes", [])]
            strides = [_as_int(s, f"a stride of {shown!r}") for s in tm.get("strides", [])]
            offset = _as_int(tm.get("storage_offset", {"as_int": 0}), f"the offset of {shown!r}")
            if len(sizes) != len(strides) or any(s < 0 for s in sizes + strides) or offset < 0:
                raise _corrupt(f"the {kind[:-1]} {shown!r} has inconsistent sizes and strides")
            nbytes = records[f"{folder}/{path}"]
            element = _ELEMENT_SIZE.get(tm["dtype"])
            if element is None:
                raise _unsupported(f"stores the {kind[:-1]} {shown!r} in an unsupported dtype ({tm['dtype']})")
            if nbytes and all(sizes):
                reach = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1
                if reach * element > nbytes:
                    raise _corrupt(f"the {kind[:-1]} {shown!r} reaches past the end of its data")
            count += 1
    return count


def _check_expr(text: Any) -> None:
    """A symbolic shape expression: sympy ``eval``s it, so only arithmetic over symbols may pass."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise _corrupt("a symbolic shape expression is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _unsupported(f"has a symbolic shape expression that is not arithmetic: {text[:120]!r}") from exc
    ok_ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
              ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.BitAnd, ast.BitOr)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Load, *ok_ops)):
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SYMBOL_NAME.match(node.value):
            continue
        if isinstance(node, ast.Name) and (_SYMBOL_NAME.match(node.id) or node.id in _SYMPY_CALLS
                                           or node.id in _SYMPY_CONSTANTS):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
            continue
        if isinstance(node, ast.keyword) and node.arg in _SYMBOL_ASSUMPTIONS \
                and isinstance(node.value, ast.Constant) and type(node.value.value) is bool:
            continue
        raise _unsupported(f"has a symbolic shape expression that is not plain arithmetic over shape symbols "
                           f"(sympy would evaluate it as code): {text[:120]!r}")


def target_problem(target: Any) -> str | None:
    """Why a node's (or an operator argument's) target is refused; None when it is allowed."""
    if not isinstance(target, str):
        return "a target that is not a string"
    if target in SAFE_PYTHON_TARGETS or target in SAFE_HIGHER_ORDER:
        return None
    m = _OP_TARGET.match(target)
    if m is None:
        return "not an aten operator (a Python function or an extension operator)"
    ns, name = m.group(1), m.group(2)
    if ns == "higher_order":
        return "a higher-order operator certiprune does not run"
    op = f"{ns}::{name}"
    why = denial_reason(op)
    if why is not None:
        return why
    if ns not in NAMESPACES:
        return f"an operator of the namespace {ns!r} (custom operators need native libraries)"
    if op not in allowlist():
        return "not on the operator allowlist"
    return None


def _arg_value(node: dict[str, Any], name: str) -> Any:
    for inp in node.get("inputs") or []:
        if isinstance(inp, dict) and inp.get("name") == name and isinstance(inp.get("arg"), dict):
            arg = inp["arg"]
            if "as_bool" in arg:
                return arg["as_bool"]
            return arg
    return None


def _walk(value: Any, visit: Callable[[str, Any, Any], None], depth: int = 0) -> None:
    """Every (key, value, parent) of the JSON tree, iteratively (a deep tree cannot exhaust the stack)."""
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                visit(k, item, v)
                if isinstance(item, (dict, list)):
                    stack.append(item)
        elif isinstance(v, list):
            stack.extend(i for i in v if isinstance(i, (dict, list)))


def _check_program(doc: Any) -> tuple[list[str], frozenset[str]]:
    """The serialized program: every target, expression, name and spec; returns (forward args, ops)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise _corrupt("models/<name>.json has no graph_module")
    gm = doc["graph_module"]
    graph, signature = gm.get("graph"), gm.get("signature")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or not isinstance(signature, dict):
        raise _corrupt("the program has no graph or no signature")
    if not isinstance(doc.get("guards_code", []), list):
        raise _corrupt("guards_code is not a list")
    problems: dict[str, str] = {}
    training: list[str] = []
    ops: set[str] = set()

    def visit(key: str, value: Any, parent: Any) -> None:
        if key == "target" and isinstance(parent, dict) and "inputs" in parent and "outputs" in parent:
            why = target_problem(value)
            if why is not None:
                problems.setdefault(str(value)[:200], why)
                return
            m = _OP_TARGET.match(value)
            if m is not None:
                op = f"{m.group(1)}::{m.group(2)}"
                ops.add(op)
                flag = _TRAINING_FLAGS.get(op)
                if op in _ALWAYS_TRAINING or (flag is not None and _arg_value(parent, flag) is True):
                    training.append(value.removeprefix("torch.ops."))
            name = parent.get("name")
            if name is not None and not (isinstance(name, str) and _IDENT.match(name)):
                raise _corrupt(f"a node is named {str(name)[:80]!r}, not an identifier")
        elif key == "as_operator":
            why = target_problem(value)
            if why is not None:
                problems.setdefault(str(value)[:200], why)
        elif key == "expr_str":
            _check_expr(value)
        elif key in ("as_custom_obj", "as_custom_objs", "custom_obj", "custom_obj_values") and value:
            raise _unsupported("uses a script object (TorchBind), which is unpickled and runs native code")
        elif key in ("token", "as_tokens") and value:
            raise _unsupported("threads effect tokens (side-effecting operators)")
        elif key in ("gradient_to_parameter", "gradient_to_user_input", "loss_output") and value is not None:
            raise _unsupported("is a joint (training) graph, not an inference program")
        elif key in ("parameter_name", "buffer_name", "tensor_constant_name") and not (
                isinstance(value, str) and _FQN.match(value)):
            raise _corrupt(f"the name {str(value)[:80]!r} is not a dotted identifier")
        elif key == "name" and isinstance(parent, dict) and len(parent) == 1 and not (
                isinstance(value, str) and _IDENT.match(value)):  # a tensor/sym argument {"name": ...}
            raise _corrupt(f"a graph value is named {str(value)[:80]!r}, not an identifier")

    _walk(doc, visit)
    for key in doc.get("range_constraints") or {}:
        if not (isinstance(key, str) and _SYMBOL_NAME.match(key)):
            _check_expr(key)
    if problems:
        parts = [f"{t} ({why})" for t, why in list(problems.items())[:5]]
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ModelError("The exported program calls " + "; ".join(parts) + more
                         + "; certiprune refuses models that touch files, processes or the network, or that run "
                         "anything but tensor operators.", code="model_uses_forbidden_op")
    if training:
        raise ModelError(
            f"The program was exported in training mode ({', '.join(sorted(set(training))[:4])} with training=True): "
            "its outputs would depend on the batch (BatchNorm statistics) or on chance (dropout), and an exported "
            "graph cannot be switched to eval. Call model.eval() before torch.export.export and upload it again.",
            code="model_exported_in_training_mode")
    return _forward_args(gm), frozenset(ops)


def _forward_args(gm: dict[str, Any]) -> list[str]:
    """The user inputs in call order: ``forward_arg_names`` of the root module call, else the graph's."""
    names: list[str] | None = None
    calls = gm.get("module_call_graph")
    if isinstance(calls, list):
        for entry in calls:
            if isinstance(entry, dict) and entry.get("fqn") == "" and isinstance(entry.get("signature"), dict):
                fan = entry["signature"].get("forward_arg_names")
                if isinstance(fan, list):
                    names = fan
    if names is None:
        names = []
        for spec in gm["signature"].get("input_specs") or []:
            arg = spec.get("user_input", {}).get("arg") if isinstance(spec, dict) else None
            if isinstance(arg, dict):
                inner = next(iter(arg.values()), None)
                names.append(inner.get("name") if isinstance(inner, dict) else None)
    for n in names:
        if not (isinstance(n, str) and _IDENT.match(n)) or keyword.iskeyword(n):
            raise _corrupt(f"a forward argument is named {str(n)[:80]!r}, not an identifier")
    return list(names)


def check_pt2(path: str | os.PathLike, reader: Any = None) -> Pt2Summary:
    """Every check of the module docstring on a ``.pt2`` archive; ``ModelError`` with a 4xx code otherwise.

    ``reader``: where the records come from (default: Python's ``zipfile``; the worker passes torch's own
    reader, see :mod:`calibration.exported`). Reads JSON and sizes only; nothing is unpickled."""
    reader = reader or Reader(Path(path))
    records = reader.records()
    model = _check_entries(records)
    fmt = reader.read("archive_format", 64).strip()
    if fmt != b"pt2":
        raise _corrupt("archive_format is not 'pt2'")
    if "byteorder" in records and reader.read("byteorder", 64).strip() not in (b"little", b""):
        raise _unsupported("was written on a big-endian machine")
    n_payloads = _check_payloads(reader, records, model)
    forward_args, ops = _check_program(_json(reader, f"models/{model}.json"))
    return Pt2Summary(model=model, forward_args=forward_args, ops=ops, weights=n_payloads)


def pt2_forward_signature(path: str | os.PathLike) -> list[tuple[str, bool]] | None:
    """(name, has_default) of the program's forward arguments, for :func:`calibration.signature.match_inputs`.

    An exported program is specialised to the inputs it was exported with: every argument is required."""
    try:
        return [(n, False) for n in check_pt2(path).forward_args]
    except ModelError:
        return None


__all__ = ["ACCEPTED", "MAX_INFLATED", "NAMESPACES", "Pt2Summary", "Reader", "SAFE_HIGHER_ORDER",
           "SAFE_PYTHON_TARGETS", "check_pt2", "is_pt2", "pt2_forward_signature", "target_problem"]
