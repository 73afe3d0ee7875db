"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, OwnerDep, StorageDep, StoreDep
from ..errors import error_body
from ..schemas import ErrorBody, HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """The process is up and serving requests."""
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": ErrorBody}})
def readyz(store: StoreDep, storage: StorageDep) -> JSONResponse:
    """Ready to accept jobs: the job store answers and the data dir is writable."""
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["data_dir"] = "ok" if storage.writable() else "not writable"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse(HealthPublic(status="ok", checks=checks).model_dump())
    failing = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    body = error_body("not_ready", f"The service cannot accept jobs: {failing}.")
    body["error"]["checks"] = checks
    return JSONResponse(body, status_code=503)


@router.get("/metrics", response_class=Response, responses={401: {"model": ErrorBody}})
def metrics(m: MetricsDep, _owner: OwnerDep) -> Response:
    """Prometheus metrics; with API keys configured, any tenant's key is needed (they describe every tenant's load)."""
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
