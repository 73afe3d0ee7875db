"""A corpus of bad inputs through the real HTTP API: each gets the §3 error body with a specific code.

After every refused request the server still answers /healthz, and nothing was written half:
no new folder under data_dir/jobs, no new file under data_dir/datasets, no job or dataset row.
Problems only the sandboxed worker can see (the model must run) fail the JOB with a specific code
and leave no artifact. The API process never unpickles what users send: a pickle whose loading
would create a canary file is uploaded in every place a pickle can hide, and the canary stays absent.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import sqlite3
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy
from service_harness import (
    KEY_A,
    KEY_B,
    REPO,
    Inputs,
    Server,
    assert_error,
    module_server,
    submit,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(240)

UPLOAD_LIMIT = 2 * 1024 * 1024
FAST = {"sparsities": [0.1, 0.5], "epsilon": 0.05}


# -- building bad files ---------------------------------------------------------------------

class Canary:
    """Unpickling this object creates ``path`` (a stand-in for arbitrary code execution)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy_with_header(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def zip_bomb() -> bytes:
    """A 1 KiB zip whose central directory declares 5 × 4 GiB of content."""
    raw = bytearray(zip_bytes({f"archive/data/{i}": b"x" for i in range(5)}))
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) != -1:
        raw[pos + 24:pos + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size
        pos += 4
    return bytes(raw)


@dataclass
class Files:
    model: bytes
    data: bytes
    big_data: bytes
    canary: Path
    bad_models: dict[str, bytes]


@pytest.fixture(scope="module")
def files(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Files:
    import torch
    from torch import nn

    d = tmp_path_factory.mktemp("bad-inputs")
    canary = d / "canary-unpickled"

    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 0:
                raise RuntimeError("boom: this model refuses to run")
            return self.fc(x)

    class WrongShape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).sum(dim=1)

    class NonFinite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) / 0.0 * 0.0  # NaN everywhere

    class NoPrunable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scale)[:, :10]

    def scripted(module: nn.Module, freeze: bool = False) -> bytes:
        s = torch.jit.script(module.eval())
        if freeze:
            s = torch.jit.freeze(s)
        buf = io.BytesIO()
        torch.jit.save(s, buf)
        return buf.getvalue()

    ckpt = io.BytesIO()
    torch.save({"weight": torch.zeros(2, 2), "payload": Canary(canary)}, ckpt)
    fake_code = zip_bytes({"archive/code/__torch__.py": b"this is not TorchScript", "archive/data.pkl": b"\x80\x02N."})
    bad_models = {
        "raises": scripted(Raises()),
        "wrong_shape": scripted(WrongShape()),
        "non_finite": scripted(NonFinite()),
        "frozen": scripted(nn.Sequential(nn.Linear(64, 10)), freeze=True),
        "no_prunable": scripted(NoPrunable()),
        "garbage_code": fake_code,
        "pickle_checkpoint": ckpt.getvalue(),
    }
    return Files(model=inputs.model.read_bytes(), data=inputs.data.read_bytes(), big_data=inputs.big_data.read_bytes(),
                 canary=canary, bad_models=bad_models)


# -- the server and what "nothing written" means --------------------------------------------

@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed-root")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dataset_root: Path) -> Iterator[Server]:
    # localhost:9 is allowed as a root, but resolves to loopback: the address guard must still refuse it.
    yield from module_server(tmp_path_factory, api_keys=f"{KEY_A},{KEY_B}", max_upload_bytes=UPLOAD_LIMIT,
                             allowed_dataset_roots=f"{dataset_root},http://localhost:9/data/",
                             max_concurrent_jobs=2, max_attempts=1)


@dataclass
class Snapshot:
    entries: set[str]
    rows: tuple[int, int]


def snapshot(server: Server) -> Snapshot:
    root = server.data_dir
    entries = {str(p.relative_to(root)) for sub in ("jobs", "datasets") if (root / sub).exists()
               for p in (root / sub).iterdir()}
    entries |= {p.name for p in root.iterdir() if p.name.startswith(".tmp")}
    with sqlite3.connect(root / "certiprune.db") as db:
        rows = (db.execute("SELECT count(*) FROM jobs").fetchone()[0],
                db.execute("SELECT count(*) FROM datasets").fetchone()[0])
    return Snapshot(entries=entries, rows=rows)


