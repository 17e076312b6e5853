"""Atomic file writes and content hashes shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alexnet_deploy.errors import UserError


def check_writable_dir(path: Path) -> None:
    """Raise UserError unless ``path`` can be written: its parent folder is writable, or the
    nearest folder above it that exists is (missing folders are created only when something is
    written, by :func:`atomic_path` and :func:`make_parent`)."""
    parent = Path(path).resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder; choose "
                        "another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {existing} is not writable: choose another output path")


def make_parent(path: Path | str) -> Path:
    """Create ``path``'s parent folders (the moment something is written there); return it."""
    path = Path(path)
    check_writable_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    An exception or interrupt inside the block removes the temporary file, so ``dest`` is either
    the old file or the complete new one, never half-written.
    """
    dest = make_parent(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json_atomic(dest: Path | str, obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

