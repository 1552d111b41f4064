"""Whole models on the GPU through the Triton kernel: bf16, GQA, left padding, strided q/k/v from transformers.

Skipped without CUDA (CI has none); run on the GPU machine with ``pytest -m gpu``. The CPU suite checks the same
properties with the reference kernel in fp32 (test_fixed_patterns.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnkit
from tests.conftest import random_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def smollm2_shaped() -> LlamaForCausalLM:
    """Random weights in SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64), 2 layers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260, hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=4096, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def models():
    yield "smollm2-shaped", smollm2_shaped()
    for name in ("tiny-llama", "tiny-qwen2"):
        yield name, attnkit.load_model(name, dtype="float32", device="cpu")[0]


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("name", ["smollm2-shaped", "tiny-llama", "tiny-qwen2"])
def test_keep_everything_matches_dense_in_bf16(name, monkeypatch):
    monkeypatch.setenv("ATTNKIT_KERNELS", "triton")  # fail rather than fall back to the reference
    model = dict(models())[name]
    ids, mask = random_batch(model.config.vocab_size, 3, 700, pad_lengths=[0, 9, 300])
    ids, mask = ids.cuda(), mask.cuda()
    exact = logits(model.cuda(), ids, mask)  # fp32 dense: the truth
    model = model.to(torch.bfloat16)
    dense = logits(model, ids, mask)
    attnkit.apply(model, {"attnkit": 1, "name": "keep", "steps": [{"method": "sliding_window", "window": 10_000}]})
    patched = logits(model, ids, mask)
    real = mask.bool()
    err_dense = (dense - exact)[real].abs().max()
    err_patched = (patched - exact)[real].abs().max()
    assert err_patched <= 2 * err_dense + 1e-3, (float(err_patched), float(err_dense))


@pytest.mark.parametrize("name", ["smollm2-shaped", "tiny-qwen2"])
def test_sparse_triton_matches_reference_in_a_model(name, monkeypatch):
    model = dict(models())[name].cuda().to(torch.bfloat16)
    ids, mask = random_batch(model.config.vocab_size, 2, 1000, pad_lengths=[0, 130])
    ids, mask = ids.cuda(), mask.cuda()
    attnkit.apply(model, {"attnkit": 1, "name": "s", "steps": [{"method": "streaming_llm", "sink": 64, "window": 256}]})
    monkeypatch.setenv("ATTNKIT_KERNELS", "reference")
    ref = logits(model, ids, mask)
    monkeypatch.setenv("ATTNKIT_KERNELS", "triton")
    tri = logits(model, ids, mask)
    assert 0 < model.attnkit_stats.mean_density() < 0.7
    real = mask.bool()
    rel = (tri - ref)[real].norm() / ref[real].norm()
    assert rel < 2e-2, float(rel)


def test_bench_on_cuda_reports_memory_and_times():
    """attnkit bench's CUDA path: event timings, peak memory, the Triton kernel inside a patched prefill."""
    from attnkit.eval.speed import bench_model, compare_speed

    model = smollm2_shaped().cuda().to(torch.bfloat16)
    attnkit.apply(model, {"attnkit": 1, "name": "s", "steps": [{"method": "streaming_llm", "sink": 64, "window": 256}]})
    rows = bench_model(model, [1024, 2048], new_tokens=4, repeats=2, show_progress=False)
    assert [r.mode for r in rows] == ["dense", "patched"] * 2
    for r in rows:
        assert r.device == "cuda" and r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.peak_memory_mb > 0
    (c1, c2) = compare_speed(rows)
    assert 0 < c2.density < c1.density < 1 and c2.kv_ratio < 1
