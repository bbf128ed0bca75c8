"""The app factory: settings in, a ready FastAPI app out. Nothing happens at import."""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from sqlalchemy import select, text

from server import dashboard, migrate
from server.api import errors
from server.api.deps import Context
from server.api.routes import blobs, devices, models, releases, tokens, trust
from server.auth import Scope, secret_hash
from server.blobs.factory import make_blob_store
from server.catalog import Catalog
from server.context import ServiceContext
from server.db import make_engine, make_session_factory, transaction
from server.logging_setup import RequestLogMiddleware, configure_logging
from server.metrics import MetricsMiddleware, exposition
from server.models import ApiTokenRow
from server.settings import Settings
from server.trust.setup import RefreshThrottle, open_trust_repository


def build_context(settings: Settings) -> ServiceContext:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if settings.migrate_on_start:
        migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    trust = open_trust_repository(settings, sessions)
    return ServiceContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        blobs=make_blob_store(settings),
        trust=trust,
        trust_refresh=RefreshThrottle(trust),
        catalog=Catalog(sessions, settings.poll_cache_seconds),
        tmp_dir=settings.data_dir / "tmp",
    )


def _bootstrap_token(ctx: ServiceContext) -> None:
    secret = ctx.settings.bootstrap_token
    if not secret:
        return
    hashed = secret_hash(secret)
    with transaction(ctx.sessions) as session:
        if session.scalar(select(ApiTokenRow.id).where(ApiTokenRow.token_hash == hashed)) is None:
            session.add(
                ApiTokenRow(
                    name="bootstrap", token_hash=hashed, scopes=[Scope.ADMIN.value], revoked=False
                )
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. ``settings`` default to the environment (``DIFFCAST_*``)."""
    settings = settings or Settings()
    configure_logging()
    ctx = build_context(settings)
    _bootstrap_token(ctx)
    app = FastAPI(
        title="Diffcast",
        version="0.1.0",
        description="Over-the-air updates of on-device speech models as neural diffs.",
    )
    app.state.context = ctx
    app.state.device_credentials = {}
    app.state.started = time.time()
    app.state.blob_kinds = {}
    errors.install(app)
    for module in (models, devices, blobs, trust, tokens, releases):
        app.include_router(module.router)
    dashboard.install(app)
    # The last added runs first: the request id is set before anything is timed.
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestLogMiddleware)

    @app.get("/healthz", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def ready(ctx: Context) -> dict[str, str]:
        """Readiness: the database answers."""
        with ctx.sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics (all workers' when ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    return app


def app_from_env() -> FastAPI:
    """Entry point for ``uvicorn --factory server.app:app_from_env`` (several workers)."""
    return create_app(Settings())


__all__ = ["app_from_env", "create_app"]
