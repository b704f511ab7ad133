"""Alembic environment: upgrades one library database.

clipfind passes an open connection in `config.attributes["connection"]`;
by hand, pass the database file with `-x db=PATH` (or a PostgreSQL URL, `-x db=postgresql+psycopg://...`).
"""

from alembic import context
from sqlalchemy import create_engine

from retrieval.store.schema import Base

target_metadata = Base.metadata
config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies tables
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    db = context.get_x_argument(as_dictionary=True).get("db")
    if not db:
        raise SystemExit("pass the library database: alembic -x db=PATH/clipfind.db upgrade head")
    with create_engine(db if "://" in db else f"sqlite:///{db}").connect() as conn:
        _run(conn)
