"""Sparse paged decode attention in plain PyTorch: the definition the Triton kernel is tested against.

One decode query per (batch row, query head) attends to a few pages of the KV cache. Pages are counted per row
from the row's first real token: with ``pad[b]`` leading padding slots (left padding), page ``j`` of row ``b``
holds the slots ``pad[b] + j·page_size`` … ``pad[b] + (j+1)·page_size - 1`` that are ``< S``, so a padded row
pages its tokens exactly as the same row without padding, and padding is never attended. The row's last page
(``last[b] = ceil((S - pad[b]) / page_size) - 1``, the one holding the current token) is always attended; the
listed pages add to it. Listed entries outside ``[0, last[b])`` are ignored, so fillers (``-1``, or whatever a
top-k returns past the valid pages) and a repeat of the last page cost nothing and change nothing.
"""

from __future__ import annotations

import torch


def check_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor, page_size: int, pad
) -> None:
    if query.dim() != 3 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"expected query [B, Hq, D] and key/value [B, Hkv, S, D] of one shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, d = query.shape
    hkv = key.shape[1]
    if key.shape[0] != b or key.shape[-1] != d or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree on batch, head_dim or heads")
    if pages.dim() != 3 or pages.shape[0] != b or pages.shape[1] not in (hq, hkv):
        raise ValueError(
            f"pages must be [B, Hq, K] (per query head) or [B, Hkv, K] (per GQA group), got {tuple(pages.shape)} "
            f"for Hq={hq}, Hkv={hkv}"
        )
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if pad is not None and tuple(pad.shape) != (b,):
        raise ValueError(f"pad must be [B] = [{b}], got {tuple(pad.shape)}")


def attended_tokens(pages: torch.Tensor, page_size: int, pad: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """``[B, H, S]`` bool: the slots each (row, head) of ``pages [B, H, K]`` attends (see the module docstring)."""
    b, h, _ = pages.shape
    device = pages.device
    pad = torch.zeros(b, dtype=torch.long, device=device) if pad is None else pad.to(device=device, dtype=torch.long)
    slots = torch.arange(seq_len, device=device)
    rel = slots[None, :] - pad[:, None]  # [B, S] position within the row's real tokens
    page_of_slot = torch.where(rel >= 0, rel // page_size, -1)
    last = (seq_len - pad + page_size - 1) // page_size - 1  # [B]
    num_pages = int(last.max().item()) + 1
    chosen = torch.zeros(b, h, num_pages + 1, dtype=torch.bool, device=device)  # the extra column takes fillers
    listed = pages.long()
    ok = (listed >= 0) & (listed < last.view(b, 1, 1))
    chosen.scatter_(2, torch.where(ok, listed, num_pages), True)
    chosen[torch.arange(b, device=device), :, last] = True
    chosen[..., num_pages] = False
    index = torch.where(page_of_slot >= 0, page_of_slot, num_pages)[:, None, :].expand(b, h, seq_len)
    return chosen.gather(2, index)


def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    pad: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one decode query per head over the listed pages plus the row's last page.

    Args:
        query: ``[B, Hq, D]``, the decode step's query (post-RoPE).
        key, value: ``[B, Hkv, S, D]``, the whole cache including the current token (views of a larger buffer are
            fine; GQA not expanded: query head ``h`` reads KV head ``h // (Hq / Hkv)``).
        pages: ``[B, Hq, K]`` page indices per query head, or ``[B, Hkv, K]`` per KV head (shared by the GQA
            group), integer; entries outside ``[0, last[b])`` are ignored, the last page is always attended.
            Listed pages must be distinct.
        page_size: tokens per page.
        pad: ``[B]`` leading padding slots per row (left padding), or None for none.
        scale: logit scale, default ``D ** -0.5``.
        seq_len: None (all ``S`` slots hold keys), or a one-element integer tensor on the keys' device: only the
            first ``seq_len`` slots hold keys (a fixed-capacity cache whose decode steps are replayed from a CUDA
            graph; this reference reads it back, the Triton kernel loads it).

    Returns:
        ``[B, Hq, D]`` in the query's dtype (softmax in fp32).
    """
    check_inputs(query, key, value, pages, page_size, pad)
    if seq_len is not None:
        filled = int(seq_len.reshape(-1)[0])
        if not 0 < filled <= key.shape[2]:
            raise ValueError(f"seq_len {filled} is outside the cache's {key.shape[2]} slots")
        key, value = key[:, :, :filled], value[:, :, :filled]
    b, hq, d = query.shape
    hkv, seq_len = key.shape[1], key.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    mask = attended_tokens(pages, page_size, pad, seq_len)  # [B, Hq or Hkv, S]
    mask = mask.view(b, hkv, group, seq_len) if pages.shape[1] == hq else mask.view(b, hkv, 1, seq_len)
    q = query.float().view(b, hkv, group, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, key.float()) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, value.float())
    return out.reshape(b, hq, d).to(query.dtype)
