"""Distillation in several processes (accelerate on CPU, gloo) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


def seer_recipe(path: Path, batch_size: int) -> Path:
    recipe = {
        "attnkit": 1,
        "name": f"seer-b{batch_size}",
        "steps": [{
            "method": "seer_attention", "block_size": 16, "gate_hidden": 16,
            "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "seq_len": 96, "batch_size": batch_size,
                      "data": "builtin:corpus", "seed": 0, "checkpoint_every": 0},
        }],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def linear_recipe(path: Path, batch_size: int) -> Path:
    recipe = {
        "attnkit": 1,
        "name": f"hedgehog-b{batch_size}",
        "steps": [{
            "method": "linearize", "feature_dim": 8, "window": 4,
            "transfer": {"steps": 3, "lr": 1e-2, "seq_len": 64, "batch_size": batch_size, "data": "builtin:corpus",
                         "seed": 0},
        }],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def distill(tmp_path: Path, name: str, batch_size: int, processes: int, *extra: str, make_recipe=seer_recipe) -> Path:
    out = tmp_path / name
    args = ["-m", "attnkit", "distill", "--model", "tiny-llama", "--recipe",
            str(make_recipe(tmp_path / f"{name}.yaml", batch_size)), "--out", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
        if launcher is None:
            pytest.skip("torchrun not found")
        cmd = [launcher, "--nproc_per_node", str(processes), "--master_port", "29531", *args]
    # ACCELERATE_USE_CPU: accelerate then runs the torchrun processes as one gloo group (MULTI_CPU)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = "FSDP2: frozen model sharded" in proc.stdout
    assert sharded == ("--fsdp" in extra), proc.stdout[-3000:]
    return out


@pytest.mark.parametrize(
    ("job", "sharded"),
    [("seer", False), ("seer", True), ("linearize", True)],
    ids=["seer-replicated", "seer-fsdp2", "linearize-fsdp2"],
)
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, job, sharded):
    """Two processes with batch 1 each = one process with batch 2; with ``--fsdp`` the frozen model is sharded
    with FSDP2 (each process holds half of every decoder layer) and the result is the same. Jobs: SeerAttention
    gate distillation and linearization's attention transfer."""
    make, log, tokens = {
        "seer": (seer_recipe, "loss.jsonl", [192, 384, 576]),
        "linearize": (linear_recipe, "transfer/loss.jsonl", [128, 256, 384]),
    }[job]
    one = distill(tmp_path, "one", 2, 1, make_recipe=make)
    two = distill(tmp_path, "two", 1, 2, *(["--fsdp"] if sharded else []), make_recipe=make)
    rows_one = [json.loads(x) for x in (one / "train" / log).read_text().splitlines()]
    rows_two = [json.loads(x) for x in (two / "train" / log).read_text().splitlines()]
    # one row per step (only the main process writes), the same tokens seen
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    assert [r["tokens"] for r in rows_two] == [r["tokens"] for r in rows_one] == tokens
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    gates_one, gates_two = load_file(one / "attnkit.safetensors"), load_file(two / "attnkit.safetensors")
    assert gates_one.keys() == gates_two.keys()
    for key in gates_one:
        torch.testing.assert_close(gates_two[key], gates_one[key], atol=1e-5, rtol=1e-4)
    # the base weights saved by a sharded run are the whole, unchanged ones
    base_one, base_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert base_one.keys() == base_two.keys()
    for key in base_one:
        torch.testing.assert_close(base_two[key], base_one[key], atol=0, rtol=0)
