"""Block-max-pooled softmax attention in plain PyTorch: SeerAttention's distillation target, and its definition.

For every query row ``r`` the true softmax attention ``p[r, t]`` over the keys ``t`` the row may see (causally
visible and not padding) is taken; then, for each (query block ``i``, key block ``j``), the largest ``p[r, t]`` over
the real rows ``r`` of query block ``i`` and the keys ``t`` of key block ``j``; finally each query-block row is
divided by its sum::

    pooled[b, h, i, j] = P[i, j] / Σ_j' P[i, j'],   P[i, j] = max_{r ∈ block i, real} max_{t ∈ block j} p[b, h, r, t]

This is the ground truth of SeerAttention (Gao et al. 2024): its training kernel keeps each row's running max of the
scaled scores per key block, turns it into the softmax probability with the row's final max and sum, max-pools it
over the block's rows (a 2D max pool of the attention map) and divides every pooled row by its sum. A learned gate
(:mod:`attnkit.sparsify.seer`) is trained to predict this distribution with a softmax over key blocks.

Conventions (those of :mod:`attnkit.kernels.block_mask`): the ``Sq`` queries are the last ``Sq`` of the ``Sk``
positions (row ``r`` sits at position ``r + Sk - Sq`` and, when causal, sees key ``t`` iff ``t <= r + Sk - Sq``);
query blocks tile the rows from row 0, key blocks the keys from key 0. ``key_padding_mask [B, Sk]`` (True = real
token) removes padding keys, and a query row is real iff its own position is a real token; padding rows take part
in nothing. GQA-native: query head ``h`` reads KV head ``h // (Hq // Hkv)``.

Two passes per chunk of whole query blocks: first each row's max and sum of ``exp`` (its softmax normaliser), then
the per-key-block maxima of the scores, which the normaliser turns into probabilities (``exp`` is monotone, so the
block max of the probabilities is ``exp(block max of scores - row max) / row sum``). Chunks are sized so that one
chunk's fp32 scores stay under ``chunk_bytes``; nothing of size ``Sq × Sk`` is ever held. Causal chunks score only
the keys their last row can see.
"""

from __future__ import annotations

import torch

from attnkit.kernels.block_mask import num_blocks

