"""MLA conversion: exact at full rope/full rank, absorbed == unabsorbed, cached decode == full forward, generate,
save → load, KV bytes, clear errors, and the DeepSeek-V3 export."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import attnkit
from attnkit.attention import attention_modules
from attnkit.convert.conversion import kv_bytes_per_token
from attnkit.convert.mla import MLAAttention
from attnkit.recipe import RecipeError
from tests.conftest import random_batch

CALIBRATION = {"calibration_tokens": 512, "calibration_seq_len": 128}
# Calibration ids passed as data (tokenizing the built-in corpus byte by byte costs seconds per conversion).
CALIBRATION_IDS = torch.randint(3, 256, (2, 96), generator=torch.Generator().manual_seed(5))


def mla_recipe(**step):
    return {"attnkit": 1, "name": "test-mla", "steps": [{"method": "mla", **CALIBRATION, **step}]}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def set_absorb(model, absorb: str) -> None:
    for attention in attention_modules(model):
        if isinstance(attention, MLAAttention):
            attention.absorb = absorb


def test_full_rope_full_rank_reproduces_logits(tiny):
    """rope_dim = Hkv·D keeps RoPE on every key dimension (RoRoPE's head mixing commutes with RoPE) and full rank
    keeps every value dimension: the converted model is the original one."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 50, pad_lengths=[0, 7])
    before = logits(model, ids, attention_mask=mask)
    kd = model.config.num_key_value_heads * model.config.head_dim
    attnkit.apply(model, mla_recipe(kv_rank=kd, rope_dim=kd), data=CALIBRATION_IDS)
    assert all(isinstance(a, MLAAttention) for a in attention_modules(model))
    after = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[1, 7:], before[1, 7:], rtol=1e-4, atol=1e-4)


def test_low_rank_is_an_approximation_that_improves_with_rank(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 50)
    before = logits(model, ids)
    errors = []
    for rank in (8, 40):
        converted, _ = attnkit.load_model(model.config.name_or_path, dtype="float32", device="cpu")
        attnkit.apply(converted, mla_recipe(kv_rank=rank, rope_dim=8), data=CALIBRATION_IDS)
        errors.append(float((logits(converted, ids) - before).abs().mean()))
        info = converted.attnkit_conversion[0]["layers"][0]
        assert info["rank"] == rank and info["kv_values_per_token"] == [64, rank + 8]
    assert 0 < errors[1] < errors[0]


@pytest.mark.parametrize("absorb", ["always", "never"])
def test_absorbed_equals_unabsorbed(tiny, absorb):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 40, pad_lengths=[0, 5])
    attnkit.apply(model, mla_recipe(kv_rank=12, rope_dim=8, absorb="decode"), data=CALIBRATION_IDS)
    default = logits(model, ids, attention_mask=mask)
    set_absorb(model, absorb)
    torch.testing.assert_close(logits(model, ids, attention_mask=mask), default, rtol=1e-4, atol=1e-4)


def test_cached_decode_equals_full_forward(tiny):
    """Prefill 30 tokens into a cache (latent + rope key), then 6 one-token steps on the absorbed path."""
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 36)
    attnkit.apply(model, mla_recipe(kv_rank=12, rope_dim=8, latent_norm=True), data=CALIBRATION_IDS)
    full = logits(model, ids)
    cache = DynamicCache()
    steps = [logits(model, ids[:, :30], past_key_values=cache, use_cache=True)[:, -1]]
    for t in range(30, 35):
        steps.append(logits(model, ids[:, t : t + 1], past_key_values=cache, use_cache=True)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 29:35], rtol=1e-4, atol=1e-4)
    stored_key, stored_value = cache.layers[0].keys, cache.layers[0].values
    assert stored_key.shape == (2, 1, 35, 12) and stored_value.shape == (2, 1, 35, 8)  # latent + rope key only


def _random_mla_attention(q_heads: int, kv_heads: int, head_dim: int, rank: int, rope_frequencies: list[int],
                          seed: int) -> MLAAttention:
    """An MLA module with random weights (its math, not a conversion, is under test)."""
    from types import SimpleNamespace

    from attnkit.convert.mla import MLALayer

    torch.manual_seed(seed)
    layer = MLALayer(0, 32, q_heads, kv_heads, head_dim, rank, rope_frequencies, 1, q_bias=False, kv_bias=False,
                     o_bias=False, latent_norm=False, eps=1e-6)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    config = SimpleNamespace(_attn_implementation="sdpa")
    return MLAAttention(layer, config, scaling=head_dim**-0.5, absorb="decode")


