"""Block attention mass in plain PyTorch: the definition of "where the attention really goes", per block.

For every query row the true softmax attention (over all keys the row may see: causally visible and not
padding) is summed over the keys of each key block; those per-row block masses are then averaged over the real
query rows of each query block. The result ``mass [B, Hq, QB, KB]`` therefore has rows that sum to 1 (0 for a
query block without real rows), and ``(mass * blocks).sum(-1)`` is the mean fraction of attention that a set of
computed blocks captures — the recall of a block-sparse method, and the target a learned selector is trained on.

Conventions (the same as :mod:`attnkit.kernels.block_mask` and the block-sparse kernels):

- the ``Sq`` queries are the last ``Sq`` of the ``Sk`` positions: query row ``r`` sits at position
  ``r + Sk - Sq`` and, when causal, may see key ``j`` iff ``j <= r + Sk - Sq``;
- query blocks tile the query rows from row 0, key blocks tile the keys from key 0 (the last ones may be short);
- ``key_padding_mask [B, Sk]`` (True = real token) removes padding keys, and a query row is *real* iff its own
  position is a real token. Padding rows carry no mass and do not count in the average.

GQA-native: query head ``h`` reads KV head ``h // (Hq // Hkv)``; K is never expanded. Memory: query rows are
processed in chunks whose fp32 score matrix stays under ``chunk_bytes`` (default :data:`CHUNK_BYTES`, 256 MB),
and in causal mode each chunk only scores the keys its last row can see. Nothing of size ``Sq × Sk`` is held.
"""

from __future__ import annotations

import torch

from attnkit.kernels.block_mask import num_blocks

CHUNK_BYTES = 256 * 2**20  # fp32 scores per chunk of query rows


def _pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if bq <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got {block_size}")
    return int(bq), int(bk)


