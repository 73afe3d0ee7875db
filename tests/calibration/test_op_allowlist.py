"""The operator allowlist: hostile TorchScript is refused from its code text, before any loading.

Hostile models are built here with torch.jit.script, saved with torch.jit.save and then (for some)
rewritten the way an attacker would: code under another top folder, upper-case ``CODE/``,
re-zipped with ZIP_DEFLATED, hand-edited code text. Every refusal is checked for its code and for
the operator named in the message; the benign corpus must pass, and quickly.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibration.errors import ModelError
from calibration.model import check_archive, load_model
from calibration.op_allowlist import (
    DENIED_BUILTINS,
    DENIED_NAMESPACES,
    DENIED_OPS,
    MAX_CODE_BYTES,
    allowlist,
    denial_reason,
    scan_archive,
    scan_code,
)

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = "model_uses_forbidden_op"


def _save(module: torch.nn.Module | torch.jit.ScriptModule, path: Path) -> Path:
    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    torch.jit.save(scripted, str(path))
    return path


def _refused(path: Path, *needles: str, torch_reader: bool = False) -> str:
    with pytest.raises(ModelError) as info:
        if torch_reader:
            scan_archive(path, torch_reader=True)
        else:
            check_archive(path)
    assert info.value.code == FORBIDDEN, (info.value.code, str(info.value))
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _rewrite(src: Path, dst: Path, *, rename=lambda n: n, edit=lambda n, b: b,
             compression: int | None = None) -> Path:
    """Copy a zip entry by entry, renaming entries and editing their bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            new = zipfile.ZipInfo(rename(info.filename), date_time=info.date_time)
            new.compress_type = info.compress_type if compression is None else compression
            zout.writestr(new, data)
    return dst


# -- hostile models ----------------------------------------------------------------------------


class ReadsFile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        leaked = torch.from_file("/etc/hostname", shared=False, size=8, dtype=torch.uint8)
        return self.fc(x) + leaked.sum().float() * 0


class MapsFileForWriting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        victim = torch.from_file("/tmp/victim.bin", shared=True, size=8, dtype=torch.uint8)
        victim.zero_()
        return self.fc(x) + victim.sum().float() * 0  # used, or TorchScript drops it as dead code


