"""Dataset URIs over HTTP: snapshotted from a real local web server; the address the connection
really reached is checked at fetch time (DNS rebinding), redirects are never followed."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from service.errors import ApiError
from service.intake import copy_dataset_uri
from service.storage import Storage
from service_harness import FAST_CONFIG, Inputs, Server, submit, wait_terminal


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.endswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/data/cal.npz")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a refused fetch closes the connection mid-response: expected, not worth a traceback


@pytest.fixture(scope="module")
def web(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 serving /data/cal.npz (the digits calibration file)."""
    root = tmp_path_factory.mktemp("web")
    (root / "data").mkdir()
    (root / "data" / "cal.npz").write_bytes(inputs.data.read_bytes())
    httpd = _QuietServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _copy(tmp_path: Path, uri: str, roots: list[str]):
    return copy_dataset_uri(Storage(str(tmp_path / "store")), uri, "snap", 10 * 1024**2, roots)


def test_an_allowed_literal_address_is_snapshotted(web: int, inputs: Inputs, tmp_path: Path) -> None:
    root = f"http://127.0.0.1:{web}/data/"
    stored = _copy(tmp_path, root + "cal.npz", [root])
    assert stored.path == "snap.npz"
    assert stored.sha256 == hashlib.sha256(inputs.data.read_bytes()).hexdigest()
    assert (tmp_path / "store" / "snap.npz").read_bytes() == inputs.data.read_bytes()


def test_a_name_that_reaches_a_private_address_at_fetch_time_is_refused(web: int, tmp_path: Path) -> None:
    """The admission check resolved the name to a public address; by the fetch it answers 127.0.0.1.
    Calling the fetch directly with a name that resolves to loopback is that moment: it must refuse."""
    root = f"http://localhost:{web}/data/"
    with pytest.raises(ApiError) as err:
        _copy(tmp_path, root + "cal.npz", [root])
    assert err.value.status_code == 422 and err.value.code == "dataset_address_not_allowed", err.value
    assert "127.0.0.1" in err.value.message or "::1" in err.value.message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("snap*"))


@pytest.mark.parametrize(("path", "needle"), [("redirect", "redirects are not followed"), ("missing.npz", "404")])
def test_redirects_and_errors_are_unreadable(web: int, tmp_path: Path, path: str, needle: str) -> None:
    root = f"http://127.0.0.1:{web}/data/"
    with pytest.raises(ApiError) as err:
        _copy(tmp_path, root + path, [root])
    assert err.value.status_code == 422 and err.value.code == "dataset_unreadable" and needle in err.value.message


def test_a_job_reads_its_dataset_over_http(web: int, inputs: Inputs,
                                          make_server: Callable[..., Server]) -> None:
    root = f"http://127.0.0.1:{web}/data/"
    server = make_server(allowed_dataset_roots=root)
    with server.client() as c:
        r = submit(c, inputs.model, dataset=root + "cal.npz", config=FAST_CONFIG)
        assert r.status_code == 202, r.text
        assert r.json()["data_sha256"] == hashlib.sha256(inputs.data.read_bytes()).hexdigest()
        assert wait_terminal(c, r.json()["id"], timeout=120)["status"] == "succeeded"
        bad = submit(c, inputs.model, dataset=root + "redirect", config=FAST_CONFIG)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "dataset_unreadable", bad.text
