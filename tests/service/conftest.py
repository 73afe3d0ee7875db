"""Service fixtures: real models and data made in the test (digits, scikit-learn), and real servers."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import httpx
from service_harness import KEY_A, KEY_B, Inputs, Server


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("inputs")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:900]), torch.from_numpy(y[:900])
    for _ in range(15):
        for idx in torch.randperm(900).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    torch.jit.script(model).save(str(d / "model.pt"))
    np.savez(d / "data.npz", x=x[900:], y=y[900:])

    torch.manual_seed(1)
    big = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    torch.jit.script(big).save(str(d / "big.pt"))
    rng = np.random.default_rng(1)
    n_big = 40000  # a full 100-level curve: about a minute on 2 CPU cores, so slow jobs stay slow on fast CI
    idx = rng.integers(0, len(y), n_big)
    np.savez(d / "big.npz", x=(x[idx] + rng.normal(0, 0.05, (n_big, 64))).astype(np.float32), y=y[idx])
    return Inputs(model=d / "model.pt", data=d / "data.npz", big_model=d / "big.pt", big_data=d / "big.npz",
                  x_cal=x[900:], y_cal=y[900:])


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start servers with ``CERTIPRUNE_*`` settings; all are stopped (and their logs shown on failure) at the end."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, **settings: Any) -> Server:
        data_dir = data_dir or tmp_path_factory.mktemp("srv") / "data"
        env = {f"CERTIPRUNE_{k.upper()}": str(v) for k, v in settings.items()}
        server = Server(data_dir=data_dir, env=env).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(signal.SIGKILL if server.proc and server.proc.poll() is None else signal.SIGTERM, timeout=15)




@pytest.fixture(scope="session")
def worker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the embedded local executor; no API keys (loopback only)."""
    from service_harness import module_server

    yield from module_server(tmp_path_factory, cancel_grace_s=2, max_attempts=2)


# Clients of the two tenants, for modules that define a ``server`` fixture with both keys.
@pytest.fixture
def a(server: Server) -> Iterator[httpx.Client]:
    with server.client(KEY_A) as c:
        yield c


@pytest.fixture
def b(server: Server) -> Iterator[httpx.Client]:
    with server.client(KEY_B) as c:
        yield c


@pytest.fixture(scope="session")
def hostile_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Scripted models that attack the sandbox: a 12 GiB allocation, an endless loop, and two whose
    artifacts straddle a file-size limit."""
    import io

    import torch
    from torch import nn

    d = tmp_path_factory.mktemp("hostile")

    class Hog(nn.Module):
        """Asks for 12 GiB in every forward (untouched, so harmless without a limit)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            big = torch.empty([3 * 1073741824])
            return self.fc(x) + big.narrow(0, 0, 1).zero_()

    class Spins(nn.Module):
        """Never returns."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            i = 0
            while i >= 0:
                i += 1
                if i == -5:
                    break
            return self.fc(x)

    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10))
    wider = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    paths = {}
    for name, module in {"hog": Hog(), "spins": Spins(), "wide": wide, "wider": wider}.items():
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(module.eval()), buf)
        paths[name] = d / f"{name}.pt"
        paths[name].write_bytes(buf.getvalue())
    return paths
