"""The product outside the clone: recipes shipped as package data, working folders created only
when something is written, and a wheel that installs into a fresh virtual environment and runs
from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_deploy.cli import cli
from alexnet_deploy.errors import UserError
from alexnet_deploy.train import available_recipes, load_recipe
from tests.conftest import ROOT

TORCH_PIN = os.environ.get("TORCH", "torch==2.13.0")  # the Makefile's pin


def test_recipes_ship_inside_the_package():
    assert available_recipes() == ["cifar10", "demo", "imagenette", "paper"]
    for name in available_recipes():
        assert (ROOT / "alexnet_deploy" / "recipes" / f"{name}.toml").is_file()
        assert load_recipe(name).name == name
    assert load_recipe("demo").image_size == 67
    with pytest.raises(UserError, match="recipe 'nope' not found: use one of cifar10, demo, "):
        load_recipe("nope")
    with pytest.raises(UserError, match="recipe file missing.toml does not exist"):
        load_recipe("missing.toml")


@pytest.mark.parametrize("args", [
    ["train", "--recipe", "demo", "--data", "no-such-folder", "--out", "train/demo"],
    ["calibrate", "--model", "no.onnx", "--data", "synthetic:train",
     "--out", "calibration/x.json"],
    ["build", "--model", "no.onnx", "--precision", "fp32", "--out", "engines/x"],
])
def test_a_failed_command_leaves_no_working_folder(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
    assert list(tmp_path.iterdir()) == []


def test_outputs_create_their_folders_when_written(tmp_path):
    from alexnet_deploy.fileio import write_json_atomic

    target = tmp_path / "a" / "b" / "c.json"
    write_json_atomic(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n'
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        write_json_atomic(blocker / "sub" / "c.json", {})


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_elsewhere(tmp_path):
    """Build the wheel, install it (with the pinned CPU torch) into a new virtual environment,
    and run train -> export -> build -> predict from an empty folder outside the clone."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to copy the tracked sources")
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    src = tmp_path / "src"
    # build from the files git knows (not ignored), so the wheel cannot pick up local leftovers
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run = _runner(tmp_path)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("alexnet_deploy-*.whl")
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", TORCH_PIN, str(wheel)])
    work.mkdir()
    tool = str(venv / "bin" / "alexnet-deploy")
    out = run([tool, "train", "--recipe", "demo", "--epochs", "1", "--out", "run"], cwd=work)
    assert "trained 1 epochs" in out
    run([tool, "export", "--checkpoint", "run/best.pt", "--out", "model.onnx"], cwd=work)
    run([tool, "build", "--model", "model.onnx", "--precision", "fp32", "--backend",
         "onnxruntime", "--out", "engines/fp32"], cwd=work)
    code = ("import json\nfrom alexnet_deploy import load_engine\n"
            "from alexnet_deploy.data import synthetic_dataset\n"
            "synthetic_dataset('test').open_image(0).save('image.png')\n"
            "with load_engine('engines/fp32') as e:\n"
            "    print(json.dumps(e.classify(['image.png'], top_k=2)[0].labels))\n")
    api = run([str(venv / "bin" / "python"), "-c", code], cwd=work)
    cli_out = run([tool, "predict", "--engine", "engines/fp32", "image.png", "--top-k", "2"],
                  cwd=work)
    labels = json.loads(api)
    assert cli_out.startswith(f"image.png: {labels[0]} ")
    assert sorted(p.name for p in work.iterdir()) == ["engines", "image.png", "model.onnx", "run"]
    site = run([str(venv / "bin" / "python"), "-c",
                "import alexnet_deploy; print(alexnet_deploy.__file__)"], cwd=work)
    assert str(venv) in site and str(ROOT) not in site


def _runner(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(cmd: list[str], cwd: Path = tmp_path) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    return run
