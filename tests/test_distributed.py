"""Data-parallel training under torchrun: two local CPU processes, gloo, DDP over two towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from alexnet_deploy.data import synthetic_dataset

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from alexnet_deploy import train as T
    recipe = T.load_recipe(sys.argv[1]).replace(data=sys.argv[2], val_data=sys.argv[2])
    result = T.train(recipe, sys.argv[3], progress=False)
    torch.save(result.model.state_dict(), os.path.join(sys.argv[3], f"rank{os.environ['RANK']}.pt"))
""")


@pytest.mark.slow
def test_two_gloo_processes_train_in_lockstep(tmp_path):
    ds = synthetic_dataset("train")
    data = tmp_path / "tiny.npz"
    np.savez(data, images=ds.images[:64], labels=ds.labels[:64], classes=np.array(ds.class_names))
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('epochs = 1\nimage_size = 67\nwidth_mult = 0.125\nbatch_size = 16\n'
                      'lr = 0.02\ninit = "kaiming"\nschedule = "constant"\ndevices = "cpu,cpu"\n')
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(recipe), str(data), str(out)],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    # each rank saw a different half of the data; only synchronized gradients keep them equal
    init = torch.load(out / "last.pt", weights_only=True)
    assert init["epoch"] == 1
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.equal(ranks[0][k], saved[k]), k
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    metrics = json.loads(lines[0])
    assert 0 <= metrics["val_top1"] <= 1 and metrics["loss"] > 0
