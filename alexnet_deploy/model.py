"""The 2012 AlexNet (Krizhevsky, Sutskever, Hinton), in three interchangeable forms.

* :class:`AlexNet` -- the paper's two towers. Tower ``t`` lives on ``devices[t]``; activations
  cross devices only where the paper's towers connect: conv3, fc6, fc7 and fc8 read both towers,
  conv2, conv4 and conv5 read their own. fc8 lives on ``devices[0]``.
* :class:`AlexNetGrouped` -- the same function on one device: grouped convolutions (groups=2) for
  conv2/4/5, concatenated weights elsewhere, LRN applied per group. Export uses this form.
  With ``arch="torchvision"`` it is torchvision's single-tower variant (no LRN, no groups).
* :class:`TorchvisionAlexNet` -- ``state_dict`` keys and shapes identical to
  ``torchvision.models.alexnet``, so users can load torchvision weights they already have.

:func:`two_tower_to_grouped`, :func:`grouped_to_two_tower` and :func:`torchvision_to_grouped`
convert between them without loss (tensor concatenation / slicing only).

Input size: the paper's conv1 has no padding, so the smallest input is 67 px (the torchvision
variant, with conv1 padding 2, takes 63 px); an adaptive 6x6 average pool before fc6 makes any
size from there up produce the same fc6 shape. At 227 px it is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_deploy.errors import UserError

# The paper's layer widths (both towers together) and torchvision's single-tower widths.
PAPER_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256,
                "fc6": 4096, "fc7": 4096}
TORCHVISION_WIDTHS = {"conv1": 64, "conv2": 192, "conv3": 384, "conv4": 256, "conv5": 256,
                      "fc6": 4096, "fc7": 4096}
# LRN in the paper's convention: b = a / (k + alpha * sum(a^2))^beta over n=5 adjacent channels.
# torch's LocalResponseNorm divides alpha by n, so it gets alpha * n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
TORCH_LRN_ALPHA = LRN_ALPHA * LRN_SIZE
POOL_KERNEL, POOL_STRIDE, POOL_OUT = 3, 2, 6
ARCHS = ("paper", "torchvision")


@dataclass(frozen=True)
class AlexNetConfig:
    """Shape of an AlexNet.

    Args:
        num_classes: outputs of fc8. Defaults to 1000.
        image_size: input height and width the model is trained at. Defaults to 227.
        width_mult: scales every layer's width (rounded to an even count so both towers match).
            Defaults to 1.0 (the paper's widths).
        dropout: dropout probability on fc6 and fc7 outputs. Defaults to 0.5.
        arch: ``"paper"`` (two towers, LRN, groups) or ``"torchvision"`` (single tower).
            Defaults to ``"paper"``.
    """

    num_classes: int = 1000
    image_size: int = 227
    width_mult: float = 1.0
    dropout: float = 0.5
    arch: str = "paper"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}: expected one of {ARCHS}")
        if self.num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.width_mult <= 0:
            raise UserError(f"width_mult must be > 0, got {self.width_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < self.min_image_size:
            raise UserError(
                f"image_size {self.image_size} is too small: this AlexNet needs at least "
                f"{self.min_image_size} px"
            )

    @property
    def groups(self) -> int:
        return 2 if self.arch == "paper" else 1

    @property
    def lrn(self) -> bool:
        return self.arch == "paper"

    @property
    def conv1_padding(self) -> int:
        return 0 if self.arch == "paper" else 2

    @property
    def min_image_size(self) -> int:
        return 67 if self.arch == "paper" else 63

    @property
    def widths(self) -> dict[str, int]:
        base = PAPER_WIDTHS if self.arch == "paper" else TORCHVISION_WIDTHS
        step = 2 * self.groups  # even per tower
        return {k: max(step, round(v * self.width_mult / step) * step)
                for k, v in base.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AlexNetConfig:
        known = {"num_classes", "image_size", "width_mult", "dropout", "arch"}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model config has unknown keys {sorted(unknown)}: is this an "
                            "alexnet-deploy checkpoint?")
        return cls(**d)


def _init_(module: nn.Module, bias: float) -> None:
    """The paper's init: weights N(0, 0.01), biases 1 (conv2, conv4, conv5, fc6, fc7) or 0."""
    nn.init.normal_(module.weight, mean=0.0, std=0.01)
    nn.init.constant_(module.bias, bias)


def _lrn(x: torch.Tensor) -> torch.Tensor:
    return F.local_response_norm(x, LRN_SIZE, alpha=TORCH_LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


def group_lrn(x: torch.Tensor, groups: int) -> torch.Tensor:
    """LRN applied to each channel group separately (the window never crosses a tower)."""
    if groups == 1:
        return _lrn(x)
    return torch.cat([_lrn(part) for part in x.chunk(groups, dim=1)], dim=1)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, POOL_KERNEL, POOL_STRIDE)


def _pool_to_6(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, POOL_OUT)


class Tower(nn.Module):
    """One of the paper's two towers (half of every layer's width, fc8 excluded)."""

    def __init__(self, cfg: AlexNetConfig) -> None:
        super().__init__()
        w = {k: v // 2 for k, v in cfg.widths.items()}
        self.conv1 = nn.Conv2d(3, w["conv1"], 11, stride=4, padding=cfg.conv1_padding)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2)
        self.conv3 = nn.Conv2d(2 * w["conv2"], w["conv3"], 3, padding=1)  # reads both towers
        self.conv4 = nn.Conv2d(w["conv3"], w["conv4"], 3, padding=1)
        self.conv5 = nn.Conv2d(w["conv4"], w["conv5"], 3, padding=1)
        self.fc6 = nn.Linear(2 * w["conv5"] * POOL_OUT * POOL_OUT, w["fc6"])  # reads both
        self.fc7 = nn.Linear(2 * w["fc6"], w["fc7"])  # reads both
        for name, bias in (("conv1", 0.0), ("conv2", 1.0), ("conv3", 0.0), ("conv4", 1.0),
                           ("conv5", 1.0), ("fc6", 1.0), ("fc7", 1.0)):
            _init_(getattr(self, name), bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> relu -> lrn -> pool -> conv2 -> relu -> lrn -> pool (own tower only)."""
        x = _pool(_lrn(F.relu(self.conv1(x))))
        return _pool(_lrn(F.relu(self.conv2(x))))

    def trunk(self, both: torch.Tensor) -> torch.Tensor:
        """conv3 (both towers in) -> conv4 -> conv5 -> pool -> 6x6 -> flatten."""
        x = F.relu(self.conv3(both))
        x = F.relu(self.conv4(x))
        x = _pool(F.relu(self.conv5(x)))
        return torch.flatten(_pool_to_6(x), 1)


class AlexNet(nn.Module):
    """The paper's two-tower AlexNet with tower ``t`` on ``devices[t]``.

    Args:
        cfg: model shape (``arch`` must be ``"paper"``).
        devices: two devices, e.g. ``("cuda:0", "cuda:1")``, ``("cpu", "cpu")``. Defaults to CPU.
    """

    def __init__(self, cfg: AlexNetConfig, devices: Sequence[str | torch.device] = ("cpu", "cpu")):
        super().__init__()
        if cfg.arch != "paper":
            raise UserError("the two-tower model needs arch='paper'")
        self.cfg = cfg
        self.towers = nn.ModuleList([Tower(cfg), Tower(cfg)])
        self.fc8 = nn.Linear(cfg.widths["fc7"], cfg.num_classes)
        _init_(self.fc8, 0.0)
        self.devices = (torch.device("cpu"), torch.device("cpu"))
        self.place(devices)

    def place(self, devices: Sequence[str | torch.device]) -> AlexNet:
        """Move tower 0 (and fc8) to ``devices[0]`` and tower 1 to ``devices[1]``."""
        if len(devices) != 2:
            raise UserError(f"--devices needs two devices (A,B), got {list(devices)}")
        self.devices = tuple(torch.device(d) for d in devices)
        self.towers[0].to(self.devices[0])
        self.towers[1].to(self.devices[1])
        self.fc8.to(self.devices[0])
        return self

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.cfg.dropout, self.training)

    def _both(self, parts: Sequence[torch.Tensor], t: int) -> torch.Tensor:
        """Tower 0's then tower 1's activations, concatenated on tower ``t``'s device."""
        dev = self.devices[t]
        return torch.cat([p.to(dev, non_blocking=True) for p in parts], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d0, d1 = self.devices
        t0, t1 = self.towers
        stems = [t0.stem(x.to(d0, non_blocking=True)), t1.stem(x.to(d1, non_blocking=True))]
        # cross-connection 1: conv3 reads both towers
        flat = [t0.trunk(self._both(stems, 0)), t1.trunk(self._both(stems, 1))]
        # cross-connections 2 and 3: fc6 and fc7 read both towers
        h6 = [self._dropout(F.relu(t.fc6(self._both(flat, i)))) for i, t in enumerate((t0, t1))]
        h7 = [self._dropout(F.relu(t.fc7(self._both(h6, i)))) for i, t in enumerate((t0, t1))]
        # cross-connection 4: fc8 reads both towers (lives on device A)
        return self.fc8(self._both(h7, 0))


class AlexNetGrouped(nn.Module):
    """AlexNet on one device; for ``arch="paper"`` the same function as :class:`AlexNet`.

    Layers are named ``conv1`` .. ``conv5``, ``fc6`` .. ``fc8`` (export keys node names on them).
    """

    def __init__(self, cfg: AlexNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, g = cfg.widths, cfg.groups
        self.conv1 = nn.Conv2d(3, w["conv1"], 11, stride=4, padding=cfg.conv1_padding)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2, groups=g)
        self.conv3 = nn.Conv2d(w["conv2"], w["conv3"], 3, padding=1)
        self.conv4 = nn.Conv2d(w["conv3"], w["conv4"], 3, padding=1, groups=g)
        self.conv5 = nn.Conv2d(w["conv4"], w["conv5"], 3, padding=1, groups=g)
        self.fc6 = nn.Linear(w["conv5"] * POOL_OUT * POOL_OUT, w["fc6"])
        self.fc7 = nn.Linear(w["fc6"], w["fc7"])
        self.fc8 = nn.Linear(w["fc7"], cfg.num_classes)
        for name, bias in (("conv1", 0.0), ("conv2", 1.0), ("conv3", 0.0), ("conv4", 1.0),
                           ("conv5", 1.0), ("fc6", 1.0), ("fc7", 1.0), ("fc8", 0.0)):
            _init_(getattr(self, name), bias)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return group_lrn(x, self.cfg.groups) if self.cfg.lrn else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pool(self._norm(F.relu(self.conv1(x))))
        x = _pool(self._norm(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = _pool(F.relu(self.conv5(x)))
        x = torch.flatten(_pool_to_6(x), 1)
        drop = self.cfg.dropout if self.cfg.arch == "paper" else 0.0
        x = F.dropout(F.relu(self.fc6(x)), drop, self.training)
        x = F.dropout(F.relu(self.fc7(x)), drop, self.training)
        return self.fc8(x)


class TorchvisionAlexNet(nn.Module):
    """``torchvision.models.alexnet``'s module tree, so its ``state_dict`` loads unchanged."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((POOL_OUT, POOL_OUT))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * POOL_OUT * POOL_OUT, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# torchvision key prefix -> AlexNetGrouped layer name
TORCHVISION_KEYS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3",
                    "features.8": "conv4", "features.10": "conv5", "classifier.1": "fc6",
                    "classifier.4": "fc7", "classifier.6": "fc8"}
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
TOWER_LAYERS = LAYERS[:-1]


def two_tower_to_grouped(model: AlexNet) -> AlexNetGrouped:
    """The single-device form of ``model`` (on CPU): tower weights concatenated along dim 0."""
    grouped = AlexNetGrouped(model.cfg)
    state = {}
    t0, t1 = model.towers
    for name in TOWER_LAYERS:
        for p in ("weight", "bias"):
            a = getattr(getattr(t0, name), p).detach().cpu()
            b = getattr(getattr(t1, name), p).detach().cpu()
            state[f"{name}.{p}"] = torch.cat([a, b], dim=0)
    state["fc8.weight"] = model.fc8.weight.detach().cpu()
    state["fc8.bias"] = model.fc8.bias.detach().cpu()
    grouped.load_state_dict(state)
    return grouped


def grouped_to_two_tower(grouped: AlexNetGrouped,
                         devices: Sequence[str | torch.device] = ("cpu", "cpu")) -> AlexNet:
    """The two-tower form of ``grouped``: each layer's output channels split in half."""
    model = AlexNet(grouped.cfg, ("cpu", "cpu"))
    state = {}
    for name in TOWER_LAYERS:
        for p in ("weight", "bias"):
            halves = getattr(getattr(grouped, name), p).detach().cpu().chunk(2, dim=0)
            for t in (0, 1):
                state[f"towers.{t}.{name}.{p}"] = halves[t]
    state["fc8.weight"] = grouped.fc8.weight.detach().cpu()
    state["fc8.bias"] = grouped.fc8.bias.detach().cpu()
    model.load_state_dict(state)
    return model.place(devices)


def torchvision_config(state_dict: dict[str, torch.Tensor], image_size: int = 224
                       ) -> AlexNetConfig:
    """Check a torchvision AlexNet ``state_dict`` and return its config; UserError if malformed."""
    reference = TorchvisionAlexNet(num_classes=1).state_dict()
    missing = [k for k in reference if k not in state_dict]
    unexpected = [k for k in state_dict if k not in reference]
    if missing or unexpected:
        raise UserError(
            f"not a torchvision AlexNet state_dict: missing keys {missing[:4]}, unexpected keys "
            f"{unexpected[:4]}"
        )
    num_classes = state_dict["classifier.6.weight"].shape[0]
    reference = TorchvisionAlexNet(num_classes=num_classes).state_dict()
    for k, v in reference.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UserError(f"torchvision AlexNet key {k} has shape {tuple(state_dict[k].shape)}, "
                            f"expected {tuple(v.shape)}")
    return AlexNetConfig(num_classes=num_classes, image_size=image_size, arch="torchvision")


def torchvision_to_grouped(state_dict: dict[str, torch.Tensor], image_size: int = 224
                           ) -> AlexNetGrouped:
    """An :class:`AlexNetGrouped` (``arch="torchvision"``) holding torchvision weights."""
    cfg = torchvision_config(state_dict, image_size)
    grouped = AlexNetGrouped(cfg)
    grouped.load_state_dict({f"{TORCHVISION_KEYS[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v
                             for k, v in state_dict.items()})
    return grouped


def build_model(cfg: AlexNetConfig, devices: Sequence[str] | None = None) -> nn.Module:
    """The training form of ``cfg``: two towers for the paper's arch, else the single-device one."""
    if cfg.arch == "paper":
        return AlexNet(cfg, devices or ("cpu", "cpu"))
    return AlexNetGrouped(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
