"""Training and evaluation: recipes, devices, checkpoints, metrics, resume, evaluate, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alexnet_deploy import train as T
from alexnet_deploy.checkpoint import load_checkpoint
from alexnet_deploy.cli import cli
from alexnet_deploy.data import synthetic_dataset
from alexnet_deploy.errors import UserError

TINY = {"image_size": 67, "width_mult": 0.125, "batch_size": 32, "lr": 0.01, "init": "kaiming",
        "eval_batch_size": 64, "workers": 0}


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """96 synthetic training images as an .npz (fast to train on)."""
    ds = synthetic_dataset("train")
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=ds.images[:96], labels=ds.labels[:96], classes=np.array(ds.class_names))
    return path


def _recipe_file(tmp_path, **values) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**TINY, **values}.items()]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _invoke(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---- recipes ----

def test_recipes_parse_and_paper_is_the_papers():
    assert {"paper", "cifar10", "imagenette", "demo"} <= set(T.available_recipes())
    for name in T.available_recipes():
        assert T.load_recipe(name).name == name
    paper = T.load_recipe("paper")
    assert (paper.batch_size, paper.momentum, paper.weight_decay, paper.lr, paper.epochs) == \
        (128, 0.9, 5e-4, 0.01, 90)
    assert (paper.schedule, paper.plateau_factor, paper.image_size, paper.width_mult) == \
        ("plateau", 0.1, 227, 1.0)
    assert (paper.init, paper.dropout, paper.lighting, paper.flip) == ("paper", 0.5, 0.1, True)
    assert paper.preprocess.resize == 256
    demo = T.load_recipe("demo")
    assert demo.data == "synthetic:train" and demo.val_data == "synthetic:test"
    assert T.load_recipe("cifar10").image_size >= 67


def test_recipe_errors(tmp_path):
    with pytest.raises(UserError, match="not found: use one of .*paper"):
        T.load_recipe("nonexistent")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        T.load_recipe(str(bad))
    bad.write_text("epochs = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        T.load_recipe(str(bad))
    with pytest.raises(UserError, match="schedule"):
        T.Recipe(schedule="sometimes")


# ---- devices ----

def test_parse_devices():
    assert T.parse_devices("cpu,cpu") == (torch.device("cpu"), torch.device("cpu"))
    assert T.parse_devices(" cpu , cpu ") == (torch.device("cpu"), torch.device("cpu"))
    for text, message in [("cpu", "give two devices"), ("cpu,cpu,cpu", "give two devices"),
                          ("gpu0,cpu", "gpu0"), ("meta,cpu", "not supported")]:
        with pytest.raises(UserError, match=message):
            T.parse_devices(text)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(UserError, match="does not exist"):
        T.parse_devices(f"cuda:0,cuda:{count}")
    if count >= 1:
        assert T.parse_devices("cuda:0,cuda:0") == (torch.device("cuda", 0),) * 2


def test_missing_device_is_one_clean_line(tmp_path):
    line = _cli_error(["train", "--recipe", "demo", "--devices", "cuda:0,cuda:7", "--out",
                       str(tmp_path / "run")])
    assert "cuda:" in line and "does not exist" in line


# ---- a run: metrics, checkpoints, evaluate, resume ----

def test_train_writes_metrics_and_loadable_checkpoints_and_evaluate_agrees(tmp_path, tiny_npz):
    out = tmp_path / "run"
    _invoke(["train", "--recipe", _recipe_file(tmp_path, epochs=2, schedule="plateau"),
             "--data", str(tiny_npz), "--val-data", str(tiny_npz), "--devices", "cpu,cpu",
             "--out", str(out), "--lr", "0.02"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"loss", "top1", "top5", "img_per_s", "lr", "val_top1", "val_top5"} <= set(m)
        assert 0 <= m["top1"] <= m["top5"] <= 1 and m["img_per_s"] > 0
    assert lines[0]["lr"] == 0.02  # the command line overrode the recipe
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "config", "preprocess", "classes", "optimizer", "scheduler", "epoch",
            "rng", "metrics", "recipe"} <= set(state)
    assert state["epoch"] == 2 and state["recipe"]["lr"] == 0.02
    assert state["classes"] == synthetic_dataset("train").class_names
    assert state["preprocess"]["crop"] == 67 and state["config"]["width_mult"] == 0.125
    best = load_checkpoint(out / "best.pt")
    assert best.metrics["val_top1"] == max(m["val_top1"] for m in lines)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))

    report = tmp_path / "eval.json"
    _invoke(["evaluate", "--checkpoint", str(out / "last.pt"), "--data", str(tiny_npz),
             "--json", str(report)])
    result = json.loads(report.read_text())
    assert set(result) == {"top1", "top5", "num_images"} and result["num_images"] == 96
    # the grouped single-device form agrees with the two-tower model's validation
    assert abs(result["top1"] - lines[-1]["val_top1"]) <= 1 / 96
    ten = T.evaluate(out / "last.pt", tiny_npz, ten_crop=True)
    assert ten.num_images == 96 and 0 <= ten.top1 <= 1


def test_one_epoch_plus_resume_equals_two_epochs(tmp_path, tiny_npz):
    recipe = _recipe_file(tmp_path, epochs=2, schedule="plateau", plateau_patience=0)
    common = ["--recipe", recipe, "--data", str(tiny_npz), "--val-data", str(tiny_npz)]
    _invoke(["train", *common, "--out", str(tmp_path / "straight")])
    _invoke(["train", *common, "--out", str(tmp_path / "split"), "--epochs", "1"])
    assert load_checkpoint(tmp_path / "split" / "last.pt").epoch == 1
    _invoke(["train", "--recipe", recipe, "--out", str(tmp_path / "split"), "--resume",
             "--epochs", "2"])
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert any(not torch.equal(a[k], _weights(tmp_path / "split" / "best.pt")[k]) for k in a) \
        or load_checkpoint(tmp_path / "split" / "best.pt").epoch == 2
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_interrupted_onecycle_run_resumes_exactly(tmp_path, tiny_npz):
    recipe = T.load_recipe(_recipe_file(tmp_path, epochs=2, schedule="onecycle",
                                        warmup_epochs=0.5)).replace(data=str(tiny_npz))

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    T.train(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        T.train(recipe, tmp_path / "cut", on_epoch_end=stop_after_first, progress=False)
    resumed = T.resume_recipe(tmp_path / "cut", {})
    T.train(resumed, tmp_path / "cut", resume=True, progress=False)
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "cut" / "last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    with pytest.raises(UserError, match="cannot be extended"):
        T.resume_recipe(tmp_path / "cut", {"epochs": 5})
    with pytest.raises(UserError, match="width-mult differs"):
        T.resume_recipe(tmp_path / "cut", {"width_mult": 0.5})


def test_run_errors(tmp_path, tiny_npz):
    recipe = _recipe_file(tmp_path, epochs=1)
    out = tmp_path / "run"
    assert "--resume" in _cli_error(["train", "--recipe", recipe, "--out", str(out),
                                     "--resume"])
    _invoke(["train", "--recipe", recipe, "--data", str(tiny_npz), "--out", str(out)])
    assert "already holds a run" in _cli_error(["train", "--recipe", recipe, "--data",
                                                str(tiny_npz), "--out", str(out)])
    assert "no training data" in _cli_error(["train", "--recipe", recipe, "--out",
                                             str(tmp_path / "other")])
    # evaluate: corrupt checkpoint, data of other classes
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((out / "last.pt").read_bytes()[:1000])
    assert str(corrupt) in _cli_error(["evaluate", "--checkpoint", str(corrupt), "--data",
                                       str(tiny_npz)])
    foreign = tmp_path / "torchvision.pt"  # weights of another architecture / format
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, foreign)
    assert "not an alexnet-deploy checkpoint" in _cli_error(
        ["evaluate", "--checkpoint", str(foreign), "--data", str(tiny_npz)])
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.arange(4) % 2)
    line = _cli_error(["evaluate", "--checkpoint", str(out / "last.pt"), "--data", str(other)])
    assert "'class_0' (2 classes)" in line and "its 10 classes" in line


# ---- holdout (issue 14: the accuracy budget measures INT8 on images training never saw) ----


def test_holdout_indices_are_one_seeded_draw():
    from alexnet_deploy.data import holdout_indices

    a = holdout_indices(100, 20, seed=3)
    assert len(a) == 20 and len(set(a.tolist())) == 20 and list(a) == sorted(a)
    assert 0 <= a.min() and a.max() < 100
    assert np.array_equal(a, holdout_indices(100, 20, seed=3))
    assert not np.array_equal(a, holdout_indices(100, 20, seed=4))
    assert len(holdout_indices(100, 0, seed=3)) == 0
    for bad in (100, 101, -1):
        with pytest.raises(UserError, match="holdout must be between 0 and"):
            holdout_indices(100, bad, seed=0)


def test_training_leaves_the_holdout_out_and_export_carries_it(tmp_path, tiny_npz):
    from alexnet_deploy.data import TrainSet, holdout_indices, open_dataset
    from alexnet_deploy.export import export, source_from_checkpoint
    from alexnet_deploy.metadata import read_model_info
    from alexnet_deploy.preprocess import PreprocessSpec

    held = holdout_indices(96, 30, seed=0)
    ts = TrainSet(tiny_npz, PreprocessSpec.for_size(67), workers=0, exclude=held)
    assert len(ts) == 66 and not set(ts.index.tolist()) & set(held.tolist())
    assert set(ts.index.tolist()) == set(range(96)) - set(held.tolist())
    assert np.array_equal(ts.labels, open_dataset(tiny_npz).labels[ts.index])

    out = tmp_path / "run"
    _invoke(["train", "--recipe", _recipe_file(tmp_path, epochs=1), "--data", str(tiny_npz),
             "--holdout", "30", "--devices", "cpu,cpu", "--out", str(out)])
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.training_data == {"fingerprint": open_dataset(tiny_npz).fingerprint(),
                                  "images": 96, "holdout": 30, "holdout_seed": 0}
    assert ckpt.state["recipe"]["holdout"] == 30
    export(source_from_checkpoint(out / "last.pt"), tmp_path / "m.onnx")
    assert read_model_info(tmp_path / "m.onnx").training_data == ckpt.training_data
    # without --val-data the holdout validates: the epoch's val_top1 is last.pt on those images
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    data = np.load(tiny_npz)
    held_npz = tmp_path / "held.npz"
    np.savez(held_npz, images=data["images"][held], labels=data["labels"][held],
             classes=data["classes"])
    assert abs(metrics["val_top1"] - T.evaluate(out / "last.pt", held_npz).top1) <= 1 / 30


def test_a_holdout_as_large_as_the_data_is_one_line(tmp_path, tiny_npz):
    line = _cli_error(["train", "--recipe", _recipe_file(tmp_path, epochs=1),
                       "--data", str(tiny_npz), "--holdout", "96", "--out", str(tmp_path / "r")])
    assert "--holdout: holdout must be between 0 and the data's 95 images, got 96" in line
    assert not (tmp_path / "r").exists()
