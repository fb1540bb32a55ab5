"""PostgreSQL + pgvector: connecting, the schema and its migrations, the stored manifest and encoder files.

Shared by the reader (``postgres.py``) and the writer (``postgres_writer.py``). Tables (``MIGRATIONS``, applied
once each under an advisory lock): articles, passages and sentences with their vectors (HNSW over passages),
BM25 postings and statistics scored in SQL exactly as the FAISS backend's bm25s indexes, the vocabulary, the
manifest and write generation (``qa_meta``), and the ONNX question encoder's files, so a serving host needs only
the database URL: docs/decisions/postgres-backend.md.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from ..errors import ConfigError, IndexCorrupt, IndexNotBuilt, QAError
from ..files import publish_folder, sha256_file, write_bytes_atomically, write_json_atomically

logger = logging.getLogger(__name__)

PASSAGE_TERMS, PASSAGE_PAIRS, SENTENCE_TERMS = 0, 1, 2  # qa_postings.kind
ENCODER_CACHE = "pg-encoders"

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE EXTENSION IF NOT EXISTS vector;
    CREATE TABLE qa_meta (key text PRIMARY KEY, value jsonb NOT NULL);
    CREATE TABLE qa_articles (
        id text PRIMARY KEY, source text NOT NULL, title text, date text, text text NOT NULL,
        content_hash text NOT NULL, passages integer NOT NULL);
    CREATE TABLE qa_passages (
        id bigint PRIMARY KEY, article_id text NOT NULL REFERENCES qa_articles(id) ON DELETE CASCADE,
        start integer NOT NULL, "end" integer NOT NULL, text text NOT NULL,
        first_sentence bigint NOT NULL, last_sentence bigint NOT NULL, date text, embedding vector NOT NULL);
    CREATE INDEX qa_passages_article ON qa_passages (article_id);
    CREATE INDEX qa_passages_date ON qa_passages (date);
    CREATE TABLE qa_sentences (
        id bigint PRIMARY KEY, article_id text NOT NULL REFERENCES qa_articles(id) ON DELETE CASCADE,
        start integer NOT NULL, "end" integer NOT NULL, embedding vector NOT NULL);
    CREATE INDEX qa_sentences_article ON qa_sentences (article_id);
    CREATE TABLE qa_postings (kind smallint NOT NULL, term text NOT NULL, doc bigint NOT NULL,
                              tf real NOT NULL, dl real NOT NULL, PRIMARY KEY (kind, term, doc));
    CREATE INDEX qa_postings_doc ON qa_postings (kind, doc);
    CREATE TABLE qa_lexical_stats (kind smallint PRIMARY KEY, docs bigint NOT NULL,
                                   total_length double precision NOT NULL);
    CREATE TABLE qa_vocabulary (word text PRIMARY KEY, count integer NOT NULL);
    CREATE TABLE qa_encoder_files (path text PRIMARY KEY, sha256 text NOT NULL, data bytea NOT NULL);
    CREATE SEQUENCE qa_passage_ids;
    CREATE SEQUENCE qa_sentence_ids;
    """),
    # Document frequencies kept per term, so a question's BM25 reads its terms' postings once, not twice.
    (2, """
    CREATE TABLE qa_term_stats (kind smallint NOT NULL, term text NOT NULL, df integer NOT NULL,
                                PRIMARY KEY (kind, term));
    INSERT INTO qa_term_stats (kind, term, df) SELECT kind, term, count(*) FROM qa_postings GROUP BY kind, term;
    """),
    # Where each article came from and the title shown without a headline (``backends.base.INFO_COLUMNS``);
    # rows written before stay NULL until the folder is indexed again (``PostgresWriter.sync`` fills them).
    (3, """
    ALTER TABLE qa_articles ADD COLUMN IF NOT EXISTS source_url text, ADD COLUMN IF NOT EXISTS outlet text,
        ADD COLUMN IF NOT EXISTS author text, ADD COLUMN IF NOT EXISTS story text,
        ADD COLUMN IF NOT EXISTS title_from text, ADD COLUMN IF NOT EXISTS lead_title text;
    """),
]


