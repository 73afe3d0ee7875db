"""Every bad input of SPEC §4 raises a specific exception whose message names the problem."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

from calibration import certify
from calibration.config import validate_config
from calibration.data import load_calibration, split_tune_cal
from calibration.errors import ConfigError, DataError, ModelError
from calibration.model import load_model


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


GOOD_X = np.zeros((10, 64), np.float32)


@pytest.mark.parametrize(
    "arrays, code, words",
    [
        ({"y": np.zeros(10, np.int64)}, "data_missing_x", "no array 'x'"),
        ({"x": GOOD_X, "y": np.zeros(9, np.int64)}, "data_length_mismatch", "10 samples but 'y' has 9"),
        ({"x": GOOD_X, "y": np.full(10, -1)}, "data_labels_out_of_range", "≥ 0"),
        ({"x": GOOD_X, "y": np.full(10, 0.5)}, "data_bad_labels", "integer"),
        ({"x": GOOD_X, "y": np.zeros((10, 2, 2), np.int64)}, "data_bad_labels", "shape (n_samples,)"),
        ({"x": GOOD_X, "y": np.full((10, 3), -5, np.int64)}, "data_labels_out_of_range", "-100"),
        ({"x": np.where(np.eye(10, 64) > 0, np.nan, 0).astype(np.float32)}, "data_not_finite", "NaN"),
        ({"x": np.full((10, 64), np.inf, np.float32)}, "data_not_finite", "infinite"),
        ({"x": np.zeros((0, 64), np.float32)}, "data_empty", "empty"),
        ({"x": np.zeros(10, np.float32)}, "data_bad_shape", "at least 2 axes"),
        ({"x": np.array([["a"] * 3] * 10)}, "data_bad_dtype", "numeric"),
        ({"x": GOOD_X, "z z": GOOD_X}, "data_unexpected_arrays", "'z z'"),
    ],
)
def test_bad_npz_raises_specific_data_error(tmp_path, arrays, code, words):
    with pytest.raises(DataError) as info:
        load_calibration(_npz(tmp_path, **arrays))
    assert info.value.code == code
    assert words in str(info.value)


def test_pickled_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"evil": 1}] * 3, dtype=object))
    with pytest.raises(DataError) as info:
        load_calibration(path)
    assert info.value.code == "data_pickled"


def test_raw_pickle_file_is_refused(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    with pytest.raises(DataError) as info:
        load_calibration(path)
    assert info.value.code == "data_pickled"


def test_truncated_and_garbage_files(tmp_path):
    good = _npz(tmp_path, x=np.random.rand(100, 64).astype(np.float32))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, code in ((cut, "data_malformed"), (tmp_path / "empty.npz", "data_empty")):
        if path.name == "empty.npz":
            path.write_bytes(b"")
        with pytest.raises(DataError) as info:
            load_calibration(path)
        assert info.value.code == code
    text = tmp_path / "x.csv"
    text.write_text("1,2,3\n")
    with pytest.raises(DataError, match="Unrecognised data format"):
        load_calibration(text)


def test_safetensors_round_trip_and_errors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "d.safetensors"
    save_file({"x": np.ones((5, 3), np.float32), "y": np.arange(5, dtype=np.int64)}, str(path))
    data = load_calibration(path)
    assert data.n == 5 and data.has_labels and data.y.tolist() == [0, 1, 2, 3, 4]
    save_file({"y": np.arange(5, dtype=np.int64)}, str(path))
    with pytest.raises(DataError) as info:
        load_calibration(path)
    assert info.value.code == "data_missing_x"


def test_labels_beyond_model_classes_fail_the_job(tmp_path, files):
    path = _npz(tmp_path, x=np.random.rand(50, 64).astype(np.float32), y=np.full(50, 12))
    with pytest.raises(DataError) as info:
        certify(files["mlp"], path, {"sparsities": [0.0, 0.1]})
    assert info.value.code == "data_labels_out_of_range" and "10 classes" in str(info.value)


def test_input_shape_the_model_rejects(tmp_path, files):
    path = _npz(tmp_path, x=np.random.rand(50, 7).astype(np.float32))
    with pytest.raises(ModelError) as info:
        certify(files["mlp"], path, {"sparsities": [0.0, 0.1]})
    assert info.value.code == "model_forward_failed" and "[50, 7]" in str(info.value)


class _Raises(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            raise RuntimeError("boom in forward")
        return self.fc(x)


class _WrongShape(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).sum(1)


class _NonFinite(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / 0.0


@pytest.mark.parametrize("module, code", [(_Raises, "model_forward_failed"), (_WrongShape, "model_bad_output"),
                                          (_NonFinite, "model_output_not_finite")])
def test_models_that_misbehave(tmp_path, module, code):
    model = tmp_path / "m.pt"
    torch.jit.script(module()).save(str(model))
    data = _npz(tmp_path, x=np.random.rand(20, 4).astype(np.float32), y=np.zeros(20, np.int64))
    with pytest.raises(ModelError) as info:
        certify(model, data, {"sparsities": [0.0, 0.5]})
    assert info.value.code == code


def test_model_archive_problems(tmp_path):
    eager = torch.nn.Sequential(torch.nn.Linear(4, 3))
    cases = {}
    cases["not_zip"] = tmp_path / "a.pt"
    cases["not_zip"].write_bytes(b"definitely not a model")
    cases["pickle"] = tmp_path / "b.pt"
    torch.save(eager.state_dict(), cases["pickle"])
    cases["truncated"] = tmp_path / "c.pt"
    torch.jit.script(eager).save(str(tmp_path / "full.pt"))
    full = (tmp_path / "full.pt").read_bytes()
    cases["truncated"].write_bytes(full[: len(full) // 2])
    cases["frozen"] = tmp_path / "d.pt"
    torch.jit.freeze(torch.jit.script(eager.eval())).save(str(cases["frozen"]))
    cases["plain_zip"] = tmp_path / "e.pt"
    with zipfile.ZipFile(cases["plain_zip"], "w") as zf:
        zf.writestr("hello.txt", "hi")
    expected = {"not_zip": "model_not_torchscript", "pickle": "model_is_pickle_checkpoint",
                "truncated": ("model_not_torchscript", "model_corrupt", "model_load_failed"),
                "frozen": "model_frozen", "plain_zip": "model_not_torchscript"}
    for name, path in cases.items():
        with pytest.raises(ModelError) as info:
            load_model(path)
        want = expected[name]
        assert info.value.code in (want if isinstance(want, tuple) else (want,)), (name, info.value.code)
    with pytest.raises(ModelError, match="Cannot prune a frozen model"):
        load_model(cases["frozen"])


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"epsilon": 1.5}, "'epsilon' parameter must be a number in the open interval (0, 1). Got 1.5"),
        ({"delta": 0}, "'delta'"),
        ({"epsilon": "0.1"}, "'epsilon'"),
        ({"sparsities": [0.2, 0.1]}, "strictly increasing"),
        ({"sparsities": [0.1, 0.1]}, "strictly increasing"),
        ({"sparsities": [0.1, 1.0]}, "[0, 1)"),
        ({"sparsities": []}, "non-empty"),
        ({"criterion": "l1"}, "'magnitude'"),
        ({"criterion": ["magnitude", "magnitude"]}, "duplicates"),
        ({"bound": "clt"}, "'wsr'"),
        ({"procedure": "holm"}, "'fixed_sequence'"),
        ({"seed": -1}, "'seed'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"batch_size": True}, "'batch_size'"),
        ({"frobnicate": 1}, "Unknown config field"),
    ],
)
def test_config_errors_name_the_parameter(raw, words):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert words in str(info.value)


def test_risk_needing_labels_without_labels(tmp_path, files):
    path = _npz(tmp_path, x=np.random.rand(30, 64).astype(np.float32))
    with pytest.raises(ConfigError) as info:
        certify(files["mlp"], path, {"risk": "error_rate"})
    assert info.value.code == "labels_required"


def test_split_is_seeded_disjoint_and_complete():
    a, b = split_tune_cal(1000, 0.25, seed=7), split_tune_cal(1000, 0.25, seed=7)
    assert np.array_equal(a.cal, b.cal) and np.array_equal(a.tune, b.tune)
    assert a.tune.size == 250 and a.cal.size == 750
    assert set(a.tune).isdisjoint(a.cal) and len(set(a.tune) | set(a.cal)) == 1000
    assert not np.array_equal(split_tune_cal(1000, 0.25, seed=8).cal, a.cal)
