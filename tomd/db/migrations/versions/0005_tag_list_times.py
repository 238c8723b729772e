"""when tags and list memberships were added (backtests replay them as they stood)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 01:05:00
"""
from alembic import op
import sqlalchemy as sa
import tomd.db.models

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('target_tags', schema=None) as batch_op:
        batch_op.add_column(sa.Column('added_at', tomd.db.models.UTCDateTime(), nullable=True))
    with op.batch_alter_table('target_list_members', schema=None) as batch_op:
        batch_op.add_column(sa.Column('added_at', tomd.db.models.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('target_list_members', schema=None) as batch_op:
        batch_op.drop_column('added_at')
    with op.batch_alter_table('target_tags', schema=None) as batch_op:
        batch_op.drop_column('added_at')
