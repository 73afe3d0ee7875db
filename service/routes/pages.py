"""Pages for people: ``/`` lists the jobs (live), ``/jobs/{id}`` shows a report when the server needs API keys.

Both pages are static: they hold no job data, so they need no authentication and reflect nothing
from the request. Their markup is ``templates/jobs.html`` and ``templates/report_viewer.html``; a
script from ``static/`` (``common.js`` and the page's own) fetches ``/v1/…`` with the tab's API key,
if one is set, and writes data into the page with ``textContent`` only. The key comes from a form or
a ``?key=`` query (taken out of the address bar at once), lives in ``sessionStorage`` and is sent as
``Authorization: Bearer``; it is never written into the page. A Content-Security-Policy admits
same-origin scripts and requests only, and no inline script at all; no external assets.

Without API keys a browser can open ``/v1/jobs/{id}/report`` directly (it is plain HTML). With
keys, a link cannot carry the header, so ``/jobs/{id}`` fetches that same report with the key
and shows it (its inline scripts, of which it has none, would not run).
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ..web import env

router = APIRouter(tags=["pages"], include_in_schema=False)

#: Scripts: files of service/static only, never inline. Styles: the jobs page links its CSS files; the
#: report viewer also takes in the fetched report's inline <style> (and its bars' style attributes).
_CSP = ("default-src 'none'; script-src 'self'; style-src {style}; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
JOBS_CSP = _CSP.format(style="'self'")
VIEWER_CSP = _CSP.format(style="'self' 'unsafe-inline'")


@cache
def jobs_page() -> tuple[str, str]:
    """(html, content security policy) of the jobs list."""
    return env.get_template("jobs.html").render(scripts=["common.js", "jobs.js"]), JOBS_CSP


@cache
def report_viewer_page() -> tuple[str, str]:
    """(html, content security policy) of the page that fetches a report with the tab's API key."""
    return env.get_template("report_viewer.html").render(scripts=["common.js", "report_viewer.js"]), VIEWER_CSP


def _html(page: tuple[str, str]) -> HTMLResponse:
    html, csp = page
    return HTMLResponse(html, headers={
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",  # a ?key= never leaves in a Referer header
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    })


@router.get("/", response_class=HTMLResponse)
def jobs_list_page() -> HTMLResponse:
    """The caller's 50 newest jobs, refreshed every 1.5 s while one is queued or running (else every 5 s)."""
    return _html(jobs_page())


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_report_page(job_id: str) -> HTMLResponse:
    """A job's report, fetched in the browser with the tab's API key. ``job_id`` is read by the script from
    the address, never written into the page by the server."""
    del job_id
    return _html(report_viewer_page())


__all__ = ["router"]
