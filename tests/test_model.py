"""The model: paper shapes, LRN convention, two-tower == grouped, torchvision layout, knobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alexnet_deploy import model as M
from alexnet_deploy.errors import UserError
from alexnet_deploy.model import (
    AlexNet,
    AlexNetConfig,
    AlexNetGrouped,
    TorchvisionAlexNet,
    count_parameters,
    group_lrn,
    grouped_to_two_tower,
    torchvision_to_grouped,
    two_tower_to_grouped,
)
from alexnet_deploy.train import kaiming_init_

# torchvision.models.alexnet().state_dict(): keys and shapes (torchvision 0.2x, 1000 classes)
TORCHVISION_SHAPES = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def _o1_model(cfg: AlexNetConfig, seed: int = 0) -> AlexNet:
    """A two-tower model whose activations are O(1) at every layer (He init, small random
    biases), so that a mismatch anywhere shows in the logits and gradients. The paper's
    N(0, 0.01) init would shrink them ~5x per layer and hide errors below the tolerance."""
    torch.manual_seed(seed)
    model = AlexNet(cfg)
    kaiming_init_(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-0.1, 0.1)
        model.fc8.weight.normal_(0, 0.05)
    return model


def test_paper_parameter_count_and_shapes():
    cfg = AlexNetConfig()
    assert count_parameters(AlexNet(cfg)) == 60_965_224
    assert count_parameters(AlexNetGrouped(cfg)) == 60_965_224
    tower = AlexNet(cfg).towers[0]
    # each tower holds half of every layer; conv2/4/5 read their own tower, conv3/fc6/fc7 both
    assert tuple(tower.conv1.weight.shape) == (48, 3, 11, 11)
    assert tuple(tower.conv2.weight.shape) == (128, 48, 5, 5)
    assert tuple(tower.conv3.weight.shape) == (192, 256, 3, 3)
    assert tuple(tower.conv4.weight.shape) == (192, 192, 3, 3)
    assert tuple(tower.conv5.weight.shape) == (128, 192, 3, 3)
    assert tuple(tower.fc6.weight.shape) == (2048, 9216)
    assert tuple(tower.fc7.weight.shape) == (2048, 4096)


def test_paper_init():
    model = AlexNet(AlexNetConfig(width_mult=0.5, num_classes=10))
    for t in model.towers:
        for name in ("conv1", "conv3"):
            assert torch.all(getattr(t, name).bias == 0)
        for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
            assert torch.all(getattr(t, name).bias == 1)
        assert abs(float(t.fc6.weight.detach().std()) - 0.01) < 5e-4
        assert abs(float(t.fc6.weight.detach().mean())) < 5e-4
    assert torch.all(model.fc8.bias == 0)


def _paper_lrn(a: torch.Tensor, n=5, k=2.0, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """The paper's eq. (section 3.3), written out channel by channel."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return out


def test_lrn_constants_match_the_paper():
    assert (M.LRN_SIZE, M.LRN_K, M.LRN_BETA, M.LRN_ALPHA) == (5, 2.0, 0.75, 1e-4)
    assert M.TORCH_LRN_ALPHA == pytest.approx(5e-4)  # torch divides alpha by n
    torch.manual_seed(0)
    a = torch.rand(2, 12, 4, 4, dtype=torch.float64) * 80  # large enough for alpha to matter
    expected = _paper_lrn(a)
    assert torch.allclose(group_lrn(a, 1), expected, rtol=1e-12, atol=0)
    # passing the paper's alpha straight to torch would be a different normalization
    wrong = F.local_response_norm(a, 5, alpha=1e-4, beta=0.75, k=2.0)
    assert (wrong - expected).abs().max() > 1e-2 * expected.abs().max()


