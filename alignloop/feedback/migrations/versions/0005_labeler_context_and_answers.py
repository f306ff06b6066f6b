"""Labeler context and several questions: labelers.public_id, labelers.attributes, judgements.answers

`public_id` is the pseudonymous id exports name a labeler by (random "L" + 16 hex digits; existing labelers get one
here), `attributes` what an admin says about a labeler (group, locale, expertise: a JSON object of strings; `{}` for
existing ones). `answers` keeps every answer of a judgement in a project that asks several questions (NULL
otherwise; existing judgements answered the one question in their `choice` / `strength` columns).

Revision ID: 0005
Revises: 0004
"""
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs, no batch (table-copying) mode: on SQLite with foreign keys on, dropping the old labelers
    # table would cascade-delete every assignment and judgement
    # NOT NULL needs a default to be added on SQLite: "" until every row gets its id below (and the unique index)
    op.add_column("labelers", sa.Column("public_id", sa.String(40), nullable=False, server_default=""))
    op.add_column("labelers", sa.Column("attributes", sa.JSON(), nullable=False, server_default="{}"))
    conn = op.get_bind()
    labelers = sa.table("labelers", sa.column("id", sa.Integer), sa.column("public_id", sa.String))
    for (lid,) in conn.execute(sa.select(labelers.c.id)).all():
        # the migration's own copy of models.new_public_id: a migration never changes with the models
        conn.execute(labelers.update().where(labelers.c.id == lid).values(public_id="L" + secrets.token_hex(8)))
    if conn.dialect.name != "sqlite":  # SQLite cannot drop a column default; the models always set the id
        op.alter_column("labelers", "public_id", existing_type=sa.String(40), server_default=None)
    op.create_index("ix_labelers_public_id", "labelers", ["public_id"], unique=True)
    op.add_column("judgements", sa.Column("answers", sa.JSON()))


def downgrade() -> None:
    op.drop_index("ix_labelers_public_id", table_name="labelers")
    for table, column in (("judgements", "answers"), ("labelers", "attributes"), ("labelers", "public_id")):
        if op.get_bind().dialect.name == "sqlite":  # SQLite >= 3.35 drops a column in place (no table copy)
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        else:
            op.drop_column(table, column)
