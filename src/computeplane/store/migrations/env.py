"""Alembic environment: runs on a connection that ``computeplane.store.migrate`` provides."""

from __future__ import annotations

from alembic import context

from computeplane.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with 'computeplane init' or computeplane.store.migrate")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
