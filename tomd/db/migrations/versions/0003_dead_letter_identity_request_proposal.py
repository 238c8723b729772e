"""dead letters identified by their coordinates (idempotent), kafka headers kept; request proposal

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 23:50:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('headers', _json, nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_dead_letters_stream_fingerprint'), ['stream', 'fingerprint'])
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('proposal', sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f('ix_observation_requests_proposal'), ['proposal'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observation_requests_proposal'))
        batch_op.drop_column('proposal')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_dead_letters_stream_fingerprint'), type_='unique')
        batch_op.drop_column('headers')
        batch_op.drop_column('fingerprint')
