"""Durable files: the one place that knows how to write safely (temporary sibling, fsync, ``os.replace``).

Every module that writes a file a reader may open while it changes goes through these helpers, so a reader
sees the whole old file or the whole new one, never a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, IO


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of the file at ``path`` (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (builds are immutable, so sharing the inode is safe); copy across devices."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path`` in the same folder (so ``os.replace`` onto ``path`` is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomically(path: Path, write: Callable[[IO], Any], *, binary: bool = False) -> None:
    """Write ``path`` via ``write(fh)`` into a temporary sibling, fsync it, rename it onto ``path``, fsync the folder.

    A crash at any point leaves the old file or the new one; the temporary file is removed on failure.
    """
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    write_atomically(path, lambda fh: fh.write(data), binary=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    write_atomically(path, lambda fh: fh.write(text))


def write_json_atomically(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as indented, key-sorted JSON, atomically and durably."""
    write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True))


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a fully written (and fsynced) folder ``tmp`` onto the absent name ``final`` and fsync the parent."""
    os.replace(tmp, final)
    fsync_dir(final.parent)
