"""save → load reproduces the patched model; plain from_pretrained gets the dense one; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import attnkit
from attnkit.checkpoint import CheckpointError
from attnkit.recipe import RecipeError
from tests.conftest import random_batch

RECIPE = {
    "attnkit": 1,
    "name": "test-bigbird",
    "steps": [{"method": "bigbird", "window": 32, "global_tokens": 16, "random_blocks": 2, "seed": 3, "block_size": 16}],
}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_load_same_logits_and_blocks(tiny, tmp_path):
    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 200)
    dense = logits(model, ids)
    attnkit.apply(model, RECIPE)
    patched = logits(model, ids)
    blocks = {i: layer.prefill.select_blocks(torch.zeros(1, model.config.num_attention_heads, 200, 1), torch.zeros(1, 1, 200, 1), None).to_dense()
              for i, layer in enumerate(attnkit.attention.attnkit_layers(model))}
    out = attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "attnkit.safetensors", "recipe.yaml"}
    config = json.loads((out / "config.json").read_text())
    assert config["attnkit"]["recipe"]["name"] == "test-bigbird"
    assert config["attnkit"]["layers"]["0"] == {"prefill": "bigbird"}

    reloaded, _ = attnkit.load(out, dtype="float32", device="cpu")
    assert torch.equal(logits(reloaded, ids), patched)
    for i, layer in enumerate(attnkit.attention.attnkit_layers(reloaded)):
        again = layer.prefill.select_blocks(torch.zeros(1, model.config.num_attention_heads, 200, 1), torch.zeros(1, 1, 200, 1), None)
        assert torch.equal(again.to_dense(), blocks[i])

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert plain.config._attn_implementation != "attnkit"
    torch.testing.assert_close(logits(plain, ids), dense, atol=1e-5, rtol=0)


def test_unpatch_restores_dense_exactly(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 120)
    before = logits(model, ids)
    attnkit.apply(model, RECIPE)
    assert not torch.allclose(logits(model, ids), before)
    attnkit.unpatch(model)
    assert torch.equal(logits(model, ids), before)
    assert not any("attnkit" in name for name, _ in model.named_modules())


def test_existing_output_is_refused_and_overwrite_replaces(tiny, tmp_path):
    model, tokenizer = tiny
    attnkit.apply(model, RECIPE)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="already exists"):
        attnkit.save(model, target, tokenizer=tokenizer)
    assert (target / "keep.txt").read_text() == "user data"
    attnkit.save(model, target, tokenizer=tokenizer, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "attnkit.safetensors").exists()


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    attnkit.apply(model, RECIPE)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("attnkit.checkpoint.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_apply_errors_leave_the_model_untouched(tiny):
    model, _ = tiny
    with pytest.raises(RecipeError, match="layer 99 out of range"):
        attnkit.apply(model, {"attnkit": 1, "name": "x", "steps": [{"method": "sliding_window", "layers": [99]}]})
    assert not hasattr(model.model.layers[0].self_attn, "attnkit")
    assert model.config._attn_implementation != "attnkit"
    attnkit.apply(model, RECIPE)
    with pytest.raises(RuntimeError, match="already patched"):
        attnkit.apply(model, RECIPE)


def test_save_of_unpatched_model_and_load_of_non_checkpoint(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(CheckpointError, match="not patched"):
        attnkit.save(model, tmp_path / "x", tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        attnkit.load(tmp_path)
