"""GQA/MQA conversion: no merge = same model, alignment keeps the function, merging = the reference formula,
activation-aware grouping pairs alike heads, native save/load, clear errors, impossible recipe orders."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import attnkit
from attnkit.attention import attention_modules
from attnkit.checkpoint import CheckpointError
from attnkit.convert.conversion import kv_second_moments
from attnkit.convert.gqa import GQA, alignment_rotations, rotate_heads
from attnkit.recipe import RecipeError
from tests.conftest import random_batch

CALIBRATION = {"calibration_tokens": 512, "calibration_seq_len": 128}
# Calibration ids passed as data (tokenizing the built-in corpus byte by byte costs seconds per conversion).
CALIBRATION_IDS = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(5))


def gqa_recipe(**step):
    return {"attnkit": 1, "name": "test-gqa", "steps": [{"method": "gqa", **CALIBRATION, **step}]}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_no_merge_keeps_logits(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 50)
    before = logits(model, ids)
    attnkit.apply(model, gqa_recipe(num_kv_heads=model.config.num_key_value_heads), data=CALIBRATION_IDS)
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def _random_key_rotation(kv_heads: int, head_dim: int, g: torch.Generator) -> torch.Tensor:
    """Per head, one 2D rotation per RoPE frequency pair (i, i + D/2): the rotations that commute with RoPE."""
    half = head_dim // 2
    i = torch.arange(half)
    out = torch.zeros(kv_heads, head_dim, head_dim, dtype=torch.float64)
    for h in range(kv_heads):
        phase = torch.rand(half, generator=g, dtype=torch.float64) * 6.283
        out[h, i, i], out[h, i, i + half], out[h, i + half, i], out[h, i + half, i + half] = (
            phase.cos(), -phase.sin(), phase.sin(), phase.cos())
    return out


@pytest.mark.parametrize("fitted", [False, True], ids=["random-rotations", "fitted-procrustes"])
def test_alignment_rotations_keep_the_function(tiny, fitted):
    """Absorbing RoPE-commuting key rotations and arbitrary orthogonal value rotations changes nothing (qkv bias
    included), whether random or the Procrustes fit from calibration."""
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 60)
    before = logits(model, ids)
    kv_heads, d = model.config.num_key_value_heads, model.config.head_dim
    g = torch.Generator().manual_seed(1)
    moments = kv_second_moments(model, [ids[:1], ids[1:]], [0, 1]) if fitted else None
    for idx, attention in enumerate(attention_modules(model)):
        if fitted:
            key_rot, value_rot = alignment_rotations(moments[idx]["kv"] / moments[idx]["n"], [[0, 1]], kv_heads, d)
            assert not torch.allclose(value_rot[1], torch.eye(d, dtype=torch.float64))
        else:
            key_rot = _random_key_rotation(kv_heads, d, g)
            value_rot = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=g, dtype=torch.float64))[0]
        rotate_heads(attention, key_rot, value_rot)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_a_non_commuting_key_rotation_changes_the_function(tiny):
    """The check above can fail: a general orthogonal key rotation does not commute with RoPE."""
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 60)
    before = logits(model, ids)
    kv_heads, d = model.config.num_key_value_heads, model.config.head_dim
    g = torch.Generator().manual_seed(2)
    key_rot = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=g, dtype=torch.float64))[0]
    rotate_heads(attention_modules(model)[0], key_rot, torch.eye(d, dtype=torch.float64).repeat(kv_heads, 1, 1))
    assert (logits(model, ids) - before).abs().max() > 1e-3


def test_merged_model_equals_reference_formula(tiny):
    """Contiguous mean pooling without alignment equals a model built by hand: k/v weights and biases averaged over
    each group (Ainslie et al.), loaded into a config with fewer KV heads."""
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 40)
    config = model.config.to_dict()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attnkit.apply(model, gqa_recipe(num_kv_heads=1, grouping="contiguous", align=False), data=CALIBRATION_IDS)
    d = model.config.head_dim
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            value = state[key]
            state[key] = value.view(2, d, *value.shape[1:]).mean(0)
    reference_config = type(model.config).from_dict({**config, "num_key_value_heads": 1})
    reference = AutoModelForCausalLM.from_config(reference_config).eval()
    reference.load_state_dict(state)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def _duplicated_heads_model():
    model, _ = attnkit.load_model("tiny-llama-mha", dtype="float32", device="cpu")
    d = model.config.head_dim
    with torch.no_grad():
        for attention in attention_modules(model):
            for name in ("k_proj", "v_proj"):
                w = getattr(attention, name).weight
                w[2 * d : 3 * d] = w[:d]
                w[3 * d :] = w[d : 2 * d]
    return model


def test_activation_grouping_pairs_alike_heads():
    """MHA with 4 KV heads where head 2 duplicates head 0 and head 3 duplicates head 1: 4 → 2 heads merges the
    duplicates, so the merge is exact (the model is unchanged); contiguous pairs (0,1), (2,3) are not."""
    model = _duplicated_heads_model()
    ids, _ = random_batch(model.config.vocab_size, 2, 40)
    before = logits(model, ids)
    attnkit.apply(model, gqa_recipe(num_kv_heads=2, grouping="activation", align=True), data=CALIBRATION_IDS)
    report = model.attnkit_conversion[0]
    assert all(sorted(map(sorted, layer["groups"])) == [[0, 2], [1, 3]] for layer in report["layers"].values())
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    contiguous = _duplicated_heads_model()
    attnkit.apply(contiguous, gqa_recipe(num_kv_heads=2, grouping="contiguous", align=False), data=CALIBRATION_IDS)
    assert (logits(contiguous, ids) - before).abs().max() > 1e-2


def test_save_load_and_plain_from_pretrained(tiny, tmp_path):
    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 40)
    attnkit.apply(model, gqa_recipe(kv_fraction=0.5), data=CALIBRATION_IDS)
    assert model.config.num_key_value_heads == 1
    converted = logits(model, ids)
    out = attnkit.save(model, tmp_path / "gqa", tokenizer=tokenizer)
    loaded, _ = attnkit.load(out)
    torch.testing.assert_close(logits(loaded, ids), converted, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(plain, ids), converted, rtol=1e-6, atol=1e-6)
    with pytest.raises(CheckpointError, match="baseline is the original model: evaluate with --model ORIGINAL"):
        attnkit.evaluate(out)  # a converted checkpoint has no dense mode to compare with


def test_kv_fraction_picks_the_largest_valid_count():
    step = GQA(kv_fraction=0.5)
    assert [step.target_heads(h) for h in (8, 3, 2, 32, 1)] == [4, 1, 1, 16, 1]


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"num_kv_heads 3 is invalid .* 2 KV heads.*valid: \[1, 2\]"):
        attnkit.apply(model, gqa_recipe(num_kv_heads=3), data=CALIBRATION_IDS)
    with pytest.raises(RecipeError, match="converts every layer"):
        attnkit.Recipe.load(gqa_recipe(num_kv_heads=1, layers=[0]))


def test_impossible_orders_fail_at_load():
    mla = {"method": "mla", "kv_rank": 16}
    gqa = {"method": "gqa", "num_kv_heads": 1}
    with pytest.raises(RecipeError, match="gqa after mla is impossible"):
        attnkit.Recipe.load({"attnkit": 1, "name": "x", "steps": [mla, gqa]})
    with pytest.raises(RecipeError, match="conversion steps must come before attention methods"):
        attnkit.Recipe.load({"attnkit": 1, "name": "x", "steps": [{"method": "streaming_llm"}, gqa]})
    with pytest.raises(RecipeError, match="appears twice"):
        attnkit.Recipe.load({"attnkit": 1, "name": "x", "steps": [gqa, gqa]})
    attnkit.Recipe.load({"attnkit": 1, "name": "x", "steps": [gqa, mla, {"method": "streaming_llm"}]})
