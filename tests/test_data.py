"""The data layer: the three kinds of data set, evaluation and training batches, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet_deploy import data as D
from alexnet_deploy.cli import cli
from alexnet_deploy.errors import UserError
from alexnet_deploy.preprocess import PreprocessSpec

SPEC = PreprocessSpec.for_size(67)  # resize 76


def _folder(tmp_path, counts=(3, 2), size=(40, 30), mode="RGB"):
    """A small image folder: class ``c<i>`` holds ``counts[i]`` JPEGs of random pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, count in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / f"c{c}" / f"{i}.jpg")
    return root


def _npz(tmp_path, n=12, size=40, **arrays):
    rng = np.random.default_rng(1)
    path = tmp_path / "data.npz"
    values = {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              "labels": np.arange(n) % 3, "classes": np.array(["a", "b", "c"])}
    values.update(arrays)
    np.savez(path, **{k: v for k, v in values.items() if v is not None})
    return path


def _cli_error(args: list[str]) -> str:
    """Run the CLI expecting a clean failure; return its one error line."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                      SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---- synthetic ----

def test_synthetic_is_deterministic_balanced_and_varied():
    train = D.synthetic_dataset("train")
    assert train.images.shape == (4000, D.SYNTHETIC_SIZE, D.SYNTHETIC_SIZE, 3)
    assert train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert train.class_names == list(D.SYNTHETIC_CLASSES)
    # image i depends only on (seed, i): regenerating any image gives the same pixels
    for i in (0, 17, 3999):
        again = D._draw_synthetic(int(train.labels[i]), np.random.default_rng([1001, i]))
        assert np.array_equal(again, train.images[i])
    test = D.open_dataset("synthetic:test")
    assert len(test) == 1000 and test.fingerprint() != train.fingerprint()
    # realistic-ish statistics: the whole range is used, images differ from each other
    assert train.images.min() == 0 and train.images.max() == 255
    assert 60 < train.images.mean() < 200
    assert train.images.reshape(4000, -1).std(axis=1).min() > 5
    with pytest.raises(UserError, match="synthetic:train or synthetic:test"):
        D.open_dataset("synthetic:val")


# ---- npz ----

def test_npz_dataset_and_eval_batches_use_the_spec(tmp_path):
    path = _npz(tmp_path)
    ds = D.open_dataset(path)
    assert len(ds) == 12 and ds.class_names == ["a", "b", "c"]
    batches = list(D.iter_batches(path, SPEC, batch_size=5))
    assert [len(b.labels) for b in batches] == [5, 5, 2]
    first = batches[0]
    assert first.images.shape == (5, 3, 67, 67) and first.images.dtype == np.float32
    expected = SPEC.load(Image.fromarray(ds.images[3]))
    assert np.array_equal(first.images[3], expected)
    assert first.labels.tolist() == [0, 1, 2, 0, 1]
    # a seeded subset is reproducible and sorted
    a = np.concatenate([b.indices for b in D.iter_batches(path, SPEC, limit=4, seed=7)])
    b = np.concatenate([b.indices for b in D.iter_batches(path, SPEC, limit=4, seed=7)])
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and len(a) == 4


def test_npz_grayscale_and_defaults(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (4, 20, 20), dtype=np.uint8)
    ds = D.load_npz(_npz(tmp_path, images=gray, labels=np.array([0, 1, 1, 0]), classes=None))
    assert ds.images.shape == (4, 20, 20, 3) and ds.class_names == ["class_0", "class_1"]


@pytest.mark.parametrize("arrays,message", [
    ({"labels": None}, "no 'labels' array"),
    ({"images": None, "labels": None}, "no 'images' or 'labels'"),
    ({"images": np.zeros((12, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"labels": np.arange(5)}, "'labels' must be integers of shape"),
    ({"labels": np.arange(12) % 5}, "'classes' names only 3"),
])
def test_npz_bad_input(tmp_path, arrays, message):
    with pytest.raises(UserError, match=message):
        D.open_dataset(_npz(tmp_path, **arrays))


def test_npz_missing_keys_via_cli(tmp_path):
    line = _cli_error(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data",
                       str(_npz(tmp_path, labels=None))])
    assert "does not exist" in line  # the checkpoint is checked first
    bad = _npz(tmp_path, labels=None)
    line = _cli_error(["train", "--recipe", "demo", "--data", str(bad), "--out",
                       str(tmp_path / "run")])
    assert str(bad) in line and "'labels'" in line


# ---- image folders ----

def test_folder_dataset_with_grayscale_and_classes_tsv(tmp_path):
    root = _folder(tmp_path, counts=(2, 3), mode="L")
    (root / "classes.tsv").write_text("wnid\tname\nc0\tfirst\nc1\tsecond\n")
    (root / "c1" / "notes.txt").write_text("not an image")
    ds = D.open_dataset(root)
    assert ds.class_ids == ["c0", "c1"] and ds.class_names == ["first", "second"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    batch = next(D.iter_batches(root, SPEC, batch_size=8, workers=0))
    assert batch.images.shape == (5, 3, 67, 67)
    # grayscale became RGB: the three channels hold the same pixels before normalization
    pixels = batch.images * np.asarray(SPEC.std)[:, None, None] + np.asarray(SPEC.mean)[
        :, None, None]
    assert np.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert np.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)


def test_imagenet_samples_of_varied_size_and_mode(shared_data):
    root = shared_data("imagenet_samples48")
    ds = D.open_dataset(root)
    assert len(ds) == 48 and ds.num_classes == 48
    assert ds.imagenet1k_index is not None and ds.imagenet1k_index[0] == 0
    assert ds.class_names[0] == "tench"
    spec = PreprocessSpec()
    batches = list(D.iter_batches(ds, spec, batch_size=16))
    images = np.concatenate([b.images for b in batches])
    assert images.shape == (48, 3, 227, 227) and np.isfinite(images).all()
    modes = {Image.open(p).mode for p in ds.paths}
    assert "L" in modes  # the set exercises grayscale -> RGB
    for i in (0, 47):
        assert np.array_equal(images[i], spec.load_path(ds.paths[i]))


def test_shared_npz_and_imagenette(shared_data):
    cifar = D.open_dataset(shared_data("cifar10_test_2k.npz"))
    assert len(cifar) == 2000 and cifar.class_names[0] == "airplane"
    val = D.open_dataset(shared_data("imagenette_val300"))
    assert len(val) == 300 and val.num_classes == 10 and val.class_names[0] == "tench"
    assert len(D.dataset_fingerprint(val)) == 64
    assert D.class_names(shared_data("imagenette_val300")) == val.class_names


def test_corrupt_and_truncated_images_are_skipped_counted_and_named_once(tmp_path, capsys):
    root = _folder(tmp_path, counts=(3, 3), size=(64, 64))
    good = (root / "c0" / "0.jpg").read_bytes()
    (root / "c0" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "c1" / "2.jpg").write_bytes(b"definitely not a jpeg")  # corrupt
    for workers in (0, 2):
        skipped = D.SkippedImages(D.open_dataset(root))
        batches = list(D.iter_batches(root, SPEC, batch_size=4, workers=workers,
                                      skipped=skipped))
        assert sum(len(b.labels) for b in batches) == 4
        assert skipped.count == 2
        err = capsys.readouterr().err
        assert err.count("warning: skipping unreadable image") == 1
        assert "1.jpg" in err
    # training skips them too, and never serves them
    train = D.TrainSet(root, SPEC, workers=0)
    assert len(train) == 4 and train.skipped.count == 2
    assert sum(len(y) for _, y in train.epoch(0, 3)) == 4


def test_bad_folders_via_cli(tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in _cli_error(["train", "--recipe", "demo", "--data", str(missing),
                                       "--out", str(tmp_path / "r1")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in _cli_error(["train", "--recipe", "demo", "--data", str(empty),
                                     "--out", str(tmp_path / "r2")])
    root = _folder(tmp_path, counts=(1,))
    (root / "hollow").mkdir()
    line = _cli_error(["train", "--recipe", "demo", "--data", str(root), "--out",
                       str(tmp_path / "r3")])
    assert "hollow" in line and "has no images" in line


# ---- evaluation crops ----

def test_ten_crops(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8))
    crops = D.ten_crops(image, SPEC)
    assert crops.shape == (10, 3, 67, 67)
    assert np.array_equal(crops[0], SPEC.load(image))  # crop 0 is the evaluation crop
    for k in range(5):
        assert np.array_equal(crops[5 + k], crops[k][:, :, ::-1])
    assert len({crops[k].tobytes() for k in range(5)}) == 5
    batch = next(D.iter_batches(_npz(tmp_path), SPEC, batch_size=4, ten_crop=True))
    assert batch.images.shape == (4, 10, 3, 67, 67)


# ---- training batches ----

def test_train_batches_are_deterministic_per_epoch_and_sharded():
    ds = D.ArrayDataset(D.synthetic_dataset("test").images[:40],
                        D.synthetic_dataset("test").labels[:40], D.SYNTHETIC_CLASSES, "small")
    a, b = D.TrainSet(ds, SPEC, seed=3), D.TrainSet(ds, SPEC, seed=3)
    ea, eb = list(a.epoch(2, 16)), list(b.epoch(2, 16))
    assert [len(y) for _, y in ea] == [16, 16, 8]
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert ea[0][0].shape == (16, 3, 67, 67) and ea[0][0].dtype == torch.float32
    other = list(a.epoch(3, 16))
    assert not torch.equal(other[0][0], ea[0][0])  # a new epoch, new order and draws
    # two ranks split the epoch: disjoint halves that together cover every image
    halves = [torch.cat([y for _, y in a.epoch(2, 16, rank=r, world=2)]) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 20
    orders = [list(a.sampler(2, r, 2)) for r in (0, 1)]
    assert sorted(orders[0] + orders[1]) == list(range(40))


def test_streaming_gives_the_same_batches_as_the_cache(tmp_path):
    root = _folder(tmp_path, counts=(5, 4), size=(90, 70))
    cached = D.TrainSet(root, SPEC, seed=1, workers=0)
    streamed = D.TrainSet(root, SPEC, seed=1, workers=2, cache_bytes=0)
    assert cached.cache is not None and streamed.cache is None
    for (xa, ya), (xb, yb) in zip(cached.epoch(1, 4), streamed.epoch(1, 4), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_is_crop_flip_and_pca_lighting():
    ds = D.ArrayDataset(D.synthetic_dataset("test").images[:8],
                        D.synthetic_dataset("test").labels[:8], D.SYNTHETIC_CLASSES, "tiny")
    plain = D.TrainSet(ds, SPEC, D.Augment(flip=False, lighting=0.0), seed=5)
    lit = D.TrainSet(ds, SPEC, D.Augment(flip=False, lighting=0.1), seed=5)
    flipped = D.TrainSet(ds, SPEC, D.Augment(flip=True, lighting=0.0), seed=5)
    order = list(plain.sampler(0))
    (x_plain, _), = plain.epoch(0, 8)
    (x_lit, _), = lit.epoch(0, 8)
    (x_flip, _), = flipped.epoch(0, 8)
    draws = plain._draws(0)
    std = torch.tensor(SPEC.std).view(3, 1, 1)
    for b, i in enumerate(order):
        # the plain crop is the square's window at the drawn offset, normalized
        y, x = draws["offset"][i]
        window = plain.cache[i, y:y + 67, x:x + 67]
        assert torch.allclose(x_plain[b], torch.from_numpy(SPEC.normalize(window)), atol=1e-6)
        # lighting adds one RGB offset per image: eigvec @ (alpha * 0.1 * eigval), over std
        alpha = torch.from_numpy(draws["alpha"][i]).double() * 0.1
        rgb = torch.tensor(D.PCA_EIGVEC).double() @ (alpha * torch.tensor(D.PCA_EIGVAL).double())
        assert torch.allclose((x_lit[b] - x_plain[b]) * std, rgb.float().view(3, 1, 1),
                              atol=1e-5)
        expect = x_plain[b].flip(-1) if draws["flip"][i] else x_plain[b]
        assert torch.equal(x_flip[b], expect)
    assert 0 < draws["flip"].sum() < len(draws["flip"])
    assert (draws["offset"] > 0).any() and draws["offset"].max() <= 76 - 67


def test_label_map_matches_names_ids_or_imagenet_index(tmp_path, shared_data):
    root = _folder(tmp_path, counts=(1, 1, 1))
    (root / "classes.tsv").write_text("wnid\tname\timagenet1k_index\n"
                                      "c0\tzero\t5\nc1\tone\t7\nc2\ttwo\t9\n")
    ds = D.open_dataset(root)
    assert D.label_map(["two", "zero", "one"], ds).tolist() == [1, 2, 0]  # by name
    assert D.label_map(["c2", "c1", "c0", "extra"], ds).tolist() == [2, 1, 0]  # by folder id
    assert D.label_map([f"k{i}" for i in range(1000)], ds).tolist() == [5, 7, 9]  # ImageNet-1k
    with pytest.raises(UserError, match=r"class 'two' \(3 classes\).*its 2 classes: zero, one"):
        D.label_map(["zero", "one"], ds)