@dataclass
class Ctx:
    a: httpx.Client
    b: httpx.Client
    anon: httpx.Client
    files: Files
    inputs: Inputs
    dataset_root: Path
    a_job: str
    a_dataset: str
    tmp: Path


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    code: str
    send: Callable[[Ctx], httpx.Response]


def job(ctx: Ctx, *, model: bytes | None = None, data: bytes | None = None, dataset: str | None = None,
        config: str | dict[str, Any] | None = None, client: str = "a", headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None) -> httpx.Response:
    """POST /v1/jobs with the good model and data unless told otherwise (``b""`` is an empty part)."""
    files: dict[str, Any] = {"model": ("model.pt", ctx.files.model if model is None else model)}
    if dataset is None:
        files["data"] = ("data.npz", ctx.files.data if data is None else data)
    form: dict[str, str] = {}
    if dataset is not None:
        form["dataset"] = dataset
    if config is not None:
        form["config"] = config if isinstance(config, str) else json.dumps(config)
    files.update(extra or {})
    return getattr(ctx, client).post("/v1/jobs", files=files, data=form, headers=headers)


def data(ctx: Ctx, payload: bytes, config: dict[str, Any] | None = None) -> httpx.Response:
    return job(ctx, data=payload, config=config)


def model(ctx: Ctx, payload: bytes) -> httpx.Response:
    return job(ctx, model=payload)


def cfg(ctx: Ctx, config: str | dict[str, Any]) -> httpx.Response:
    return job(ctx, config=config)


def uri(ctx: Ctx, dataset: str) -> httpx.Response:
    return job(ctx, dataset=dataset)


def streamed_oversize(ctx: Ctx) -> httpx.Response:
    """A multipart body without Content-Length: the limit must hold on the bytes as they arrive."""
    big = ctx.files.big_data

    def chunks() -> Iterator[bytes]:
        yield b'--b0undary\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n\r\n'
        yield ctx.files.model
        yield b'\r\n--b0undary\r\nContent-Disposition: form-data; name="data"; filename="d.npz"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n--b0undary--\r\n"

    return ctx.a.post("/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b0undary"})


def symlink_out(ctx: Ctx) -> httpx.Response:
    link = ctx.dataset_root / "escape.npz"
    if not link.exists():
        link.symlink_to(ctx.inputs.data)
    return uri(ctx, str(link))


