"""Demonstrations and conversations

* `judgements.text`: a demonstration's written (or edited) response.
* `demonstration_reviews`: an admin's accept / reject (with a note) of one demonstration version, append-only.
* `conversations`: a labeler's conversation with the served model, one per assignment of a conversation project;
  ended with a 1-7 rating and a comment; at most one open per labeler and project (`ux_conversations_open`).
* `conversation_turns`: each turn's messages so far, two candidate next messages, the 8-point choice and the chosen
  candidate; the generation's status (pending / ready / failed / chosen) and error.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (no batch mode): see 0005 on why a table copy would cascade-delete on SQLite
    op.add_column("judgements", sa.Column("text", sa.Text))
    op.create_table(
        "demonstration_reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("judgement_id", sa.Integer, sa.ForeignKey("judgements.id", ondelete="CASCADE"), nullable=False),
        sa.Column("admin_id", sa.Integer, sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_demonstration_reviews_judgement", "demonstration_reviews", ["judgement_id", "id"])
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("assignment_id", sa.Integer, sa.ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False,
                  unique=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="open"),
        sa.Column("rating", sa.Integer),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
        sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime),
    )
    op.create_index("ix_conversations_project", "conversations", ["project_id", "status"])
    # one open conversation per labeler and project (a double-clicked open_start Start cannot open two)
    op.create_index("ux_conversations_open", "conversations", ["project_id", "labeler_id"], unique=True,
                    sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))
    op.create_table(
        "conversation_turns",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("context", sa.JSON, nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="pending"),
        sa.Column("candidates", sa.JSON),
        sa.Column("shown_order", sa.JSON, nullable=False),
        sa.Column("choice", sa.Integer),
        sa.Column("chosen", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("gen_ms", sa.Integer),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("chosen_at", sa.DateTime),
        sa.UniqueConstraint("conversation_id", "idx", name="uq_conversation_turn_idx"),
    )


def downgrade() -> None:
    op.drop_table("conversation_turns")
    op.drop_index("ux_conversations_open", table_name="conversations")
    op.drop_index("ix_conversations_project", table_name="conversations")
    op.drop_table("conversations")
    op.drop_index("ix_demonstration_reviews_judgement", table_name="demonstration_reviews")
    op.drop_table("demonstration_reviews")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE judgements DROP COLUMN text")
    else:
        op.drop_column("judgements", "text")
