"""photometry: no index of its own on target_id, no foreign key on alert_id (cheaper points at ingest)

A ZTF alert brings ~7 photometry points, so whatever each row costs at insert
is paid ~7 times per alert.

ix_photometry_target_id goes: the unique index uq_photometry_target_id_dedupe
on (target_id, dedupe) leads with target_id and serves every lookup by target,
so each point paid for two index insertions where one does.

fk_photometry_alert_id_alerts goes: on PostgreSQL it made every point run a
referential-integrity check (an index probe on alerts and a row lock) at
insert; dropping such checks (with other foreign keys) took the server from
~0.28 to ~0.20 ms of CPU per alert. Its ON DELETE SET NULL never fires: tomd
never deletes alerts (alerts.target_id is SET NULL when a target goes).
alert_id stays, as provenance: the alert that brought the point.
fk_photometry_target_id_targets stays: deleting a target deletes its points.

SQLite cannot drop a constraint in place: the batch rebuilds the table (its
columns, data, unique constraint and the target_id foreign key with its
CASCADE are kept).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 06:40:00
"""
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('photometry', schema=None) as batch_op:
        batch_op.drop_index('ix_photometry_target_id')
        batch_op.drop_constraint('fk_photometry_alert_id_alerts', type_='foreignkey')


def downgrade() -> None:
    # Nothing checked alert_id since the upgrade: a point naming no alert loses the link, as
    # ON DELETE SET NULL would have done, so the constraint can come back (on SQLite too,
    # where the rebuild's copy into the constrained table would otherwise fail).
    op.execute("UPDATE photometry SET alert_id = NULL WHERE alert_id IS NOT NULL "
               "AND NOT EXISTS (SELECT 1 FROM alerts WHERE alerts.id = photometry.alert_id)")
    with op.batch_alter_table('photometry', schema=None) as batch_op:
        batch_op.create_foreign_key('fk_photometry_alert_id_alerts', 'alerts', ['alert_id'], ['id'],
                                    ondelete='SET NULL')
        batch_op.create_index('ix_photometry_target_id', ['target_id'], unique=False)
