"""create_app(settings): the FastAPI application — routers, error handlers, middleware, and the executor's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .auth import KeyRing
from .errors import install_error_handlers
from .executors import make_executor
from .metrics import Metrics
from .middleware import MetricsMiddleware, UploadGuardMiddleware, redact_access_log
from .routes import datasets, health, jobs, pages
from .settings import Settings
from .storage import Storage
from .store import JobStore
from .web import STATIC_URL, static_files

log = logging.getLogger("certiprune.api")

DESCRIPTION = """
Certify how far a trained PyTorch model can be pruned **with a statistical guarantee**
(Learn then Test), and download the pruned model.

Submit a TorchScript model and a calibration set to `POST /v1/jobs`, poll `GET /v1/jobs/{id}`,
then fetch `GET /v1/jobs/{id}/artifact` and `GET /v1/jobs/{id}/report`.
Every error has the body `{"error": {"code": "<snake_case>", "message": "..."}}`.
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the app. Nothing starts until the lifespan runs (the executor claims jobs only then)."""
    store = JobStore.from_url(settings.resolved_database_url)
    storage = Storage(settings.data_dir)
    keys = KeyRing(settings.api_keys)
    metrics = Metrics(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_access_log()  # uvicorn configures its loggers before the lifespan runs
        executor = make_executor(settings, store)
        app.state.executor = executor
        if executor is not None:
            executor.start()
        log.info("certiprune API ready (data dir %s, executor %s, auth %s)", storage.root, settings.executor,
                 "on" if keys.enabled else "off")
        try:
            yield
        finally:
            if executor is not None:
                await run_in_threadpool(executor.stop)
            store.close()

    from . import __version__

    app = FastAPI(title="certiprune", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.executor = None

    install_error_handlers(app)
    app.add_middleware(UploadGuardMiddleware, max_bytes=settings.max_upload_bytes, keys=keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: also counts 401/413 from the guard
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(pages.router)
    app.mount(STATIC_URL, static_files(), name="static")  # the pages' CSS and JS (service/static)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory service.app:app_from_env`` (settings from ``CERTIPRUNE_*`` variables)."""
    return create_app(Settings())


__all__ = ["app_from_env", "create_app"]
