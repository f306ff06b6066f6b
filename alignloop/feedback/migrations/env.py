"""Alembic environment for the feedback store. Migrations are run programmatically by `alignloop.feedback.db`
(`upgrade(engine)`), which passes the connection in `config.attributes["connection"]`."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from alignloop.feedback.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic -x url=...` from a shell
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
        with create_engine(url).connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata,
                              render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        return
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
