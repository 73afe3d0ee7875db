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


def reject_unknown_query_parameters(request: Request) -> None:
    """API routes refuse query parameters they do not declare: a typo (``?limt=5``) must not pass silently."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    stack = [dependant]
    while stack:  # the route's own query parameters and those of its dependencies
        d = stack.pop()
        known.update(p.alias for p in d.query_params)
        stack.extend(d.dependencies)
    unknown = sorted(set(request.query_params.keys()) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise ApiError(422, "unknown_query_parameter",
                       f"Unknown query parameter(s) {', '.join(map(repr, unknown))}. Valid here: {valid}.")


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


VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
BODY_ERRORS = {"400": "The body is not valid multipart form data (code `bad_request`).",
               "413": "The body is larger than the server accepts (code `upload_too_large`)."}


def _error_body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its own 422 body (``HTTPValidationError``); ours is ErrorBody: say so in the schema."""
    from .schemas import ErrorBody

    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" not in components:
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorBody"] = body
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" in operation:  # the upload guard and the body parser answer these for any body
                responses = operation.setdefault("responses", {})
                for status, description in BODY_ERRORS.items():
                    responses.setdefault(status, {"description": description,
                                                  "content": {"application/json": {"schema": dict(error_ref)}}})
            for response in operation.get("responses", {}).values():
                media = response.get("content", {}).get("application/json", {})
                ref = media.get("schema", {}).get("$ref", "")
                if ref.rsplit("/", 1)[-1] in VALIDATION_SCHEMAS:
                    media["schema"] = dict(error_ref)
                    response["description"] = "Invalid parameters (code `validation_error`)."
    for name in VALIDATION_SCHEMAS:
        components.pop(name, None)  # only referenced by the bodies replaced above and by each other
    return schema


def describe_errors_in_openapi(app: FastAPI) -> None:
    """Make ``/openapi.json`` describe the bodies the handlers below really send (checked by schemathesis)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        return _error_body_schema(generate())  # FastAPI caches the schema; the rewrite is idempotent

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Render every error as the §3 body, and document that body in the OpenAPI schema."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    describe_errors_in_openapi(app)


__all__ = ["ApiError", "describe_errors_in_openapi", "error_body", "error_response", "install_error_handlers"]
