"""Checkpoints: the hand-off from training to export.

A checkpoint is a ``torch.save`` dict, loadable with ``torch.load(weights_only=True)``:

=================  ==========================================================================
``format``         ``"alexnet-deploy/checkpoint/1"``
``model``          the model ``state_dict`` (two-tower keys ``towers.T.LAYER.*`` + ``fc8.*`` for
                   ``arch="paper"``; :class:`~alexnet_deploy.model.AlexNetGrouped` keys otherwise)
``config``         :class:`~alexnet_deploy.model.AlexNetConfig` as a dict
``preprocess``     :class:`~alexnet_deploy.preprocess.PreprocessSpec` as a dict
``classes``        class names, index order
``epoch``          epochs completed
``optimizer``,     state dicts for ``--resume`` (may be absent in exported-only checkpoints)
``scheduler``
``rng``            RNG states (torch CPU, numpy, python) for bit-exact resume
``metrics``        last epoch's metrics dict
``recipe``         the resolved training recipe
``training_data``  ``fingerprint`` and ``images`` of the training data, and the ``holdout``
                   count and ``holdout_seed`` of the images training left out
=================  ==========================================================================

Writes are atomic (temporary file + rename): an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import KIND_NAMES, atomic_path, file_kind, sha256_file
from alexnet_deploy.model import (
    AlexNet,
    AlexNetConfig,
    AlexNetGrouped,
    build_model,
    two_tower_to_grouped,
)
from alexnet_deploy.preprocess import PreprocessSpec

FORMAT = "alexnet-deploy/checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``state`` is the raw dict for resume; the rest is parsed."""

    path: Path
    config: AlexNetConfig
    preprocess: PreprocessSpec
    classes: list[str]
    model_state: dict[str, torch.Tensor]
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @property
    def training_data(self) -> dict[str, Any]:
        """What :data:`~alexnet_deploy.metadata.TRAINING_DATA` records: the training data's
        fingerprint and the images it held out (``{}`` when the checkpoint does not say)."""
        record = self.state.get("training_data")
        if isinstance(record, dict):
            return dict(record)
        if "data_fingerprint" in self.state:  # written before holdouts existed: none held out
            return {"fingerprint": str(self.state["data_fingerprint"]), "holdout": 0}
        return {}

    def training_model(self, devices=("cpu", "cpu")) -> torch.nn.Module:
        """The model in its training form (two towers for ``arch="paper"``), weights loaded."""
        model = build_model(self.config, devices)
        model.load_state_dict(self.model_state)
        if isinstance(model, AlexNet):
            model.place(devices)
        return model

    def grouped_model(self) -> AlexNetGrouped:
        """The single-device form on CPU, in eval mode: what export and references run."""
        model = self.training_model(("cpu", "cpu"))
        if isinstance(model, AlexNet):
            model = two_tower_to_grouped(model)
        return model.eval()


def save_checkpoint(path: Path | str, *, model: torch.nn.Module, config: AlexNetConfig,
                    preprocess: PreprocessSpec, classes: list[str], epoch: int = 0,
                    **extra: Any) -> None:
    """Write a checkpoint atomically. ``extra`` (optimizer, scheduler, rng, metrics, recipe ...)
    is stored as-is and must hold only tensors, numbers, strings, lists and dicts."""
    state = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "classes": list(classes),
        "epoch": int(epoch),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_torch_file(path: Path, what: str, *, missing: str, corrupt: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a one-line UserError naming ``what`` and
    ``path`` when the file is missing (hint ``missing``) or unreadable (hint ``corrupt``)."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: {missing}")
    kind = file_kind(path)
    if kind != "checkpoint":  # torch.load's own errors on such a file are tracebacks or riddles
        raise UserError(f"{what} {path} is not a PyTorch file (it is {KIND_NAMES[kind]}): "
                        f"{missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            ValueError, IndexError, KeyError) as e:
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file ({_first_line(e)}): "
                        f"{corrupt}") from e


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load and check a checkpoint; a UserError names the file and the problem otherwise."""
    path = Path(path)
    state = load_torch_file(path, "checkpoint",
                            missing="pass the .pt file written by 'alexnet-deploy train' "
                                    "(DIR/best.pt or DIR/last.pt)",
                            corrupt="re-run training or pick another checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not an alexnet-deploy checkpoint (no "
                        f"'format: {FORMAT}'); for torchvision weights use --torchvision-weights")
    try:
        config = AlexNetConfig.from_dict(state["config"])
        preprocess = PreprocessSpec.from_dict(state["preprocess"])
        model_state = state["model"]
        classes = [str(c) for c in state["classes"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is missing {e}: re-run training") from e
    expected = build_model(config).state_dict()
    bad = [k for k, v in expected.items()
           if k not in model_state or tuple(model_state[k].shape) != tuple(v.shape)]
    if bad or set(model_state) - set(expected):
        raise UserError(f"checkpoint {path} does not match its own {config.arch} architecture "
                        f"config (first mismatched key: {(bad or sorted(set(model_state)))[0]})")
    if len(classes) != config.num_classes:
        raise UserError(f"checkpoint {path} lists {len(classes)} class names for "
                        f"{config.num_classes} outputs")
    return Checkpoint(path=path, config=config, preprocess=preprocess, classes=classes,
                      model_state=model_state, epoch=int(state.get("epoch", 0)),
                      metrics=dict(state.get("metrics") or {}), state=state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__
