"""The one ``Settings`` object. Environment variables use the ``SYNTHCOHORT_`` prefix; CLI flags override."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service and CLI configuration."""

    model_config = SettingsConfigDict(env_prefix="SYNTHCOHORT_", extra="ignore")

    data_dir: Path = Field(Path("synthcohort-data"), description="Root for datasets and the SQLite database.")
    db_url: str | None = Field(None, description="SQLAlchemy URL; defaults to SQLite under data_dir.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device for training/sampling.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default.")
    workers: int = Field(2, ge=1, le=256, description="Worker processes for data preparation and exports.")
    job_workers: int = Field(1, ge=1, le=64, description="Cohort jobs one process (serve or worker) runs at once.")
    job_lease_seconds: float = Field(
        30.0,
        ge=2.0,
        le=3600.0,
        description="A job whose worker stops renewing its lease this long is resumed elsewhere.",
    )
    job_poll_seconds: float = Field(1.0, gt=0.0, le=60.0, description="How often an idle worker looks for jobs.")
    rate_limit_per_minute: int = Field(
        1200, ge=1, description="Requests one API key may make per minute to one API process (then 429)."
    )
    dataset_storage_cap_gb: float | None = Field(
        None, gt=0.0, description="New cohort jobs are refused (507) while the datasets take this much (None: no cap)."
    )
    dataset_ttl_days: float | None = Field(
        None, gt=0.0, description="Finished datasets are deleted this many days after they finished (None: kept)."
    )
    max_samples_per_request: int = Field(10_000, ge=1, description="Largest cohort one REST request may ask for.")
    ui_session_hours: float = Field(8.0, gt=0.0, le=24.0 * 30, description="A web sign-in lasts this long.")
    environment: Literal["production", "development"] = Field(
        "production", description="development: web session cookies without Secure (plain http off this machine)."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="Proxies (IPs or networks, comma-separated) whose X-Forwarded-For/-Proto the service trusts: "
        "the real client address (sign-in limits) and scheme (HSTS) behind a TLS proxy.",
    )
    default_daily_quota: int = Field(
        10_000, ge=1, description="Samples per 24 h for keys created without their own quota (every job counts)."
    )


@lru_cache
def get_settings() -> Settings:
    """Settings read once from the environment (tests may clear the cache)."""
    return Settings()