def test_lrn_per_tower_differs_from_lrn_over_merged_channels():
    # The paper's towers normalize over their own channels: the window of a channel at the
    # tower boundary never reaches into the other GPU's channels. One LRN over the merged
    # channels would mix them, so the grouped form must apply LRN per group.
    torch.manual_seed(1)
    a = torch.rand(1, 16, 3, 3, dtype=torch.float64) * 80
    per_tower, merged = group_lrn(a, 2), group_lrn(a, 1)
    boundary = [6, 7, 8, 9]  # channels within n//2 = 2 of the boundary at 8
    inner = [c for c in range(16) if c not in boundary]
    assert torch.equal(per_tower[:, inner], merged[:, inner])
    assert (per_tower[:, boundary] - merged[:, boundary]).abs().min() > 1e-6
    assert torch.allclose(per_tower[:, :8], _paper_lrn(a[:, :8]), rtol=1e-12, atol=0)
    assert torch.allclose(per_tower[:, 8:], _paper_lrn(a[:, 8:]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("width_mult,image_size", [(0.25, 67), (0.5, 99)])
def test_two_tower_and_grouped_give_same_logits_and_gradients(width_mult, image_size):
    cfg = AlexNetConfig(num_classes=10, image_size=image_size, width_mult=width_mult)
    towers = _o1_model(cfg).eval()  # dropout off: the two forms draw different masks
    grouped = two_tower_to_grouped(towers).eval()
    torch.manual_seed(2)
    x = torch.randn(3, 3, image_size, image_size)
    labels = torch.tensor([1, 4, 7])
    logits_t, logits_g = towers(x), grouped(x)
    assert logits_t.abs().max() > 0.5  # non-degenerate: logits are O(1)
    assert torch.allclose(logits_t, logits_g, atol=1e-5, rtol=1e-5)
    F.cross_entropy(logits_t, labels).backward()
    F.cross_entropy(logits_g, labels).backward()
    for name in M.TOWER_LAYERS:
        for p in ("weight", "bias"):
            g_towers = torch.cat([getattr(getattr(t, name), p).grad for t in towers.towers])
            g_grouped = getattr(getattr(grouped, name), p).grad
            assert g_grouped.abs().max() > 0, f"{name}.{p} got no gradient"
            assert torch.allclose(g_towers, g_grouped, atol=1e-5, rtol=1e-5), f"{name}.{p}"
    assert torch.allclose(towers.fc8.weight.grad, grouped.fc8.weight.grad, atol=1e-5, rtol=1e-5)


def test_full_size_two_tower_equals_grouped():
    cfg = AlexNetConfig()
    towers = _o1_model(cfg).eval()
    grouped = two_tower_to_grouped(towers).eval()
    x = torch.randn(1, 3, 227, 227)
    with torch.no_grad():
        assert torch.allclose(towers(x), grouped(x), atol=1e-5, rtol=1e-5)


def test_conversion_round_trip_is_lossless():
    cfg = AlexNetConfig(num_classes=7, image_size=67, width_mult=0.25)
    towers = _o1_model(cfg)
    back = grouped_to_two_tower(two_tower_to_grouped(towers))
    for (k, a), (k2, b) in zip(towers.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_torchvision_variant_matches_torchvision_layout():
    state = TorchvisionAlexNet().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == TORCHVISION_SHAPES
    assert list(state) == list(TORCHVISION_SHAPES)  # same order as torchvision's
    assert count_parameters(TorchvisionAlexNet()) == 61_100_840  # torchvision's documented count


def test_torchvision_weights_load_into_grouped_form_unchanged():
    torch.manual_seed(3)
    tv = TorchvisionAlexNet(num_classes=10).eval()
    kaiming_init_(tv)
    grouped = torchvision_to_grouped(tv.state_dict(), image_size=99).eval()
    assert grouped.cfg.arch == "torchvision" and grouped.cfg.num_classes == 10
    x = torch.randn(2, 3, 99, 99)
    with torch.no_grad():
        assert torch.allclose(tv(x), grouped(x), atol=1e-5, rtol=1e-5)
    bad = dict(tv.state_dict())
    bad.pop("features.0.bias")
    with pytest.raises(UserError, match="missing keys"):
        torchvision_to_grouped(bad)


def test_width_classes_and_size_knobs():
    cfg = AlexNetConfig(num_classes=10, image_size=67, width_mult=0.5)
    assert cfg.widths == {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128,
                          "fc6": 2048, "fc7": 2048}
    model = AlexNet(cfg)
    assert model.fc8.out_features == 10
    for size in (67, 99, 227, 256):  # the adaptive pool makes every size reach fc6 alike
        assert AlexNet(AlexNetConfig(num_classes=10, image_size=size, width_mult=0.25))(
            torch.zeros(1, 3, size, size)).shape == (1, 10)
    odd = AlexNetConfig(width_mult=0.3)
    assert all(v % 4 == 0 for v in odd.widths.values())  # even per tower
    with pytest.raises(UserError, match="at least 67"):
        AlexNetConfig(image_size=66)
    with pytest.raises(UserError, match="width_mult"):
        AlexNetConfig(width_mult=0)
    assert AlexNetConfig(image_size=63, arch="torchvision").min_image_size == 63
