"""Initial schema: images with embeddings, runs, errors, vector log, tags.

Written for both stores. SQLite gets exactly the schema it always had (its DDL must not
change: existing libraries upgrade from it). PostgreSQL gets 64-bit integers where values
outgrow 32 bits (nanosecond mtimes, sizes, ids of a billion images and their tags) and the
change-log triggers as plpgsql functions.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# INTEGER on SQLite (its rowid alias and DDL stay as they were), BIGINT on PostgreSQL.
BIG = sa.Integer().with_variant(sa.BigInteger(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("precision", sa.String(), nullable=True),
        sa.Column("device", sa.String(), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", BIG, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("path_bytes", sa.LargeBinary(), nullable=True),
        sa.Column("size", BIG, nullable=False),
        sa.Column("mtime_ns", BIG, nullable=False),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("format", sa.String(), nullable=True),
        sa.Column("taken_at", sa.DateTime(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sqlite_autoincrement=True,  # ids are never reused: FAISS is keyed by them
    )
    op.create_index("ix_images_content_hash", "images", ["content_hash"])
    op.create_index("ix_images_taken_at", "images", ["taken_at"])
    op.create_table(
        "errors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "vector_log",
        sa.Column("seq", BIG, primary_key=True, autoincrement=True),
        sa.Column("image_id", BIG, nullable=False),
        sa.Column("op", sa.String(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "tag_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "tags",
        sa.Column("id", BIG, primary_key=True),
        sa.Column(
            "tag_run_id",
            sa.Integer(),
            sa.ForeignKey("tag_runs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "image_id", BIG, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
    )
    op.create_index("ix_tags_label", "tags", ["label"])
    op.create_index("ix_tags_image_id", "tags", ["image_id"])
    op.create_index("ix_tags_tag_run_id", "tags", ["tag_run_id"])

    # The FAISS file is a cache of images.embedding. These triggers record every
    # change in the same transaction as the change, so the cache can catch up
    # exactly, whoever wrote the row.
    if op.get_context().dialect.name == "postgresql":
        _postgres_triggers()
        return
    op.execute(
        "CREATE TRIGGER images_vector_add AFTER INSERT ON images BEGIN "
        "INSERT INTO vector_log (image_id, op) VALUES (NEW.id, 'add'); END"
    )
    op.execute(
        "CREATE TRIGGER images_vector_change AFTER UPDATE OF embedding ON images BEGIN "
        "INSERT INTO vector_log (image_id, op) VALUES (NEW.id, 'add'); END"
    )
    op.execute(
        "CREATE TRIGGER images_vector_del AFTER DELETE ON images BEGIN "
        "INSERT INTO vector_log (image_id, op) VALUES (OLD.id, 'del'); END"
    )


# Every trigger first takes one transaction-level advisory lock, so writers that change
# vectors commit one after another and `vector_log.seq` grows in commit order: a reader that
# has seen seq N has seen every entry below N (SQLite gets this from its single writer).
# Inserts and deletes log a whole statement at once (transition tables), so a bulk insert of
# a thousand rows costs one trigger call.
_LOCK = "PERFORM pg_advisory_xact_lock(hashtext('clipfind vector_log ' || current_schema()));"
_PG_FUNCTIONS = {
    "clipfind_log_added": f"""
        BEGIN {_LOCK}
          INSERT INTO vector_log (image_id, op) SELECT id, 'add' FROM new_rows ORDER BY id;
          RETURN NULL;
        END""",
    "clipfind_log_changed": f"""
        BEGIN {_LOCK}
          INSERT INTO vector_log (image_id, op) VALUES (NEW.id, 'add');
          RETURN NULL;
        END""",
    "clipfind_log_deleted": f"""
        BEGIN {_LOCK}
          INSERT INTO vector_log (image_id, op) SELECT id, 'del' FROM old_rows ORDER BY id;
          RETURN NULL;
        END""",
}
_PG_TRIGGERS = {
    "images_vector_add": "AFTER INSERT ON images REFERENCING NEW TABLE AS new_rows "
                         "FOR EACH STATEMENT EXECUTE FUNCTION clipfind_log_added()",
    "images_vector_change": "AFTER UPDATE OF embedding ON images "
                            "FOR EACH ROW EXECUTE FUNCTION clipfind_log_changed()",
    "images_vector_del": "AFTER DELETE ON images REFERENCING OLD TABLE AS old_rows "
                         "FOR EACH STATEMENT EXECUTE FUNCTION clipfind_log_deleted()",
}


def _postgres_triggers() -> None:
    for name, body in _PG_FUNCTIONS.items():
        op.execute(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $${body}$$")
    for name, definition in _PG_TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {definition}")


def downgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    for trigger in ("images_vector_add", "images_vector_change", "images_vector_del"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON images" if postgres else ""))
    if postgres:
        for name in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    for table in ("tags", "tag_runs", "vector_log", "errors", "images", "runs", "meta"):
        op.drop_table(table)
