"""initial feedback schema

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("task_type", sa.String(20), nullable=False),
        sa.Column("guidelines_md", sa.Text(), nullable=False),
        sa.Column("overlap_k", sa.Integer(), nullable=False),
        sa.Column("gold_rate", sa.Float(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("is_chat", sa.Boolean(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
    )
    op.create_index("ix_prompts_project_id", "prompts", ["project_id"])
    op.create_table(
        "completions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("prompt_id", sa.Integer(), sa.ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("model", sa.String(300)),
        sa.Column("params", sa.JSON(), nullable=False),
    )
    op.create_index("ix_completions_prompt_id", "completions", ["prompt_id"])
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prompt_id", sa.Integer(), sa.ForeignKey("prompts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("completion_ids", sa.JSON(), nullable=False),
        sa.Column("is_gold", sa.Boolean(), nullable=False),
        sa.Column("gold_answer", sa.JSON()),
        sa.Column("n_active", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_items_queue", "items", ["project_id", "is_gold", "n_active", "id"])
    op.create_table(
        "labelers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("username", sa.String(100), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(300), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("labeler_id", sa.Integer(), sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("is_gold", sa.Boolean(), nullable=False),
        sa.Column("shown_order", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime()),
        sa.UniqueConstraint("item_id", "labeler_id", name="uq_assignment_item_labeler"),
    )
    op.create_index("ix_assignments_labeler_id", "assignments", ["labeler_id"])
    op.create_index("ix_assignments_labeler_project_status", "assignments", ["labeler_id", "project_id", "status"])
    op.create_table(
        "judgements",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("assignment_id", sa.Integer(), sa.ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("labeler_id", sa.Integer(), sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("shown_order", sa.JSON(), nullable=False),
        sa.Column("choice", sa.String(20)),
        sa.Column("strength", sa.String(30)),
        sa.Column("picked_position", sa.Integer()),
        sa.Column("ranking", sa.JSON()),
        sa.Column("thumbs", sa.Integer()),
        sa.Column("likert", sa.Integer()),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("time_spent_ms", sa.Integer()),
        sa.Column("idempotency_key", sa.String(100), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("assignment_id", "version", name="uq_judgement_assignment_version"),
    )
    op.create_index("ix_judgements_item_id", "judgements", ["item_id"])


def downgrade() -> None:
    for t in ("judgements", "assignments", "labelers", "items", "completions", "prompts", "projects"):
        op.drop_table(t)
