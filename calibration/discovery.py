"""Which weights are prunable: decided by what each weight *does* in the model's graph, not by what its
module is called (SPEC §2).

Why not module names: a TorchScript module's ``original_name`` is its Python class name, so subclasses
(timm ``Conv2dSame``, ``NonDynamicallyQuantizableLinear``), modules with another name for the same
operation (Hugging Face ``Conv1D``: ``addmm(b, x, W)``) and bare parameters (``in_proj_weight``, RNN
``weight_ih_l0``) are invisible to a name list. A traced module keeps no attributes besides parameters,
buffers and submodules, so ``in_features`` or ``kernel_size`` cannot be asked either.

How (scripted and traced modules alike): copy the ``forward`` graph, inline every method and function
call (``torch._C._jit_pass_inline``), and follow data flow from each parameter:

- a ``prim::GetAttr`` chain from ``self`` names a submodule, a parameter, or a tensor/list attribute
  (a scripted ``nn.LSTM`` reads ``self._flat_weights``); tensors are mapped to parameters by storage;
- values derived from a parameter by view-like ops (``t``, ``transpose``, ``slice``, ``chunk``,
  ``split``, ``view``, ``to``, list/tuple packing, ``prim::If``/``prim::Loop`` results, …) carry it;
- a parameter is a **matrix weight** when some node uses it as the weight of ``aten::linear`` or a
  convolution (``conv*``, ``_convolution``, ``conv_transpose*``), as an operand of a matrix product
  (``mm``, ``matmul``, ``bmm``, ``addmm``, ``einsum``, …), in the parameter list of a fused RNN
  (``aten::lstm``/``gru``/``rnn_*``, ``*_cell``), or as a ≥ 2-d argument of a fused attention /
  transformer op (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``);
- it is a **lookup table** (an embedding) when some node indexes into it: ``embedding``,
  ``embedding_bag``, ``index_select``, ``index``, ``gather``, ``take`` (with the parameter first).

Prunable by default: every parameter of two or more dimensions that is a matrix weight and not a lookup
table, and not tied to one. As a safety net the weight of a standard ``Conv*d``/``ConvTranspose*d``/``Linear``
module (by ``original_name``) counts as a matrix weight even where the walk found no use of it. Tied parameters (one storage under several names, e.g. a language model's
head and its token embedding) are one candidate, listed under their first name, pruned together or not
at all; a group with an embedding in it is not a candidate by default. Biases and norm weights are
1-d and never candidates. ``prune_include`` (glob patterns over parameter names; a tied group matches
when any of its names does) replaces the default set by the matching ≥ 2-d parameters — it can opt in an
embedding — and ``prune_exclude`` removes matching ones; ``exclude_first_last`` then drops the first and
the last candidate.

BatchNorm layers (for re-estimation) are found by behaviour too: every module holding ``running_mean``,
``running_var`` and ``num_batches_tracked`` tensors of its own (``BatchNorm*d``, ``SyncBatchNorm`` and
subclasses such as timm's ``BatchNormAct2d``).

Modules that are not TorchScript (eager ``nn.Module``) fall back to ``isinstance`` checks with the same
rules.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .errors import ModelError

#: Ops whose outputs carry the parameters of their inputs (views, casts, packing).
_PASS = frozenset({
    "aten::t", "aten::numpy_T", "aten::mT", "aten::transpose", "aten::permute", "aten::view", "aten::reshape",
    "aten::view_as", "aten::reshape_as", "aten::slice", "aten::select", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::tensor_split", "aten::unsafe_split", "aten::chunk", "aten::unsafe_chunk",
    "aten::unbind", "aten::contiguous", "aten::to", "aten::type_as", "aten::detach", "aten::clone",
    "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::unflatten",
    "aten::float", "aten::half", "aten::bfloat16", "aten::__getitem__", "aten::movedim", "aten::swapaxes",
    "prim::unchecked_cast", "prim::ListConstruct", "prim::ListUnpack", "prim::TupleConstruct",
    "prim::TupleUnpack", "prim::TupleIndex", "prim::ConstantChunk",
})
#: op → input positions that are the weight of a linear map.
_WEIGHT_AT = {
    "aten::linear": (1,), "aten::conv1d": (1,), "aten::conv2d": (1,), "aten::conv3d": (1,),
    "aten::_convolution": (1,), "aten::convolution": (1,), "aten::_convolution_mode": (1,),
    "aten::conv_transpose1d": (1,), "aten::conv_transpose2d": (1,), "aten::conv_transpose3d": (1,),
    "aten::mm": (0, 1), "aten::matmul": (0, 1), "aten::bmm": (0, 1), "aten::mv": (0, 1), "aten::dot": (0, 1),
    "aten::addmm": (1, 2), "aten::addmv": (1, 2), "aten::baddbmm": (1, 2), "aten::addbmm": (1, 2),
    "aten::einsum": (1,), "aten::tensordot": (0, 1), "aten::chain_matmul": (0,), "aten::linalg_multi_dot": (0,),
    "aten::lstm": (None,), "aten::gru": (None,), "aten::rnn_tanh": (None,), "aten::rnn_relu": (None,),
    "aten::lstm_cell": (2, 3), "aten::gru_cell": (2, 3), "aten::rnn_tanh_cell": (2, 3), "aten::rnn_relu_cell": (2, 3),
}
_TRANSPOSED = ("aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d")
_CONV = ("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution", "aten::convolution",
         "aten::_convolution_mode")
_RNN = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu", "aten::lstm_cell", "aten::gru_cell",
        "aten::rnn_tanh_cell", "aten::rnn_relu_cell")
#: op → input position of a table that is looked up by index.
_LOOKUP_AT = {"aten::embedding": 0, "aten::embedding_bag": 0, "aten::_embedding_bag": 0,
              "aten::embedding_renorm_": 0, "aten::index_select": 0, "aten::index": 0, "aten::gather": 0,
              "aten::take": 0}
#: Standard module classes by TorchScript ``original_name`` (the safety net of :func:`discover`).
_STANDARD = {**{f"Conv{d}d": "conv" for d in (1, 2, 3)}, **{f"ConvTranspose{d}d": "conv_transpose" for d in (1, 2, 3)},
             "Linear": "linear", "NonDynamicallyQuantizableLinear": "linear"}
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def record_weight_uses(kind: str, use: str, carried: list[Any], uses: dict[int, set[str]]) -> None:
    """Mark the parameter groups that reach the weight positions of op ``kind`` (``_WEIGHT_AT``; every
    operand for a matrix product) as used as ``use``. ``carried[i]``: the groups input ``i`` carries.
    Shared by the TorchScript walk here and the exported-graph walk (``calibration.exported``)."""
    positions = _WEIGHT_AT[kind]
    chosen = range(len(carried)) if positions == (None,) else positions
    for i in chosen:
        if i is not None and i < len(carried):
            for g in carried[i]:
                uses.setdefault(g, set()).add(use)


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable weight tensor: ``name`` is the parameter name (``features.0.weight``).

    ``kind``: how the graph uses it — ``linear``, ``conv``, ``conv_transpose``, ``matmul`` (a bare
    matrix product such as Hugging Face ``Conv1D``), ``rnn``, ``attention`` (a fused attention op), or
    ``embedding`` (only when opted in by ``prune_include``). ``tied``: other names of the same tensor.
    """

    name: str
    module_path: str
    module_type: str
    param: torch.nn.Parameter
    kind: str = "linear"
    tied: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class Discovery:
    """Every weight matrix of a model (≥ 2-d parameters, tied names once) and which are candidates.

    ``weights``: the candidates, in module order. ``matrices``: name → numel of every ≥ 2-d parameter
    group (the denominator of :meth:`summary`). ``not_candidates``: name → why it is not pruned.
    """

    weights: list[PrunableWeight]
    matrices: dict[str, int]
    not_candidates: dict[str, str] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)
    method: str = "graph"

    def summary(self) -> dict[str, Any]:
        """JSON-ready: candidates vs all weight matrices (count and parameters)."""
        params = sum(w.numel for w in self.weights)
        of_params = sum(self.matrices.values())
        return {
            "count": len(self.weights), "params": int(params),
            "of_count": len(self.matrices), "of_params": int(of_params),
            "fraction_count": len(self.weights) / len(self.matrices) if self.matrices else 0.0,
            "fraction_params": params / of_params if of_params else 0.0,
            "names": [w.name for w in self.weights],
            "not_candidates": dict(self.not_candidates),
            "tied": {k: list(v) for k, v in self.tied.items()},
            "method": self.method,
        }


