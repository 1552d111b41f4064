"""The sink + window decode cache: bounded memory under generate, exact when nothing is evicted."""

from __future__ import annotations

import torch

import attnkit
from attnkit.cache import SinkWindowLayer
from tests.conftest import random_batch


def streaming(sink: int, window: int, evict: bool = True) -> dict:
    return {
        "attnkit": 1,
        "name": "test-streaming",
        "steps": [{"method": "streaming_llm", "sink": sink, "window": window, "block_size": 16, "evict": evict}],
    }


def test_generation_stays_within_its_memory_bound(tiny):
    model, _ = tiny
    sink, window, prompt, new = 4, 24, 20, 60  # generates past 2x the window
    attnkit.apply(model, streaming(sink, window))
    cache = attnkit.make_cache(model)
    assert isinstance(cache.layers[0], SinkWindowLayer)
    ids, _ = random_batch(model.config.vocab_size, 2, prompt)
    stored = []
    # Decode step by step to observe the cache after every token.
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            stored.append(max(layer.stored_tokens() for layer in cache.layers))
            assert cache.layers[0].keys.shape[-2] == stored[-1]
    assert max(stored) == sink + window - 1
    assert cache.get_seq_length() == prompt + new  # positions keep counting after eviction
    assert all(s <= sink + window - 1 for s in stored)


def test_generate_with_streaming_cache(tiny):
    model, _ = tiny
    attnkit.apply(model, streaming(4, 16))
    ids, mask = random_batch(model.config.vocab_size, 2, 30, pad_lengths=[0, 5])
    cache = attnkit.make_cache(model)
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, do_sample=False)
    assert out.shape == (2, 70)
    assert max(layer.stored_tokens() for layer in cache.layers) == 4 + 16 - 1


def test_no_eviction_matches_dense_generation(tiny):
    """With sink + window ≥ everything, generate with the evicting cache equals dense generate, padded batch."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 30, pad_lengths=[0, 6])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    dense = model.generate(**kwargs)
    attnkit.apply(model, streaming(4, 1000))
    patched = model.generate(**kwargs, past_key_values=attnkit.make_cache(model))
    assert torch.equal(patched, dense)


def test_evicting_decode_matches_a_token_level_oracle(tiny):
    """After eviction, one decode step equals dense attention restricted to sink + recent tokens (via a 4D mask)."""
    model, _ = tiny
    sink, window = 3, 8
    ids, _ = random_batch(model.config.vocab_size, 1, 40)
    # Oracle: full forward with an explicit 4D mask where the last token sees only sink + window tokens.
    n = ids.shape[1]
    attnkit.apply(model, streaming(sink, window))
    cache = attnkit.make_cache(model)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    attnkit.unpatch(model)
    # The prefill of the first n-1 tokens was itself block-sparse (sink + window at block granularity), so the
    # oracle replays that pattern for the earlier rows and, for the last row, keeps sink + the last window keys,
    # all through eager attention with an explicit 4D mask.
    model.set_attn_implementation("eager")
    mask4d = torch.ones(n, n).tril().bool()
    mask4d[-1] = False
    mask4d[-1, :sink] = True
    mask4d[-1, n - window :] = True
    # Earlier rows: the streaming prefill pattern at block 16 over 39 tokens with sink 3, window 8.
    method = attnkit.registry.get_method("streaming_llm")(sink=sink, window=window, block_size=16)
    blocks = method.pattern(n - 1, n - 1, 1, 0, "cpu")[0]
    rows = torch.arange(n - 1)
    prefix = blocks[rows // 16][:, rows // 16] & torch.ones(n - 1, n - 1).tril().bool()
    mask4d[: n - 1, : n - 1] = prefix
    bias = torch.zeros(1, 1, n, n).masked_fill(~mask4d, float("-inf"))
    with torch.no_grad():
        oracle = model(input_ids=ids, attention_mask=bias).logits[:, -1]
    torch.testing.assert_close(step, oracle, atol=2e-5, rtol=0)


def test_no_decode_cache_without_a_decode_method(tiny):
    model, _ = tiny
    attnkit.apply(model, streaming(4, 16, evict=False))
    assert attnkit.make_cache(model) is None


def test_dense_mode_generates_with_a_full_cache(tiny):
    """Inside attnkit.dense(model) the dense comparison must not use the evicting cache."""
    model, _ = tiny
    attnkit.apply(model, streaming(4, 16))
    assert attnkit.make_cache(model) is not None
    with attnkit.dense(model):
        assert attnkit.make_cache(model) is None
    attnkit.unpatch(model)
    assert attnkit.make_cache(model) is None


def test_evicting_decode_with_a_4d_mask(tiny):
    """A model-provided 4D mask (the dense fallback path) is mapped onto the evicted keys like a padding mask."""
    model, _ = tiny
    attnkit.apply(model, streaming(3, 8))
    ids, _ = random_batch(model.config.vocab_size, 1, 40)
    steps = []
    for mask in (None, torch.ones(1, 1, 1, 40, dtype=torch.bool)):
        cache = attnkit.make_cache(model)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
            steps.append(model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(steps[1], steps[0], atol=2e-5, rtol=0)