def connect(url: str, autocommit: bool = True):
    """Open a psycopg connection with pgvector's types registered; a clear ``QAError`` when it cannot."""
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError as exc:
        raise ConfigError(f"--database-url needs the postgres extra ({exc.name} is missing): "
                          "pip install 'qa-service[postgres]'") from None

    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise QAError(f"Cannot connect to the PostgreSQL database ({redact(url)}): {str(exc).strip()[:200]}",
                      code="database_unavailable", status=503) from None
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        pass  # no vector extension yet: migrate() creates it, then connections register it
    return conn


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    return (f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}"
            f"{':' + str(parts.port) if parts.port else ''}{parts.path}")


def migrate(conn) -> int:
    """Apply the schema migrations not yet applied; return the schema version. Safe to run concurrently."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('qa_service.migrate'))")
        conn.execute("CREATE TABLE IF NOT EXISTS qa_schema_migrations (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT version FROM qa_schema_migrations")}
        for version, sql in MIGRATIONS:
            if version not in done:
                conn.execute(sql)
                conn.execute("INSERT INTO qa_schema_migrations (version) VALUES (%s)", (version,))
                logger.info("applied schema migration %d", version)
    from pgvector.psycopg import register_vector

    register_vector(conn)
    return max(v for v, _ in MIGRATIONS)


def stored_manifest(conn) -> dict | None:
    """The manifest the last write stored in ``qa_meta``, or None."""
    row = conn.execute("SELECT value FROM qa_meta WHERE key = 'manifest'").fetchone()
    return row[0] if row else None


BUILD_HINT = "Build it with: qa-service index SEEDS_DIR --database-url URL"


def database_manifest(conn, url: str) -> dict:
    """Return the manifest of the index in the database, or raise a clear error when there is none."""
    import psycopg

    try:
        exists = conn.execute("SELECT to_regclass('qa_meta') IS NOT NULL").fetchone()[0]
        manifest = stored_manifest(conn) if exists else None
    except psycopg.Error as exc:
        raise IndexCorrupt(f"The database {redact(url)} cannot be read ({type(exc).__name__}).") from exc
    if manifest is None:
        raise IndexNotBuilt(f"The database {redact(url)} holds no index yet. {BUILD_HINT}")
    return manifest


def read_database_manifest(url: str) -> tuple[dict, str]:
    """Return the manifest of the index in the database at ``url`` and a printable name for it."""
    conn = connect(url)
    try:
        return database_manifest(conn, url), f"database {redact(url)}"
    finally:
        conn.close()


def fetch_encoder(conn, entry: dict, cache_root: Path) -> Path:
    """Return a local folder holding the encoder files ``entry`` names, copied from the database if needed."""
    folder = Path(cache_root) / entry["sha256"][:32]
    marker = folder / "manifest.json"
    if marker.is_file():
        return folder
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        for key in ("file", "tokenizer"):
            row = conn.execute("SELECT data, sha256 FROM qa_encoder_files WHERE path = %s", (entry[key],)).fetchone()
            if row is None:
                raise IndexCorrupt(f"The database lacks the encoder file {entry[key]}. "
                                   "Rebuild it with: qa-service index SEEDS_DIR --database-url URL --force")
            target = tmp / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(target, row[0])
            if sha256_file(target) != row[1]:
                raise IndexCorrupt("An encoder file in the database does not match its checksum.")
        write_json_atomically(tmp / "manifest.json", {"encoder": entry})  # last: it marks the folder complete
        try:
            publish_folder(tmp, folder)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def store_encoder(conn, entry: dict, folder: Path) -> None:
    """Upload the encoder files ``entry`` names from ``folder`` into the database, unless already there."""
    for key in ("file", "tokenizer"):
        path = folder / entry[key]
        digest = sha256_file(path)
        row = conn.execute("SELECT sha256 FROM qa_encoder_files WHERE path = %s", (entry[key],)).fetchone()
        if row is None or row[0] != digest:
            conn.execute("INSERT INTO qa_encoder_files (path, sha256, data) VALUES (%s, %s, %s) "
                         "ON CONFLICT (path) DO UPDATE SET sha256 = EXCLUDED.sha256, data = EXCLUDED.data",
                         (entry[key], digest, path.read_bytes()))
