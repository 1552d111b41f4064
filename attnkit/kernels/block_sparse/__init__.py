"""Block-sparse attention: ``reference.py`` (PyTorch, the spec) and backends of the same signature.

Dispatch (:func:`block_sparse_attention`): ``ATTNKIT_KERNELS`` = ``reference`` forces the reference, ``flex``
runs FlexAttention on the same mask; otherwise the fastest backend available for the inputs' device is used
(the Triton kernel on CUDA once it lands; the reference elsewhere).
"""

from __future__ import annotations

import os

import torch

from attnkit.kernels.block_mask import BlockMask
from attnkit.kernels.block_sparse import reference


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """The reference's signature, run by FlexAttention (GQA through ``enable_gqa``, no K/V copies).

    Rows that see no key come back as zeros, as in the reference (FlexAttention returns 0 for them too).
    """
    from torch.nn.attention.flex_attention import flex_attention

    flex_mask = block_mask.expand(q.shape[0], q.shape[1]).to_flex(key_padding_mask=key_padding_mask, causal=causal)
    return flex_attention(q, k, v, block_mask=flex_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.block_sparse.reference.block_sparse_attention` for shapes and semantics."""
    backend = os.environ.get("ATTNKIT_KERNELS", "auto")
    if backend == "flex":
        return flex_block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"ATTNKIT_KERNELS must be auto, reference, triton or flex; got {backend!r}")
    return reference.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
