"""Mapping errors to HTTP responses, in one place: every error body is
``{"error": {"code": ..., "message": ...}}`` and nothing reaches the client as a 500
traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import ServiceError

log = logging.getLogger("diffcast.server")


def error_body(code: str, message: str, status: int, **extra: object) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_body(exc.code, exc.message, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"location": list(map(str, e.get("loc", ()))), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return error_body("invalid_request", "the request is not valid", 422, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_body("http_error", str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_body("internal_error", "an internal error occurred", 500)
