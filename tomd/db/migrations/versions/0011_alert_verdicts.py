"""alert_verdicts: an alert's not-fired verdicts in one row instead of a decision row each

With 25 rules every alert wrote 25 decision rows, nearly all "not fired",
each paying its heap tuple, four index entries and two foreign-key checks:
~14 us of PostgreSQL CPU per row, 0.35 ms per alert, more than everything
else the alert stores. And 2.5·10^8 rows a night at Rubin's rate. The
not-fired verdicts of an alert now go into one alert_verdicts row (a JSON
list, compressed with lz4 where the server has it); the other outcomes stay
in decisions. Rows written before stay where they are: readers read both.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 07:05:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def _lz4_available(bind) -> bool:
    return bind.dialect.name == "postgresql" and bind.execute(sa.text(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
    )).first() is not None


def upgrade() -> None:
    op.create_table(
        'alert_verdicts',
        sa.Column('alert_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('target_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('verdicts', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name='fk_alert_verdicts_alert_id_alerts',
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['target_id'], ['targets.id'], name='fk_alert_verdicts_target_id_targets',
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('alert_id', name='pk_alert_verdicts'),
    )
    op.create_index('ix_alert_verdicts_target_id', 'alert_verdicts', ['target_id'], unique=False)
    bind = op.get_bind()
    if _lz4_available(bind):
        op.execute("ALTER TABLE alert_verdicts ALTER COLUMN verdicts SET COMPRESSION lz4")


def downgrade() -> None:
    # The not-fired verdicts go back to a decision row each, as they were stored before: read by
    # alert id, 5,000 alerts at a time (a busy database holds ~10^8 verdicts), written in bulk.
    import json

    bind = op.get_bind()
    decisions = sa.table('decisions', sa.column('alert_id'), sa.column('target_id'), sa.column('rule'),
                         sa.column('rule_version'), sa.column('outcome'), sa.column('reason'),
                         sa.column('details', sa.JSON()), sa.column('created_at'))
    after = -1
    while True:
        rows = bind.execute(sa.text(
            "SELECT alert_id, target_id, created_at, verdicts FROM alert_verdicts WHERE alert_id > :after "
            "ORDER BY alert_id LIMIT 5000"), {"after": after}).all()
        if not rows:
            break
        after = rows[-1][0]
        out = []
        for alert_id, target_id, created_at, verdicts in rows:
            if isinstance(verdicts, str):  # SQLite hands JSON back as text through a plain text()
                verdicts = json.loads(verdicts)
            for entry in verdicts:
                rule, version, reason = entry[:3]
                if len(entry) == 7:  # [rule, version, reason, clause, line, texts, values]
                    details = {"clause": entry[3], "values": dict(zip(entry[5], entry[6])), "line": entry[4]}
                else:  # [rule, version, reason, details]
                    details = entry[3] or {}
                # JSON kept a NUL a reason quoted; text columns refuse it (written visibly, as insert_decisions does).
                out.append({"alert_id": alert_id, "target_id": target_id, "rule": rule, "rule_version": version,
                            "outcome": "not_fired", "reason": (reason or "").replace("\x00", "\\x00"),
                            "details": details, "created_at": created_at})
        op.bulk_insert(decisions, out)
    op.drop_index('ix_alert_verdicts_target_id', table_name='alert_verdicts')
    op.drop_table('alert_verdicts')