CHUNK_BYTES = 256 * 2**20  # fp32 scores of one chunk of query rows


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """The row-normalised block-max-pooled softmax attention map (SeerAttention's gate target).

    Args:
        q: ``[B, Hq, Sq, D]`` queries, post-RoPE (any float dtype; scores are computed in fp32).
        k: ``[B, Hkv, Sk, D]`` keys, post-RoPE, ``Hq % Hkv == 0``, ``Sk >= Sq``; the queries are the last ``Sq``.
        block_size: rows per query block and keys per key block.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Sk]``, True = real token. Padding keys get no attention; padding
            query rows (``key_padding_mask[:, Sk - Sq:]`` False) are left out of the block maxima.
        causal: row ``r`` sees key ``t`` iff ``t <= r + Sk - Sq``. False: every non-padding key.
        chunk_bytes: budget of one chunk's fp32 scores ``[B, Hq, rows, Sk]`` (default :data:`CHUNK_BYTES`); the
            result does not depend on it.

    Returns:
        float32 ``[B, Hq, QB, KB]`` (``QB = ceil(Sq / bs)``, ``KB = ceil(Sk / bs)``). Each row ``[b, h, i, :]`` sums
        to 1, or is all 0 when query block ``i`` holds no real row that sees a key. Blocks holding no visible
        (query, key) pair are exactly 0.
    """
    batch, hq, sq, dim = _check_shapes(q, k, block_size, key_padding_mask)
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    bs = block_size
    qb, kb = num_blocks(sq, bs), num_blocks(sk, bs)
    scale = dim**-0.5 if scale is None else scale
    offset = sk - sq
    device = q.device

    kpm = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    kf = k.float()
    key_pos = torch.arange(sk, device=device)
    out = torch.zeros(batch, hkv, group, qb, kb, dtype=torch.float32, device=device)

    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows_per_chunk = max(bs, budget // max(1, 4 * batch * hq * sk) // bs * bs)  # whole query blocks per chunk
    for start in range(0, sq, rows_per_chunk):
        stop = min(sq, start + rows_per_chunk)
        n = stop - start
        rows = torch.arange(start, stop, device=device)
        width = min(sk, stop + offset) if causal else sk
        qc = (q[:, :, start:stop].float() * scale).reshape(batch, hkv, group, n, dim)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf[:, :, :width])  # [B, Hkv, G, n, width]
        if kpm is not None:
            scores.masked_fill_(~kpm[:, None, None, None, :width], float("-inf"))
        if causal:  # keys before the chunk's first position are visible to all its rows: mask only the rest
            first = min(width, start + offset)
            hidden = key_pos[first:width] > rows[:, None] + offset  # [n, width - first]
            scores[..., first:].masked_fill_(hidden, float("-inf"))

        # Pass 1: each row's softmax normaliser (its max, from the key-block maxima, then Σ exp(s - max)).
        block_max = _key_block_max(scores, bs)  # [B, Hkv, G, n, ceil(width / bs)]
        row_max = block_max.amax(-1, keepdim=True)
        row_max.masked_fill_(row_max == float("-inf"), 0.0)  # a row that sees no key: every exp is 0
        row_sum = scores.sub_(row_max).exp_().sum(-1, keepdim=True)
        # Pass 2: the block maxima of the scores → the block maxima of the probabilities (exp is monotone).
        del scores
        probs = (block_max - row_max).exp_() / row_sum.clamp_min(1.0)  # Σ >= 1 wherever a key is seen
        probs.masked_fill_(row_sum == 0, 0.0)
        if kpm is not None:  # padding rows take no part in the block maxima
            probs.mul_(kpm[:, None, None, offset + start : offset + stop, None])
        # Max over the rows of each query block (the chunk starts on a block boundary).
        nqb = num_blocks(n, bs)
        probs = torch.nn.functional.pad(probs, (0, 0, 0, nqb * bs - n))
        pooled = probs.unflatten(3, (nqb, bs)).amax(4)  # [B, Hkv, G, nqb, ceil(width / bs)]
        block0 = start // bs
        out[:, :, :, block0 : block0 + nqb, : pooled.shape[-1]] = pooled

    out = out.view(batch, hq, qb, kb)
    return normalize_rows(out)


def _key_block_max(x: torch.Tensor, bs: int) -> torch.Tensor:
    """``x [..., S]`` → ``[..., ceil(S / bs)]``: maxima over consecutive runs of ``bs`` (the last one may be short)."""
    s = x.shape[-1]
    full = s // bs
    parts = []
    if full:
        parts.append(x[..., : full * bs].unflatten(-1, (full, bs)).amax(-1))
    if s % bs:
        parts.append(x[..., full * bs :].amax(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def normalize_rows(pooled: torch.Tensor) -> torch.Tensor:
    """Divide each ``[..., i, :]`` row by its sum, in place; all-zero rows stay 0."""
    total = pooled.sum(-1, keepdim=True)
    return pooled.div_(torch.where(total > 0, total, 1.0))


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, block_size: int, key_padding_mask: torch.Tensor | None
) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B,Hq,Sq,D] and k [B,Hkv,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, hq, sq, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, head_dim, or Hq % Hkv != 0)")
    if sq > k.shape[2]:
        raise ValueError(f"Sq ({sq}) > Sk ({k.shape[2]}): the queries must be the last Sq of the Sk positions")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, k.shape[2]):
        raise ValueError(f"key_padding_mask must be [B, Sk] = [{batch}, {k.shape[2]}], got {tuple(key_padding_mask.shape)}")
    return batch, hq, sq, dim
