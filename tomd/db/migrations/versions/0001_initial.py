"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 19:42:15.059144
"""
from alembic import op
import sqlalchemy as sa
import tomd.db.models
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('stream', sa.String(length=100), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=False),
    sa.Column('topic', sa.String(length=249), nullable=True),
    sa.Column('partition', sa.Integer(), nullable=True),
    sa.Column('offset', sa.BigInteger(), nullable=True),
    sa.Column('key', sa.LargeBinary(), nullable=True),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('resolved_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index('ix_dead_letters_coords', ['topic', 'partition', 'offset'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('target_id', sa.BigInteger(), nullable=True),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_outbox_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_kind'), ['kind'], unique=False)

    op.create_table('poll_state',
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('last_poll_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('cursor', sa.String(length=200), nullable=True),
    sa.PrimaryKeyConstraint('facility', name=op.f('pk_poll_state'))
    )
    op.create_table('target_lists',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_target_lists')),
    sa.UniqueConstraint('name', name=op.f('uq_target_lists_name'))
    )
    op.create_table('targets',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('ra', sa.Float(), nullable=True),
    sa.Column('dec', sa.Float(), nullable=True),
    sa.Column('hpx', sa.BigInteger(), nullable=True),
    sa.Column('gal_l', sa.Float(), nullable=True),
    sa.Column('gal_b', sa.Float(), nullable=True),
    sa.Column('epoch', sa.Float(), nullable=True),
    sa.Column('pm_ra', sa.Float(), nullable=True),
    sa.Column('pm_dec', sa.Float(), nullable=True),
    sa.Column('parallax', sa.Float(), nullable=True),
    sa.Column('distance', sa.Float(), nullable=True),
    sa.Column('scheme', sa.String(length=32), nullable=True),
    sa.Column('epochofel', sa.Float(), nullable=True),
    sa.Column('orbinc', sa.Float(), nullable=True),
    sa.Column('longascnode', sa.Float(), nullable=True),
    sa.Column('argofperih', sa.Float(), nullable=True),
    sa.Column('eccentricity', sa.Float(), nullable=True),
    sa.Column('meandist', sa.Float(), nullable=True),
    sa.Column('meananom', sa.Float(), nullable=True),
    sa.Column('perihdist', sa.Float(), nullable=True),
    sa.Column('epochofperih', sa.Float(), nullable=True),
    sa.Column('dailymot', sa.Float(), nullable=True),
    sa.Column('extras', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('modified_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_targets'))
    )
    with op.batch_alter_table('targets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_targets_hpx'), ['hpx'], unique=False)

    op.create_table('hook_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('hook', sa.String(length=200), nullable=False),
    sa.Column('event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('claimed_by', sa.String(length=100), nullable=True),
    sa.Column('claimed_until', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('finished_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['event_id'], ['outbox.id'], name=op.f('fk_hook_runs_event_id_outbox'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hook_runs')),
    sa.UniqueConstraint('hook', 'event_id', name=op.f('uq_hook_runs_hook_event_id'))
    )
    with op.batch_alter_table('hook_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hook_runs_event_id'), ['event_id'], unique=False)

    op.create_table('notices',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('notice_type', sa.String(length=100), nullable=True),
    sa.Column('time', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('ra', sa.Float(), nullable=True),
    sa.Column('dec', sa.Float(), nullable=True),
    sa.Column('error_deg', sa.Float(), nullable=True),
    sa.Column('area_90_deg2', sa.Float(), nullable=True),
    sa.Column('retracted', sa.Boolean(), nullable=False),
    sa.Column('test', sa.Boolean(), nullable=False),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('updated_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_notices_target_id_targets'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_notices')),
    sa.UniqueConstraint('source', 'event_id', name=op.f('uq_notices_source_event_id'))
    )
    op.create_table('target_list_members',
    sa.Column('list_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.ForeignKeyConstraint(['list_id'], ['target_lists.id'], name=op.f('fk_target_list_members_list_id_target_lists'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_target_list_members_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('list_id', 'target_id', name=op.f('pk_target_list_members'))
    )
    with op.batch_alter_table('target_list_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_target_list_members_target_id'), ['target_id'], unique=False)

    op.create_table('target_names',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('norm', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=True),
    sa.Column('primary', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_target_names_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_target_names')),
    sa.UniqueConstraint('norm', name=op.f('uq_target_names_norm'))
    )
    with op.batch_alter_table('target_names', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_target_names_target_id'), ['target_id'], unique=False)

    op.create_table('target_tags',
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tag', sa.String(length=100), nullable=False),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_target_tags_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('target_id', 'tag', name=op.f('pk_target_tags'))
    )
    with op.batch_alter_table('target_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_target_tags_tag'), ['tag'], unique=False)

    op.create_table('alerts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('stream', sa.String(length=100), nullable=True),
    sa.Column('topic', sa.String(length=249), nullable=True),
    sa.Column('partition', sa.Integer(), nullable=True),
    sa.Column('offset', sa.BigInteger(), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('object_id', sa.String(length=200), nullable=True),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('notice_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('time', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('ra', sa.Float(), nullable=True),
    sa.Column('dec', sa.Float(), nullable=True),
    sa.Column('band', sa.String(length=32), nullable=True),
    sa.Column('mag', sa.Float(), nullable=True),
    sa.Column('mag_err', sa.Float(), nullable=True),
    sa.Column('flux', sa.Float(), nullable=True),
    sa.Column('flux_err', sa.Float(), nullable=True),
    sa.Column('fields', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('ingested_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['notice_id'], ['notices.id'], name=op.f('fk_alerts_notice_id_notices'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_alerts_target_id_targets'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    sa.UniqueConstraint('source', 'key', name=op.f('uq_alerts_source_key'))
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alerts_object_id'), ['object_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_target_id'), ['target_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_time'), ['time'], unique=False)

    op.create_table('decisions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('alert_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('rule', sa.String(length=200), nullable=False),
    sa.Column('rule_version', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('details', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name=op.f('fk_decisions_alert_id_alerts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_decisions_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_decisions')),
    sa.UniqueConstraint('alert_id', 'rule', name=op.f('uq_decisions_alert_id_rule'))
    )
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_decisions_alert_id'), ['alert_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_decisions_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_decisions_outcome'), ['outcome'], unique=False)
        batch_op.create_index(batch_op.f('ix_decisions_rule'), ['rule'], unique=False)
        batch_op.create_index(batch_op.f('ix_decisions_target_id'), ['target_id'], unique=False)

    op.create_table('photometry',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('alert_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('mjd', sa.Float(), nullable=False),
    sa.Column('band', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('mag', sa.Float(), nullable=True),
    sa.Column('mag_err', sa.Float(), nullable=True),
    sa.Column('flux', sa.Float(), nullable=True),
    sa.Column('flux_err', sa.Float(), nullable=True),
    sa.Column('limit', sa.Float(), nullable=True),
    sa.Column('dedupe', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name=op.f('fk_photometry_alert_id_alerts'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_photometry_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_photometry')),
    sa.UniqueConstraint('target_id', 'dedupe', name=op.f('uq_photometry_target_id_dedupe'))
    )
    with op.batch_alter_table('photometry', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_photometry_target_id'), ['target_id'], unique=False)

    op.create_table('observation_requests',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('decision_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('template', sa.String(length=100), nullable=True),
    sa.Column('mode', sa.String(length=32), nullable=True),
    sa.Column('priority', sa.Float(), nullable=True),
    sa.Column('window_start', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('window_end', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('facility_state', sa.String(length=64), nullable=True),
    sa.Column('facility_id', sa.String(length=100), nullable=True),
    sa.Column('request', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('estimated_hours', sa.Float(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('claimed_by', sa.String(length=100), nullable=True),
    sa.Column('claimed_until', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('cadence', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('parent_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('submitted_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.Column('updated_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('last_polled_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['decision_id'], ['decisions.id'], name=op.f('fk_observation_requests_decision_id_decisions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['parent_id'], ['observation_requests.id'], name=op.f('fk_observation_requests_parent_id_observation_requests'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_observation_requests_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_observation_requests')),
    sa.UniqueConstraint('decision_id', name=op.f('uq_observation_requests_decision_id')),
    sa.UniqueConstraint('name', name=op.f('uq_observation_requests_name'))
    )
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_observation_requests_facility'), ['facility'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_requests_facility_id'), ['facility_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_requests_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_observation_requests_target_id'), ['target_id'], unique=False)

    op.create_table('data_products',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('request_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('notice_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('product_id', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('filename', sa.String(length=400), nullable=False),
    sa.Column('storage_key', sa.String(length=1000), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('md5', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('meta', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('stored_at', tomd.db.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['notice_id'], ['notices.id'], name=op.f('fk_data_products_notice_id_notices'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['request_id'], ['observation_requests.id'], name=op.f('fk_data_products_request_id_observation_requests'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name=op.f('fk_data_products_target_id_targets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_data_products')),
    sa.UniqueConstraint('facility', 'product_id', name=op.f('uq_data_products_facility_product_id'))
    )
    with op.batch_alter_table('data_products', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_data_products_request_id'), ['request_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_data_products_target_id'), ['target_id'], unique=False)

    op.create_table('observation_status',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('time', tomd.db.models.UTCDateTime(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('facility_state', sa.String(length=64), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['observation_requests.id'], name=op.f('fk_observation_status_request_id_observation_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_observation_status'))
    )
    with op.batch_alter_table('observation_status', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_observation_status_request_id'), ['request_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('observation_status', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observation_status_request_id'))

    op.drop_table('observation_status')
    with op.batch_alter_table('data_products', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_data_products_target_id'))
        batch_op.drop_index(batch_op.f('ix_data_products_request_id'))

    op.drop_table('data_products')
    with op.batch_alter_table('observation_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_observation_requests_target_id'))
        batch_op.drop_index(batch_op.f('ix_observation_requests_state'))
        batch_op.drop_index(batch_op.f('ix_observation_requests_facility_id'))
        batch_op.drop_index(batch_op.f('ix_observation_requests_facility'))

    op.drop_table('observation_requests')
    with op.batch_alter_table('photometry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_photometry_target_id'))

    op.drop_table('photometry')
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_decisions_target_id'))
        batch_op.drop_index(batch_op.f('ix_decisions_rule'))
        batch_op.drop_index(batch_op.f('ix_decisions_outcome'))
        batch_op.drop_index(batch_op.f('ix_decisions_created_at'))
        batch_op.drop_index(batch_op.f('ix_decisions_alert_id'))

    op.drop_table('decisions')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_time'))
        batch_op.drop_index(batch_op.f('ix_alerts_target_id'))
        batch_op.drop_index(batch_op.f('ix_alerts_object_id'))

    op.drop_table('alerts')
    with op.batch_alter_table('target_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_target_tags_tag'))

    op.drop_table('target_tags')
    with op.batch_alter_table('target_names', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_target_names_target_id'))

    op.drop_table('target_names')
    with op.batch_alter_table('target_list_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_target_list_members_target_id'))

    op.drop_table('target_list_members')
    op.drop_table('notices')
    with op.batch_alter_table('hook_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hook_runs_event_id'))

    op.drop_table('hook_runs')
    with op.batch_alter_table('targets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_targets_hpx'))

    op.drop_table('targets')
    op.drop_table('target_lists')
    op.drop_table('poll_state')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_kind'))
        batch_op.drop_index(batch_op.f('ix_outbox_created_at'))

    op.drop_table('outbox')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index('ix_dead_letters_coords')

    op.drop_table('dead_letters')

