"""Atomic file writes and content hashes shared by every stage."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    remove_stale_temporaries(dest)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def temporary_prefix(dest: Path) -> str:
    """``.NAME.PID-``: the prefix of the hidden temporary files and folders written beside
    ``dest``; the process id tells :func:`remove_stale_temporaries` whether the writer is alive."""
    return f".{dest.name}.{os.getpid()}-"


def remove_stale_temporaries(dest: Path | str) -> None:
    """Remove the temporaries (``.NAME.PID-xxxx.tmp`` / ``.old``) that writes to ``dest`` left
    behind when their process was killed: those whose process no longer exists on this host.
    An ``.old`` folder holding the previous ``dest`` (killed mid-replacement, ``dest`` gone) is
    put back instead."""
    dest = Path(dest)
    prefix = f".{dest.name}."
    for leftover in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid_text, dash, _ = leftover.name[len(prefix):].partition("-")
        if not (dash and pid_text.isdigit() and leftover.suffix in (".tmp", ".old")):
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _alive(pid):
            continue
        if leftover.suffix == ".old" and (leftover / dest.name).exists() and not dest.exists():
            os.replace(leftover / dest.name, dest)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


# ---- the output-path guard every command runs before its work ----

#: what each output kind is called in messages; the keys are what :func:`file_kind` returns
KIND_NAMES = {
    "onnx": "an ONNX model", "checkpoint": "a PyTorch checkpoint", "npz": "an .npz data set",
    "calibration": "a calibration file", "sidecar": "an engine sidecar (engine.json)",
    "cache": "a TensorRT calibration cache", "json": "a JSON file", "text": "a text file",
    "png": "a PNG image", "image": "an image", "data": "a binary file", "engine": "an engine folder",
    "run": "a training run folder", "folder": "a folder",
}
#: existing kinds an output of each kind may replace (an empty folder is fine for folders)
_REPLACEABLE = {"text": {"text"}, "run": {"run", "folder"}, "engine": {"engine"}}
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def file_kind(path: Path | str) -> str | None:
    """What is at ``path``, sniffed from its content (a key of :data:`KIND_NAMES`), or None when
    nothing is there. The suffix is not trusted: ``model.json`` holding ONNX is ``onnx``."""
    path = Path(path)
    if path.is_dir():
        if (path / "engine.json").is_file():
            return "engine"
        return "run" if (path / "last.pt").is_file() else "folder"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip or numpy's .npz
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "data"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "checkpoint"
    if head.startswith(b"\x80"):  # a pickle: torch.save's legacy format
        return "checkpoint"
    if head.startswith(b"TRT-"):
        return "cache"
    if head.startswith(b"\x08") or path.suffix.lower() == ".onnx":  # ir_version, protobuf field 1
        return "onnx"
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError):
        return "data"
    if text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return "text"
        fmt = doc.get("format", "") if isinstance(doc, dict) else ""
        return {"alexnet-deploy/calibration/1": "calibration",
                "alexnet-deploy/engine/1": "sidecar"}.get(fmt, "json")
    return "text"


def engine_folder_above(path: Path | str) -> Path | None:
    """The engine folder (one holding ``engine.json``) that ``path`` lies inside, or None."""
    for folder in Path(path).resolve().parents:
        if (folder / "engine.json").is_file():
            return folder
    return None


def print_note(message: str) -> None:
    """One line on stderr (a note beside a command's output)."""
    print(message, file=sys.stderr)


def check_output(path: Path | str, option: str, kind: str, *,
                 inputs: Mapping[str, Path | str | None]
                 | Iterable[tuple[str, Path | str | None]] = (),
                 say: Callable[[str], None] | None = print_note) -> Path:
    """Refuse an output path that would destroy something, before the command's work starts.

    Refused (UserError naming ``option`` and the path): ``path`` is one of ``inputs`` (or, for
    a folder output, holds one); it lies inside an engine folder; it is a folder where a file
    is written or the other way round; it is an existing file of another kind than ``kind``
    (sniffed by :func:`file_kind`); or its folder cannot be written. Replacing an earlier output
    of the same kind is allowed, and said in one line through ``say``.

    Args:
        path: the output the command will write.
        option: the option that named it (``--out``, ``--json`` ...), for messages.
        kind: what will be written there, a key of :data:`KIND_NAMES`.
        inputs: option -> path of each of the command's inputs, a mapping or ``(option,
            path)`` pairs (None and ``synthetic:...`` entries are skipped). Defaults to none.
        say: where the "replacing" note goes; None says nothing (the caller says it).
            Defaults to :func:`print_note` (one line on stderr).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    target = path.resolve()
    folder_kind = kind in ("engine", "run", "folder")
    for in_option, value in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if value is None or str(value).startswith("synthetic:") or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if source == target or (folder_kind and target in source.parents):
            what = "is" if source == target else "holds"
            raise UserError(f"{option} {path} {what} this command's input {in_option} {value}: "
                            "an output never replaces an input; choose another path")
    engine = engine_folder_above(path)
    if engine is not None:
        raise UserError(f"{option} {path} is inside the engine folder {engine}, which holds "
                        "only what 'alexnet-deploy build' wrote: choose a path outside it")
    existing = file_kind(path)
    if existing is not None:
        if existing in ("engine", "run", "folder") and not folder_kind:
            suffix = {"text": "md", "calibration": "json"}.get(kind, kind)
            raise UserError(f"{option} {path} is a folder: give a file name such as "
                            f"{path / ('out.' + suffix)}")
        if folder_kind and existing not in ("engine", "run", "folder"):
            raise UserError(f"{option} {path} is {KIND_NAMES[existing]}, not a folder: "
                            "choose another path")
        empty = (not any(path.iterdir())) if path.is_dir() else path.stat().st_size == 0
        if not empty and existing not in _REPLACEABLE.get(kind, {kind}):
            raise UserError(f"{option} {path} already exists and is {KIND_NAMES[existing]}, "
                            f"not {KIND_NAMES[kind]}: choose another path or remove it first")
        if say is not None and not empty and kind != "run":
            say(f"note: replacing {path} ({KIND_NAMES[existing]} written earlier)")
    _check_can_create(path, option)
    return path


def _check_can_create(path: Path, option: str) -> None:
    """UserError unless :func:`check_writable_dir` accepts ``path`` and a file can really be
    created in its folder (or the nearest existing one above it), tried with an unnamed
    temporary file: permission bits say nothing for root or on a read-only file system."""
    try:
        check_writable_dir(path)
    except UserError as e:
        raise UserError(f"{option} {path}: {e}") from None
    folder = path.resolve().parent
    while not folder.exists():  # missing folders are created by the write
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {folder} ({e.strerror or e}); "
                        "choose another path") from None
