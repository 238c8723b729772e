"""alerts.payload as json (not jsonb) on PostgreSQL, compressed with lz4

Why: tomd keeps the survey payload as it came and never queries inside it in
SQL, but jsonb makes the server parse and re-encode every payload (~9 kB for a
ZTF alert with its history) and pglz compresses it. Measured on 3,000 real ZTF
payloads (COPY, server CPU): jsonb+pglz 0.27-0.35 ms each, json+pglz 0.17,
json+lz4 0.06: the server's largest per-alert cost at ingest. json still checks
that the text is valid JSON. alerts.fields, small and worth querying, stays
jsonb. SQLite stores JSON as text already: nothing to do there.

The type change rewrites the alerts table (a lock for as long as that takes on
a large table). lz4 needs PostgreSQL 14+ built with it; otherwise the column
keeps the server's default compression.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 04:00:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def _lz4_available(bind) -> bool:
    return bool(bind.execute(sa.text(
        "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
    )).first())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.alter_column("alerts", "payload", type_=sa.JSON(), existing_type=postgresql.JSONB(),
                    postgresql_using="payload::json")
    if _lz4_available(bind):
        op.execute("ALTER TABLE alerts ALTER COLUMN payload SET COMPRESSION lz4")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if _lz4_available(bind):
        op.execute("ALTER TABLE alerts ALTER COLUMN payload SET COMPRESSION default")
    op.alter_column("alerts", "payload", type_=postgresql.JSONB(), existing_type=sa.JSON(),
                    postgresql_using="payload::jsonb")
