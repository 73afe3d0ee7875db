"""One error body for every failure: ``{"error": {"code": "<snake_case>", "message": "..."}}`` (SPEC §3).

``ApiError`` is what routes raise; the handlers installed by ``install_error_handlers`` turn it,
Starlette's own HTTP errors (unknown route, 405), request validation errors and anything
unexpected into that body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("certiprune.api")

#: Codes for errors that Starlette/FastAPI raise on their own.
STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a stable snake_case ``code`` and a message for a person."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code

    @property
    def message(self) -> str:
        return str(self.detail)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    if isinstance(exc.detail, str):
        message = exc.detail
    else:
        message = str(exc.detail)
    if exc.status_code == 404 and not isinstance(exc, ApiError):
        message = f"No route {request.method} {request.url.path}. See /docs for the API."
    elif exc.status_code == 405 and not isinstance(exc, ApiError):
        allowed = (exc.headers or {}).get("allow", "")
        hint = f"; use {allowed}." if allowed else "."
        message = f"Method {request.method} is not allowed on {request.url.path}{hint}"
    return error_response(exc.status_code, code, message, headers=exc.headers)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] or [str(p) for p in loc]
    return ".".join(parts)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [f"{_loc(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
    message = "Invalid request. " + "; ".join(problems[:10])
    return error_response(422, "validation_error", message)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("Unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "An unexpected error occurred on the server; it has been logged.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers"]
