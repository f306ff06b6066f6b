"""Steps task type: judgements.step_labels

A steps item is one solution whose steps are its completions (in order); a steps judgement rates each step +1 good /
0 neutral / -1 bad, stored as a JSON list in `judgements.step_labels` (NULL for the other task types). Existing
judgements have none.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("judgements", sa.Column("step_labels", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("judgements") as b:
        b.drop_column("step_labels")
