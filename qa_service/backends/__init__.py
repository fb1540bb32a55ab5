"""Index backends: where articles, passages, sentences and their vectors live; this package picks one.

- ``FaissBackend`` (``faiss.py``, the default): one immutable build of an index directory, loaded into the
  serving process;
- ``PostgresBackend`` (``postgres.py``, ``--database-url``): rows of a PostgreSQL database with pgvector,
  shared by any number of service processes (docs/decisions/postgres-backend.md).

Both implement ``base.IndexBackend``.
"""

from __future__ import annotations

from ..config import Settings
from ..manifest import read_manifest
from .base import Evidence, IndexBackend


def open_backend(settings: Settings) -> IndexBackend:
    """Open the backend ``settings`` choose: PostgreSQL when ``database_url`` is set, else the FAISS directory."""
    if settings.database_url:
        from .postgres import PostgresBackend

        return PostgresBackend(settings)
    from .faiss import FaissBackend

    return FaissBackend(settings)


def read_index_manifest(settings: Settings) -> tuple[dict, str]:
    """Return the live index's manifest and where it lives, cheaply (no vectors loaded); raise if there is none."""
    if settings.database_url:
        from .postgres import read_database_manifest

        return read_database_manifest(settings.database_url)
    return read_manifest(settings.index_dir), str(settings.index_dir)


__all__ = ["Evidence", "IndexBackend", "open_backend", "read_index_manifest"]
