"""The dashboard page: one server-rendered HTML shell, plus its script and stylesheet.

The page holds no data and needs no credential to load; its script asks for an API
token once (kept in ``sessionStorage``, so it is gone when the tab closes) and draws
everything from the JSON API with ``Authorization: Bearer``. A strict Content Security
Policy allows only this server's own script, styles and API, and the script writes
text with ``textContent`` only, so nothing a device reports can become markup.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def assets_version() -> str:
    """A short hash of the static files, appended to their URLs to bust caches."""
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def page_router(templates: Jinja2Templates, version: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/dashboard", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return templates.TemplateResponse(
            request,
            "dashboard.html",
            {"root": root, "assets": version, "server_version": request.app.version},
            headers=SECURITY_HEADERS,
        )

    return router