def _previous_absorbed(attention: MLAAttention, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
    """The absorbed one-token step as it was before ``_latent_decode``: concatenate [latent; k_rope] into one key
    and run SDPA (heads folded into the query rows, or the 4D-mask branch)."""
    from attnkit.convert.mla import _linear_weight

    layer = attention.attnkit
    per = layer.q_heads // layer.kv_heads
    w = _linear_weight(layer.kv_b_proj).view(layer.kv_heads, 2 * layer.head_dim, layer.rank)
    w_k, w_v = w[:, : layer.head_dim], w[:, layer.head_dim :]
    bsz, hq, sq, d = q_nope.shape
    q_lat = torch.einsum("bgpsd,gdr->bgpsr", q_nope.view(bsz, layer.kv_heads, per, sq, d), w_k)
    query = torch.cat([q_lat.reshape(bsz, hq, sq, layer.rank), q_rope], -1)
    key = torch.cat([latent, k_rope], -1)
    if mask is not None and mask.dim() == 4:
        out_lat = attention._attend(query, key, latent, mask, dispatch=False)
    else:
        out_lat = attention._latent_attention(query, key, latent, mask)
    out = torch.einsum("bgpsr,gdr->bgpsd", out_lat.view(bsz, layer.kv_heads, per, sq, layer.rank), w_v)
    return out.reshape(bsz, hq, sq, d)


def _decode_mask(kind: str, lengths: list[int], sk: int):
    """None, or a mask of ``kind`` letting row ``b`` see its last ``lengths[b]`` keys (left padding)."""
    if kind == "none":
        return None
    real = torch.stack([torch.arange(sk) >= sk - n for n in lengths])  # [B, Sk], True = real token
    if kind == "padding-2d":
        return real
    if kind == "bool-4d":
        return real[:, None, None, :]
    return torch.zeros(real.shape).masked_fill(~real, torch.finfo(torch.float32).min)[:, None, None, :]  # additive


@pytest.mark.parametrize("mask_kind", ["none", "padding-2d", "bool-4d", "float-4d"])
@pytest.mark.parametrize(("batch", "q_heads", "kv_heads", "sk", "rank"), [
    (1, 4, 4, 1, 7), (2, 6, 2, 37, 11), (2, 9, 3, 129, 24), (3, 4, 1, 65, 5)],
    ids=["B1-Hq4-Hkv4-Sk1-r7", "B2-Hq6-Hkv2-Sk37-r11", "B2-Hq9-Hkv3-Sk129-r24", "B3-Hq4-Hkv1-Sk65-r5"])
def test_latent_decode_equals_unabsorbed_and_previous(batch, q_heads, kv_heads, sk, rank, mask_kind, nan_empty):
    """The one-token absorbed step (two matmuls over the cache in place) == the unabsorbed path == the previous
    concatenate-then-SDPA formula, at odd cache lengths, GQA/MQA/MHA, left-padded batches, every mask form."""
    head_dim, rope = 16, [0, 2, 4, 6]
    attention = _random_mla_attention(q_heads, kv_heads, head_dim, rank, rope, seed=sk)
    g = torch.Generator().manual_seed(sk + batch)
    q_nope = torch.randn(batch, q_heads, 1, head_dim, generator=g)
    q_rope = torch.randn(batch, q_heads, 1, 2 * len(rope), generator=g)
    latent = torch.randn(batch, 1, sk, rank, generator=g)
    k_rope = torch.randn(batch, 1, sk, 2 * len(rope), generator=g)
    lengths = [sk - (3 * b) % sk for b in range(batch)]  # row 0 unpadded, later rows left-padded
    mask = _decode_mask(mask_kind, lengths, sk)
    with torch.no_grad():
        new = attention._absorbed(q_nope, q_rope, latent, k_rope, mask)
        unabsorbed = attention._unabsorbed(q_nope, q_rope, latent, k_rope, mask)
        previous = _previous_absorbed(attention, q_nope, q_rope, latent, k_rope, mask)
    assert new.shape == (batch, q_heads, 1, head_dim)
    torch.testing.assert_close(new, previous, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, unabsorbed, rtol=1e-5, atol=1e-5)


def test_latent_decode_fully_masked_row_is_zero():
    """A query that sees no key gets zeros, as the previous SDPA path gave (not NaN)."""
    attention = _random_mla_attention(4, 2, 16, 9, [0, 2, 4, 6], seed=0)
    q_nope, q_rope = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 8)
    latent, k_rope = torch.randn(2, 1, 5, 9), torch.randn(2, 1, 5, 8)
    mask = torch.tensor([[True] * 5, [False] * 5])
    with torch.no_grad():
        new = attention._absorbed(q_nope, q_rope, latent, k_rope, mask)
        previous = _previous_absorbed(attention, q_nope, q_rope, latent, k_rope, mask)
    assert torch.equal(new[1], torch.zeros_like(new[1]))
    torch.testing.assert_close(new, previous, rtol=1e-5, atol=1e-5)


