"""Templates and static files of the pages for people: one Jinja2 environment, the ``/static`` mount.

Markup lives in ``service/templates/`` (a base layout and one template per page), CSS and JS in
``service/static/``; both are package data (pyproject.toml), found next to this module, so an
installed wheel, an editable install and a plain checkout read the same files.

Autoescaping is on for every template: every ``{{ value }}`` is HTML-escaped with the standard
library's :func:`html.escape` (quotes too, so it is safe inside attributes; ``None`` renders empty),
unless the view model hands over :class:`markupsafe.Markup` — only markup this package produced.
"""

from __future__ import annotations

import base64
import hashlib
import html
from functools import cache
from pathlib import Path
from typing import Any

from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from starlette.types import Receive, Scope, Send

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_URL = "/static"


def _escape(value: Any) -> Any:
    """Jinja's ``finalize``: what every expression becomes before output (autoescape leaves Markup alone)."""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, finalize=_escape,
                  undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)


@cache
def static_text(name: str) -> str:
    """A file of ``service/static`` as text (the report inlines its CSS, so it stays one saveable file)."""
    return (STATIC_DIR / name).read_text(encoding="utf-8")


@cache
def sri(name: str) -> str:
    """Subresource-integrity value of a static file, for ``<script integrity=…>``."""
    digest = hashlib.sha384((STATIC_DIR / name).read_bytes()).digest()
    return "sha384-" + base64.b64encode(digest).decode("ascii")


def static_url(name: str) -> str:
    return f"{STATIC_URL}/{name}"


env.globals.update(static_url=static_url, sri=sri)


class Static(StaticFiles):
    """StaticFiles with ``nosniff`` (a file is only ever what its extension says) and no framing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                            (b"cache-control", b"no-cache")]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def static_files() -> Static:
    return Static(directory=STATIC_DIR)


__all__ = ["STATIC_URL", "env", "sri", "static_files", "static_text", "static_url"]
