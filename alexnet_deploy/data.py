"""Data: where images come from and how they become batches.

Three kinds of data set, all opened by :func:`open_dataset` from one string:

* an image folder -- one sub-folder per class, JPEG/PNG of any size and mode (grayscale, CMYK and
  palette images are converted to RGB); an optional ``classes.tsv`` beside the class folders
  (columns ``wnid``, ``name`` and optionally ``imagenet1k_index``) gives readable names;
* an ``.npz`` -- ``images`` uint8 ``[N, H, W, 3]`` RGB, ``labels`` int ``[N]``, optional
  ``classes`` (names, index order);
* ``synthetic:train`` / ``synthetic:test`` -- the embedded default: ten classes of procedurally
  drawn shapes and textures, generated deterministically from a fixed seed (no download anywhere).

Evaluation batches (:func:`iter_batches`) use :meth:`PreprocessSpec.load` exactly: the same
resize, center crop and normalization that export, calibration and validation use, with optional
10-crop averaging. Training batches (:class:`TrainSet`) follow the paper: the image's shorter side
is resized to ``spec.resize`` and its central ``resize x resize`` square kept, then every epoch
each image gets a random ``crop x crop`` patch, a horizontal flip with probability 1/2 and PCA
lighting noise (sigma 0.1, fb.resnet.torch's ImageNet eigenvalues and eigenvectors). Every random
draw of an epoch comes from ``(seed, epoch)``, so a resumed run sees the same batches as an
uninterrupted one.

A corrupt or truncated image never stops a run: it is skipped, counted, and the first one is
named in a warning. Bad input (a missing or empty folder, a class folder with no images, an
``.npz`` without ``images``/``labels``) raises :class:`~alexnet_deploy.errors.UserError`.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import hashlib
import importlib.resources
import signal
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import KIND_NAMES, file_kind
from alexnet_deploy.preprocess import DECODE_ERRORS, PreprocessSpec, to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC_PREFIX = "synthetic:"
# fb.resnet.torch (datasets/imagenet.lua): PCA of ImageNet RGB pixels in 0..1.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------

class ImageDataset:
    """Labeled images, indexable; see :class:`FolderDataset` and :class:`ArrayDataset`.

    Attributes:
        source: what was opened (a path, or ``"synthetic:train"``).
        labels: int64 ``[N]`` class index of each image.
        class_ids: one id per class (folder name / wnid, or the class name for arrays).
        class_names: readable names, index order (from ``classes.tsv`` or the ``.npz``).
        imagenet1k_index: each class's index among the ImageNet-1k classes when ``classes.tsv``
            gives it, else ``None``.
    """

    source: str
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]
    imagenet1k_index: list[int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def open_image(self, i: int) -> Image.Image:
        """Image ``i`` fully decoded (raises PIL's errors for a corrupt file)."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """A human name for image ``i`` (its file, or its index in the array)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 hex identifying the data set's content (see :func:`dataset_fingerprint`)."""
        raise NotImplementedError


class FolderDataset(ImageDataset):
    """An image folder: ``root/<class>/<image>``, classes in sorted folder-name order."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        if not root.exists():
            raise UserError(f"data folder {root} does not exist: pass an image folder (one "
                            "sub-folder per class), an .npz or synthetic:train")
        if not root.is_dir():
            raise UserError(f"data {root} is neither a folder nor an .npz file")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise UserError(f"data folder {root} is empty: it needs one sub-folder of images per "
                            "class")
        paths, labels = [], []
        for label, folder in enumerate(class_dirs):
            files = sorted(p for p in folder.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}"
                                "): add images or remove the folder")
            paths += files
            labels += [label] * len(files)
        self.source = str(root)
        self.root = root
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_ids = [p.name for p in class_dirs]
        self.class_names, self.imagenet1k_index = _read_classes_tsv(root, self.class_ids)

    def open_image(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as image:
            image.load()  # decode now: truncated files fail here, not later
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def fingerprint(self) -> str:
        # Names and sizes, not contents: cheap on ImageNet-sized folders, still changes when
        # files are added, removed, relabeled or rewritten with another size.
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{path.relative_to(self.root)}\t{label}\t{path.stat().st_size}\n"
                          .encode())
        digest.update("\t".join(self.class_names).encode())
        return digest.hexdigest()


def _read_classes_tsv(root: Path, class_ids: list[str]) -> tuple[list[str], list[int] | None]:
    """Readable names (and ImageNet-1k indices) for ``class_ids`` from ``root/classes.tsv``."""
    tsv = root / "classes.tsv"
    if not tsv.is_file():
        return list(class_ids), None
    try:
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{tsv} is unreadable ({e}): fix it or remove it") from e
    if not rows or "wnid" not in rows[0] or "name" not in rows[0]:
        raise UserError(f"{tsv} needs a header line with columns 'wnid' and 'name' "
                        "(tab-separated)")
    by_id = {row["wnid"]: row for row in rows}
    names = [by_id[c]["name"] if c in by_id and by_id[c]["name"] else c for c in class_ids]
    index = None
    if "imagenet1k_index" in rows[0] and all(c in by_id for c in class_ids):
        try:
            index = [int(by_id[c]["imagenet1k_index"]) for c in class_ids]
        except (TypeError, ValueError):
            index = None
    return names, index


class ArrayDataset(ImageDataset):
    """Images held in memory: uint8 ``[N, H, W, 3]`` RGB (an ``.npz`` or the synthetic set)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 source: str) -> None:
        self.images = images
        self.labels = labels
        self.class_names = [str(c) for c in class_names]
        self.class_ids = list(self.class_names)
        self.source = source

    def open_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "RGB")

    def describe(self, i: int) -> str:
        return f"{self.source}[{i}]"

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).data)
        digest.update(self.labels.astype("<i8").tobytes())
        digest.update("\t".join(self.class_names).encode())
        return digest.hexdigest()


def load_npz(path: Path | str) -> ArrayDataset:
    """An ``.npz`` data set; UserError naming the file and the problem if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist: pass an .npz, an image folder or "
                        "synthetic:train")
    kind = file_kind(path)
    if kind != "npz":  # numpy would answer with its allow_pickle hint
        raise UserError(f"data file {path} is not an .npz archive (it is {KIND_NAMES[kind]}): "
                        "pass one written by numpy.savez with 'images' uint8 [N,H,W,3] and "
                        "'labels' [N], an image folder or synthetic:train")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise UserError(f"{path} has no {' or '.join(repr(k) for k in missing)} array "
                                f"(it has {sorted(npz.files)}): an .npz needs 'images' uint8 "
                                "[N,H,W,3] and 'labels' [N]")
            images, labels = npz["images"], npz["labels"]
            classes = npz["classes"] if "classes" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz ({e})") from e
    if images.dtype != np.uint8:
        raise UserError(f"{path}: 'images' must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1):  # grayscale -> RGB
        images = np.repeat(images.reshape(images.shape[:3] + (1,)), 3, axis=3)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: 'images' must be [N,H,W,3] (NHWC, RGB), got shape "
                        f"{images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype,
                                                                            np.integer):
        raise UserError(f"{path}: 'labels' must be integers of shape [{len(images)}], got "
                        f"{labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise UserError(f"{path} holds no images")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise UserError(f"{path}: 'labels' has negative values")
    if classes is None:
        classes = [f"class_{i}" for i in range(int(labels.max()) + 1)]
    elif len(classes) <= labels.max():
        raise UserError(f"{path}: 'labels' go up to {labels.max()} but 'classes' names only "
                        f"{len(classes)} classes")
    return ArrayDataset(images, labels, [str(c) for c in classes], str(path))


def open_dataset(data: str | Path | ImageDataset) -> ImageDataset:
    """Open an image folder, an ``.npz`` or ``synthetic:train`` / ``synthetic:test``."""
    if isinstance(data, ImageDataset):
        return data
    text = str(data)
    if text.startswith(SYNTHETIC_PREFIX):
        return synthetic_dataset(text[len(SYNTHETIC_PREFIX):])
    if text.lower().endswith(".npz"):
        return load_npz(text)
    return FolderDataset(text)


def class_names(data: str | Path | ImageDataset) -> list[str]:
    """Readable class names of a data set, index order."""
    return list(open_dataset(data).class_names)


@functools.lru_cache(maxsize=1)
def imagenet1k_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names in the standard (sorted WordNet id) order, from the
    package's ``imagenet1k_classes.tsv`` (first WordNet lemma; the two names that repeat carry
    their WordNet id)."""
    rows = importlib.resources.files("alexnet_deploy").joinpath(
        "imagenet1k_classes.tsv").read_text().splitlines()[1:]
    return [row.split("\t")[1] for row in rows]


def dataset_fingerprint(data: str | Path | ImageDataset) -> str:
    """sha256 hex of a data set: image bytes and labels for arrays; relative paths, labels and
    file sizes for folders (cheap on large folders)."""
    return open_dataset(data).fingerprint()


def label_map(classes: Sequence[str], dataset: ImageDataset, model: str = "the model"
              ) -> np.ndarray:
    """``map[data label] -> index in classes``: the data's classes matched to a model's by
    ImageNet-1k index of ``classes.tsv`` for a 1000-class model, else by readable name, else by id
    (folder name). UserError when the data has a class the model does not know."""
    if dataset.imagenet1k_index is not None and len(classes) == 1000:
        return np.asarray(dataset.imagenet1k_index, np.int64)  # exact even where names repeat
    index = {name: i for i, name in enumerate(classes)}
    for keys in (dataset.class_names, dataset.class_ids):
        if all(k in index for k in keys):
            return np.asarray([index[k] for k in keys], np.int64)
    unknown = next(k for k in dataset.class_names if k not in index)
    raise UserError(f"data {dataset.source} has class {unknown!r} ({dataset.num_classes} classes),"
                    f" which {model} does not know (its {len(classes)} classes: "
                    f"{', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}): use data of "
                    "the classes the model was trained on")


# ---------------------------------------------------------------------------------------------
# The synthetic data set (the embedded default)
# ---------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("disc", "ring", "square", "triangle", "cross", "star", "crescent",
                     "stripes", "checkerboard", "dots")
SYNTHETIC_SPLITS = {"train": (4000, 1001), "test": (1000, 2002)}  # images, seed
SYNTHETIC_SIZE = 80  # px; the demo model crops 67 from the spec's 76 px resize
SYNTHETIC_HUE_SPREAD = 0.08  # std of a shape's hue around its class's (hues 0.1 apart)


@functools.lru_cache(maxsize=2)
def synthetic_dataset(split: str) -> ArrayDataset:
    """``synthetic:train`` (4,000 images) or ``synthetic:test`` (1,000), 80x80 RGB, 10 classes.

    Each image is one shape or texture (the class) of random size, rotation and position, in a
    colour near its class's hue, over a random two-colour gradient with a few distractor blobs
    and pixel noise. The demo recipe's quarter-width AlexNet reaches about 85% top-1 on the test
    split in eight epochs; the confusions left are between similar shapes of similar hue
    (cross/star, checkerboard/dots).
    Image ``i`` of a split depends only on ``(split seed, i)``, so the data is identical on
    every machine and in every process.
    """
    if split not in SYNTHETIC_SPLITS:
        raise UserError(f"unknown synthetic split {split!r}: use synthetic:train or "
                        "synthetic:test")
    count, seed = SYNTHETIC_SPLITS[split]
    labels = np.arange(count, dtype=np.int64) % len(SYNTHETIC_CLASSES)
    images = np.stack([_draw_synthetic(int(label), np.random.default_rng([seed, i]))
                       for i, label in enumerate(labels)])
    images.setflags(write=False)
    return ArrayDataset(images, labels, SYNTHETIC_CLASSES, SYNTHETIC_PREFIX + split)


def _draw_synthetic(label: int, rng: np.random.Generator, size: int = SYNTHETIC_SIZE
                    ) -> np.ndarray:
    yy, xx = _grid(size)
    # background: a two-colour linear gradient in a random direction
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.float32(np.cos(angle) / (2 * size)) + yy * np.float32(np.sin(angle) /
                                                                         (2 * size)) + 0.5)
    image = c0 + (c1 - c0) * ramp[..., None]
    # distractors: soft blobs of random colour that every class shares
    for _ in range(rng.integers(1, 4)):
        bx, by = rng.uniform(0, size, 2)
        spread = rng.uniform(3, 9)
        blob = np.exp(((xx - bx) ** 2 + (yy - by) ** 2) * np.float32(-0.5 / spread ** 2))
        image += (rng.uniform(0, 255, 3).astype(np.float32) - image) * (0.7 * blob)[..., None]
    # the class's shape: random radius, centre and rotation; coordinates (u, v) in the
    # shape's own frame, in units of its radius
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(theta) / radius), np.float32(np.sin(theta) / radius)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    mask = _shape_mask(SYNTHETIC_CLASSES[label], dx * cos + dy * sin, dy * cos - dx * sin, rng)
    # foreground colour: each class leans to its own hue (as real classes do: goldfish are
    # orange), spread so that colour alone is an unreliable cue; it must stand out from the
    # background under the shape
    under = image[int(cy), int(cx)]
    for _ in range(20):
        hue = (label / len(SYNTHETIC_CLASSES) + rng.normal(0, SYNTHETIC_HUE_SPREAD)) % 1.0
        fg = 255 * np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.4, 1), rng.uniform(0.4, 1)))
        if np.abs(fg - under).sum() >= 150:
            break
    alpha = np.float32(rng.uniform(0.75, 1.0))
    image[mask] += (fg.astype(np.float32) - image[mask]) * alpha
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(4, 14))
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)``, float32 ``[size, size]`` each."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return yy, xx


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if name == "disc":
        return r < 1.0
    if name == "ring":
        return (r < 1.0) & (r > rng.uniform(0.5, 0.7))
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if name == "triangle":
        edges = [np.cos(phi - a) * r for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                np.pi / 2 + 4 * np.pi / 3)]
        return np.max(edges, axis=0) < 0.5
    if name == "cross":
        arm = rng.uniform(0.22, 0.34)
        return ((np.abs(u) < arm) & (np.abs(v) < 1.0)) | ((np.abs(v) < arm) & (np.abs(u) < 1.0))
    if name == "star":
        return r < 0.45 + 0.55 * ((np.cos(5 * phi) + 1) / 2) ** 2
    if name == "crescent":
        return (r < 1.0) & (np.hypot(u - rng.uniform(0.35, 0.55), v) > 0.8)
    if name == "stripes":
        return (r < 1.05) & (np.sin(u * rng.uniform(7, 10)) > 0)
    if name == "checkerboard":
        k = rng.uniform(2.2, 3.0)
        inside = np.maximum(np.abs(u), np.abs(v)) < 0.9
        return inside & ((np.floor(u * k) + np.floor(v * k)) % 2 == 0)
    if name == "dots":
        k = rng.uniform(1.8, 2.3)
        cell_u, cell_v = (u * k) % 1 - 0.5, (v * k) % 1 - 0.5
        return (r < 1.05) & (np.hypot(cell_u, cell_v) < 0.3)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------------
# Decoding, with corrupt images skipped, counted and named once
# ---------------------------------------------------------------------------------------------

class SkippedImages:
    """Counts unreadable images of one data set; names only the first in a warning."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset
        self.indices: set[int] = set()

    def add(self, index: int, reason: str = "") -> None:
        if index in self.indices:
            return
        if not self.indices:
            _warn(f"warning: skipping unreadable image {self.dataset.describe(index)}"
                  f"{f' ({reason})' if reason else ''}; further ones are counted, not named")
        self.indices.add(index)

    @property
    def count(self) -> int:
        return len(self.indices)


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def train_square(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The paper's training source: shorter side resized to ``spec.resize``, central
    ``resize x resize`` square kept; uint8 ``HWC``."""
    image = spec.resize_image(image)
    w, h = image.size
    left, top = (w - spec.resize) // 2, (h - spec.resize) // 2
    return np.asarray(image.crop((left, top, left + spec.resize, top + spec.resize)), np.uint8)


def ten_crops(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Float32 ``[10, 3, crop, crop]``: centre and four corner crops of the resized image, then
    their horizontal mirrors. Crop 0 is exactly :meth:`PreprocessSpec.load`'s."""
    image = spec.resize_image(image)
    w, h, c = image.size[0], image.size[1], spec.crop
    corners = [((w - c) // 2, (h - c) // 2), (0, 0), (w - c, 0), (0, h - c), (w - c, h - c)]
    crops = [spec.normalize(np.asarray(image.crop((x, y, x + c, y + c)), np.uint8))
             for x, y in corners]
    return np.stack(crops + [crop[:, :, ::-1] for crop in crops])


class _Decoded(Dataset):
    """``dataset[i]`` through ``transform`` as ``(array | None, label, index, error)``;
    a DataLoader runs it in worker processes."""

    def __init__(self, dataset: ImageDataset, transform, indices: Sequence[int] | None = None):
        self.dataset, self.transform = dataset, transform
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        try:
            return self.transform(self.dataset.open_image(i)), int(self.dataset.labels[i]), i, ""
        except DECODE_ERRORS as e:
            return None, int(self.dataset.labels[i]), i, f"{type(e).__name__}: {e}"


def _collate(items):
    good = [it for it in items if it[0] is not None]
    arrays = np.stack([it[0] for it in good]) if good else None
    labels = np.asarray([it[1] for it in good], np.int64)
    index = np.asarray([it[2] for it in good], np.int64)
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    return arrays, labels, index, bad


def _decode(dataset: ImageDataset, transform, indices: Sequence[int] | None, batch_size: int,
            workers: int, skipped: SkippedImages) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]]:
    """``(arrays, labels, dataset indices)`` batches in ``indices`` order, unreadable images
    dropped (and recorded in ``skipped``). Arrays decode in process; files in ``workers``."""
    if isinstance(dataset, ArrayDataset):
        workers = 0
    loader = DataLoader(_Decoded(dataset, transform, indices), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate,
                        persistent_workers=False, prefetch_factor=4 if workers else None,
                        worker_init_fn=_ignore_interrupt)
    for arrays, labels, index, bad in loader:
        for i, reason in bad:
            skipped.add(i, reason)
        if arrays is not None:
            yield arrays, labels, index


def _ignore_interrupt(worker_id: int) -> None:
    """Decode processes ignore Ctrl-C: the main process stops them. (Interrupted themselves,
    they hang on their queues and the loader waits 5 s for each before killing it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """Decode processes for image folders: one per core, 1 to 4."""
    import os

    return max(1, min(4, (os.cpu_count() or 2)))


# ---------------------------------------------------------------------------------------------
# Evaluation batches (the public API other stages read)
# ---------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    """One evaluation batch: ``images`` float32 ``[B, 3, crop, crop]`` (``[B, 10, 3, crop,
    crop]`` with ten-crop), ``labels`` int64 ``[B]``, ``indices`` positions in the data set."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def iter_batches(data: str | Path | ImageDataset, spec: PreprocessSpec, batch_size: int = 64,
                 *, limit: int | None = None, seed: int | None = None, ten_crop: bool = False,
                 workers: int | None = None, skipped: SkippedImages | None = None,
                 indices: Sequence[int] | None = None) -> Iterator[Batch]:
    """Preprocessed evaluation batches of a data set, through :meth:`PreprocessSpec.load`.

    Args:
        data: an image folder, an ``.npz``, ``synthetic:train``/``synthetic:test`` or an open
            :class:`ImageDataset`.
        spec: the preprocessing spec (from the checkpoint or the ONNX model's metadata).
        batch_size: images per batch (the last may be smaller). Defaults to 64.
        limit: use at most this many images. Defaults to all.
        seed: with ``limit``, pick a seeded random subset (sorted, so classes are mixed) instead
            of the first ``limit`` images. Defaults to ``None`` (first images).
        ten_crop: yield the ten crops of :func:`ten_crops` per image. Defaults to ``False``.
        workers: decode processes for image folders. Defaults to :func:`default_workers`.
        skipped: collects unreadable images (a fresh one if ``None``); they are left out of
            the batches, so ``len(batch.labels)`` may be smaller than ``batch_size``.
        indices: exactly these data-set positions, in this order (``limit`` and ``seed`` are
            then ignored). Defaults to ``None``.
    """
    dataset = open_dataset(data)
    indices = _subset(len(dataset), limit, seed) if indices is None else np.asarray(indices)
    skipped = skipped if skipped is not None else SkippedImages(dataset)
    for arrays, labels, index in _decode(dataset, eval_transform(spec, ten_crop), indices,
                                         batch_size,
                                         default_workers() if workers is None else workers,
                                         skipped):
        yield Batch(arrays, labels, index)


def eval_transform(spec: PreprocessSpec, ten_crop: bool = False):
    """A picklable ``PIL image -> float32 array``: :meth:`PreprocessSpec.load` or
    :func:`ten_crops`."""
    return functools.partial(ten_crops, spec=spec) if ten_crop else spec.load


def holdout_indices(n: int, count: int, seed: int) -> np.ndarray:
    """The positions (sorted) of the ``count`` images of an ``n``-image data set that training
    with ``holdout = count`` and ``seed`` never sees: one seeded draw, shared by ``train`` (which
    leaves them out) and the INT8 accuracy budget (which measures on them)."""
    if not 0 <= count < n:
        raise UserError(f"holdout must be between 0 and the data's {n - 1} images, got {count}")
    if count == 0:
        return np.zeros(0, np.int64)
    # a stream of its own (not the seed itself), so it differs from validate --limit's draw
    return np.sort(np.random.default_rng([seed, 0x401D]).choice(n, size=count, replace=False))


def _subset(n: int, limit: int | None, seed: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    if seed is None:
        return np.arange(limit)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class EvalSet:
    """A validation set preprocessed once (kept in memory when it fits ``cache_bytes``), served
    as torch batches, optionally sharded over distributed ranks."""

    def __init__(self, data: str | Path | ImageDataset, spec: PreprocessSpec, *,
                 ten_crop: bool = False, workers: int | None = None,
                 cache_bytes: float = 2**30, indices: Sequence[int] | None = None) -> None:
        self.dataset = open_dataset(data)
        self.spec, self.ten_crop = spec, ten_crop
        self.workers = default_workers() if workers is None else workers
        self.skipped = SkippedImages(self.dataset)
        # the data-set positions served: all, or e.g. a training holdout (holdout_indices)
        self.index = np.arange(len(self.dataset)) if indices is None else np.asarray(indices)
        per_image = 4 * 3 * spec.crop ** 2 * (10 if ten_crop else 1)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if per_image * len(self.index) <= cache_bytes:
            parts = list(self._decode(self.index, 64))
            self.cache = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                          torch.from_numpy(np.concatenate([p[1] for p in parts])))

    def __len__(self) -> int:
        return len(self.index) if self.cache is None else len(self.cache[1])

    def _decode(self, indices: np.ndarray, batch_size: int):
        return _decode(self.dataset, eval_transform(self.spec, self.ten_crop), indices,
                       batch_size, self.workers, self.skipped)

    def batches(self, batch_size: int, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of this rank's shard (every ``world``-th image from ``rank``)."""
        if self.cache is not None:
            images, labels = self.cache
            shard = torch.arange(rank, len(labels), world)
            for start in range(0, len(shard), batch_size):
                sel = shard[start:start + batch_size]
                yield images[sel], labels[sel]
            return
        for images, labels, _ in self._decode(self.index[rank::world], batch_size):
            yield torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# Training batches: paper augmentation, deterministic per (seed, epoch)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """Training augmentation. Defaults are the paper's.

    Args:
        flip: horizontal flip with probability 1/2. Defaults to ``True``.
        lighting: std of the PCA lighting noise's coefficients (0 turns it off).
            Defaults to 0.1.
    """

    flip: bool = True
    lighting: float = 0.1


class TrainSet:
    """A training set: decoded and resized once (kept in memory as uint8 when it fits
    ``cache_bytes``, else decoded every epoch by ``workers`` processes), augmented per batch.

    Args:
        data: what :func:`open_dataset` accepts.
        spec: the model's preprocessing spec (``resize`` and ``crop`` are used).
        augment: the augmentation. Defaults to the paper's.
        seed: every epoch's order and random draws derive from ``(seed, epoch)``. Defaults to 0.
        workers: decode processes for image folders. Defaults to :func:`default_workers`.
        cache_bytes: keep decoded images in memory up to this size. Defaults to 4 GiB.
        exclude: data-set positions never served (a holdout, :func:`holdout_indices`).
            Defaults to none.
    """

    def __init__(self, data: str | Path | ImageDataset, spec: PreprocessSpec,
                 augment: Augment = Augment(), *, seed: int = 0, workers: int | None = None,
                 cache_bytes: float = 4 * 2**30, exclude: Sequence[int] = ()) -> None:
        self.dataset = open_dataset(data)
        self.spec, self.augment, self.seed = spec, augment, seed
        self.workers = default_workers() if workers is None else workers
        self.skipped = SkippedImages(self.dataset)
        self._transform = functools.partial(train_square, spec=spec)
        self.cache: np.ndarray | None = None
        # data-set positions of the served images
        self.index = np.setdiff1d(np.arange(len(self.dataset)), np.asarray(exclude, np.int64))
        if 3 * spec.resize ** 2 * len(self.index) <= cache_bytes:
            squares = np.empty((len(self.index), spec.resize, spec.resize, 3), np.uint8)
            kept = []
            for arrays, _, index in _decode(self.dataset, self._transform, self.index, 64,
                                            self.workers, self.skipped):
                squares[len(kept):len(kept) + len(index)] = arrays
                kept += index.tolist()
            if not kept:
                raise UserError(f"no readable image in {self.dataset.source}")
            self.cache = squares[:len(kept)]
            self.index = np.asarray(kept, np.int64)
        self.labels = self.dataset.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def sampler(self, epoch: int, rank: int = 0, world: int = 1) -> DistributedSampler:
        """This rank's shuffled share of the set for ``epoch`` (all of it when ``world`` is 1)."""
        sampler = DistributedSampler(range(len(self)), num_replicas=world, rank=rank,
                                     shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)
        return sampler

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        per_rank = -(-len(self) // world)
        return -(-per_rank // batch_size)

    def epoch(self, epoch: int, batch_size: int, rank: int = 0, world: int = 1
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented ``(images float32 NCHW, labels int64)`` batches of ``epoch``."""
        order = np.fromiter(iter(self.sampler(epoch, rank, world)), np.int64)
        draws = self._draws(epoch)
        if self.cache is not None:
            for start in range(0, len(order), batch_size):
                sel = order[start:start + batch_size]
                yield (self._augment(self.cache[sel], self.index[sel], draws),
                       torch.from_numpy(self.labels[sel]))
            return
        for arrays, labels, index in _decode(self.dataset, self._transform, self.index[order],
                                             batch_size, self.workers, self.skipped):
            yield self._augment(arrays, index, draws), torch.from_numpy(labels)

    def _draws(self, epoch: int) -> dict[str, np.ndarray]:
        """Every random number of ``epoch``, per data-set position (independent of order)."""
        rng = np.random.default_rng([self.seed, epoch, 0xA1E7])
        n, room = len(self.dataset), self.spec.resize - self.spec.crop + 1
        return {"offset": rng.integers(0, room, size=(n, 2)),
                "flip": rng.random(n) < 0.5,
                "alpha": rng.normal(0.0, 1.0, size=(n, 3)).astype(np.float32)}

    def _augment(self, squares: np.ndarray, positions: np.ndarray, draws: dict) -> torch.Tensor:
        """uint8 ``[B, R, R, 3]`` -> float32 ``[B, 3, crop, crop]``: crop, flip, normalize,
        light, with the draws of the images at data-set ``positions``."""
        c = self.spec.crop
        offsets, flips = draws["offset"][positions], draws["flip"][positions]
        crops = np.empty((len(squares), c, c, 3), np.uint8)
        for b, (square, (y, x), flip) in enumerate(zip(squares, offsets, flips)):
            patch = square[y:y + c, x:x + c]
            crops[b] = patch[:, ::-1] if flip and self.augment.flip else patch
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment.lighting > 0:
            alpha = torch.from_numpy(draws["alpha"][positions]) * self.augment.lighting
            rgb = (alpha * torch.tensor(PCA_EIGVAL)) @ torch.tensor(PCA_EIGVEC).T  # [B, 3]
            x += rgb[:, :, None, None]
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()
