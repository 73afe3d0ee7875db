"""Capture the inputs of a TorchScript model's prunable layers (TorchScript has no forward hooks).

How: copy the module's ``forward`` graph, inline every method call (``torch._C._jit_pass_inline``),
and follow each ``prim::GetAttr`` chain from ``self`` to its dotted name (``features.0.weight``,
the names of :func:`calibration.model.find_prunable`). A node that consumes a prunable weight —
``aten::linear``, ``aten::conv1d/2d/3d``, ``aten::_convolution`` / ``aten::convolution`` /
``aten::_convolution_mode`` (traced ``padding='same'``), the
``conv_transpose`` ops, ``aten::t`` feeding ``mm``/``matmul``/``addmm`` (old exports of Linear), or a
weight used directly as the right operand of ``mm``/``matmul``/``addmm`` (x @ W, W of shape (in, out):
Hugging Face ``Conv1D``; kind ``linear_t``) — has its input value (and its stride/padding/dilation/groups arguments) registered as extra
graph outputs; ``torch._C._create_function_from_graph`` turns the graph into a function called
with the module's C++ object, so it reads the *live* weights, exactly like ``module(x)``.

Works on scripted and traced modules alike (both keep ``self`` and submodule attributes in the
graph). A layer used inside control flow (``prim::If``/``prim::Loop`` blocks) cannot be probed —
its input may not exist on every path — and is listed in :attr:`GraphProbe.unprobed` with the
reason; a layer called several times yields one input per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelError
from .model import PrunableWeight, quiet_torchscript_warnings

_CONV = {"aten::conv1d": 1, "aten::conv2d": 2, "aten::conv3d": 3, "aten::_convolution_mode": 0}
_CONV_T = {"aten::conv_transpose1d": 1, "aten::conv_transpose2d": 2, "aten::conv_transpose3d": 3}
_GENERIC_CONV = ("aten::_convolution", "aten::convolution")
_MATMUL = ("aten::mm", "aten::matmul", "aten::addmm")

_HINT = "reconstruction needs layer inputs; this graph could not be probed: "


@dataclass(frozen=True)
class LayerCall:
    """One call of a prunable layer in the graph; ``slots`` index the probe's output tuple.

    ``kind``: ``linear`` (input (*, in_features)), ``linear_t`` (the same input, weight (in, out)),
    ``conv`` (input (N, C, *spatial)) or ``conv_transpose``. ``slots`` holds ``input`` and, for convolutions, ``stride``,
    ``padding``, ``dilation``, ``groups`` (and ``transposed`` for the generic op).
    """

    name: str
    kind: str
    slots: dict[str, int]


@dataclass(frozen=True)
class LayerInput:
    """What one prunable layer saw on one batch.

    ``x``: the layer's input, shape (*, in_features) for Linear, (N, C, *spatial) for convolutions.
    ``padding``: per spatial dim (before, after) pairs, or ``"same"`` (resolved with the kernel size).
    """

    name: str
    kind: str
    x: torch.Tensor
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1


def _walk(block: Any, depth: int = 0):
    """All nodes with their nesting depth (0 = the graph's top-level block)."""
    for node in block.nodes():
        yield node, depth
        for sub in node.blocks():
            yield from _walk(sub, depth + 1)


class GraphProbe:
    """A function ``x → (model output, {weight name: [LayerInput per call]})`` for one module.

    ``unprobed``: weight name → why its inputs cannot be captured (absent names are probed).
    """

    def __init__(self, module: torch.jit.ScriptModule, weights: list[PrunableWeight]) -> None:
        self._module = module
        wanted = {w.name for w in weights}
        try:
            method = module._c._get_method("forward")
            graph = method.graph.copy()
            torch._C._jit_pass_inline(graph)
        except Exception as exc:  # not a ScriptModule, or a graph torch refuses to inline
            raise ModelError(_HINT + f"{type(exc).__name__}: {exc}".strip(), code="model_not_probeable") from exc
        inputs = list(graph.inputs())
        if len(inputs) < 2:  # self, then every forward argument (several: calibration.inputs.ModelInputs)
            raise ModelError(_HINT + "forward takes no input.", code="model_not_probeable")
        names: dict[int, str] = {inputs[0].unique(): ""}
        calls: list[tuple[str, str, dict[str, Any]]] = []
        self.unprobed: dict[str, str] = {}

        def name_of(value: Any) -> str | None:
            return names.get(value.unique())

        for node, depth in _walk(graph.block()):
            kind = node.kind()
            if kind == "prim::GetAttr":
                parent = name_of(node.input())
                if parent is not None:
                    names[node.output().unique()] = f"{parent}.{node.s('name')}" if parent else node.s("name")
                continue
            found = self._layer_call(node, name_of)
            if found is None:
                continue
            weight_name, layer_kind, values = found
            if weight_name not in wanted:
                continue
            if depth > 0:
                self.unprobed[weight_name] = "it is called inside control flow (an if or a loop) of the graph"
                continue
            calls.append((weight_name, layer_kind, values))
        for name in wanted - {c[0] for c in calls} - set(self.unprobed):
            self.unprobed[name] = "no linear/convolution node of the graph consumes it directly"
        # A weight with one call inside control flow and one outside: its statistics would be partial.
        calls = [c for c in calls if c[0] not in self.unprobed]
        if not calls:
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self.unprobed.items())) or "no prunable weight found"
            raise ModelError(_HINT + reasons, code="model_not_probeable")

        slot_of: dict[int, int] = {}
        self.calls: list[LayerCall] = []
        n_outputs = len(list(graph.outputs()))
        if n_outputs != 1:
            raise ModelError(_HINT + f"forward returns {n_outputs} values; one is expected.", code="model_not_probeable")
        next_slot = 1
        for weight_name, layer_kind, values in calls:
            slots = {}
            for key, value in values.items():
                uid = value.unique()
                if uid not in slot_of:
                    graph.registerOutput(value)
                    slot_of[uid] = next_slot
                    next_slot += 1
                slots[key] = slot_of[uid]
            self.calls.append(LayerCall(weight_name, layer_kind, slots))
        try:
            graph.makeMultiOutputIntoTuple()
            with quiet_torchscript_warnings():
                self._fn = torch._C._create_function_from_graph("certiprune_probe", graph)
        except Exception as exc:
            raise ModelError(_HINT + f"{type(exc).__name__}: {exc}".strip().splitlines()[0],
                             code="model_not_probeable") from exc

    @staticmethod
    def _layer_call(node: Any, name_of: Any) -> tuple[str, str, dict[str, Any]] | None:
        kind = node.kind()
        ins = list(node.inputs())
        if kind == "aten::linear" and len(ins) >= 2 and name_of(ins[1]):
            return name_of(ins[1]), "linear", {"input": ins[0]}
        if kind in _CONV and len(ins) == 7 and name_of(ins[1]):
            return name_of(ins[1]), "conv", {"input": ins[0], "stride": ins[3], "padding": ins[4],
                                             "dilation": ins[5], "groups": ins[6]}
        if kind in _GENERIC_CONV and len(ins) >= 9 and name_of(ins[1]):
            return name_of(ins[1]), "conv", {"input": ins[0], "stride": ins[3], "padding": ins[4],
                                             "dilation": ins[5], "transposed": ins[6], "groups": ins[8]}
        if kind in _CONV_T and len(ins) >= 2 and name_of(ins[1]):
            return name_of(ins[1]), "conv_transpose", {"input": ins[0]}
        if kind in _MATMUL:
            # Linear as exported by old tracers: mm(x, t(W)), matmul(x, t(W)), addmm(b, x, t(W)).
            x, wt = (ins[1], ins[2]) if kind == "aten::addmm" else (ins[0], ins[1])
            producer = wt.node()
            if producer.kind() == "aten::t" and name_of(producer.input()):
                return name_of(producer.input()), "linear", {"input": x}
            if name_of(wt):  # x @ W with W (in, out): Hugging Face Conv1D's addmm(b, x, W)
                return name_of(wt), "linear_t", {"input": x}
        return None

    @torch.no_grad()
    def __call__(self, x: Any) -> tuple[Any, dict[str, list[LayerInput]]]:
        """Run the model once on ``x`` (a tensor or ModelInputs); returns its output and every probed layer's inputs."""
        args = x.tensors if hasattr(x, "tensors") else (x,)
        out = self._fn(self._module._c, *args)
        captured: dict[str, list[LayerInput]] = {}
        for call in self.calls:
            captured.setdefault(call.name, []).append(_layer_input(call, out))
        return out[0], captured


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    items = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return tuple(items * n) if len(items) == 1 else tuple(items)


