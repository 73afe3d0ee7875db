"""ASGI middleware: refuse unauthenticated or oversized request bodies while they stream in; count requests.

Both run before FastAPI parses a multipart form, which it would otherwise spool to disk in full
before any route code (or dependency) runs.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import UNAUTHORIZED_MESSAGE, KeyRing
from .errors import ApiError, error_response
from .metrics import Metrics

BODY_METHODS = {"POST", "PUT", "PATCH"}


def too_large_message(limit: int) -> str:
    return (f"The request body exceeds the server's upload limit of {limit} bytes "
            f"({limit / 1024**2:.1f} MiB). Upload a smaller file or ask the operator to raise "
            "CERTIPRUNE_MAX_UPLOAD_BYTES.")


class UploadGuardMiddleware:
    """401 before reading a body without a valid key; 413 once a body passes ``max_bytes``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, keys: KeyRing) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["path"].startswith("/v1/") and self.keys.owner_for(headers.get("authorization")) is None:
            response = error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, "upload_too_large", too_large_message(self.max_bytes),
                                      headers={"Connection": "close"})
            await response(scope, receive, send)
            return

        received = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI re-raises it from body parsing, our handler renders it.
                    raise ApiError(413, "upload_too_large", too_large_message(limit), headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Counts requests and their latency by method, route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], template, status, time.perf_counter() - start)


__all__ = ["MetricsMiddleware", "UploadGuardMiddleware"]


_KEY_IN_QUERY = re.compile(r"([?&](?:key|api_key|token)=)[^&#\s]*", re.IGNORECASE)


class RedactKeysInAccessLog(logging.Filter):
    """A key given in a page URL (``/?key=…``) must never reach the access log: replace its value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_KEY_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _KEY_IN_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger once."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactKeysInAccessLog) for f in logger.filters):
        logger.addFilter(RedactKeysInAccessLog())
