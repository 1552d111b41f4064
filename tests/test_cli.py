"""The `attnkit` command: convert, recipes, inspect, models, and its errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnkit.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich wraps tables to the terminal width


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_recipes_lists_and_shows():
    result = run("recipes")
    assert result.exit_code == 0
    for name in ("streaming_llm", "sliding_window", "longformer", "strided", "dilated", "bigbird"):
        assert name in result.output
    shown = run("recipes", "streaming_llm")
    assert shown.exit_code == 0 and "method: streaming_llm" in shown.output and "attnkit: 1" in shown.output


def test_convert_inspect_and_refuse_existing_output(tmp_path):
    out = tmp_path / "ckpt"
    result = run("convert", "--recipe", "streaming_llm", "--model", "tiny-llama", "--out", str(out), "--no-eval")
    assert result.exit_code == 0, result.output
    assert (out / "attnkit.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["attnkit"]["recipe"]["name"] == "streaming_llm"

    inspected = run("inspect", str(out))
    assert inspected.exit_code == 0
    assert "streaming_llm" in inspected.output and "bytes/token" in inspected.output
    assert "bounded at 1088 tokens" in inspected.output

    again = run("convert", "--recipe", "streaming_llm", "--model", "tiny-llama", "--out", str(out), "--no-eval")
    assert again.exit_code == 2 and "already exists" in again.output
    forced = run("convert", "--recipe", "streaming_llm", "--model", "tiny-llama", "--out", str(out), "--no-eval", "--overwrite")
    assert forced.exit_code == 0


def test_convert_with_eval_prints_the_comparison(tmp_path):
    result = run(
        "convert", "--recipe", "sliding_window", "--model", "tiny-llama", "--out", str(tmp_path / "c"),
        "--lengths", "256", "--samples", "2",
    )
    assert result.exit_code == 0, result.output
    for column in ("method", "mean density", "dense", "patched", "passkey", "256"):
        assert column in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("convert", "--recipe", "no_such_recipe", "--model", "tiny-llama", "--no-eval"), "unknown recipe"),
        (("convert", "--recipe", "streaming_llm", "--model", "/no/such/model_dir", "--no-eval"), "error"),
        (("recipes", "nope"), "unknown recipe"),
        (("inspect", "/no/such/dir"), "not a checkpoint folder"),
    ],
)
def test_errors_are_clear(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_models_lists_aliases():
    result = run("models")
    assert result.exit_code == 0
    for alias in ("llama", "qwen", "tiny-llama"):
        assert alias in result.output