def _layer_input(call: LayerCall, out: tuple[Any, ...]) -> LayerInput:
    x = out[call.slots["input"]]
    kind = call.kind
    if kind != "conv":
        return LayerInput(call.name, kind, x)
    if "transposed" in call.slots and bool(out[call.slots["transposed"]]):
        return LayerInput(call.name, "conv_transpose", x)
    n = x.dim() - 2
    stride = _tuple(out[call.slots["stride"]], n)
    dilation = _tuple(out[call.slots["dilation"]], n)
    raw = out[call.slots["padding"]]
    padding: tuple[tuple[int, int], ...] | str
    if isinstance(raw, str):
        padding = "same" if raw == "same" else tuple((0, 0) for _ in range(n))  # "valid" = no padding
    else:
        padding = tuple((p, p) for p in _tuple(raw, n))
    return LayerInput(call.name, "conv", x, stride=stride, padding=padding, dilation=dilation,
                      groups=int(out[call.slots["groups"]]))


def build_probe(module: torch.jit.ScriptModule, weights: list[PrunableWeight]) -> GraphProbe:
    """A :class:`GraphProbe` for ``module``'s prunable ``weights``; raises ModelError when impossible."""
    return GraphProbe(module, weights)


__all__ = ["GraphProbe", "LayerCall", "LayerInput", "build_probe"]
