"""Reuse of earlier ONNX exports, so an unchanged model is not exported again (docs/decisions/export-cache.md).

Three sources, tried by the callers in this order: the live index's own export (``shareable_encoder``), an
earlier build of the same index with the same model fingerprint (``reuse_build_export``), and the machine's
export cache shared by every index folder (``cached_export`` / ``remember_export``). Reused files are
hard-linked (builds are immutable) and checked against their checksums before use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from ..files import link_or_copy, publish_folder, sha256_file, write_json_atomically
from .models import canonical_model_name, model_files_digest
from .onnx_encoder import EXPORT_VERSION, resolve_quantize

logger = logging.getLogger(__name__)

EXPORT_CACHE_KEEP = 4  # exports the machine's cache holds; the least recently used go
STALE_TMP_SECONDS = 3600  # a writer killed mid-copy leaves a .tmp- folder; a running one finishes well within this


def shareable_encoder(manifest: dict | None, model: str, quantize: str, check_files: bool = True) -> bool:
    """True when a new build of ``model`` may embed with ``manifest``'s ONNX encoder instead of exporting again.

    That needs the same model name, the same model files as when the export was made (``model_files_digest``),
    the same ``--quantize`` choice, the current export format, and export files whose checksums still match.
    A rebuild then never imports torch: the export was checked against sentence-transformers when it was made.

    Args:
        check_files: hash the export in ``manifest["_build_dir"]``; False for an index whose export lives
            elsewhere and is checked when fetched (PostgreSQL: ``backends.postgres.fetch_encoder``).
    """
    entry = (manifest or {}).get("encoder") or {}
    if entry.get("backend") != "onnx" or entry.get("export_version") != EXPORT_VERSION:
        return False
    quantize = resolve_quantize(quantize, manifest)
    if manifest.get("model") != canonical_model_name(model) or entry.get("quantize", "none") != quantize:
        return False
    digest = entry.get("model_files")
    if not digest or digest != model_files_digest(model):
        return False
    if not check_files:
        return True
    build = Path(manifest.get("_build_dir", ""))
    try:  # a damaged export is not passed on: the rebuild exports afresh (how --force repairs an index)
        return (sha256_file(build / entry["file"]) == entry["sha256"]
                and sha256_file(build / entry["tokenizer"]) == entry["tokenizer_sha256"])
    except (OSError, KeyError):
        return False


def reuse_build_export(builds: Iterable[Path], fingerprint: str, precision: str, folder: Path) -> dict | None:
    """Hard-link a matching export (same model fingerprint and precision) from an earlier build into ``folder``;
    return its manifest entry, or None when no build has one."""
    for build in sorted(builds, key=lambda p: p.name, reverse=True):
        if build.name.startswith("."):
            continue
        try:
            entry = json.loads((build / "manifest.json").read_text(encoding="utf-8")).get("encoder") or {}
        except (OSError, ValueError):
            continue
        if not (entry.get("backend") == "onnx" and entry.get("fingerprint") == fingerprint
                and entry.get("precision") == precision):
            continue
        try:
            for key in ("file", "tokenizer"):
                link_or_copy(build / entry[key], folder / Path(entry[key]).name)
            if sha256_file(folder / Path(entry["file"]).name) != entry["sha256"]:
                raise ValueError("checksum mismatch")
        except (OSError, KeyError, ValueError) as exc:
            logger.info("not reusing the ONNX export of build %s: %s", build.name, exc)
            for path in folder.iterdir():
                path.unlink()
            continue
        return {**entry, "reused_from": build.name}
    return None


def export_cache_dir() -> Path | None:
    """Where ONNX exports are kept for every index on this machine; None when the cache is off.

    ``QA_EXPORT_CACHE`` names the folder ("off" turns the cache off); else ``$XDG_CACHE_HOME/qa-service/onnx``,
    else ``~/.cache/qa-service/onnx``.
    """
    value = os.environ.get("QA_EXPORT_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "no", "false") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qa-service" / "onnx"


def _cache_key(model_files: str, quantize: str) -> str:
    return f"{model_files[:32]}-{quantize}-v{EXPORT_VERSION}"


def cached_export(model: str, quantize: str) -> dict | None:
    """Return a manifest (``model``, ``dimension``, ``encoder``, ``_build_dir``) of a cached export of ``model``'s
    files, fit to embed a new index with (``shareable_encoder``, checksums included); None when there is none.

    A new index folder of a model this machine has exported before then starts without loading torch.
    """
    root, digest = export_cache_dir(), model_files_digest(model)
    if root is None or digest is None:
        return None
    folder = root / _cache_key(digest, quantize)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    manifest["_build_dir"] = str(folder)
    if not shareable_encoder(manifest, model, quantize):
        logger.info("not using the cached ONNX export in %s: it does not match the model or its checksums; "
                    "removing it", folder)
        shutil.rmtree(folder, ignore_errors=True)  # the next export of this model takes its place
        return None
    try:
        os.utime(folder)  # used: kept longest
    except OSError:
        pass
    return manifest


def remember_export(manifest: dict | None) -> None:
    """Keep the ONNX export of a build (its manifest, as ``read_manifest`` gives) in the machine's export cache.

    Best effort: a cache that cannot be written is logged and skipped. The entry is assembled in a temporary
    folder and renamed into place, so a reader sees all of it or nothing. An entry for the same export (same
    checksum and size) is left as it is: ``cached_export`` checks the checksums before any use and removes an
    entry that fails them.
    """
    entry = (manifest or {}).get("encoder") or {}
    root = export_cache_dir()
    if root is None or entry.get("backend") != "onnx" or not entry.get("model_files"):
        return
    folder = root / _cache_key(entry["model_files"], entry.get("quantize", "none"))
    tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    try:
        source = Path(manifest["_build_dir"])
        if folder.exists():
            try:
                cached = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
                if cached.get("encoder", {}).get("sha256") == entry.get("sha256") and \
                        (folder / entry["file"]).stat().st_size == (source / entry["file"]).stat().st_size:
                    return
            except (OSError, ValueError, KeyError):
                pass
            shutil.rmtree(folder, ignore_errors=True)
        for key in ("file", "tokenizer"):
            (tmp / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source / entry[key], tmp / entry[key])
        cached = {"model": manifest["model"], "dimension": manifest["dimension"],
                  "encoder": {**entry, "reused_from": None}, "cached_from": source.name}
        write_json_atomically(tmp / "manifest.json", cached)
        publish_folder(tmp, folder)
    except (OSError, KeyError) as exc:
        logger.info("could not keep the ONNX export in the cache %s: %s", root, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_cache(root)


def _prune_cache(root: Path) -> None:
    try:
        entries = [p for p in root.iterdir() if p.is_dir()]
        kept = sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                      reverse=True)
        for path in kept[EXPORT_CACHE_KEEP:]:
            shutil.rmtree(path, ignore_errors=True)
        for path in entries:
            if path.name.startswith(".tmp-") and time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass
