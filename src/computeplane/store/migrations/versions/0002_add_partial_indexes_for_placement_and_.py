"""add partial indexes for placement and listing

PostgreSQL cannot use an index column compared with IS NULL to order rows, so the placement
and listing queries get indexes whose predicate contains that condition instead.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_listing"))
        batch_op.create_index(
            "ix_instances_visible",
            ["organization_id", "id"],
            unique=False,
            postgresql_where=sa.text("deleted_at IS NULL"),
            sqlite_where=sa.text("deleted_at IS NULL"),
        )

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_nodes_placement_sectored",
            ["gpus_free", "id"],
            unique=False,
            postgresql_where=sa.text("state = 'active' AND sector IS NOT NULL"),
            sqlite_where=sa.text("state = 'active' AND sector IS NOT NULL"),
        )
        batch_op.create_index(
            "ix_nodes_placement_unsectored",
            ["gpus_free", "id"],
            unique=False,
            postgresql_where=sa.text("state = 'active' AND sector IS NULL"),
            sqlite_where=sa.text("state = 'active' AND sector IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_nodes_placement_unsectored",
            postgresql_where=sa.text("state = 'active' AND sector IS NULL"),
            sqlite_where=sa.text("state = 'active' AND sector IS NULL"),
        )
        batch_op.drop_index(
            "ix_nodes_placement_sectored",
            postgresql_where=sa.text("state = 'active' AND sector IS NOT NULL"),
            sqlite_where=sa.text("state = 'active' AND sector IS NOT NULL"),
        )

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_instances_visible",
            postgresql_where=sa.text("deleted_at IS NULL"),
            sqlite_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.create_index(
            batch_op.f("ix_instances_listing"),
            ["organization_id", "deleted_at", "id"],
            unique=False,
        )
