"""Block-sparse attention run by FlexAttention: a second backend and a benchmark peer for the same BlockMask."""

from __future__ import annotations

import torch

from attnkit.kernels.block_mask import BlockMask


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """The reference's signature and semantics (see ``reference.py``); GQA through ``enable_gqa``, no K/V copies.

    Rows that see no key come back as zeros, as in the reference.
    """
    from torch.nn.attention.flex_attention import flex_attention

    flex_mask = block_mask.expand(q.shape[0], q.shape[1]).to_flex(key_padding_mask=key_padding_mask, causal=causal)
    return flex_attention(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
