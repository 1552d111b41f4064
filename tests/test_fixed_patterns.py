"""Fixed patterns: exact at keep-everything settings, sparse and correct otherwise, on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import attnkit
from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.sparsify.fixed import window_blocks
from tests.conftest import random_batch

# fp32 on CPU: the block-sparse reference (fp32 accumulate) vs SDPA differ by rounding only.
LOGIT_ATOL = 2e-5

KEEP_ALL = {
    "streaming_llm": {"sink": 4, "window": 10_000},
    "sliding_window": {"window": 10_000},
    "longformer": {"window": 10_000, "global_tokens": 2},
    "strided": {"window": 10_000, "stride": 32},
    "dilated": {"segments": [[10_000, 1]]},
    "bigbird": {"window": 10_000, "random_blocks": 2},
}
SPARSE = {
    "streaming_llm": {"sink": 16, "window": 32},
    "sliding_window": {"window": 32},
    "longformer": {"window": 32, "global_tokens": 16},
    "strided": {"window": 32, "stride": 64},
    "dilated": {"segments": [[64, 1], [128, 2]]},
    "bigbird": {"window": 32, "global_tokens": 16, "random_blocks": 1},
}


def recipe(method: str, params: dict, block_size: int = 16) -> dict:
    return {"attnkit": 1, "name": f"test-{method}", "steps": [{"method": method, "block_size": block_size, **params}]}


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", sorted(KEEP_ALL))
def test_keep_everything_reproduces_dense(tiny, method):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 3, 150, pad_lengths=[0, 7, 40])
    dense = logits(model, ids, mask)
    attnkit.apply(model, recipe(method, KEEP_ALL[method]))
    patched = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], dense[real], atol=LOGIT_ATOL, rtol=0)
    assert model.attnkit_stats.mean_density() == pytest.approx(1.0)
    attnkit.unpatch(model)
    assert torch.equal(logits(model, ids, mask), dense)


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_sparse_settings_are_sparse_and_change_logits(tiny, method):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 300)
    dense = logits(model, ids)
    attnkit.apply(model, recipe(method, SPARSE[method]))
    patched = logits(model, ids)
    density = model.attnkit_stats.mean_density()
    assert 0 < density < 0.8, density
    assert not torch.allclose(patched, dense, atol=1e-3)
    # The first block of queries sees only its own causal prefix, which every pattern keeps: unchanged.
    torch.testing.assert_close(patched[:, :16], dense[:, :16], atol=LOGIT_ATOL, rtol=0)


def test_window_blocks_cover_the_token_window():
    # Every (q, k) pair with 0 <= q - k < window must lie in a kept block (blocks are a superset).
    for q_len, kv_len, bs, window in [(97, 97, 16, 20), (40, 130, 32, 50), (1, 77, 16, 5)]:
        blocks = window_blocks(q_len, kv_len, bs, window)
        off = kv_len - q_len
        for r in range(q_len):
            for k in range(kv_len):
                if 0 <= r + off - k < window:
                    assert blocks[r // bs, k // bs], (q_len, kv_len, r, k)
        # and no block that holds no such pair
        vis = causal_block_matrix(q_len, kv_len, (bs, bs))
        assert not (blocks & ~vis).any()


def test_streaming_pattern_semantics():
    m = attnkit.registry.get_method("streaming_llm")(sink=16, window=32, block_size=16)
    blocks = m.pattern(128, 128, 1, 0, "cpu")[0] & causal_block_matrix(128, 128, (16, 16))
    # query block 7 (positions 112..127): sink block 0 + blocks within 32 tokens (5, 6, 7)
    assert torch.nonzero(blocks[7]).flatten().tolist() == [0, 5, 6, 7]


def test_chunked_prefill_matches_one_shot(tiny):
    """Prefill in two chunks through the cache (Sq < Sk) equals a one-shot prefill, with sparsity on.

    The split is block-aligned (128 = 8 blocks of 16): query blocks tile each chunk from its first row, so only an
    aligned split selects the same blocks as the one-shot prefill.
    """
    model, _ = tiny
    attnkit.apply(model, recipe("streaming_llm", {"sink": 16, "window": 48, "evict": False}))
    ids, _ = random_batch(model.config.vocab_size, 2, 200)
    one_shot = logits(model, ids)
    cache = DynamicCache()
    with torch.no_grad():
        first = model(input_ids=ids[:, :128], past_key_values=cache, use_cache=True).logits
        second = model(input_ids=ids[:, 128:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), one_shot, atol=LOGIT_ATOL, rtol=0)


def test_min_seq_len_falls_back_to_dense(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 100)
    dense = logits(model, ids)
    attnkit.apply(model, recipe("sliding_window", {"window": 16, "min_seq_len": 101}))
    torch.testing.assert_close(logits(model, ids), dense, atol=LOGIT_ATOL, rtol=0)
    assert all(s["dense_fallback"] for s in model.attnkit_stats.per_layer().values())


def test_layers_selector_patches_only_those_layers(tiny):
    model, _ = tiny
    attnkit.apply(model, recipe("sliding_window", {"window": 16, "layers": [-1]}))
    last = model.config.num_hidden_layers - 1
    assert set(model.attnkit_state.layer_methods) == {last}
    assert model.attnkit_stats.per_layer() == {}  # nothing ran yet
    logits(model, random_batch(model.config.vocab_size, 1, 64)[0])
    assert set(model.attnkit_stats.per_layer()) == {last}
