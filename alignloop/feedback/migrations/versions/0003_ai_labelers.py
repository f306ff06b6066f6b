"""AI labelers: labelers.kind ("human" | "ai") and labelers.model, judgements.details

An AI labeler is a labeler of kind "ai" whose `model` names the model that judged; its judgements keep their
evidence (per-order probabilities, raw picks, principle, rationale) in `judgements.details`. Existing labelers
become kind "human" (the server default); existing judgements have no details.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("labelers", sa.Column("kind", sa.String(20), nullable=False, server_default="human"))
    op.add_column("labelers", sa.Column("model", sa.String(300)))
    op.add_column("judgements", sa.Column("details", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("judgements") as b:
        b.drop_column("details")
    with op.batch_alter_table("labelers") as b:
        b.drop_column("model")
        b.drop_column("kind")
