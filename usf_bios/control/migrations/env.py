"""Alembic environment: the URL comes from the caller (usf_bios.control.db.migrate)."""

from alembic import context

from usf_bios.control.db import make_engine
from usf_bios.control.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
