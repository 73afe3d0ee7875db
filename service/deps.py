"""Dependencies, declared once as ``Annotated`` aliases: settings, store, storage, executor, the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .auth import UNAUTHORIZED_MESSAGE, KeyRing
from .errors import ApiError
from .executors import Executor
from .metrics import Metrics
from .settings import Settings
from .storage import Storage
from .store import JobStore

_bearer = HTTPBearer(auto_error=False, description="An API key configured in CERTIPRUNE_API_KEYS.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_executor(request: Request) -> Executor | None:
    return request.app.state.executor


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant (hash of the API key) making the request; 401 when keys are configured and none is valid."""
    keys: KeyRing = request.app.state.keys
    header = f"Bearer {credentials.credentials}" if credentials else None
    owner = keys.owner_for(header)
    if owner is None:
        raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})
    return owner


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ExecutorDep = Annotated[Executor | None, Depends(get_executor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(get_owner)]

__all__ = ["ExecutorDep", "MetricsDep", "OwnerDep", "SettingsDep", "StorageDep", "StoreDep"]
