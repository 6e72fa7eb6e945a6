"""Alembic migrations of the service database (run by :func:`app.db.upgrade`)."""
