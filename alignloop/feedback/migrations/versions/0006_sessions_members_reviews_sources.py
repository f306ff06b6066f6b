"""Server-side sessions, project members, adjudications, import source keys

* `sessions`: one row per signed-in browser or API client. The cookie carries a random token; the table keeps only
  its SHA-256 (`id`), so a copied database does not hold usable sessions. Logout deletes the row; deactivating a
  labeler or changing their password deletes all of theirs. `last_seen_at` drives the idle timeout, `created_at`
  the absolute one.
* `project_members`: which labelers may label a project whose `settings.access` is "members" (a project open to
  all ignores it).
* `adjudications`: an admin's review decision on an item, append-only (the newest per item counts): "accept" (the
  labels' consensus stands, reviewed), "override" (`answer` replaces the consensus: the same fields a judgement
  has) or "exclude" (the item is left out of exports). Export honours them.
* `prompts.source_key`: what makes an import idempotent: "id:<row id>" when the row had an `id`, else a hash of the
  row's content; unique per project, so importing the same file twice adds nothing the second time.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_sessions_labeler", "sessions", ["labeler_id"])
    op.create_table(
        "project_members",
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("labeler_id", sa.Integer, sa.ForeignKey("labelers.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("added_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_project_members_labeler", "project_members", ["labeler_id"])
    op.create_table(
        "adjudications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer, sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("admin_id", sa.Integer, sa.ForeignKey("labelers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("answer", sa.JSON()),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_adjudications_item", "adjudications", ["item_id", "id"])
    # plain ADD COLUMN (no batch mode): see 0005 on why a table copy would cascade-delete on SQLite
    op.add_column("prompts", sa.Column("source_key", sa.String(100)))
    op.create_index("uq_prompts_project_source", "prompts", ["project_id", "source_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_prompts_project_source", table_name="prompts")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE prompts DROP COLUMN source_key")
    else:
        op.drop_column("prompts", "source_key")
    op.drop_index("ix_adjudications_item", table_name="adjudications")
    op.drop_table("adjudications")
    op.drop_index("ix_project_members_labeler", table_name="project_members")
    op.drop_table("project_members")
    op.drop_index("ix_sessions_labeler", table_name="sessions")
    op.drop_table("sessions")
