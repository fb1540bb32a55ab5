"""What an index directory holds and how to read it: file names, format version, the live build's manifest.

The searcher, the backends and the builder all read the index through this module, so none of them needs the
builder (``store.py``) to know where things are. Layout and write protocol: docs/architecture.md.

    index/CURRENT            name of the live build (replaced atomically)
    index/builds/<id>/       one complete, immutable build: manifest.json, passages.sqlite, vectors.faiss,
                             sentences.npy, model/ (ONNX query encoder), lexical/ (bm25s), vocabulary.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from .config import Settings
from .embedding import canonical_model_name
from .embedding.onnx_encoder import encoder_status
from .errors import IndexCorrupt, IndexMismatch, IndexNotBuilt
from .types import Article

# The layout of a build's files. 2: the articles table keeps each article's provenance (source_url, outlet,
# author, story, title_from) and the lead title shown for an article without a headline.
FORMAT_VERSION = 2
CURRENT = "CURRENT"
BUILDS = "builds"
MANIFEST = "manifest.json"
PASSAGES_DB = "passages.sqlite"
VECTORS = "vectors.faiss"
SENTENCE_VECTORS = "sentences.npy"
LEXICAL = "lexical"
VOCABULARY = "vocabulary.json"

# Versions of what is put before a passage or sentence when it is embedded (``index_texts``); recorded in the
# manifest, so changing how that text is made rebuilds the index.
PASSAGE_CONTEXT = "headline-or-lead-v1"
SENTENCE_CONTEXT = "headline-or-lead-pooled-v2"
LEXICAL_VERSION = "bm25s-lucene-k0.9-b0.4-snowball-v2-sentences-bigrams-headline-or-lead-v2"


def rebuild_hint(index_dir: Path) -> str:
    return f"Rebuild it with: qa-service index SEEDS_DIR --index-dir {index_dir}"


def chunking_settings(settings: Settings) -> dict:
    """The manifest's ``chunking`` entry: everything that decides how articles are cut and what is indexed."""
    return {"max_tokens": settings.max_tokens, "overlap_sentences": settings.overlap_sentences,
            "splitter": "sentencex+news-abbrev-v1", "passage_context": PASSAGE_CONTEXT,
            "sentence_context": SENTENCE_CONTEXT, "lexical": LEXICAL_VERSION}


def current_build_dir(index_dir: Path) -> Path:
    """Return the live build folder, or raise ``IndexNotBuilt``."""
    index_dir = Path(index_dir)
    pointer = index_dir / CURRENT
    if not pointer.is_file():
        raise IndexNotBuilt(f"No index found in {index_dir}. {rebuild_hint(index_dir)}")
    name = pointer.read_text(encoding="utf-8").strip()
    build = index_dir / BUILDS / name
    if not name or "/" in name or not build.is_dir():
        raise IndexCorrupt(f"The index in {index_dir} points to a missing build ({name!r}). {rebuild_hint(index_dir)}")
    return build


def read_manifest(index_dir: Path) -> dict:
    """Return the live manifest after checking its files are whole; raise a clear error otherwise."""
    index_dir = Path(index_dir)
    build = current_build_dir(index_dir)
    try:
        manifest = json.loads((build / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexCorrupt(f"The index manifest in {index_dir} is missing or unreadable. "
                           f"{rebuild_hint(index_dir)}") from exc
    found = manifest.get("format_version") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        age = ("an older" if isinstance(found, int) and found < FORMAT_VERSION
               else "a newer" if isinstance(found, int) else "another")
        raise IndexMismatch(
            f"The index in {index_dir} was built by {age} qa-service (index format "
            f"{found if found is not None else '?'}; this one reads format {FORMAT_VERSION}), so it must be rebuilt "
            f"once; the articles folder is unchanged. {rebuild_hint(index_dir)}"
        )
    for name, meta in manifest.get("files", {}).items():
        path = build / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise IndexCorrupt(f"The index file {name} in {index_dir} is missing or truncated. "
                               f"{rebuild_hint(index_dir)}")
    manifest["_build_dir"] = str(build)
    return manifest


def recorded_articles_dir(manifest: dict | None) -> Path | None:
    """The absolute articles folder a manifest says its index was built from (None: it does not say)."""
    folder = (manifest or {}).get("articles_dir")
    return Path(folder) if folder else None


def live_manifest(index_dir: Path) -> dict | None:
    """Return the live build's manifest, or None when there is no usable index (not built, damaged, other format)."""
    try:
        return read_manifest(index_dir)
    except (IndexNotBuilt, IndexCorrupt, IndexMismatch):
        return None


def check_model(manifest: dict, model: str, index_dir: Path) -> None:
    """Raise ``IndexMismatch`` when the index was built with another model than ``model``."""
    wanted = canonical_model_name(model)
    if manifest.get("model") != wanted:
        raise IndexMismatch(
            f"The index in {index_dir} was built with model {manifest.get('model')!r}, not {wanted!r}. "
            f"Rebuild it with: qa-service index SEEDS_DIR --index-dir {index_dir} --model {model}, "
            f"or ask with --model {manifest.get('model')}."
        )


def metadata_digest(articles: Sequence[Article]) -> str:
    """A checksum of every article's metadata (file, title, date, provenance, story) in id order: an index is
    stale when it changes though no text did (a story regrouped, a feed's channel renamed)."""
    rows = sorted((a.id, a.source, a.title, a.date, a.source_url, a.outlet, a.author, a.story, a.title_from)
                  for a in articles)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def folder_status(manifest: dict, articles_dir: Path | None) -> str | None:
    """Why an index whose manifest is ``manifest`` does not stand for the folder ``articles_dir`` (None: it does,
    or no folder is asked about): the manifest records the absolute folder it was built from."""
    if articles_dir is None:
        return None
    recorded = manifest.get("articles_dir")
    if recorded == str(Path(articles_dir).resolve()):
        return None
    return f"it was built from another folder, {recorded}" if recorded else "it does not record its articles folder"


def index_status(settings: Settings, articles: Sequence[Article],
                 articles_dir: Path | None = None) -> tuple[bool, str]:
    """Return ``(fresh, reason)``: is the live index built from exactly these articles and settings (and from the
    folder ``articles_dir``, when given)?"""
    try:
        manifest = read_manifest(settings.index_dir)
    except (IndexNotBuilt, IndexCorrupt, IndexMismatch) as exc:
        return False, exc.message
    if manifest.get("model") != canonical_model_name(settings.model):
        return False, "the model changed"
    if manifest.get("chunking") != chunking_settings(settings):
        return False, "the chunking settings changed"
    if manifest.get("articles") != {a.id: a.content_hash for a in articles}:
        return False, "the articles changed"
    if manifest.get("metadata") != metadata_digest(articles):
        return False, "the articles' metadata changed"
    reason = encoder_status(manifest, settings.quantize) or folder_status(manifest, articles_dir)
    if reason:
        return False, reason
    return True, "up to date"
