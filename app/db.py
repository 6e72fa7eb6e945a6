"""The service database: API keys, cohort jobs and the audit log (SQLAlchemy; SQLite by default,
PostgreSQL by URL with the same code). Plain data-access functions, no HTTP in here.

The schema changes through Alembic migrations (``app/migrations``): :func:`upgrade` applies them
(``synthcohort db upgrade``), and the embedded SQLite default is upgraded automatically when it is opened. Any
other database must be upgraded by the operator first; opening one whose schema is behind is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    false,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from app.settings import Settings
from generators.errors import SynthCohortError

MIGRATIONS = Path(__file__).parent / "migrations"
DB_POOL_CONNECTIONS = 20  # per process; PostgreSQL's default 100 connections serve 2 APIs + 2 workers + tools
FIRST_REVISION = "0001"  # the schema databases created before migrations have


class SchemaOutOfDate(SynthCohortError):
    """The database's schema is older (or newer) than this version of synthcohort expects."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A time read from the database, made timezone-aware (SQLite hands back naive UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """An API key; only its SHA-256 digest is stored (keys are 256-bit random, so no slow hash is needed)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    digest: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    quota_samples_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_request_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEvent(Base):
    """Who did what, when, and how it ended."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    counts: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Job(Base):
    """A cohort request and its progress; survives restarts."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(128))
    counts: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    formats: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    generated: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the worker running it
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    covariates: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # label → covariate targets


class UiSession(Base):
    """A signed-in web page session: the cookie holds a random token, the table its SHA-256 digest (so a copy of
    the database opens no session), the key it acts for and the session's CSRF token."""

    __tablename__ = "ui_sessions"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def database_url(settings: Settings) -> str:
    """``SYNTHCOHORT_DB_URL``, or a SQLite file under ``SYNTHCOHORT_DATA_DIR``."""
    if settings.db_url:
        return settings.db_url
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(settings.data_dir).resolve() / 'synthcohort.db'}"


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine per URL. SQLite is migrated to the current schema on first use; any other database must
    already be there (:class:`SchemaOutOfDate` says to run ``synthcohort db upgrade``)."""
    engine = make_engine(url)
    if url.startswith("sqlite"):
        upgrade(engine)
    else:
        current, head = revision_of(engine), head_revision()
        if current != head:
            engine.dispose()
            raise SchemaOutOfDate(
                f"the database schema is at revision {current or 'none'}, this version needs {head}: "
                "run `synthcohort db upgrade` (with the same SYNTHCOHORT_DB_URL) first"
            )
    return engine


def make_engine(url: str) -> Engine:
    """An engine with a pool of :data:`DB_POOL_CONNECTIONS` (5 kept open, the rest on demand)."""
    connect_args = {"check_same_thread": False} if url.startswith("sqlite") else {}
    return create_engine(
        url, connect_args=connect_args, pool_pre_ping=True, pool_size=5, max_overflow=DB_POOL_CONNECTIONS - 5
    )


def alembic_config():  # an Alembic Config pointing at the packaged migrations
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def revision_of(engine: Engine) -> str | None:
    """The schema revision a database is at (``None``: empty, or created before migrations existed)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and inspect(connection).has_table("api_keys"):
            return FIRST_REVISION  # made by the service's create_all before migrations: that schema is 0001
        return current


def upgrade(target: Engine | str) -> tuple[str | None, str]:
    """Apply every pending migration; ``(revision before, revision after)``. A database created before
    migrations existed is first marked as the first revision (its schema), so its keys, jobs and log stay."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(target) if isinstance(target, str) else target
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and inspect(connection).has_table("api_keys"):
            command.stamp(config, FIRST_REVISION)
            before = FIRST_REVISION
        command.upgrade(config, "head")
    if isinstance(target, str):
        engine.dispose()
    return before, head_revision()


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(engine_for(database_url(settings)), expire_on_commit=False)


def record_event(
    session: Session,
    *,
    action: str,
    outcome: str,
    key_id: int | None = None,
    model: str | None = None,
    counts: dict | None = None,
    dataset_id: str | None = None,
    detail: str | None = None,
) -> AuditEvent:
    event = AuditEvent(
        action=action,
        outcome=outcome,
        key_id=key_id,
        model=model,
        counts=counts,
        dataset_id=dataset_id,
        detail=detail,
    )
    session.add(event)
    session.commit()
    return event


def audit_events(
    session: Session, *, limit: int = 100, action: str | None = None, key_prefix: str | None = None
) -> list[AuditEvent]:
    """Most recent first; ``action`` keeps events whose action starts with it (``cohort`` or ``cohort.create``),
    ``key_prefix`` those of one key."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEvent.action.startswith(action, autoescape=True))
    if key_prefix:
        query = query.join(ApiKey, AuditEvent.key_id == ApiKey.id).where(ApiKey.prefix == key_prefix)
    return list(session.scalars(query))
