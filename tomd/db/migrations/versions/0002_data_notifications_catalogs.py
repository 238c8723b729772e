"""data retrieval state, durable notifications, catalog cache

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 23:40:00
"""
from alembic import op
import sqlalchemy as sa
import tomd.db.models
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data_due_at', tomd.db.models.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('data_attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.create_index(batch_op.f('ix_observation_requests_data_due_at'), ['data_due_at'], unique=False)

    with op.batch_alter_table('data_products', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))

    op.create_table('notifications',
    sa.Column('id', _id, nullable=False),
    sa.Column('channel', sa.String(length=100), nullable=False),
    sa.Column('dedupe_key', sa.String(length=300), nullable=False),
    sa.Column('event_id', _id, nullable=True),
    sa.Column('target_id', sa.BigInteger(), nullable=True),
    sa.Column('message', _json, nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('claimed_by', sa.String(length=100), nullable=True),
    sa.Column('claimed_until', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('sent_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['outbox.id'], name=op.f('fk_notifications_event_id_outbox'),
                            ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notifications')),
    sa.UniqueConstraint('channel', 'dedupe_key', name=op.f('uq_notifications_channel_dedupe_key'))
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index('ix_notifications_due', ['state', 'channel'], unique=False)

    op.create_table('catalog_cache',
    sa.Column('id', _id, nullable=False),
    sa.Column('service', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('payload', _json, nullable=False),
    sa.Column('fetched_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_catalog_cache')),
    sa.UniqueConstraint('service', 'key', name=op.f('uq_catalog_cache_service_key'))
    )


def downgrade() -> None:
    op.drop_table('catalog_cache')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_due')
    op.drop_table('notifications')
    with op.batch_alter_table('data_products', schema=None) as batch_op:
        batch_op.drop_column('error')
        batch_op.drop_column('attempts')
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observation_requests_data_due_at'))
        batch_op.drop_column('data_attempts')
        batch_op.drop_column('data_due_at')
