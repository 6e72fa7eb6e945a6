"""The FastAPI application factory."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from app.api import routes_admin, routes_cohorts, routes_datasets, routes_models
from app.api.deps import CurrentKey, RateLimiter
from app.api.limits import BodyLimitMiddleware
from app.api.schemas import Health
from app.db import session_factory
from app.errors import Refused, http_status_for
from app.jobs import job_runner
from app.metrics import MetricsMiddleware, metrics_response
from app.model_registry import ModelRegistry
from app.settings import Settings
from app.ui import routes as ui_routes
from app.ui import routes_admin as ui_admin
from app.ui.deps import STATIC, SignInRequired, error_page, is_ui, sign_in_required
from generators.errors import SynthCohortError

log = logging.getLogger("synthcohort.api")
DATABASE_RETRY_SECONDS = 5
SIGN_INS_PER_MINUTE = 20  # failed web sign-ins per client address
HSTS = "max-age=31536000; includeSubDomains"


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    """Domain errors raised by routes and the services they call: their message, with the status of
    :func:`app.errors.http_status_for` (an unexpected one is logged and answered generically)."""
    code = http_status_for(exc)
    message = str(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Refused) and exc.retry_after else None
    if code >= 500 and not isinstance(exc, Refused):  # a refusal (507: storage full) is expected, not a fault
        log.error("domain error during %s %s", request.method, request.url.path, exc_info=exc)
        message = "internal error; the operator has been told"
    if is_ui(request):
        return error_page(request, code, message, headers)
    return JSONResponse({"detail": message}, status_code=code, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """HTTP errors raised by routes: a page under ``/ui``, FastAPI's JSON everywhere else."""
    if is_ui(request):
        return error_page(request, exc.status_code, str(exc.detail), exc.headers)
    return await http_exception_handler(request, exc)


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    if is_ui(request):
        return error_page(request, 422, "the address or form was not understood")
    return await request_validation_exception_handler(request, exc)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is away (restarting, failing over, unreachable): 503 with Retry-After, never a 500. The
    engine's pre-ping reconnects by itself once it is back."""
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse(
        {"detail": "the database is unavailable for the moment; retry shortly"},
        status_code=503,
        headers={"Retry-After": str(DATABASE_RETRY_SECONDS)},
    )


class RequestIdMiddleware(BaseHTTPMiddleware):
    """Every response carries ``X-Request-ID`` (and, over https, HSTS); an unexpected error becomes a generic 500
    with that id, and its full detail (paths, stack) goes to the server log only."""

    async def dispatch(self, request: Request, call_next):
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        try:
            response = await call_next(request)
        except Exception:
            log.exception("request %s %s failed (request id %s)", request.method, request.url.path, request_id)
            response = JSONResponse(
                {"detail": "internal error; quote the request id to the operator", "request_id": request_id},
                status_code=500,
            )
        response.headers["X-Request-ID"] = request_id
        if request.url.scheme == "https":  # as the client sees it (a trusted proxy's X-Forwarded-Proto)
            response.headers["Strict-Transport-Security"] = HSTS
        return response


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up and shut-down work: the job runner's threads (none in an API-only process)."""
    app.state.jobs.start()
    yield
    app.state.jobs.shutdown()


def create_app(
    settings: Settings, models_dir: Path, *, allow_not_private: bool = False, run_jobs: bool = True
) -> FastAPI:
    """The service. ``run_jobs``: this process also runs cohort jobs (embedded mode); without it, only records
    them for ``synthcohort worker`` processes sharing the database and the data directory."""
    app = FastAPI(
        title="synthcohort",
        version="1",
        description="Differentially private synthetic imaging cohorts. Every served sample passed the "
        "memorization filter; every model card states its patient-level (ε, δ).",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    app.state.sign_in_limiter = RateLimiter(SIGN_INS_PER_MINUTE)
    app.state.registry = ModelRegistry(models_dir, allow_not_private=allow_not_private)
    app.state.jobs = job_runner(settings, app.state.registry, workers=settings.job_workers if run_jobs else 0)

    app.include_router(routes_models.router)
    app.include_router(routes_cohorts.router)
    app.include_router(routes_datasets.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_admin.keys_router)
    app.include_router(ui_routes.router)
    app.include_router(ui_admin.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_exception_handler(SynthCohortError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(InterfaceError, database_unavailable)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # outermost: wraps every other layer's failures too

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (admin keys only)", include_in_schema=False)
    def metrics(key: CurrentKey) -> object:
        if key.role != "admin":  # the filter's totals are computed from training data
            raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
        return metrics_response()

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Process is up")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["ops"], summary="Models and database loaded")
    def readyz(request: Request) -> dict:
        try:
            with request.app.state.sessions() as session:
                session.execute(text("select 1"))
        except Exception:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable") from None
        models = len(request.app.state.registry.models)
        if models == 0:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no servable models")
        return {"status": "ready", "models": models}

    return app
