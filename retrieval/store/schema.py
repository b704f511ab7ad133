"""SQLAlchemy models: the library's source of truth.

Every image row carries its own embedding, so the FAISS file can always be
rebuilt from this database. Writes to `images.embedding` are mirrored into
`vector_log` by triggers (see the initial migration), which is how the FAISS
cache learns exactly which ids changed since it was last saved.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from retrieval.store.reads import readonly_uri
from retrieval.store.rows import (  # noqa: F401 - re-exported: the writers' one import for row columns
    EMBEDDING_DTYPE,
    blobs_to_matrix,
    path_from_db,
    path_to_db,
    vector_to_blob,
)

# INTEGER on SQLite (a rowid alias where it is the key), BIGINT on PostgreSQL: nanosecond
# mtimes, file sizes and the ids of a billion images outgrow 32 bits there.
BigInt = Integer().with_variant(BigInteger(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the library: model spec, embedding size, preprocessing."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Run(Base):
    """One indexing, tagging or rebuild run, so status and verify can say what made what."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    precision: Mapped[str | None] = mapped_column(String, nullable=True)
    device: Mapped[str | None] = mapped_column(String, nullable=True)
    stats: Mapped[dict] = mapped_column(JSON, default=dict)


class Image(Base):
    """A file on disk and its embedding (float32 bytes, L2-normalised)."""

    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_content_hash", "content_hash"),
        Index("ix_images_taken_at", "taken_at"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    path_bytes: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    size: Mapped[int] = mapped_column(BigInt)
    mtime_ns: Mapped[int] = mapped_column(BigInt)
    content_hash: Mapped[str] = mapped_column(String)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    format: Mapped[str | None] = mapped_column(String, nullable=True)
    taken_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ErrorRow(Base):
    """A file a run had to skip, and why; shown by `--verbose` and `status`."""

    __tablename__ = "errors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String)
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class VectorLog(Base):
    """Filled by triggers only: which image ids gained, changed or lost a vector."""

    __tablename__ = "vector_log"
    __table_args__ = ({"sqlite_autoincrement": True},)
    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInt)
    op: Mapped[str] = mapped_column(String)


class TagRun(Base):
    """A named tagging run; re-running the same name replaces its tags atomically."""

    __tablename__ = "tag_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    strategy: Mapped[str] = mapped_column(String)
    labels: Mapped[list] = mapped_column(JSON)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (
        Index("ix_tags_label", "label"),
        Index("ix_tags_image_id", "image_id"),
        Index("ix_tags_tag_run_id", "tag_run_id"),
    )
    id: Mapped[int] = mapped_column(BigInt, primary_key=True)
    tag_run_id: Mapped[int] = mapped_column(ForeignKey("tag_runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(BigInt, ForeignKey("images.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String)
    score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)


class Concept(Base):
    """A concept learned from example images: a direction in the image-embedding space.

    Every method stores what search needs to use it as one more query term and
    tagging as one more label: a unit `direction`, and `scale` and `bias` so that
    sigmoid(scale * cosine + bias) is the probability an image shows the concept.
    It is only meaningful with the weights that made it (`fingerprint`).
    """

    __tablename__ = "concepts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    method: Mapped[str] = mapped_column(String)
    fingerprint: Mapped[str] = mapped_column(String)
    embed_dim: Mapped[int] = mapped_column(Integer)
    direction: Mapped[bytes] = mapped_column(LargeBinary)
    scale: Mapped[float] = mapped_column(Float)
    bias: Mapped[float] = mapped_column(Float)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def make_engine(db_path: str, readonly: bool = False) -> Engine:
    """A SQLite engine in WAL mode with foreign keys on and a patient busy timeout.

    `readonly` opens the file for reading only (a shared copy, a mounted snapshot;
    see `reads.readonly_uri`).
    """
    url = f"sqlite:///{readonly_uri(db_path)}&uri=true" if readonly else f"sqlite:///{db_path}"
    engine = create_engine(
        url,
        connect_args={"timeout": 30},
        json_serializer=lambda obj: json.dumps(obj, default=str),
    )

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        if not readonly:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine
