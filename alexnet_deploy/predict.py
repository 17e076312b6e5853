"""``alexnet-deploy predict``: the top-k classes of image files, through an engine.

Examples::

    alexnet-deploy predict --engine engines/demo-int8 photo.jpg
    alexnet-deploy predict --engine engines/imagenet-int8 photos/ --top-k 5 --json preds.json

Each image gets one line, ``PATH: label p%, label p%, ...``, best first. Folders are searched
recursively for JPEG, PNG, BMP and WebP files (sorted). The work is :meth:`Engine.iter_classify
<alexnet_deploy.engine.Engine.iter_classify>`, so ``predict`` and ``engine.classify`` give the
same answer for the same image; the next batch is decoded while the current one runs. An
unreadable image is named on stderr and skipped; the exit status is then 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from alexnet_deploy.data import IMAGE_SUFFIXES
from alexnet_deploy.engine import Prediction, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import check_output, write_json_atomic


@dataclass
class PredictResult:
    """What ``predict`` classified: ``predictions`` in input order, ``skipped`` as
    ``(image, reason)``, and the wall time in ``seconds``."""

    engine: Path
    predictions: list[Prediction]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"engine": str(self.engine), "num_images": len(self.predictions),
                "predictions": [p.to_dict() for p in self.predictions],
                "skipped": [{"image": s, "reason": r} for s, r in self.skipped]}


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by ``inputs`` (files, or folders searched recursively), in order.

    Raises:
        UserError: an input does not exist, or a folder holds no image.
    """
    if not inputs:
        raise UserError("no image given: pass image files or folders of images")
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {item} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"image {item} does not exist: pass image files or folders")
    return paths


def format_prediction(p: Prediction) -> str:
    """``PATH: label 81.2%, label 10.1%, ...``"""
    return f"{p.source}: " + ", ".join(f"{label} {prob:.2%}"
                                       for label, prob in zip(p.labels, p.probabilities))


def run_predict(engine: str | Path, inputs: Sequence[str | Path], *, top_k: int = 5,
                batch_size: int | None = None, threads: int | None = None,
                json_path: str | Path | None = None, echo: Callable[[str], None] = print,
                warn: Callable[[str], None] = print, progress: bool | None = None
                ) -> PredictResult:
    """Classify image files with an engine, printing one line per image as batches finish.

    Args:
        engine: the engine folder.
        inputs: image files and folders.
        top_k: classes per image. Defaults to 5.
        batch_size: images per engine call. Defaults to the engine's choice (32 within its
            range).
        threads: CPU threads for CPU backends. Defaults to the backend's choice.
        json_path: also write every prediction as JSON here. Defaults to None.
        echo: where the per-image lines go. Defaults to print.
        warn: where unreadable images are named. Defaults to print.
        progress: show a progress bar. Defaults to None: when stderr is a terminal and there is
            more than one batch.
    """
    paths = collect_images(inputs)
    if json_path is not None:  # before the work, not after it
        json_path = check_output(json_path, "--json", "json",
                                 inputs=[("--engine", engine), *(("IMAGE", p) for p in paths)])
    start = time.perf_counter()
    result = PredictResult(engine=Path(engine), predictions=[])

    with load_engine(engine, threads=threads) as loaded:
        size = loaded.resolve_batch_size(batch_size)
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=len(paths), unit="img", file=sys.stderr, leave=False,
                  disable=not show or len(paths) <= size) as bar:
            say = echo if bar.disable else tqdm.write  # lines above the bar, not through it

            def unreadable(source: str, message: str) -> None:
                result.skipped.append((source, message))
                warn(f"skipped: {message}")
                bar.update(1)

            for prediction in loaded.iter_classify(paths, top_k, size,
                                                   on_unreadable=unreadable):
                result.predictions.append(prediction)
                say(format_prediction(prediction))
                bar.update(1)
    result.seconds = time.perf_counter() - start
    if json_path is not None:
        write_json_atomic(json_path, result.to_json())
    return result


def summary(result: PredictResult) -> str:
    """The one-line closing summary."""
    skipped = f", {len(result.skipped)} unreadable skipped" if result.skipped else ""
    return (f"classified {len(result.predictions)} images with {result.engine} in "
            f"{result.seconds:.1f} s{skipped}")