def query_block_rows(
    q_len: int,
    kv_len: int,
    block_size: int | tuple[int, int],
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """How many real query rows each query block holds: float32 ``[B, QB]`` (``[1, QB]`` without padding).

    The weights that turn :func:`block_attention_mass`'s per-block averages back into a mean over query rows.
    ``key_padding_mask``: optional bool ``[B, kv_len]``; query row ``r`` is real iff ``key_padding_mask[b, r +
    kv_len - q_len]``.
    """
    bq, _ = _pair(block_size)
    qb = num_blocks(q_len, bq)
    if key_padding_mask is None:
        sizes = torch.clamp(q_len - torch.arange(qb, device=device) * bq, max=bq)
        return sizes.to(torch.float32)[None]
    real = key_padding_mask[:, kv_len - q_len :].to(torch.float32)
    counts = torch.zeros(real.shape[0], qb, dtype=torch.float32, device=real.device)
    return counts.index_add_(1, torch.arange(q_len, device=real.device) // bq, real)


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int | tuple[int, int],
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Softmax attention mass per (query block, key block), averaged over each query block's real rows.

    ``mass[b, h, i, j] = mean over real rows r of query block i of  sum over keys t in key block j of
    softmax_t(scale · q[b, h, r] · k[b, h // G, t])``, the softmax taken over every key row ``r`` may see.

    Args:
        q: ``[B, Hq, Sq, D]`` queries (any float dtype; scores are computed in fp32).
        k: ``[B, Hkv, Sk, D]`` keys, ``Hq % Hkv == 0``, ``Sk >= Sq``; the queries are the last ``Sq`` positions.
        block_size: ``bs`` or ``(bq, bk)`` in tokens: query rows per query block, keys per key block.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Sk]``, True = real token. Padding keys get no attention; padding
            query rows (``key_padding_mask[:, Sk - Sq:]`` False) are left out of the average.
        causal: row ``r`` sees key ``j`` iff ``j <= r + Sk - Sq``. False: every (non-padding) key.
        chunk_bytes: budget for one chunk's fp32 scores ``[B, Hq, rows, Sk]``; default :data:`CHUNK_BYTES`.
            Only memory and speed depend on it, never the result (beyond fp32 rounding).

    Returns:
        float32 ``[B, Hq, QB, KB]`` with ``QB = ceil(Sq / bq)``, ``KB = ceil(Sk / bk)``. Each ``[b, h, i, :]``
        sums to 1, or is all 0 when query block ``i`` of batch row ``b`` holds no real row. Entries of blocks
        that hold no causally visible pair are exactly 0.
    """
    batch, hq, sq, dim = _check_shapes(q, k, key_padding_mask)
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    bq, bk = _pair(block_size)
    qb, kb = num_blocks(sq, bq), num_blocks(sk, bk)
    scale = dim**-0.5 if scale is None else scale
    offset = sk - sq
    device = q.device

    kpm = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    real_rows = None if kpm is None else kpm[:, offset:].to(torch.float32)  # [B, Sq]
    kf = k.float()  # [B, Hkv, Sk, D]
    key_pos = torch.arange(sk, device=device)
    acc = torch.zeros(batch, hkv, group, qb, kb, dtype=torch.float32, device=device)

    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows_per_chunk = max(1, budget // max(1, 4 * batch * hq * sk))
    for start in range(0, sq, rows_per_chunk):
        stop = min(sq, start + rows_per_chunk)
        n = stop - start
        rows = torch.arange(start, stop, device=device)
        # Causal: keys after the chunk's last position are invisible to all its rows; skip scoring them.
        width = min(sk, stop + offset) if causal else sk
        qc = (q[:, :, start:stop].float() * scale).reshape(batch, hkv, group, n, dim)
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf[:, :, :width])  # [B, Hkv, G, n, width]
        allowed = None  # [B or 1, n or 1, width] → broadcast over heads
        if causal:
            allowed = (key_pos[:width] <= rows[:, None] + offset)[None]
        if kpm is not None:
            pad = kpm[:, None, :width]
            allowed = pad if allowed is None else allowed & pad
        if allowed is not None:
            scores.masked_fill_(~allowed[:, None, None], float("-inf"))
        # Softmax in place, normalised after the block sums (sums are linear): exp(s - max) / Σ exp(s - max).
        row_max = scores.amax(-1, keepdim=True)
        row_max.masked_fill_(row_max == float("-inf"), 0.0)  # rows that see no key: all exp(-inf) = 0
        scores.sub_(row_max).exp_()
        sums = _key_block_sums(scores, bk)  # [B, Hkv, G, n, ceil(width / bk)]
        del scores
        # A row that sees a key has Σ ≥ 1 (its max term is exp(0) = 1); a row that sees none has 0 → stays 0.
        sums.div_(sums.sum(-1, keepdim=True).clamp_min_(1.0))
        if real_rows is not None:
            sums.mul_(real_rows[:, None, None, start:stop, None])
        acc[..., : sums.shape[-1]].index_add_(3, rows // bq, sums)

    counts = query_block_rows(sq, sk, (bq, bk), kpm, device)  # [B or 1, QB]
    acc.div_(counts.clamp_min(1.0)[:, None, None, :, None])
    return acc.view(batch, hq, qb, kb)


def _key_block_sums(x: torch.Tensor, bk: int) -> torch.Tensor:
    """``x [..., S]`` → ``[..., ceil(S / bk)]``: sums over consecutive runs of ``bk`` (the last one may be short)."""
    s = x.shape[-1]
    full = s // bk
    parts = []
    if full:
        parts.append(x[..., : full * bk].unflatten(-1, (full, bk)).sum(-1))
    if s % bk:
        parts.append(x[..., full * bk :].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> tuple[int, ...]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B,Hq,Sq,D] and k [B,Hkv,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, hq, sq, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, head_dim, or Hq % Hkv != 0)")
    if sq > k.shape[2]:
        raise ValueError(f"Sq ({sq}) > Sk ({k.shape[2]}): the queries must be the last Sq of the Sk positions")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, k.shape[2]):
        raise ValueError(f"key_padding_mask must be [B, Sk] = [{batch}, {k.shape[2]}], got {tuple(key_padding_mask.shape)}")
    return batch, hq, sq, dim


def column_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """True attention mass per (query block, key column): fp32 ``[B, Hq, QB, Sk]``, summed over the block's rows.

    Row ``r`` (position ``r + Sk - Sq``) has softmax attention over its causally visible, real keys; a query
    block's entry is the sum of its real rows' attention. Chunked over query blocks (``chunk_bytes`` of fp32
    scores per chunk), so no ``Sq × Sk`` matrix is held. GQA-native.
    """
    batch, hq, sq, dim = _check_shapes(query, key, key_padding_mask)
    hkv, sk = key.shape[1], key.shape[2]
    group, offset = hq // hkv, sk - sq
    qb = num_blocks(sq, block_size)
    kf = key.float()
    out = torch.zeros(batch, hq, qb, sk, dtype=torch.float32, device=query.device)
    blocks_per_chunk = max(1, chunk_bytes // max(1, batch * hq * block_size * sk * 4))
    keys = torch.arange(sk, device=query.device)
    for i0 in range(0, qb, blocks_per_chunk):
        i1 = min(qb, i0 + blocks_per_chunk)
        r0, r1 = i0 * block_size, min(sq, i1 * block_size)
        q = query[:, :, r0:r1].float().reshape(batch, hkv, group, r1 - r0, dim)
        logits = torch.einsum("bhgrd,bhkd->bhgrk", q, kf).reshape(batch, hq, r1 - r0, sk) * scale
        allowed = keys[None, :] <= (torch.arange(r0, r1, device=query.device) + offset)[:, None]
        allowed = allowed[None, None]
        if key_padding_mask is not None:
            kpm = key_padding_mask.bool()
            allowed = allowed & kpm[:, None, None, :] & kpm[:, None, offset + r0 : offset + r1, None]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        pad = (i1 - i0) * block_size - (r1 - r0)
        probs = torch.nn.functional.pad(probs, (0, 0, 0, pad))
        out[:, :, i0:i1] = probs.reshape(batch, hq, i1 - i0, block_size, sk).sum(3)
    return out
