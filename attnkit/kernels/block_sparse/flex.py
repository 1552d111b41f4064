"""Block-sparse attention run by FlexAttention: a second backend and a benchmark peer for the same BlockMask."""

from __future__ import annotations

import functools

import torch

from attnkit.kernels.block_mask import BlockMask


@functools.cache
def _compiled_flex():
    """FlexAttention is only fused (block lists honoured, no score matrix) when compiled; eager is the CPU spec."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    flex_mask=None,
) -> torch.Tensor:
    """The reference's signature and semantics (see ``reference.py``); GQA through ``enable_gqa``, no K/V copies.

    Rows that see no key come back as zeros, as in the reference. ``flex_mask``: a prebuilt
    ``BlockMask.to_flex()`` result (benchmarks build it once, outside the timed region).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if flex_mask is None:
        flex_mask = block_mask.expand(q.shape[0], q.shape[1]).to_flex(key_padding_mask=key_padding_mask, causal=causal)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    # Its fused kernel's tiles (128 by default) must divide the mask's blocks.
    bq, bk = block_mask.block_size
    options = {"BLOCK_M": min(bq, 128), "BLOCK_N": min(bk, 128)} if q.is_cuda and min(bq, bk) < 128 else None
    return fn(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)
