"""when each target extra was set (backtests replay extras as they stood)

targets.extras_set_at: {key: ISO 8601 UTC time} of the latest write that set
or changed each key of targets.extras. A JSON column on the row the writers
already update (no extra statement per write) rather than a table; json, not
jsonb, on PostgreSQL: it is never queried inside in SQL. Rows written before
this revision keep NULL: their extras' times are unknown (rule backtest
leaves them out unless --assume-old counts them as present from the start).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 04:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('targets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('extras_set_at', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('targets', schema=None) as batch_op:
        batch_op.drop_column('extras_set_at')