def intake_cases(x: np.ndarray, y: np.ndarray) -> list[Case]:
    x50, y50 = x[:50], y[:50]
    nan_x = x50.copy()
    nan_x[3, 5] = np.nan
    inf_x = x50.copy()
    inf_x[7, 0] = np.inf
    good_npy = io.BytesIO()
    np.save(good_npy, x50)
    m = "model_not_torchscript"
    return [
        # -- models (structure only: the API never loads them) --
        Case("model: not a zip", 422, m, lambda c: model(c, b"definitely not a zip")),
        Case("model: empty file", 422, m, lambda c: model(c, b"")),
        Case("model: truncated archive", 422, "model_corrupt",
             lambda c: model(c, c.files.model[: len(c.files.model) // 2])),
        Case("model: zip bomb (declares 20 GiB)", 422, "model_too_large", lambda c: model(c, zip_bomb())),
        Case("model: pickle checkpoint (torch.save)", 422, "model_is_pickle_checkpoint",
             lambda c: model(c, c.files.bad_models["pickle_checkpoint"])),
        Case("model: raw pickle", 422, m, lambda c: model(c, pickle.dumps(Canary(c.files.canary)))),
        Case("model: zip without code/", 422, m, lambda c: model(c, zip_bytes({"weights.bin": b"0" * 100}))),
        # -- data --
        Case("data: pickled object array", 422, "data_pickled",
             lambda c: data(c, npz_bytes(x=np.array([Canary(c.files.canary)], dtype=object)))),
        Case("data: raw pickle file", 422, "data_pickled", lambda c: data(c, pickle.dumps(Canary(c.files.canary)))),
        Case("data: object array by header only", 422, "data_pickled",
             lambda c: data(c, zip_bytes({"x.npy": npy_with_header((2,), "|O", b"")}))),
        Case("data: missing x", 422, "data_missing_x", lambda c: data(c, npz_bytes(y=y50))),
        Case("data: length mismatch", 422, "data_length_mismatch", lambda c: data(c, npz_bytes(x=x50, y=y50[:49]))),
        Case("data: negative labels", 422, "data_labels_out_of_range",
             lambda c: data(c, npz_bytes(x=x50, y=y50 - 5))),
        Case("data: fractional labels", 422, "data_bad_labels",
             lambda c: data(c, npz_bytes(x=x50, y=y50 + 0.5))),
        Case("data: string labels", 422, "data_bad_labels",
             lambda c: data(c, npz_bytes(x=x50, y=y50.astype(str)))),
        Case("data: 2-D labels", 422, "data_bad_labels",
             lambda c: data(c, npz_bytes(x=x50, y=np.stack([y50, y50], axis=1)))),  # per-position labels: no token risk
        Case("data: 3-D labels", 422, "data_bad_labels", lambda c: data(c, npz_bytes(x=x50, y=y50.reshape(50, 1, 1)))),
        Case("data: NaN labels", 422, "data_bad_labels",
             lambda c: data(c, npz_bytes(x=x50, y=np.where(np.arange(50) == 3, np.nan, y50)))),
        Case("data: NaN in x", 422, "data_not_finite", lambda c: data(c, npz_bytes(x=nan_x, y=y50))),
        Case("data: inf in x", 422, "data_not_finite", lambda c: data(c, npz_bytes(x=inf_x, y=y50))),
        Case("data: zero samples", 422, "data_empty",
             lambda c: data(c, npz_bytes(x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64)))),
        Case("data: empty file", 422, "data_empty", lambda c: data(c, b"")),
        Case("data: 1-D x", 422, "data_bad_shape", lambda c: data(c, npz_bytes(x=x50[:, 0]))),
        Case("data: string x", 422, "data_bad_dtype", lambda c: data(c, npz_bytes(x=x50.astype(str)))),
        Case("data: complex x", 422, "data_bad_dtype", lambda c: data(c, npz_bytes(x=x50.astype(np.complex64)))),
        Case("data: unexpected array", 422, "data_unexpected_arrays",
             lambda c: data(c, npz_bytes(x=x50, y=y50, secret=y50))),
        Case("data: header declares 10^12 elements", 422, "data_too_large",
             lambda c: data(c, zip_bytes({"x.npy": npy_with_header((10**6, 10**6))}))),
        Case("data: header declares 10^12 labels", 422, "data_too_large",
             lambda c: data(c, zip_bytes({"x.npy": good_npy.getvalue(), "y.npy": npy_with_header((10**12,), "<i8")}))),
        Case("data: header larger than the bytes", 422, "data_malformed",
             lambda c: data(c, zip_bytes({"x.npy": npy_with_header((1000, 64))}))),
        Case("data: truncated npz", 422, "data_malformed", lambda c: data(c, c.files.data[: len(c.files.data) // 2])),
        Case("data: unknown format", 422, "data_unsupported_format", lambda c: data(c, b"this is not an array file")),
        Case("data: corrupt safetensors", 422, "data_malformed",
             lambda c: data(c, (40).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [9999, 64]' + b" " * 8)),
        Case("data: labelled risk without labels", 422, "labels_required",
             lambda c: data(c, npz_bytes(x=x50), {"risk": "error_rate"})),
        Case("dataset upload: absurd header", 422, "data_too_large",
             lambda c: c.a.post("/v1/datasets", files={"file": ("d.npz", zip_bytes(
                 {"x.npy": npy_with_header((10**7, 10**7))}))})),
        Case("dataset upload: pickled arrays", 422, "data_pickled",
             lambda c: c.a.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(
                 x=np.array([Canary(c.files.canary)], dtype=object)))})),
        Case("dataset upload: no file part", 422, "missing_file",
             lambda c: c.a.post("/v1/datasets", files={"other": ("d.npz", c.files.data)})),
        # -- config --
        Case("config: epsilon 0", 422, "invalid_config", lambda c: cfg(c, {"epsilon": 0})),
        Case("config: epsilon 1.5", 422, "invalid_config", lambda c: cfg(c, {"epsilon": 1.5})),
        Case("config: delta 0", 422, "invalid_config", lambda c: cfg(c, {"delta": 0.0})),
        Case("config: delta 1", 422, "invalid_config", lambda c: cfg(c, {"delta": 1})),
        Case("config: epsilon NaN", 422, "invalid_config", lambda c: cfg(c, '{"epsilon": NaN}')),
        Case("config: epsilon as a string", 422, "invalid_config", lambda c: cfg(c, {"epsilon": "0.1"})),
        Case("config: unsorted sparsities", 422, "invalid_config", lambda c: cfg(c, {"sparsities": [0.5, 0.2]})),
        Case("config: duplicate sparsities", 422, "invalid_config", lambda c: cfg(c, {"sparsities": [0.2, 0.2]})),
        Case("config: sparsity 1.0", 422, "invalid_config", lambda c: cfg(c, {"sparsities": [0.5, 1.0]})),
        Case("config: negative sparsity", 422, "invalid_config", lambda c: cfg(c, {"sparsities": [-0.1, 0.5]})),
        Case("config: no sparsities", 422, "invalid_config", lambda c: cfg(c, {"sparsities": []})),
        Case("config: unknown criterion", 422, "invalid_config", lambda c: cfg(c, {"criterion": "nonsense"})),
        Case("config: unknown risk", 422, "invalid_config", lambda c: cfg(c, {"risk": "vibes"})),
        Case("config: unknown field", 422, "unknown_config_field", lambda c: cfg(c, {"epsilonn": 0.1})),
        Case("config: batch_size 0", 422, "invalid_config", lambda c: cfg(c, {"batch_size": 0})),
        Case("config: seed is a float", 422, "invalid_config", lambda c: cfg(c, {"seed": 1.5})),
        Case("config: invalid JSON", 422, "invalid_config_json", lambda c: cfg(c, "{not json")),
        Case("config: JSON array", 422, "invalid_config", lambda c: cfg(c, "[1, 2]")),
        Case("config: uncertainty file without mu", 422, "uncertainty_without_mu",
             lambda c: job(c, extra={"uncertainty": ("u.safetensors", b"\x02\0\0\0\0\0\0\0{}")})),
        Case("config: unreadable uncertainty file", 422, "invalid_uncertainty",
             lambda c: job(c, config={"criterion": "mu"}, extra={"uncertainty": ("u.safetensors", b"nonsense")})),
        # -- HTTP --
        Case("http: oversize upload (Content-Length)", 413, "upload_too_large", lambda c: data(c, c.files.big_data)),
        Case("http: oversize upload (streamed)", 413, "upload_too_large", streamed_oversize),
        Case("http: no model part", 422, "missing_model",
             lambda c: c.a.post("/v1/jobs", files={"data": ("d.npz", c.files.data)})),
        Case("http: no data part", 422, "missing_data",
             lambda c: c.a.post("/v1/jobs", files={"model": ("m.pt", c.files.model)})),
        Case("http: data and dataset", 422, "conflicting_data",
             lambda c: c.a.post("/v1/jobs", files={"model": ("m.pt", c.files.model), "data": ("d.npz", c.files.data)},
                                data={"dataset": c.a_dataset})),
        Case("http: unknown job", 404, "job_not_found", lambda c: c.a.get("/v1/jobs/job_000000000000000000000000")),
        Case("http: no API key", 401, "unauthorized", lambda c: job(c, client="anon")),
        Case("http: wrong API key", 401, "unauthorized",
             lambda c: c.a.post("/v1/jobs", headers={"Authorization": "Bearer not-a-configured-key"},
                                files={"model": ("m.pt", c.files.model), "data": ("d.npz", c.files.data)})),
        Case("http: Basic instead of Bearer", 401, "unauthorized",
             lambda c: c.anon.get("/v1/jobs", headers={"Authorization": f"Basic {KEY_A}"})),
        Case("http: another tenant's job", 404, "job_not_found", lambda c: c.b.get(f"/v1/jobs/{c.a_job}")),
        Case("http: cancel another tenant's job", 404, "job_not_found",
             lambda c: c.b.post(f"/v1/jobs/{c.a_job}/cancel")),
        Case("http: another tenant's artifact", 404, "job_not_found",
             lambda c: c.b.get(f"/v1/jobs/{c.a_job}/artifact")),
        Case("http: another tenant's dataset", 404, "dataset_not_found",
             lambda c: job(c, client="b", dataset=c.a_dataset)),
        Case("http: unknown dataset id", 404, "dataset_not_found", lambda c: uri(c, "ds_doesnotexist")),
        Case("http: bad Idempotency-Key", 422, "invalid_idempotency_key",
             lambda c: job(c, headers={"Idempotency-Key": "k" * 300})),
        Case("http: limit=0", 422, "validation_error", lambda c: c.a.get("/v1/jobs", params={"limit": 0})),
        # -- dataset URIs --
        Case("uri: '..' out of the root", 422, "dataset_not_allowed",
             lambda c: uri(c, f"{c.dataset_root}/../../../../etc/passwd")),
        Case("uri: relative path", 422, "dataset_not_allowed", lambda c: uri(c, "../../etc/passwd")),
        Case("uri: file:// outside the root", 422, "dataset_not_allowed", lambda c: uri(c, "file:///etc/passwd")),
        Case("uri: symlink out of the root", 422, "dataset_not_allowed", symlink_out),
        Case("uri: ftp scheme", 422, "dataset_scheme_not_allowed", lambda c: uri(c, "ftp://example.com/cal.npz")),
        Case("uri: memory scheme", 422, "dataset_scheme_not_allowed", lambda c: uri(c, "memory://cal.npz")),
        Case("uri: chained protocols", 422, "dataset_scheme_not_allowed",
             lambda c: uri(c, f"zip://x.npy::file://{c.dataset_root}/a.zip")),
        Case("uri: data: URL", 422, "dataset_not_allowed",
             lambda c: uri(c, "data:application/octet-stream;base64,AA==")),
        Case("uri: cloud metadata address", 422, "dataset_not_allowed",
             lambda c: uri(c, "http://169.254.169.254/latest/meta-data/")),
        Case("uri: loopback address", 422, "dataset_not_allowed", lambda c: uri(c, "http://127.0.0.1/cal.npz")),
        Case("uri: allowed root resolving to loopback", 422, "dataset_address_not_allowed",
             lambda c: uri(c, "http://localhost:9/data/cal.npz")),
        Case("uri: user info", 422, "dataset_not_allowed",
             lambda c: uri(c, "http://localhost:9@169.254.169.254/data/x")),
        Case("uri: encoded '..'", 422, "dataset_not_allowed", lambda c: uri(c, "http://localhost:9/data/%2e%2e/x.npz")),
        Case("uri: s3 without a root", 422, "dataset_not_allowed", lambda c: uri(c, "s3://bucket/cal.npz")),
    ]


@pytest.fixture(scope="module")
def ctx(server: Server, files: Files, inputs: Inputs, dataset_root: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    with server.client(KEY_A) as a, server.client(KEY_B) as b, server.client() as anon:
        a_job = submit(a, inputs.model, data=inputs.data, config=FAST)
        assert a_job.status_code == 202, a_job.text
        ds = a.post("/v1/datasets", files={"file": ("d.npz", files.data)})
        assert ds.status_code == 201, ds.text
        yield Ctx(a=a, b=b, anon=anon, files=files, inputs=inputs, dataset_root=dataset_root,
                  a_job=a_job.json()["id"], a_dataset=ds.json()["id"], tmp=tmp_path_factory.mktemp("ctx"))


def test_bad_inputs_get_a_specific_error_and_leave_nothing_behind(server: Server, ctx: Ctx, inputs: Inputs) -> None:
    cases = intake_cases(inputs.x_cal, inputs.y_cal)
    assert len({c.name for c in cases}) == len(cases)
    wait_terminal(ctx.a, ctx.a_job)  # its worker writes no more files while we compare folders
    failures: list[str] = []
    for case in cases:
        before = snapshot(server)
        try:
            response = case.send(ctx)
            err = assert_error(response, case.status, case.code)
            assert len(err["message"]) > 20, err
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
        assert ctx.anon.get("/healthz").status_code == 200, f"server down after {case.name}:\n{server.log()}"
        after = snapshot(server)
        if after.entries != before.entries:
            failures.append(f"{case.name}: left {sorted(after.entries - before.entries)}")
        if after.rows != before.rows:
            failures.append(f"{case.name}: rows {before.rows} -> {after.rows}")
    print(f"\nbad-input corpus (refused by the API): {len(cases)} cases tried, {len(cases) - len(failures)} "
          "answered with their specific code and nothing written")
    assert not ctx.files.canary.exists(), "the API process unpickled an upload"
    assert not failures, "\n".join(failures)


WORKER_CASES = [
    # (name, model key or None for the good model, data builder or None, expected code, words in the message)
    ("model frozen (no parameters)", "frozen", None, "model_frozen", "frozen"),
    ("model raises in forward", "raises", None, "model_forward_failed", "boom: this model refuses to run"),
    ("model returns the wrong shape", "wrong_shape", None, "model_bad_output", "shape (batch, classes)"),
    ("model returns NaN", "non_finite", None, "model_output_not_finite", "NaN"),
    ("model has no prunable weights", "no_prunable", None, "model_no_prunable_weights", "prunable"),
    ("model archive with invalid code", "garbage_code", None, "model_corrupt", "cannot be read as a TorchScript"),
    ("data shape the model rejects", None, lambda x, y: npz_bytes(x=x[:, :32], y=y), "model_forward_failed",
     "shape"),
    ("labels beyond the model's classes", None, lambda x, y: npz_bytes(x=x, y=np.full_like(y, 12)),
     "data_labels_out_of_range", "10 classes"),
]


def test_problems_only_the_worker_can_see_fail_the_job_with_their_code(server: Server, ctx: Ctx,
                                                                       inputs: Inputs) -> None:
    submitted: dict[str, tuple[str, str, str]] = {}
    for name, model_key, make_data, code, words in WORKER_CASES:
        payload = ctx.files.bad_models[model_key] if model_key else None
        body = make_data(inputs.x_cal, inputs.y_cal) if make_data else None
        r = job(ctx, model=payload, data=body, config=FAST)
        assert r.status_code == 202, f"{name}: {r.text}"
        submitted[r.json()["id"]] = (name, code, words)
    failures = []
    for job_id, (name, code, words) in submitted.items():
        done = wait_terminal(ctx.a, job_id, timeout=120)
        if done["status"] != "failed" or done["error"]["code"] != code or words not in done["error"]["message"]:
            failures.append(f"{name}: {done['status']} {done['error']}")
            continue
        assert_error(ctx.a.get(f"/v1/jobs/{job_id}/artifact"), 409, "job_not_succeeded")
        leftovers = [p.name for p in (server.data_dir / "jobs" / job_id).iterdir()
                     if p.name.startswith(".") or p.name == "artifact.pt"]
        if leftovers:
            failures.append(f"{name}: left {leftovers}")
    assert ctx.anon.get("/healthz").status_code == 200
    print(f"\nbad-input corpus (found by the worker): {len(WORKER_CASES)} cases tried, "
          f"{len(WORKER_CASES) - len(failures)} failed the job with their specific code")
    assert not failures, "\n".join(failures)


# -- the API process never unpickles user content -------------------------------------------

#: Modules that run in the API process (the worker, the executors that only spawn it, and the
#: offline CLI commands are not on the request path). check_archive is the only model code used.
API_MODULES = ["service/app.py", "service/auth.py", "service/deps.py", "service/errors.py", "service/intake.py",
               "service/metrics.py", "service/middleware.py", "service/schemas.py", "service/settings.py",
               "service/storage.py", "service/store.py", "service/routes/datasets.py", "service/routes/health.py",
               "service/routes/jobs.py", "calibration/data.py", "calibration/config.py", "calibration/errors.py",
               "calibration/archive.py", "calibration/op_allowlist.py", "calibration/signature.py"]
UNPICKLERS = {"load", "loads", "Unpickler"}


def _unpickling_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in ("pickle", "_pickle", "dill",
                                                                                  "cloudpickle", "joblib", "marshal",
                                                                                  "shelve")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("torch.load", "torch.jit.load", "jit.load", "torch.package.PackageImporter") or \
                (last in UNPICKLERS and name.split(".")[0] in ("pickle", "_pickle", "dill", "cloudpickle", "joblib")):
            found.append(name)
        if name in ("np.load", "numpy.load"):
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                found.append(f"{name} without allow_pickle=False")
    return found


def test_the_api_path_has_no_unpickling_call() -> None:
    offenders = {}
    for rel in API_MODULES:
        path = REPO / rel
        if path.exists():
            calls = _unpickling_calls(ast.parse(path.read_text()))
            if calls:
                offenders[rel] = calls
    intake = ast.parse((REPO / "service/intake.py").read_text())
    from_calibration = {n.module for n in ast.walk(intake) if isinstance(n, ast.ImportFrom)
                        and (n.module or "").startswith("calibration")}
    assert from_calibration <= {"calibration.config", "calibration.data", "calibration.errors", "calibration.archive",
                                "calibration.signature"}, \
        f"intake imports model code beyond the structural check: {from_calibration}"
    assert not offenders, offenders
    # The scanner itself catches what it must.
    bad = ast.parse("import pickle\ntorch.jit.load(p)\nnp.load(p)\nnp.load(p, allow_pickle=True)\npickle.loads(b)")
    assert len(_unpickling_calls(bad)) == 5
