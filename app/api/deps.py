"""Dependencies shared by the routes: settings, database session, the current API key, the registry."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.db import DB_POOL_CONNECTIONS, ApiKey
from app.keys import verify_key
from app.model_registry import ModelRegistry
from app.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key from `synthcohort keys create`.")


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


# At most this many requests of one API process hold a database session at once; the others wait without taking a
# worker thread. Sessions end before the response is sent (scope "function"). Together this keeps FastAPI's thread
# pool (40) from filling up with requests that wait for a pooled connection while the requests holding the
# connections wait for a thread to close their sessions: under 100 concurrent researchers that deadlock turned
# three requests in four into 500s after the pool's 30 s timeout (benchmarks/perf/bench_api_load.py).
SESSIONS_PER_PROCESS = DB_POOL_CONNECTIONS - 5  # room for the job runner's threads in an embedded server
SessionDep = Annotated[Session, Depends(get_session, scope="function", max_concurrency=SESSIONS_PER_PROCESS)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]


class RateLimiter:
    """At most ``per_minute`` requests per key (a key id, or a client address) in any 60-second window, counted in
    this API process."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[int | str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_seconds(self, key_id: int | str) -> int:
        """0 if this request may go ahead (and count it), else how many seconds until one may."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(key_id, deque())
            while seen and seen[0] <= now - 60.0:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return max(1, math.ceil(seen[0] + 60.0 - now))
            seen.append(now)
            return 0


def current_key(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key", headers={"WWW-Authenticate": "Bearer"})
    key = verify_key(session, credentials.credentials)
    if key is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    wait = request.app.state.rate_limiter.wait_seconds(key.id)
    if wait:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit: at most {request.app.state.rate_limiter.per_minute} requests per minute per key",
            headers={"Retry-After": str(wait)},
        )
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
