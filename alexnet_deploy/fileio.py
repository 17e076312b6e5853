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
    """Raise UserError unless ``path``'s parent folder exists and is writable."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output folder {parent} is not writable: choose another --out")


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    An exception or interrupt inside the block removes the temporary file, so ``dest`` is either
    the old file or the complete new one, never half-written.
    """
    dest = Path(dest)
    check_writable_dir(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
