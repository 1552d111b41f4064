"""The embedded SmolLM2 model end to end: `attnkit convert` on it, at a short length to keep CI reasonable."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

import attnkit
from attnkit.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama():
    return attnkit.load_model("llama", dtype="float32", device="cpu")


def test_convert_streaming_llm_on_the_embedded_model(tmp_path):
    # A window that makes 1K-token prompts really sparse (density well below 1), so the comparison means something.
    recipe = attnkit.Recipe.load("streaming_llm").to_dict()
    recipe["steps"][0].update(sink=64, window=128)  # density ≈ 0.43 at 1K (64-token blocks)
    path = tmp_path / "streaming.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ckpt"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        ["convert", "--recipe", str(path), "--model", "llama", "--out", str(out), "--lengths", "1024", "--samples", "3"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    print(result.output)
    row = next(line for line in result.output.splitlines() if "│" in line and "passkey" in line)  # the table row
    cells = [c.strip() for c in row.split("│") if c.strip()]
    density, dense, patched = float(cells[1]), float(cells[4]), float(cells[5])
    assert 0.2 < density < 0.6
    assert dense >= 2 / 3  # the dense model passes passkey at 1K (ENVIRONMENT.md: 10/10)
    assert 0.0 <= patched <= 1.0


def test_checkpoint_of_the_embedded_model_reloads_exactly(llama, tmp_path):
    model, tokenizer = llama
    ids = tokenizer("The capital of France is Paris. " * 40, return_tensors="pt").input_ids[:, :300]
    attnkit.apply(model, {"attnkit": 1, "name": "t", "steps": [{"method": "streaming_llm", "sink": 32, "window": 128}]})
    try:
        with torch.no_grad():
            patched = model(input_ids=ids).logits
        attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
        reloaded, tok2 = attnkit.load(tmp_path / "ckpt", dtype="float32", device="cpu")
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, patched)
        assert tok2("hello").input_ids == tokenizer("hello").input_ids
    finally:
        attnkit.unpatch(model)


def test_convert_quest_on_the_embedded_model(tmp_path):
    """`attnkit convert --recipe quest` end to end at a short length: a 256-token budget at 768 tokens (a third of
    the pages); the eval generates with Quest's cache, and the checkpoint reloads into a model that decodes sparsely."""
    from attnkit.sparsify.quest import QuestDecode

    recipe = attnkit.Recipe.load("quest").to_dict()
    recipe["steps"][0].update(token_budget=256)
    path = tmp_path / "quest.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ckpt"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        ["convert", "--recipe", str(path), "--model", "llama", "--out", str(out), "--lengths", "768", "--samples", "1",
         "--tasks", "passkey"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│" in line and "passkey" in line)
    cells = [c.strip() for c in row.split("│") if c.strip()]
    assert 0.0 <= float(cells[5]) <= 1.0
    model, tokenizer = attnkit.load(out, dtype="float32", device="cpu")
    ids = tokenizer("The capital of France is Paris. " * 80, return_tensors="pt").input_ids[:, :600]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       past_key_values=attnkit.make_cache(model))
    sparse = [m for m in model.modules() if isinstance(m, QuestDecode) and not m.dense]
    assert len(sparse) == model.config.num_hidden_layers - 2
    assert all(m.last_pages is not None and m.last_pages.shape[-1] == 256 // 16 - 1 for m in sparse)