def test_padded_cached_decode_absorbed_equals_unabsorbed(tiny):
    """Left-padded batch, cached one-token steps: absorb=decode (the latent decode path) == absorb=never."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 27, pad_lengths=[0, 6])
    attnkit.apply(model, mla_recipe(kv_rank=13, rope_dim=8), data=CALIBRATION_IDS)
    runs = {}
    for absorb in ("decode", "never"):
        set_absorb(model, absorb)
        cache = DynamicCache()
        steps = [logits(model, ids[:, :21], attention_mask=mask[:, :21], past_key_values=cache, use_cache=True)[:, -1]]
        for t in range(21, 27):
            steps.append(logits(model, ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                                use_cache=True)[:, -1])
        runs[absorb] = torch.stack(steps, 1)
    torch.testing.assert_close(runs["decode"], runs["never"], rtol=1e-4, atol=1e-4)


def test_generate_with_and_without_cache(tiny):
    model, tokenizer = tiny
    attnkit.apply(model, mla_recipe(kv_rank=16, rope_dim=8), data=CALIBRATION_IDS)
    ids = tokenizer("The attention cache", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_save_load_same_logits(tiny, tmp_path):
    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 40)
    attnkit.apply(model, mla_recipe(energy=0.9, rope_dim=8, layers=[-1]), data=CALIBRATION_IDS)
    ranks = model.attnkit_state.recipe.steps[0].layer_ranks
    assert list(ranks) == [1] and 0 < ranks[1] < 64 - 8
    converted = logits(model, ids)
    out = attnkit.save(model, tmp_path / "mla", tokenizer=tokenizer)
    loaded, _ = attnkit.load(out)
    assert isinstance(attention_modules(loaded)[1], MLAAttention)
    assert not isinstance(attention_modules(loaded)[0], MLAAttention)
    torch.testing.assert_close(logits(loaded, ids), converted, rtol=0, atol=0)


def test_kv_bytes_per_token(tiny):
    model, _ = tiny
    assert kv_bytes_per_token(model, 2) == 2 * 2 * 2 * 16 * 2  # 2 layers × (k + v) × 2 heads × 16 × bf16
    attnkit.apply(model, mla_recipe(kv_rank=20, rope_dim=8), data=CALIBRATION_IDS)
    assert kv_bytes_per_token(model, 2) == 2 * (20 + 8) * 2


def test_energy_picks_larger_ranks_for_more_energy(tiny):
    model, _ = tiny
    ranks = []
    for energy in (0.5, 0.99):
        converted, _ = attnkit.load_model(model.config.name_or_path, dtype="float32", device="cpu")
        attnkit.apply(converted, mla_recipe(energy=energy, rope_dim=8), data=CALIBRATION_IDS)
        ranks.append(converted.attnkit_state.recipe.steps[0].layer_ranks[0])
    assert ranks[0] < ranks[1] <= 2 * 32 - 8


def test_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"kv_rank 100 is above what fits: .* 2 × 2 heads × 16 − rope_dim 8 = 56"):
        attnkit.apply(model, mla_recipe(kv_rank=100, rope_dim=8), data=CALIBRATION_IDS)
    with pytest.raises(ValueError, match="rope_dim 40 does not fit: the keys have 2 heads × 16 = 32"):
        attnkit.apply(model, mla_recipe(kv_rank=8, rope_dim=40), data=CALIBRATION_IDS)
    with pytest.raises(ValueError, match="rope_dim 24 > head_dim 16 must be a multiple of head_dim"):
        attnkit.apply(model, mla_recipe(kv_rank=8, rope_dim=24), data=CALIBRATION_IDS)
    with pytest.raises(ValueError, match=r"strided rope frequencies need rope_dim / 2 = 3 to divide head_dim / 2 = 8"):
        attnkit.apply(model, mla_recipe(kv_rank=8, rope_dim=6), data=CALIBRATION_IDS)
    with pytest.raises(RecipeError, match="rope_dim must be even"):
        attnkit.Recipe.load(mla_recipe(kv_rank=8, rope_dim=7))
    assert not any(isinstance(a, MLAAttention) for a in attention_modules(model))  # nothing was converted


def test_gqa_then_mla_and_a_sparse_method_on_top(tmp_path):
    """A recipe may merge heads, then convert to MLA, then sparsify prefill of the converted layers."""
    model, tokenizer = attnkit.load_model("tiny-llama-mha", dtype="float32", device="cpu")
    ids, _ = random_batch(model.config.vocab_size, 1, 200)
    recipe = {"attnkit": 1, "name": "stack", "steps": [
        {"method": "gqa", "num_kv_heads": 2, **CALIBRATION},
        {"method": "mla", "kv_rank": 24, "rope_dim": 8, **CALIBRATION},
        {"method": "streaming_llm", "sink": 16, "window": 64, "block_size": 16, "evict": False},
    ]}
    attnkit.apply(model, recipe, data=CALIBRATION_IDS)
    patched = logits(model, ids)
    assert model.attnkit_stats.mean_density() < 1
    with attnkit.dense(model):
        assert (logits(model, ids) - patched).abs().max() > 1e-4  # dense() runs MLA without the sparse prefill
    out = attnkit.save(model, tmp_path / "stack", tokenizer=tokenizer)
    loaded, _ = attnkit.load(out)
    torch.testing.assert_close(logits(loaded, ids), patched, rtol=0, atol=0)
    attnkit.unpatch(loaded)
    assert isinstance(attention_modules(loaded)[0], MLAAttention)  # conversions cannot be undone; methods are gone


def _export_roundtrip(model, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    from attnkit.convert.mla import export_deepseek_v3

    report = export_deepseek_v3(model, tmp_path / "ds")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    assert isinstance(native, DeepseekV3ForCausalLM)
    assert native.config.first_k_dense_replace == native.config.num_hidden_layers
    return report, native


def test_deepseek_v3_export_loads_and_matches(tmp_path):
    """latent_norm + no query bias: the native DeepSeek-V3 model computes the same logits as attnkit's module
    (layer ranks differ: the smaller latent is zero-padded)."""
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    attnkit.apply(model, mla_recipe(energy=0.9, rope_dim=8, latent_norm=True), data=CALIBRATION_IDS)
    ids, _ = random_batch(model.config.vocab_size, 2, 40)
    report, native = _export_roundtrip(model, tmp_path)
    assert report["exact"] and report["approximations"] == []
    torch.testing.assert_close(logits(native, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    assert native.config.kv_lora_rank == max(model.attnkit_state.recipe.steps[0].layer_ranks.values())


def test_deepseek_v3_export_reports_what_it_cannot_represent(tmp_path):
    model, _ = attnkit.load_model("tiny-qwen2", dtype="float32", device="cpu")
    with torch.no_grad():
        for attention in attention_modules(model):
            attention.q_proj.bias.normal_(0, 0.5)
    attnkit.apply(model, mla_recipe(kv_rank=20, rope_dim=8), data=CALIBRATION_IDS)
    ids, _ = random_batch(model.config.vocab_size, 1, 40)
    report, native = _export_roundtrip(model, tmp_path)
    assert not report["exact"]
    assert any("query bias dropped" in a for a in report["approximations"])
    assert any("latent RMSNorm" in a for a in report["approximations"])
    assert (logits(native, ids) - logits(model, ids)).abs().max() > 1e-3


def test_deepseek_v3_export_needs_every_layer(tmp_path):
    from attnkit.convert.mla import export_deepseek_v3

    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    attnkit.apply(model, mla_recipe(kv_rank=20, rope_dim=8, layers=[0]), data=CALIBRATION_IDS)
    with pytest.raises(ValueError, match="needs every layer converted"):
        export_deepseek_v3(model, tmp_path / "ds")


def test_cli_convert_inspect_export(tmp_path):
    """`attnkit convert` with an MLA recipe file, `attnkit inspect` (MLA KV bytes), `attnkit export`."""
    import yaml
    from typer.testing import CliRunner

    from attnkit.cli import app

    recipe = tmp_path / "mla.yaml"
    recipe.write_text(yaml.safe_dump(mla_recipe(kv_rank=20, rope_dim=8, latent_norm=True,
                                                calibration_tokens=64, calibration_seq_len=64)))
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["convert", "--recipe", str(recipe), "--model", "tiny-llama", "--out",
                                 str(tmp_path / "ckpt"), "--no-eval"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "mla: 2 layers, latent rank 20 + rope key 8; KV cache 256 → 112 bytes/token" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "ckpt")], catch_exceptions=False)
    assert "KV cache: 224 bytes/token (float32: 2 MLA layers caching latent + rope key (28 values)" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ds")],
                           catch_exceptions=False)
    assert result.exit_code == 0 and "(exact)" in result.output, result.output