class Prints(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        print("INFO certiprune.service job j_123 succeeded")
        return self.fc(x)


class Saves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        torch.save(x, "/tmp/out.pt")
        return self.fc(x)


class ReadsInSetstate(nn.Module):
    """``__setstate__`` runs inside torch.jit.load: the load itself would read the file."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.stolen = torch.zeros(8, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> Tuple[Tensor, Tensor, Tensor, bool]:
        return (self.fc.weight, self.fc.bias, self.stolen, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, Tensor, Tensor, bool]) -> None:
        self.stolen = torch.from_file("/etc/hostname", shared=False, size=8, dtype=torch.uint8)
        self.training = state[3]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


@torch.jit.script
def _helper_reads(n: int) -> Tensor:
    return torch.from_file("/etc/hostname", shared=False, size=n, dtype=torch.uint8)


class ReadsInHelperFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + _helper_reads(4).sum().float() * 0


class _Inner(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + torch.from_file("/etc/hostname", shared=False, size=1, dtype=torch.uint8).float()


class ReadsInSubmodule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.inner = _Inner()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.fc(x))


HOSTILE = {
    "from_file_shared_false": (ReadsFile, ["aten::from_file", "(code/__torch__/", "reads or writes files"]),
    "from_file_shared_true": (MapsFileForWriting, ["aten::from_file", "reads or writes files"]),
    "print": (Prints, ["print() (prim::Print)", "server's output"]),
    "save": (Saves, ["aten::save", "reads or writes files"]),
    "setstate": (ReadsInSetstate, ["aten::from_file"]),
    "helper_function": (ReadsInHelperFunction, ["aten::from_file"]),
    "submodule": (ReadsInSubmodule, ["aten::from_file"]),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    return {name: _save(cls(), d / f"{name}.pt") for name, (cls, _) in HOSTILE.items()}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_model_is_refused_at_admission(hostile, name) -> None:
    msg = _refused(hostile[name], *HOSTILE[name][1])  # raises unless refused with model_uses_forbidden_op
    assert "certiprune refuses models" in msg


def test_message_says_why_in_words(hostile) -> None:
    msg = _refused(hostile["from_file_shared_false"])
    assert msg == ("The model's TorchScript code calls aten::from_file (code/__torch__/test_op_allowlist.py), which "
                   "reads or writes files; certiprune refuses models that touch files, processes or the network."), msg


@pytest.mark.parametrize("name", ["from_file_shared_true", "print", "setstate"])
def test_load_model_refuses_before_torch_jit_load(hostile, name, monkeypatch) -> None:
    def boom(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("torch.jit.load ran on a hostile archive")

    monkeypatch.setattr(torch.jit, "load", boom)
    with pytest.raises(ModelError) as info:
        load_model(hostile[name])
    assert info.value.code == FORBIDDEN


@pytest.mark.parametrize("variant", ["other_top_folder", "upper_case_code_folder", "deflated", "stored",
                                     "nested_odd_names", "upper_case_suffix"])
def test_refused_after_rewriting_the_archive(hostile, tmp_path, variant) -> None:
    src = hostile["from_file_shared_false"]
    top = lambda n: n.split("/", 1)[1]  # noqa: E731
    kw = {
        "other_top_folder": dict(rename=lambda n: "innocent_weights/" + top(n)),
        "upper_case_code_folder": dict(rename=lambda n: "x/" + top(n).replace("code/", "CODE/")),
        "deflated": dict(compression=zipfile.ZIP_DEFLATED),
        "stored": dict(compression=zipfile.ZIP_STORED),
        "nested_odd_names": dict(rename=lambda n: "a b/" + top(n).replace("code/", "code/./")),
        "upper_case_suffix": dict(rename=lambda n: "m/" + top(n).replace(".py", ".PY")),
    }[variant]
    path = _rewrite(src, tmp_path / f"{variant}.pt", **kw)
    assert "aten::from_file" in _refused(path, "aten::from_file")  # the zipfile reader (admission)
    assert "aten::from_file" in _refused(path, "aten::from_file", torch_reader=True)  # torch's own reader


def test_the_torch_reader_finds_case_insensitive_code_records(hostile, tmp_path) -> None:
    """torch.jit.load looks code records up case-insensitively: ``CODE/`` loads like ``code/``."""
    src = hostile["from_file_shared_false"]
    path = _rewrite(src, tmp_path / "upper.pt", rename=lambda n: "q/" + n.split("/", 1)[1].replace("code/", "CODE/"))
    reader = torch._C.PyTorchFileReader(str(path))
    upper = [r for r in reader.get_all_records() if r.startswith("CODE/") and r.endswith(".py")]
    assert upper and all(reader.has_record(r.replace("CODE/", "code/")) for r in upper)


EVASIONS = {
    # hand-written code text, as an attacker would put in the archive
    "alias_torch": ("t = torch\n    v = t.from_file('/etc/hostname', False, 8, dtype=0)", "torch"),
    "autograd_path": ("v = torch.autograd.autograd.from_file('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "ops_aten": ("v = ops.aten.from_file('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "torch_ops_aten": ("v = torch.ops.aten.from_file('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "spaced_dots": ("v = torch . from_file('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "line_continuation": ("v = (torch\n      # comment\n      .from_file)('/etc/hostname', False, 8, dtype=0)",
                          "aten::from_file"),
    "backslash_continuation": ("v = torch\\\n.from_file('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "getattr_string": ("v = getattr(torch, 'from_' \"file\")('/etc/hostname', False, 8, dtype=0)",
                       "aten::from_file"),
    "getattr_octal_escape": ("v = getattr(torch, 'from\\137file')('/etc/hostname', False, 8, dtype=0)",
                             "aten::from_file"),
    "getattr_nested": ("v = getattr(getattr(torch, 'autograd'), 'from_file')('/etc/hostname', False, 8, dtype=0)",
                       "aten::from_file"),
    "parenthesised": ("v = (torch).from_file('/etc/hostname', False, 8, dtype=0)", "torch"),
    "alias_ops": ("o = ops.aten\n    v = o.from_file('/etc/hostname', False, 8, dtype=0)", "ops.aten"),
    "function_value": ("f = torch.from_file\n    v = f('/etc/hostname', False, 8, dtype=0)", "aten::from_file"),
    "prim_print": ("ops.prim.Print('forged log line')", "prim::Print"),
    "print_alias": ("p = print\n    p('forged')", "print()"),
    "custom_namespace": ("v = ops.myns.steal(x)", "myns"),
    "unknown_aten": ("v = torch.definitely_not_an_op(x)", "aten::definitely_not_an_op"),
    "rpc": ("v = ops.prim.rpc_sync('worker1', 'f', ())", "prim::rpc_sync"),
    "c10d": ("v = ops.c10d.send([x], 1, 0)", "c10d::send"),
    "process_group_class": ("pg = uninitialized(__torch__.torch.classes.c10d.ProcessGroup)",
                            "__torch__.torch.classes.c10d"),
    "class_namespace_alias": ("c = __torch__.torch\n    pg = c.classes.c10d.ProcessGroup", "__torch__.torch"),
    "type_comment": ("v = x  # type: torch.from_file", "aten::from_file"),
    "tensor_method": ("x.save('/tmp/out.pt')", ".save() (aten::save)"),
    "profiler": ("h = ops.profiler._record_function_enter_new('x', None)", "profiler::_record_function_enter_new"),
}


@pytest.mark.parametrize("case", sorted(EVASIONS))
def test_hand_written_evasions_are_refused(case) -> None:
    body, needle = EVASIONS[case]
    src = f"def forward(self: __torch__.M,\n    x: Tensor) -> Tensor:\n    {body}\n    return x\n"
    findings = scan_code(src, "m/code/__torch__.py")
    assert findings, f"{case}: nothing found in\n{src}"
    assert any(needle in f.op for f in findings), (case, findings)


def test_strings_and_comments_are_not_code() -> None:
    src = ('def forward(self, x: Tensor) -> Tensor:\n'
           '    _0 = "torch.from_file(x) is mentioned in a message"\n'
           "    _1 = 'print(1)'  # torch.save(x, 'f') in a comment\n"
           '    _2 = """\n    ops.c10d.send()\n    """\n'
           '    _3 = "escaped \\" quote torch.from_file"\n'
           '    return torch.relu(x)\n')
    assert scan_code(src) == []


def test_user_methods_and_attributes_stay_allowed() -> None:
    src = ("def forward(self, x: Tensor) -> Tensor:\n"
           "    block = self.block\n    y = (block).forward(x, )\n    z = (self).helper(y, )\n"
           "    w = self.weight\n    return torch.add(torch.linear(z, w), 1)\n")
    assert scan_code(src) == []


def test_string_rules_match_torchscripts(tmp_path) -> None:
    """The scan's string rules are TorchScript's: here ``"a\\\\"`` ends at its second quote, so the
    from_file after it is code. TorchScript loads and runs this text (so it is a real evasion for a
    scanner that gets escapes wrong), and the scan refuses it."""
    inject = ('    _0 = "a\\\\"\n'
              '    _1 = torch.from_file("/etc/hostname", False, 1, dtype=0)\n'
              '    return torch.add(input, torch.sum(_1))\n')
    base = _save(torch.jit.script(nn.Identity()), tmp_path / "base.pt")

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith(".py") or b"class Identity" not in data:
            return data
        return data.decode().replace("    return input\n", inject).encode()

    out = _rewrite(base, tmp_path / "forged.pt", edit=edit)
    assert torch.jit.load(str(out))(torch.zeros(1)).numel() == 1  # the text is valid TorchScript
    _refused(out, "aten::from_file")


# -- the benign corpus ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.lstm(x)
        z, _ = self.gru(y)
        return self.fc(z[:, -1])


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.enc(x).mean(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, w = self.attn(x, x, x, need_weights=True)
        return self.fc(self.norm(y + x)).mean(1)


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.bag = nn.EmbeddingBag(50, 8, mode="mean")
        self.fc = nn.Linear(16, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(torch.cat([self.emb(tokens).mean(1), self.bag(tokens)], dim=1))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, self.w1))
        h = F.layer_norm(h, [16])
        h = F.dropout(h, 0.1, self.training)
        h = h.view(-1, 2, 8)
        h = F.max_pool1d(F.relu(self.conv(h)), 2)
        h = F.interpolate(h, scale_factor=2.0, mode="linear", align_corners=False)
        h = F.adaptive_avg_pool1d(h, 1).flatten(1)
        return F.log_softmax(self.fc(h), dim=-1) + F.softmax(self.fc(h), dim=-1) * 0 + torch.sigmoid(h).sum() * 0


class ControlFlowDictTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.names: List[str] = ["x", "y"]

    def helper(self, x: Tensor, n: int) -> Tensor:
        for _ in range(n):
            x = torch.tanh(self.a(x))
        return x

    def forward(self, x: Tensor, scale: Optional[float] = None) -> Tuple[Dict[str, Tensor], Tensor]:
        if scale is not None:
            x = x * scale
        h = self.helper(x, 2)
        i = 0
        while i < 2 and bool(h.sum() > -1e9):
            h = h + 1
            i += 1
        if isinstance(scale, float):
            h = h.clamp(min=-3.0, max=3.0)
        out = {self.names[0]: self.b(h)}
        if h.dim() != 2:
            raise ValueError(f"expected 2-D input, got {h.dim()}-D")
        return out, torch.stack([h.max(), h.min()])


class ResNetish(nn.Module):
    """ResNet-sized (about 11M parameters) for the timing check."""

    def __init__(self) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        ch = 64
        for out in (64, 128, 256, 512):
            for _ in range(2):
                layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                ch = out
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))


def _benign_corpus() -> Dict[str, torch.jit.ScriptModule]:
    torch.manual_seed(0)
    corpus: Dict[str, torch.jit.ScriptModule] = {}
    for cls in (MLP, CNN, Recurrent, Transformer, Attention, Embedder, Functional, ControlFlowDictTuple):
        corpus[f"scripted_{cls.__name__}"] = torch.jit.script(cls().eval())
    examples = {MLP: torch.randn(2, 8), CNN: torch.randn(2, 1, 12, 12), Recurrent: torch.randn(2, 5, 6),
                Transformer: torch.randn(2, 5, 16), Attention: torch.randn(2, 5, 16),
                Embedder: torch.randint(0, 50, (2, 7)), Functional: torch.randn(4, 8)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for cls, ex in examples.items():
            corpus[f"traced_{cls.__name__}"] = torch.jit.trace(cls().eval(), ex, check_trace=False)
    return corpus


@pytest.fixture(scope="module")
def benign(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("benign")
    return {name: _save(m, d / f"{name}.pt") for name, m in _benign_corpus().items()}


def test_benign_corpus_passes(benign) -> None:
    refused = {}
    for name, path in benign.items():
        try:
            check_archive(path)
            scan_archive(path, torch_reader=True)
        except ModelError as exc:
            refused[name] = str(exc)
    assert not refused, refused


def test_benign_corpus_still_loads_through_load_model(benign) -> None:
    for name in ("scripted_CNN", "traced_Transformer", "scripted_ControlFlowDictTuple"):
        assert load_model(benign[name]) is not None


def test_resnet_sized_archive_is_checked_fast(tmp_path) -> None:
    path = _save(torch.jit.script(ResNetish().eval()), tmp_path / "resnet.pt")
    assert path.stat().st_size > 20 * 1024**2
    check_archive(path)  # warm the allowlist cache once, as a long-running API process would
    t0 = time.perf_counter()
    for _ in range(3):
        check_archive(path)
    per_call = (time.perf_counter() - t0) / 3
    assert per_call < 0.2, f"check_archive took {per_call:.3f} s on a ResNet-sized archive"


def test_cold_first_check_is_fast_too(benign) -> None:
    code = ("import time, sys; sys.path.insert(0, %r); import torch; from calibration.model import check_archive;"
            "t = time.perf_counter(); check_archive(%r); print(time.perf_counter() - t)"
            % (str(REPO), str(benign["scripted_Transformer"])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 0.2, out.stdout


# -- the frozen list -----------------------------------------------------------------------------


def test_frozen_allowlist_excludes_the_denylist() -> None:
    allowed = allowlist()
    assert len(allowed) > 1500
    assert not (set(DENIED_OPS) & allowed)
    assert not [n for n in allowed if n.split("::")[0] in DENIED_NAMESPACES]
    assert not [b for b in DENIED_BUILTINS if f"builtin::{b}" in allowed]
    for op in ("aten::from_file", "aten::save", "prim::Print", "aten::_print", "prim::rpc_sync", "c10d::send"):
        assert op not in allowed and denial_reason(op)
    for op in ("aten::linear", "aten::conv2d", "aten::lstm", "aten::embedding", "prim::RaiseException",
               "aten::bernoulli_", "aten::_nested_tensor_from_mask", "aten::to", "builtin::annotate"):
        assert op in allowed, op


def test_frozen_allowlist_does_not_drift_with_the_installed_torch(tmp_path) -> None:
    """The committed file is the list; the script regenerates it for the torch this repo pins."""
    from calibration.op_allowlist_data import TORCH_VERSION

    if torch.__version__.split("+")[0] != TORCH_VERSION or torch.version.cuda:
        pytest.skip(f"the list was derived from CPU torch {TORCH_VERSION}; this is {torch.__version__}")
    out = subprocess.run([sys.executable, str(REPO / "scripts/derive_op_allowlist.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_denied_operator_is_reachable_as_a_live_tensor_method() -> None:
    """Denied aten ops are refused as ``x.name(`` too; check each has no other spelling we miss."""
    for op in DENIED_OPS:
        ns, name = op.split("::")
        if ns == "aten":  # x.name(...) only ever dispatches to aten::name
            assert scan_code(f"def f(x: Tensor):\n  return x.{name}(1)\n"), op
        assert scan_code(f"def f(x: Tensor):\n  return ops.{ns}.{name}(x)\n"), op
        assert scan_code(f"def f(x: Tensor):\n  return torch.ops.{ns}.{name}(x)\n"), op


# -- bounds and odd archives -----------------------------------------------------------------------


def test_too_much_code_is_refused_unread(tmp_path) -> None:
    base = _save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "base.pt")
    big = _rewrite(base, tmp_path / "big.pt", compression=zipfile.ZIP_DEFLATED,
                   edit=lambda n, b: b + b"#" * (MAX_CODE_BYTES + 1) if n.endswith(".py") else b)
    assert big.stat().st_size < 2 * 1024**2  # a bomb: small on disk
    with pytest.raises(ModelError) as info:
        check_archive(big)
    assert info.value.code == "model_too_large" and "64 MiB" in str(info.value)


def test_flatbuffer_polyglot_is_refused(tmp_path) -> None:
    base = _save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "base.pt")
    data = bytearray(base.read_bytes())
    data[4:8] = b"PTMF"  # torch.jit.load would take it for a flatbuffer module
    (tmp_path / "poly.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        check_archive(tmp_path / "poly.pt")
    assert info.value.code in ("model_corrupt", "model_not_torchscript")


def test_duplicate_entries_are_all_scanned(tmp_path, hostile) -> None:
    clean = _save(torch.jit.script(MLP()), tmp_path / "clean.pt")
    with zipfile.ZipFile(hostile["from_file_shared_false"]) as zh:
        bad = next(zh.read(n) for n in zh.namelist() if n.endswith(".py") and b"from_file" in zh.read(n))
    with zipfile.ZipFile(clean) as zin:
        target = next(n for n in zin.namelist() if n.endswith(".py"))
    with pytest.warns(UserWarning):  # Python warns on the duplicate name
        with zipfile.ZipFile(clean, "a") as za:
            za.writestr(target, bad)
    assert "aten::from_file" in _refused(clean, "aten::from_file")


def test_too_many_tokens_is_refused(tmp_path) -> None:
    base = _save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "base.pt")
    many = _rewrite(base, tmp_path / "many.pt", compression=zipfile.ZIP_DEFLATED,
                    edit=lambda n, b: b + b"\n_x = (" + b"[" * 1_100_000 + b"]" * 1_100_000 + b")\n"
                    if n.endswith(".py") else b)
    with pytest.raises(ModelError) as info:
        check_archive(many)
    assert info.value.code == "model_too_large" and "tokens" in str(info.value)


@pytest.mark.parametrize("text", [b'"' + b"\\n" * (8 * 2**20) + b'"', b"'\\" * (8 * 2**20),
                                  b'"""' + b'x\n"y' * (4 * 2**20) + b'"""', b'"""' + b"x" * (16 * 2**20)])
def test_pathological_text_is_scanned_in_linear_time(text) -> None:
    t0 = time.perf_counter()
    scan_code(text)
    assert time.perf_counter() - t0 < 2.0