def module_type(module: torch.nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)


def _own_tensors(module: torch.nn.Module, kind: str) -> list[tuple[str, torch.Tensor]]:
    getter = module.named_parameters if kind == "param" else module.named_buffers
    try:
        return [(n, t) for n, t in getter(recurse=False) if isinstance(t, torch.Tensor)]
    except Exception:  # pragma: no cover - very old ScriptModules
        return []


class _Groups:
    """Parameters grouped by storage: one group per tensor, whatever names it has."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.names: list[list[str]] = []  # group → names, first = representative
        self.tensor: list[torch.Tensor] = []
        self.owner: list[tuple[str, str]] = []  # group → (module path, module type) of the first name
        self._by_key: dict[tuple[Any, ...], int] = {}
        for path, sub in module.named_modules():
            for pname, p in _own_tensors(sub, "param"):
                name = f"{path}.{pname}" if path else pname
                g = self.group_of(p)
                if g is None:
                    g = len(self.names)
                    self.names.append([])
                    self.tensor.append(p)
                    self.owner.append((path, module_type(sub)))
                    self._by_key[self._key(p)] = g
                if name not in self.names[g]:
                    self.names[g].append(name)

    @staticmethod
    def _storage(t: torch.Tensor) -> tuple[str, int, int]:
        try:
            ptr = t.untyped_storage().data_ptr()
        except Exception:  # pragma: no cover
            ptr = t.data_ptr() - t.storage_offset() * t.element_size()
        return (t.device.type, t.device.index or 0, ptr)

    @classmethod
    def _key(cls, t: torch.Tensor) -> tuple[Any, ...]:
        """The same view of the same storage = the same tensor under another name (tied)."""
        return (*cls._storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def overlapping(self) -> dict[int, int]:
        """Groups that are *different* views of one storage (group → the first other group on it)."""
        by_storage: dict[tuple[str, int, int], list[int]] = {}
        for g, t in enumerate(self.tensor):
            if t.numel():
                by_storage.setdefault(self._storage(t), []).append(g)
        return {g: next(o for o in gs if o != g) for gs in by_storage.values() if len(gs) > 1 for g in gs}

    def group_of(self, t: Any) -> int | None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return None
        return self._by_key.get(self._key(t))

    def groups_in(self, value: Any) -> frozenset[int]:
        """Groups of a Python attribute value: a tensor, or a list/tuple of them."""
        if isinstance(value, torch.Tensor):
            g = self.group_of(value)
            return frozenset() if g is None else frozenset({g})
        if isinstance(value, (list, tuple)):
            out: set[int] = set()
            for v in value:
                out |= self.groups_in(v)
            return frozenset(out)
        return frozenset()


def _graph_uses(module: torch.nn.Module, groups: _Groups) -> tuple[dict[int, set[str]], set[int]]:
    """For every parameter group: how the inlined forward graph uses it (``kind``s) and which are looked up."""
    graph = module._c._get_method("forward").graph.copy()  # type: ignore[union-attr]
    torch._C._jit_pass_inline(graph)
    modules = dict(module.named_modules())
    inputs = list(graph.inputs())
    mod_of: dict[int, str] = {inputs[0].unique(): ""}  # value → module path
    carries: dict[int, frozenset[int]] = {}  # value → parameter groups it carries
    uses: dict[int, set[str]] = {}
    lookups: set[int] = set()

    def carried_by(value: Any) -> frozenset[int]:
        return carries.get(value.unique(), frozenset())

    def merge(value: Any, gs: Iterable[int]) -> None:
        gs = frozenset(gs)
        if gs:
            carries[value.unique()] = carries.get(value.unique(), frozenset()) | gs

    def visit(block: Any) -> None:
        for node in block.nodes():
            kind = node.kind()
            ins = list(node.inputs())
            if kind == "prim::GetAttr":
                parent = mod_of.get(node.input().unique())
                if parent is None:
                    continue
                attr = node.s("name")
                path = f"{parent}.{attr}" if parent else attr
                if path in modules and isinstance(modules[path], torch.nn.Module):
                    mod_of[node.output().unique()] = path
                    continue
                try:
                    value = getattr(modules[parent], attr)
                except Exception:
                    continue
                merge(node.output(), groups.groups_in(value))
                continue
            if kind in ("prim::If", "prim::Loop"):
                subs = list(node.blocks())
                if kind == "prim::Loop":  # carried values: node inputs[2:] → block params[1:]
                    for sub in subs:
                        for src, dst in zip(ins[2:], list(sub.inputs())[1:]):
                            merge(dst, carried_by(src))
                            if src.unique() in mod_of:
                                mod_of[dst.unique()] = mod_of[src.unique()]
                for sub in subs:
                    visit(sub)
                outs = list(node.outputs())
                for sub in subs:
                    bouts = list(sub.outputs())
                    if kind == "prim::Loop":
                        bouts = bouts[1:]
                    for src, dst in zip(bouts, outs):
                        merge(dst, carried_by(src))
                continue
            for sub in node.blocks():  # other ops with blocks (closures): visit, no flow out
                visit(sub)
            carried = [carried_by(v) for v in ins]
            if not any(carried):
                continue
            if kind in _PASS:
                every = frozenset().union(*carried)
                for out in node.outputs():
                    merge(out, every)
                continue
            if kind in _WEIGHT_AT:
                use = ("conv_transpose" if kind in _TRANSPOSED else "conv" if kind in _CONV
                       else "rnn" if kind in _RNN else "linear" if kind == "aten::linear" else "matmul")
                if kind in ("aten::_convolution", "aten::convolution") and len(ins) > 6:
                    flag = ins[6]
                    if flag.node().kind() == "prim::Constant" and flag.toIValue() is True:
                        use = "conv_transpose"
                record_weight_uses(kind, use, carried, uses)
                continue
            if "attention" in kind or "transformer" in kind:  # fused attention / encoder-layer ops
                for gs in carried:
                    for g in gs:
                        if groups.tensor[g].dim() >= 2:
                            uses.setdefault(g, set()).add("attention")
                continue
            if kind in _LOOKUP_AT:
                lookups.update(carried[_LOOKUP_AT[kind]])

    visit(graph.block())
    return uses, lookups


def _eager_uses(module: torch.nn.Module, groups: _Groups) -> tuple[dict[int, set[str]], set[int]]:
    """The same classification from Python types, for modules that are not TorchScript."""
    nn = torch.nn
    uses: dict[int, set[str]] = {}
    lookups: set[int] = set()

    def add(t: Any, use: str) -> None:
        g = groups.group_of(t)
        if g is not None:
            uses.setdefault(g, set()).add(use)

    for _, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            g = groups.group_of(sub.weight)
            if g is not None:
                lookups.add(g)
        elif isinstance(sub, nn.modules.conv._ConvTransposeNd):
            add(sub.weight, "conv_transpose")
        elif isinstance(sub, nn.modules.conv._ConvNd):
            add(sub.weight, "conv")
        elif isinstance(sub, nn.Linear):
            add(sub.weight, "linear")
        elif isinstance(sub, (nn.RNNBase, nn.RNNCellBase)):
            for pname, p in _own_tensors(sub, "param"):
                if pname.startswith(("weight_ih", "weight_hh", "weight_hr")):
                    add(p, "rnn")
        elif isinstance(sub, nn.MultiheadAttention):
            for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                add(getattr(sub, pname, None), "attention")
        elif type(sub).__name__ == "Conv1D" and getattr(sub, "weight", None) is not None:
            add(sub.weight, "matmul")  # Hugging Face GPT-2: x @ W
    return uses, lookups


_PRIORITY = ("conv_transpose", "conv", "linear", "rnn", "attention", "matmul")


def discover(module: torch.nn.Module, *, exclude_first_last: bool = False,
             include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> Discovery:
    """Classify every ≥ 2-d parameter of ``module``; see the module docstring for the rules."""
    groups = _Groups(module)
    method = "graph"
    try:
        from .exported import graph_uses as exported_graph_uses, is_exported

        if is_exported(module):  # a torch.export program: its FX graph (calibration.exported)
            uses, lookups = exported_graph_uses(module, groups)
            method = "exported_graph"
        else:
            uses, lookups = _graph_uses(module, groups)
    except Exception:  # not a ScriptModule, or a graph torch will not copy or inline
        uses, lookups = _eager_uses(module, groups)
        method = "module_types"
    # A safety net, never a narrowing: the weight of a module whose class is a standard Conv*/Linear stays a
    # candidate even where the graph walk missed its use (an op this module does not know).
    for _, sub in module.named_modules():
        mtype = module_type(sub)
        weight = dict(_own_tensors(sub, "param")).get("weight")
        g = groups.group_of(weight) if weight is not None and weight.dim() >= 2 else None
        if g is not None and mtype in _STANDARD and g not in uses:
            uses[g] = {_STANDARD[mtype]}
    include = list(include) if include is not None else None
    exclude = list(exclude)
    matrices: dict[str, int] = {}
    not_candidates: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    weights: list[PrunableWeight] = []
    matched_include: set[str] = set()
    overlapping = groups.overlapping()

    def matches(names: list[str], patterns: list[str]) -> str | None:
        for pat in patterns:
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                return pat
        return None

    for g, names in enumerate(groups.names):
        p = groups.tensor[g]
        if p.dim() < 2:
            continue
        name = names[0]
        matrices[name] = p.numel()
        if len(names) > 1:
            tied[name] = names[1:]
        group_uses = uses.get(g, set())
        looked_up = g in lookups
        if g in overlapping:
            other = groups.names[overlapping[g]][0]
            reason = f"shares its storage with {other} (a different view of one tensor): never pruned"
            not_candidates[name] = reason
            continue
        if looked_up:
            reason = "an embedding (looked up by index)"
            if len(names) > 1:
                reason += f", tied to {', '.join(names[1:])}: pruned together or not at all"
            use = "embedding"
        elif not group_uses:
            reason = "not used as the weight of a linear map, convolution, matrix product or RNN"
            use = ""
        else:
            reason, use = "", next(u for u in _PRIORITY if u in group_uses)
        if include is not None:
            pat = matches(names, include)
            if pat is None:
                not_candidates[name] = "not matched by prune_include"
                continue
            matched_include.add(pat)
            use = use or "other"
        elif reason:
            not_candidates[name] = reason
            continue
        pat = matches(names, exclude)
        if pat is not None:
            not_candidates[name] = f"excluded by prune_exclude pattern {pat!r}"
            continue
        path, mtype = groups.owner[g]
        weights.append(PrunableWeight(name=name, module_path=path, module_type=mtype, param=p, kind=use,
                                      tied=tuple(names[1:])))
    if include is not None:
        unmatched = [pat for pat in include if pat not in matched_include]
        if unmatched:
            raise ModelError(
                f"The prune_include pattern(s) {', '.join(map(repr, unmatched))} match no weight matrix of the model "
                f"(parameters of two or more dimensions). Its weight matrices: {', '.join(matrices) or 'none'}.",
                code="prune_pattern_matches_nothing",
            )
    if exclude_first_last and len(weights) > 2:
        for w in (weights[0], weights[-1]):
            not_candidates[w.name] = "the first or the last prunable layer (exclude_first_last)"
        weights = weights[1:-1]
    return Discovery(weights=weights, matrices=matrices, not_candidates=not_candidates, tied=tied, method=method)


def batchnorm_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that keep batch statistics of their own (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    found = []
    for _, sub in module.named_modules():
        own = dict(_own_tensors(sub, "buffer"))
        if all(isinstance(own.get(b), torch.Tensor) for b in _BN_BUFFERS):
            found.append(sub)
    return found


__all__ = ["Discovery", "PrunableWeight", "batchnorm_modules", "discover", "module_type"]
