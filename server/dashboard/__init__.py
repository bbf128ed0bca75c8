"""The operator dashboard, served by the API server at ``/dashboard``.

- :mod:`server.dashboard.page`: the HTML shell (a Jinja2 template) and its one script
  and one stylesheet under ``/dashboard/static/``;
- :mod:`server.dashboard.fleet`: the read-only JSON it draws from (``/v1/whoami`` and
  ``/v1/fleet/...``), aggregated in the database;
- :mod:`server.dashboard.series`: pure time-bucket arithmetic for the charts.

The page shows the fleet's version distribution, every release with its progress,
failure reasons and bytes saved, report outcomes and failure reasons over time, and a
device search; operators whose token has the ``publish`` scope also get pause, resume
and halt buttons, which call the release API like any other client.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from server.dashboard import fleet
from server.dashboard.page import STATIC_DIR, TEMPLATE_DIR, assets_version, page_router


def install(app: FastAPI) -> None:
    """Add the dashboard's page, static files and JSON endpoints to ``app``."""
    app.include_router(fleet.router)
    app.include_router(page_router(Jinja2Templates(directory=TEMPLATE_DIR), assets_version()))
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")


__all__ = ["install"]
