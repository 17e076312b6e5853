"""Training and evaluation: ``alexnet-deploy train`` and ``alexnet-deploy evaluate``.

Examples::

    # the embedded demo (synthetic shapes), about a minute on two CPU cores
    alexnet-deploy train --recipe demo --devices cpu,cpu --out train/demo
    # the shared CIFAR-10 subset, validated every epoch
    alexnet-deploy train --recipe cifar10 --data ../shared/data/cifar10_train_10k.npz \\
        --val-data ../shared/data/cifar10_test_2k.npz --devices cpu,cpu --out train/cifar10
    # continue an interrupted run, or extend it
    alexnet-deploy train --recipe cifar10 --out train/cifar10 --resume
    # the paper's recipe, towers on two GPUs; data parallel over 2 nodes x 2 processes x 2 GPUs
    alexnet-deploy train --recipe paper --data imagenet/train --val-data imagenet/val \\
        --devices cuda:0,cuda:1 --out train/paper --amp
    torchrun --nnodes 2 --nproc-per-node 2 ... -m alexnet_deploy train --recipe paper ...
    alexnet-deploy evaluate --checkpoint train/cifar10/best.pt \\
        --data ../shared/data/cifar10_test_2k.npz --json top1.json

A recipe is a TOML file of :class:`Recipe` fields: one shipped inside the package
(``alexnet_deploy/recipes/``: ``paper``, ``cifar10``, ``imagenette``, ``demo``, read with
:mod:`importlib.resources`, so they work from an installed wheel) or one kept anywhere else;
command-line options override it.

Every epoch appends one JSON line to ``OUT/metrics.jsonl`` and writes ``OUT/last.pt`` (everything
``--resume`` needs) and, when the monitored accuracy improved, ``OUT/best.pt``; both atomically.
The data order, augmentation and dropout of epoch ``e`` depend only on ``(seed, e, rank)``, so a
run resumed after epoch ``e`` computes what the uninterrupted run would have.

Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data parallel: DistributedDataParallel over
the two-tower model (each process drives its own pair of devices), gloo on CPU, NCCL on CUDA.
Process ``LOCAL_RANK = r`` shifts every CUDA index in ``--devices`` by ``r`` times the number of
distinct GPUs named, so ``cuda:0,cuda:1`` gives process 1 the GPUs 2 and 3. Only rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet_deploy.checkpoint import load_checkpoint, save_checkpoint
from alexnet_deploy.data import (
    Augment,
    EvalSet,
    TrainSet,
    holdout_indices,
    label_map,
    open_dataset,
)
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import check_output
from alexnet_deploy.model import AlexNetConfig, build_model
from alexnet_deploy.preprocess import PreprocessSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES = "alexnet_deploy.recipes"  # package data: the shipped recipes
SCHEDULES = ("plateau", "onecycle", "cosine", "constant")
METRICS_FILE, LAST, BEST = "metrics.jsonl", "last.pt", "best.pt"


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

@dataclass
class Recipe:
    """Everything a training run needs besides where to write. Defaults are the paper's.

    Args:
        name: recipe name (the file's stem). Defaults to ``"custom"``.
        description: one line on what the recipe is for.
        data: training data (folder, ``.npz`` or ``synthetic:train``). Defaults to ``None``
            (``--data`` must give it).
        val_data: validation data, evaluated after every epoch (``best.pt`` is the best
            epoch on it). Defaults to ``None``: the holdout, if any, else none.
        holdout: images of ``data`` never trained on (a seeded draw,
            :func:`~alexnet_deploy.data.holdout_indices`). The checkpoint records them, and an
            INT8 accuracy budget built with ``--calibration-data`` set to the same data measures
            on them: images a model has fitted flatter INT8. Without ``val_data`` they are also
            the validation set. Defaults to 0.
        epochs: epochs to train. Defaults to 90.
        batch_size: images per step (per process under torchrun). Defaults to 128.
        lr: learning rate (the peak for ``onecycle``/``cosine``). Defaults to 0.01.
        momentum: SGD momentum. Defaults to 0.9.
        nesterov: Nesterov momentum. Defaults to ``False``.
        weight_decay: L2 penalty on every weight and bias. Defaults to 5e-4.
        schedule: ``"plateau"`` (divide by ``plateau_factor`` when the monitored metric stops
            improving, the paper's rule), ``"onecycle"``, ``"cosine"`` (per step, with linear
            warm-up) or ``"constant"``. Defaults to ``"plateau"``.
        plateau_factor: lr multiplier on a plateau. Defaults to 0.1.
        plateau_patience: epochs without improvement before dividing. Defaults to 4.
        warmup_epochs: warm-up length for ``onecycle``/``cosine``. Defaults to 0.
        image_size: model input side (the crop). Defaults to 227.
        resize: shorter side before cropping. Defaults to ``None`` (``image_size * 256/227``).
        width_mult: scales every layer's width. Defaults to 1.0.
        dropout: dropout on fc6 and fc7. Defaults to 0.5.
        init: ``"paper"`` (N(0, 0.01), biases 0/1) or ``"kaiming"`` (see :func:`kaiming_init_`;
            small runs learn from the first epoch). Defaults to ``"paper"``.
        flip: random horizontal flips. Defaults to ``True``.
        lighting: PCA lighting noise sigma (0 disables). Defaults to 0.1.
        seed: seeds weights, data order, augmentation and dropout. Defaults to 0.
        devices: the two tower devices. Defaults to ``"cpu,cpu"``.
        workers: decode processes for image folders. Defaults to ``None`` (one per core).
        amp: float16 autocast on CUDA. Defaults to ``False``.
        cache_gb: keep decoded training images in memory up to this size. Defaults to 4.
        eval_batch_size: images per validation batch. Defaults to 256.
    """

    name: str = "custom"
    description: str = ""
    data: str | None = None
    val_data: str | None = None
    holdout: int = 0
    epochs: int = 90
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "plateau"
    plateau_factor: float = 0.1
    plateau_patience: int = 4
    warmup_epochs: float = 0.0
    image_size: int = 227
    resize: int | None = None
    width_mult: float = 1.0
    dropout: float = 0.5
    init: str = "paper"
    flip: bool = True
    lighting: float = 0.1
    seed: int = 0
    devices: str = "cpu,cpu"
    workers: int | None = None
    amp: bool = False
    cache_gb: float = 4.0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"recipe {self.name}: schedule {self.schedule!r} is not one of "
                            f"{SCHEDULES}")
        if self.init not in ("paper", "kaiming"):
            raise UserError(f"recipe {self.name}: init {self.init!r} is not 'paper' or 'kaiming'")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.holdout < 0:
            raise UserError(f"holdout must be >= 0, got {self.holdout}")

    @property
    def preprocess(self) -> PreprocessSpec:
        if self.resize is None:
            return PreprocessSpec.for_size(self.image_size)
        return PreprocessSpec(crop=self.image_size, resize=self.resize)

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with the non-``None`` ``overrides`` applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                            f"{', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from e


# what may differ between an interrupted run and its resumption
RESUMABLE_CHANGES = ("epochs", "devices", "workers", "amp", "eval_batch_size", "val_data",
                     "data", "description")


def resume_recipe(out: Path | str, overrides: dict[str, Any]) -> Recipe:
    """The recipe stored in ``out/last.pt`` with ``overrides`` (non-``None`` values) applied;
    UserError for an override that would change the run rather than continue it."""
    last = Path(out) / LAST
    if not last.is_file():
        raise UserError(f"--resume: {last} does not exist; start without --resume")
    stored = Recipe.from_dict(load_checkpoint(last).state.get("recipe") or {},
                              where=f"recipe stored in {last}")
    changed = [k for k, v in overrides.items()
               if v is not None and v != getattr(stored, k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise UserError(f"--resume: {changed[0].replace('_', '-')} differs from the run in "
                        f"{out}; a resumed run keeps its recipe (only "
                        f"{', '.join(RESUMABLE_CHANGES[:5])} may change)")
    recipe = stored.replace(**overrides)
    if recipe.epochs != stored.epochs and recipe.schedule in ("onecycle", "cosine"):
        raise UserError(f"--resume: the {recipe.schedule} schedule of {out} was laid out for "
                        f"{stored.epochs} epochs; it cannot be extended to {recipe.epochs}")
    return recipe


def available_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    return sorted(f.name[:-len(".toml")] for f in importlib.resources.files(RECIPES).iterdir()
                  if f.name.endswith(".toml"))


def load_recipe(name_or_file: str) -> Recipe:
    """A shipped recipe by name (``demo``, ``cifar10``, ...) or a TOML file by path."""
    path = Path(name_or_file)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist: pass a .toml file or one of "
                            f"{', '.join(available_recipes())}")
        where, stem = str(path), path.stem
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {path} cannot be read ({e})") from e
    else:
        if name_or_file not in available_recipes():
            raise UserError(f"recipe {name_or_file!r} not found: use one of "
                            f"{', '.join(available_recipes())} or a path to a .toml file")
        where, stem = f"{name_or_file} (shipped recipe)", name_or_file
        text = importlib.resources.files(RECIPES).joinpath(f"{name_or_file}.toml").read_text()
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {where} is not valid TOML ({e})") from e
    values.setdefault("name", stem)
    return Recipe.from_dict(values, where=f"recipe {where}")


# ---------------------------------------------------------------------------------------------
# Devices and processes
# ---------------------------------------------------------------------------------------------

def parse_devices(text: str, local_rank: int = 0) -> tuple[torch.device, torch.device]:
    """``"cpu,cpu"`` / ``"cuda:0,cuda:1"`` / ``"cuda:0,cuda:0"`` -> two checked devices.

    ``local_rank`` shifts CUDA indices by ``local_rank`` times the number of distinct GPUs named
    (each torchrun process drives its own pair). UserError for anything that does not exist.
    """
    names = [p.strip() for p in text.split(",") if p.strip()]
    if len(names) != 2:
        raise UserError(f"--devices {text!r}: give two devices, one per tower, e.g. cpu,cpu or "
                        "cuda:0,cuda:1")
    try:
        devices = [torch.device(n) for n in names]
    except RuntimeError as e:
        raise UserError(f"--devices {text!r}: {str(e).splitlines()[0]}") from e
    cuda_ids = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    checked = []
    for name, d in zip(names, devices):
        if d.type == "cpu":
            checked.append(torch.device("cpu"))
        elif d.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--devices {text!r}: {name} does not exist here (no CUDA GPU is "
                                "visible to torch); use cpu,cpu")
            index = (d.index or 0) + local_rank * len(cuda_ids)
            if index >= torch.cuda.device_count():
                raise UserError(f"--devices {text!r}: cuda:{index} does not exist (this process "
                                f"sees {torch.cuda.device_count()} GPU(s))")
            checked.append(torch.device("cuda", index))
        else:
            raise UserError(f"--devices {text!r}: {name} is not supported; use cpu or cuda:N")
    return checked[0], checked[1]


@dataclass
class Processes:
    """Where this process stands in a (possibly) distributed run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"  # where collectives run (NCCL: this process's first GPU)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        env = os.environ
        return cls(rank=int(env.get("RANK", 0)), world=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", 1)))

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def _start_processes(procs: Processes, devices: tuple[torch.device, torch.device]) -> bool:
    """Join the torchrun process group if there is one; ``True`` if this call created it."""
    if not procs.distributed:
        return False
    import torch.distributed as dist

    # processes on one node share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs.local_world))
    cuda = devices[0].type == "cuda"
    if cuda:
        torch.cuda.set_device(devices[0])
        procs.device = str(devices[0])
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What :func:`train` did: the run folder, the trained model (training form, not wrapped)
    and the metrics of the epochs this call ran."""

    out: Path
    epochs: int
    best_top1: float
    model: nn.Module
    metrics: list[dict[str, Any]] = field(default_factory=list)


def kaiming_init_(model: nn.Module) -> None:
    """He-normal weights (fan-in, ReLU gain) and zero biases for conv1..fc7; fc8 keeps the
    paper's N(0, 0.01) so training starts from near-uniform predictions. Activations then keep
    their scale through the depth, where the paper's init shrinks them about 5x per layer and
    small runs spend their first epochs at chance."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.endswith("fc8"):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The lr schedule and whether it steps per batch (``True``) or per epoch."""
    total = recipe.epochs * steps_per_epoch
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    if recipe.schedule == "onecycle":
        # OneCycleLR needs at least two steps in each of its phases
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=max(total, 4),
            pct_start=min(0.5, max(warmup, 2) / max(total, 4)), div_factor=25.0,
            final_div_factor=1e3, cycle_momentum=False), True
    if recipe.schedule == "cosine":
        import math

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if recipe.schedule == "plateau":
        mode = "max" if recipe.val_data or recipe.holdout else "min"  # val top-1, else loss
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=recipe.plateau_factor,
            patience=recipe.plateau_patience, min_lr=recipe.lr * 1e-4), False
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), False


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k logits, for each k (capped at classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _epoch_seed(recipe: Recipe, epoch: int, rank: int) -> int:
    return (recipe.seed * 1_000_003 + epoch * 1009 + rank) % 2**63


def train(recipe: Recipe, out: Path | str, *, resume: bool = False,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
          progress: bool | None = None, threads: int | None = None) -> TrainResult:
    """Train ``recipe`` into ``out``; see the module docstring.

    Args:
        recipe: the resolved recipe (``recipe.data`` must be set).
        out: the run folder (created). A folder that already holds a run needs ``resume``.
        resume: continue from ``out/last.pt``. Defaults to ``False``.
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` after each epoch's checkpoint
            is written (tests use it to interrupt a run). Defaults to ``None``.
        progress: show a progress bar; ``None`` shows it on a terminal. Defaults to ``None``.
        threads: CPU threads of this process. Defaults to torch's choice (all cores, shared
            evenly between the processes of a node under torchrun).
    """
    out = Path(out)
    if recipe.data is None:
        raise UserError("no training data: pass --data (an image folder, an .npz or "
                        "synthetic:train) or name 'data' in the recipe")
    check_output(out, "--out", "run", inputs={"--data": recipe.data,
                                              "--val-data": recipe.val_data})
    state: dict[str, Any] | None = None
    if resume:
        if not (out / LAST).is_file():
            raise UserError(f"--resume: {out / LAST} does not exist; start without --resume")
        state = load_checkpoint(out / LAST).state
        if "optimizer" not in state:
            raise UserError(f"--resume: {out / LAST} has no optimizer state to resume from")
    elif (out / LAST).exists():
        raise UserError(f"{out} already holds a run ({LAST}): pass --resume to continue it or "
                        "choose another --out")
    procs = Processes.from_env()
    devices = parse_devices(recipe.devices, procs.local_rank)
    owns_group = _start_processes(procs, devices)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    try:
        return _Trainer(recipe, out, procs, devices, state).run(on_epoch_end, progress)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


class _Trainer:
    """One training run: data, model, optimizer and schedule, set up (or restored) once."""

    def __init__(self, recipe: Recipe, out: Path, procs: Processes,
                 devices: tuple[torch.device, torch.device], state: dict[str, Any] | None):
        self.recipe, self.out, self.procs, self.devices = recipe, out, procs, devices
        self.amp = recipe.amp and devices[0].type == "cuda"
        if recipe.amp and not self.amp and procs.main:
            _note("note: --amp applies to CUDA devices only; training in float32")
        self.spec = recipe.preprocess
        dataset = open_dataset(recipe.data)
        try:
            held_out = holdout_indices(len(dataset), recipe.holdout, recipe.seed)
        except UserError as e:
            raise UserError(f"--holdout: {e} (training data {dataset.source})") from e
        self.train_set = TrainSet(dataset, self.spec, Augment(recipe.flip, recipe.lighting),
                                  seed=recipe.seed, workers=recipe.workers,
                                  cache_bytes=recipe.cache_gb * 2**30, exclude=held_out)
        self.classes = self.train_set.dataset.class_names
        # what export carries to the build: which images of this data the model never saw
        self.training_data = {"fingerprint": dataset.fingerprint(), "images": len(dataset),
                              "holdout": recipe.holdout, "holdout_seed": recipe.seed}
        self.val_set = None
        if not recipe.val_data and recipe.holdout:
            # no validation data given: validate (and pick best.pt) on the holdout, never on a
            # test set
            self.val_set = EvalSet(dataset, self.spec, workers=recipe.workers, indices=held_out)
        elif recipe.val_data:
            self.val_set = EvalSet(recipe.val_data, self.spec, workers=recipe.workers)
            if self.val_set.dataset.class_names != self.classes:
                raise UserError(f"validation data {recipe.val_data} has classes "
                                f"{self.val_set.dataset.class_names[:4]}... but the training "
                                f"data has {self.classes[:4]}...: use matching data sets")

        self.cfg = AlexNetConfig(num_classes=len(self.classes), image_size=recipe.image_size,
                                 width_mult=recipe.width_mult, dropout=recipe.dropout)
        torch.manual_seed(recipe.seed)
        self.model = build_model(self.cfg, devices)
        if recipe.init == "kaiming":
            kaiming_init_(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=recipe.lr,
                                         momentum=recipe.momentum, nesterov=recipe.nesterov,
                                         weight_decay=recipe.weight_decay)
        self.steps = self.train_set.num_batches(recipe.batch_size, procs.world)
        self.scheduler, self.per_step = _make_scheduler(recipe, self.optimizer, self.steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start, self.best = 0, -1.0
        if state is not None:
            self._restore(state)
        self.trained: nn.Module = self.model
        if procs.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # a module spanning two devices: DDP must not be given device_ids
            self.trained = DistributedDataParallel(self.model, device_ids=None,
                                                   output_device=None)

    def _restore(self, state: dict[str, Any]) -> None:
        if state["config"] != self.cfg.to_dict():
            raise UserError(f"--resume: {self.out / LAST} holds a model of config "
                            f"{state['config']}, not {self.cfg.to_dict()}: resume with the "
                            "run's own recipe")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng"):
            _set_rng_states(state["rng"])
        self.start, self.best = int(state["epoch"]), float(state.get("best_top1", -1.0))

    def run(self, on_epoch_end, progress: bool | None) -> TrainResult:
        recipe, procs = self.recipe, self.procs
        if procs.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.out / METRICS_FILE, self.start)
        show = (sys.stderr.isatty() if progress is None else progress) and procs.main
        history: list[dict[str, Any]] = []
        for epoch in range(self.start, recipe.epochs):
            metrics = self._train_epoch(epoch, show)
            if self.val_set is not None:
                val = _evaluate_set(self.trained, self.val_set, self.devices,
                                    recipe.eval_batch_size, procs, self.amp)
                metrics.update({"val_loss": val["loss"], "val_top1": val["top1"],
                                "val_top5": val["top5"]})
            if self.train_set.skipped.count:
                metrics["skipped_images"] = self.train_set.skipped.count
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(metrics.get("val_top1", metrics["loss"]))
            elif not self.per_step:
                self.scheduler.step()
            score = metrics.get("val_top1", metrics["top1"])
            improved, self.best = score > self.best, max(self.best, score)
            history.append(metrics)
            if procs.main:
                _append_metrics(self.out / METRICS_FILE, metrics)
                self._save(epoch + 1, metrics, improved)
                _note(_format_metrics(metrics, recipe.epochs))
            procs.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)
        return TrainResult(out=self.out, epochs=recipe.epochs, best_top1=self.best,
                           model=self.model, metrics=history)

    def _train_epoch(self, epoch: int, show: bool) -> dict[str, Any]:
        """One pass over this rank's share of the data; metrics summed over all ranks."""
        from tqdm import tqdm

        recipe, procs = self.recipe, self.procs
        torch.manual_seed(_epoch_seed(recipe, epoch, procs.rank))  # this epoch's dropout
        self.trained.train()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, images
        bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for images, labels in self.train_set.epoch(epoch, recipe.batch_size, procs.rank,
                                                   procs.world):
            labels = labels.to(self.devices[0], non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                logits = self.trained(images)
                loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.per_step:
                self.scheduler.step()
            hits = topk_correct(logits.detach().float(), labels)
            n = len(labels)
            totals = [totals[0] + float(loss.detach()) * n, totals[1] + hits[0],
                      totals[2] + hits[1], totals[3] + n]
            bar.update()
            bar.set_postfix(loss=f"{totals[0] / totals[3]:.3f}",
                            img_s=f"{totals[3] / (time.perf_counter() - start):.0f}")
        _sync(self.devices)
        seconds = time.perf_counter() - start
        bar.close()
        loss_sum, hit1, hit5, count = procs.all_sum(totals)
        return {"epoch": epoch + 1, "loss": loss_sum / count, "top1": hit1 / count,
                "top5": hit5 / count, "img_per_s": count / seconds,
                "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}

    def _save(self, epoch: int, metrics: dict[str, Any], improved: bool) -> None:
        common = {"model": self.model, "config": self.cfg, "preprocess": self.spec,
                  "classes": self.classes, "epoch": epoch, "metrics": metrics,
                  "recipe": self.recipe.to_dict(), "best_top1": self.best,
                  "training_data": self.training_data}
        if improved:
            save_checkpoint(self.out / BEST, **common)
        save_checkpoint(self.out / LAST, **common, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(),
                        scaler=self.scaler.state_dict() if self.amp else {}, rng=_rng_states())


def _note(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _sync(devices) -> None:
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _format_metrics(m: dict[str, Any], epochs: int) -> str:
    text = (f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.4f}  top1 {m['top1']:.4f}  "
            f"top5 {m['top5']:.4f}  {m['img_per_s']:.0f} img/s  lr {m['lr']:.3g}")
    if "val_top1" in m:
        text += f"  val_loss {m['val_loss']:.4f}  val_top1 {m['val_top1']:.4f}  " \
                f"val_top5 {m['val_top5']:.4f}"
    return text


def _append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop lines of epochs after the checkpoint (an interrupt between log and checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Accuracy of a model on a data set; ``top1``/``top5`` are fractions in 0..1."""

    top1: float
    top5: float
    num_images: int
    loss: float = float("nan")
    skipped_images: int = 0

    def to_json(self) -> dict[str, Any]:
        d = {"top1": self.top1, "top5": self.top5, "num_images": self.num_images}
        if self.skipped_images:
            d["skipped_images"] = self.skipped_images
        return d


def _evaluate_set(model: nn.Module, data: EvalSet, devices, batch_size: int,
                  procs: Processes | None = None, amp: bool = False) -> dict[str, float]:
    """Loss and top-1/top-5 of ``model`` on ``data`` (ten-crop: softmax averaged over crops)."""
    procs = procs or Processes()
    was_training = model.training
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        for images, labels in data.batches(batch_size, procs.rank, procs.world):
            labels = labels.to(devices[0])
            if images.dim() == 5:  # [B, crops, C, H, W]
                b, crops = images.shape[:2]
                probs = model(images.flatten(0, 1)).float().softmax(1)
                probs = probs.view(b, crops, -1).mean(1)
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
                scores = probs
            else:
                scores = model(images).float()
                loss = F.cross_entropy(scores, labels, reduction="sum")
            hits = topk_correct(scores, labels)
            totals = [totals[0] + float(loss), totals[1] + hits[0], totals[2] + hits[1],
                      totals[3] + len(labels)]
    model.train(was_training)
    loss_sum, hit1, hit5, count = procs.all_sum(totals)
    if count == 0:
        raise UserError(f"no readable image in {data.dataset.source}")
    return {"loss": loss_sum / count, "top1": hit1 / count, "top5": hit5 / count,
            "num_images": int(count)}


def evaluate(checkpoint: Path | str, data: str | Path, *, ten_crop: bool = False,
             batch_size: int = 128, devices: str | None = None, workers: int | None = None
             ) -> EvalResult:
    """Top-1/top-5 of a checkpoint on a data set, through its own preprocessing spec.

    Args:
        checkpoint: a ``.pt`` written by :func:`train`.
        data: an image folder, an ``.npz`` or ``synthetic:test`` of the checkpoint's classes,
            in any order (see :func:`~alexnet_deploy.data.label_map`).
        ten_crop: average softmax over the ten crops. Defaults to ``False`` (center crop).
        batch_size: images per batch. Defaults to 128.
        devices: run the two-tower model on these; ``None`` runs the single-device grouped form
            on CPU. Defaults to ``None``.
        workers: decode processes for image folders. Defaults to one per core.
    """
    ckpt = load_checkpoint(checkpoint)
    dataset = open_dataset(data)
    to_model = label_map(ckpt.classes, dataset, model=str(ckpt.path))
    if not np.array_equal(to_model, np.arange(len(to_model))):
        dataset = copy.copy(dataset)  # open_dataset may hand out a shared (cached) data set
        dataset.labels = to_model[dataset.labels]
    if devices is None:
        model, devs = ckpt.grouped_model(), (torch.device("cpu"),) * 2
    else:
        devs = parse_devices(devices)
        model = ckpt.training_model(devs)
    val_set = EvalSet(dataset, ckpt.preprocess, ten_crop=ten_crop, workers=workers)
    result = _evaluate_set(model, val_set, devs, batch_size)
    return EvalResult(top1=result["top1"], top5=result["top5"], num_images=result["num_images"],
                      loss=result["loss"], skipped_images=val_set.skipped.count)
