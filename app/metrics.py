"""Prometheus metrics: requests and their latency, jobs by outcome, samples and filter rejections."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

REGISTRY = CollectorRegistry()
REQUESTS = Counter("synthcohort_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "synthcohort_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
JOBS = Counter("synthcohort_jobs_total", "Finished cohort jobs", ["outcome"], registry=REGISTRY)
SAMPLES = Counter("synthcohort_samples_accepted_total", "Samples released after the filter", registry=REGISTRY)
GENERATED = Counter("synthcohort_samples_generated_total", "Samples generated", registry=REGISTRY)
REJECTED = Counter(
    "synthcohort_samples_rejected_total", "Samples rejected by the memorization filter", registry=REGISTRY
)


class MetricsMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        LATENCY.labels(request.method, name).observe(time.perf_counter() - start)
        REQUESTS.labels(request.method, name, str(response.status_code)).inc()
        return response


def metrics_response() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
