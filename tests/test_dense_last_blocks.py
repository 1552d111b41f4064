"""`dense_last_blocks`, shared by every prefill method: the last query blocks see every key, exactly."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.attention import attnkit_layers, dense_attention

SPARSE = {
    "xattention": {"stride": 4, "threshold": 0.3},
    "minference": {"last_q": 16, "vertical": 8, "slash": 8},
    "flexprefill": {"gamma": 0.5, "min_budget": 16},
    "streaming_llm": {"sink": 16, "window": 32},
}


@pytest.mark.parametrize("method", list(SPARSE))
def test_last_query_blocks_equal_dense_and_the_rest_stays_sparse(tiny, method):
    model, _ = tiny
    step = {"method": method, "block_size": 16, "dense_last_blocks": 2, **SPARSE[method]}
    attnkit.apply(model, {"attnkit": 1, "name": "t", "steps": [step]})
    layer = next(attnkit_layers(model))
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 150, d, generator=g) for h in (hq, hkv, hkv))
    pad = torch.ones(2, 150, dtype=torch.bool)
    pad[1, :9] = False  # left padding in row 1
    out = layer(q, k, v, pad, None)
    want = dense_attention(q, k, v, pad, None)
    # 150 tokens in 16-token blocks: query blocks 8 and 9 (rows 128..149) see every key, so they equal dense
    torch.testing.assert_close(out[:, :, 128:], want[:, :, 128:], atol=1e-5, rtol=0)
    assert not torch.allclose(out[1, :, 16:128], want[1, :, 16:128], atol=1e-3), (
        "the other rows should be sparse"
    )
    block_mask = layer.stats["block_mask"]
    blocks = getattr(
        block_mask, "block_mask", block_mask
    )  # MInference: the block part of its vertical-slash mask
    assert (
        blocks.to_dense()[..., -2:, :].sum()
        == blocks.causal_blocks()[-2:].sum() * blocks.shape[0] * blocks.shape[1]
    )


def test_default_is_off_and_negative_is_rejected():
    from pydantic import ValidationError

    from attnkit.registry import get_method

    assert get_method("xattention")().dense_last_blocks == 0
    with pytest.raises(ValidationError, match="dense_last_blocks"):
        get_method("minference")(dense_last_blocks=-1)
