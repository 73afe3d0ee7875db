"""Settings: refuses unsafe binds at start-up, reads lists from the environment, creates nothing at import."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_refuses_public_bind_without_api_keys() -> None:
    with pytest.raises(ValidationError, match="without API keys"):
        Settings(host="0.0.0.0")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_binds_need_no_keys(host: str) -> None:
    assert Settings(host=host).host == host


def test_public_bind_is_allowed_with_api_keys() -> None:
    assert Settings(host="0.0.0.0", api_keys=["a-long-enough-key"]).auth_enabled


def test_lists_parse_from_env_as_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTIPRUNE_API_KEYS", "first-key-123, second-key-456")
    monkeypatch.setenv("CERTIPRUNE_ALLOWED_DATASET_ROOTS", '["s3://bucket/cal/", "/srv/data"]')
    s = Settings()
    assert s.api_keys == ["first-key-123", "second-key-456"]
    assert s.allowed_dataset_roots == ["s3://bucket/cal/", "/srv/data"]


def test_short_api_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 8"):
        Settings(api_keys=["abc"])


def test_defaults_match_the_contract(tmp_path) -> None:
    s = Settings(data_dir=str(tmp_path))
    assert (s.host, s.port, s.api_keys, s.max_upload_bytes, s.max_attempts, s.executor) == (
        "127.0.0.1", 8000, [], 2 * 1024**3, 2, "local")
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'certiprune.db'}"


def test_importing_the_service_creates_no_settings_or_files(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = "import service.app, service.cli, service.worker, service.executors.local; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []  # no ./data, no database


def test_serve_takes_keys_upload_limit_and_dataset_roots_as_flags(tmp_path, inputs) -> None:
    """The same settings as the CERTIPRUNE_* variables, given as `certiprune serve` flags to a real server."""
    import shutil

    import httpx
    from service_harness import Server, submit

    root = tmp_path / "datasets"
    root.mkdir()
    shutil.copy(inputs.data, root / "cal.npz")
    keys = tmp_path / "keys.txt"
    keys.write_text("\nkey-from-file-0001\n\n")
    limit = inputs.model.stat().st_size + inputs.data.stat().st_size + 64 * 1024
    server = Server(data_dir=tmp_path / "data", env={}, args=[
        "--api-keys", "key-from-flag-0001", "--api-keys-file", str(keys), "--max-upload-bytes", str(limit),
        "--allowed-dataset-roots", str(root)]).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as anon:
            assert anon.get("/v1/jobs").status_code == 401
        for key in ("key-from-flag-0001", "key-from-file-0001"):
            with server.client(key) as c:
                assert c.get("/v1/jobs").status_code == 200, key
        with server.client("key-from-file-0001") as c:
            r = submit(c, inputs.model, dataset=str(root / "cal.npz"))
            assert r.status_code == 202, r.text
            assert submit(c, inputs.model, dataset=str(inputs.data)).json()["error"]["code"] == "dataset_not_allowed"
            big = tmp_path / "big.npz"
            big.write_bytes(b"PK" + b"\0" * (limit + 1))
            too_big = submit(c, inputs.model, data=big)
            assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "upload_too_large", too_big.text
    finally:
        server.stop()


def test_an_empty_api_keys_file_is_refused_rather_than_opening_the_server(tmp_path) -> None:
    import subprocess
    import sys

    empty = tmp_path / "keys.txt"
    empty.write_text("\n  \n")
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--api-keys-file", str(empty),
                           "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "holds no key" in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()
