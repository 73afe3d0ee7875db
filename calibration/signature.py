"""Which data arrays feed which forward arguments, without torch (SPEC §4; issue 13 item 1).

:func:`match_inputs` is the one rule, used by the engine (on ``module.forward.schema``, in the
sandboxed child) and at admission in the API process (on :func:`archive_forward_signature`, read
from the archive's code text and the class name in its ``data.pkl`` opcodes; nothing is unpickled).
"""

from __future__ import annotations

import ast
import os
import pickletools
import zipfile
from typing import Sequence

from .errors import DataError

Signature = list[tuple[str, bool]]  # (argument name, has a default), after self


def match_inputs(sig: Signature | None, names: Sequence[str]) -> list[str]:
    """The data's input arrays ``names`` checked against the forward signature; the names in call order.

    ``names == ["x"]``: the single-input case, ``x`` is the first argument and every other argument
    must have a default. Otherwise each name must be a forward argument (else ``data_unexpected_arrays``),
    every argument without a default must be given, and the given ones must be the first k arguments
    (they are passed by position).
    """
    names = list(names)
    if sig is None:
        if names == ["x"]:
            return ["x"]
        raise DataError(f"The data names inputs {names} but the model's forward signature cannot be "
                        "read to match them; use a single array 'x'.", code="data_inputs_mismatch")
    arg_names = [n for n, _ in sig]
    required = [n for n, has_default in sig if not has_default]
    if names == ["x"]:
        if len(required) > 1:
            raise DataError(
                f"The model's forward takes {len(required)} inputs ({', '.join(required)}) but the data has one array "
                "'x'. Save one array per input, named after the forward arguments: np.savez(path, "
                + ", ".join(f"{n}=..." for n in required) + ", y=...).", code="data_missing_inputs")
        if not sig:
            raise DataError("The model's forward takes no input.", code="data_inputs_mismatch")
        return ["x"]
    unknown = [n for n in names if n not in arg_names]
    if unknown:
        raise DataError(
            f"Unexpected array(s) {unknown} in the data file: they are not arguments of the model's forward "
            f"({', '.join(arg_names) or 'none'}). Use 'x' for a single input, or name one array per input after "
            "the forward arguments ('y': labels).", code="data_unexpected_arrays")
    missing = [n for n in required if n not in names]
    if missing:
        raise DataError(
            f"The model's forward needs input(s) {missing} that the data file does not hold (it holds "
            f"{names}); add one array per input, named after the forward arguments.",
            code="data_missing_inputs")
    k = max(arg_names.index(n) for n in names) + 1
    gap = [n for n in arg_names[:k] if n not in names]
    if gap:
        raise DataError(
            f"The inputs are passed by position: forward argument(s) {gap} come before {arg_names[k - 1]!r} and "
            "must be given too.", code="data_missing_inputs")
    return arg_names[:k]


def archive_forward_signature(path: str | os.PathLike) -> Signature | None:
    """The top-level module's forward arguments from a TorchScript archive's code text; None if unreadable.

    The class is the first GLOBAL of ``data.pkl`` (read as opcodes, never unpickled); its code is
    ``code/<qualified module path>.py``, parsed with ``ast`` (TorchScript code is Python syntax).
    A ``.pt2`` archive: its program's user inputs (:func:`calibration.pt2_archive.pt2_forward_signature`).
    """
    from .pt2_archive import is_pt2, pt2_forward_signature

    if is_pt2(path):
        return pt2_forward_signature(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")), None)
            if pkl is None:
                return None
            prefix = pkl.split("/")[0]
            info = zf.getinfo(pkl)
            if info.file_size > 64 * 1024**2:
                return None
            qualified = None
            for op, arg, _ in pickletools.genops(zf.read(pkl)):
                if op.name == "GLOBAL":
                    qualified = str(arg).replace(" ", ".")
                    break
                if op.name in ("STACK_GLOBAL", "STOP"):
                    return None
            if not qualified or not qualified.startswith("__torch__"):
                return None
            module_path, _, cls_name = qualified.rpartition(".")
            code_name = f"{prefix}/code/{module_path.replace('.', '/')}.py"
            if code_name not in names or zf.getinfo(code_name).file_size > 16 * 1024**2:
                return None
            tree = ast.parse(zf.read(code_name).decode("utf-8"))
    except Exception:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    args = item.args.args[1:]  # self
                    n_defaults = len(item.args.defaults)
                    return [(a.arg, i >= len(args) - n_defaults) for i, a in enumerate(args)]
    return None


__all__ = ["Signature", "archive_forward_signature", "match_inputs"]
