"""partial index for due hook runs (claims, outbox backlog)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 00:45:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_WHERE = sa.text("state IN ('pending', 'running')")


def upgrade() -> None:
    op.create_index('ix_hook_runs_due', 'hook_runs', ['state', 'hook', 'next_attempt_at'], unique=False,
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index('ix_hook_runs_due', table_name='hook_runs')
