"""Alembic environment: migrations run on the connection :func:`app.db.upgrade` hands over."""

from alembic import context

from app.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
