"""XAttention's strided antidiagonal block scoring in plain PyTorch: the definition of correct for faster backends.

Cut the query rows and the keys into tiles of ``stride`` tokens. The estimate of tile pair ``(n, m)`` is the sum
of the ``stride`` products on its antidiagonal, ``Σ_t q[n·s + s-1-t] · k[m·s + t]`` (``s`` = stride): one matmul of
reshaped inputs (each key tile's ``s`` vectors concatenated in order, each query tile's in reverse order). The
reduced logits are scaled by ``scale / stride``, soft-maxed per reduced query row over the key tiles it may see,
and summed over the reduced rows and key tiles of every (query block, key block).

Memory: the inputs are copied to fp32 once; the reduced logits are computed in chunks of query blocks whose fp32
``[B, Hq, rows, Sk / stride]`` matrix stays under ``chunk_bytes`` (default :data:`CHUNK_BYTES`).
"""

from __future__ import annotations

import torch

from attnkit.kernels.block_mask import num_blocks

CHUNK_BYTES = 256 * 2**20  # budget of one chunk's fp32 reduced logits [B, Hq, rows, Sk / stride]


def antidiagonal_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """XAttention's strided antidiagonal estimate of the attention mass of every (query block, key block).

    Args:
        query: ``[B, Hq, Sq, D]`` (post-RoPE; any float dtype, computed in fp32).
        key: ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0``, ``Sk >= Sq``; the queries are the last ``Sq`` positions.
            GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        block_size: query and key block size in tokens, a multiple of ``stride``.
        stride: antidiagonal stride ``s``: tiles of ``s × s`` tokens, one antidiagonal sampled per tile.
        scale: softmax scale, default ``D ** -0.5``; the reduced logits use ``scale / stride``.
        key_padding_mask: optional bool ``[B, Sk]``, True = real token; padding keys and padding query rows
            (``key_padding_mask[:, Sk - Sq:]`` False) contribute nothing.
        chunk_bytes: memory budget of one chunk of query blocks (default :data:`CHUNK_BYTES`); the result does not
            depend on it beyond fp32 rounding.

    Returns:
        float32 ``[B, Hq, QB, KB]``: per block, the sum over its reduced query rows of their softmax probabilities
        on its key tiles. A row of the result sums to the number of real reduced query rows of the query block;
        blocks holding no causally visible pair, or only padding keys, are exactly 0.

    Tiles and blocks are counted from query row 0 and key 0. Reduced query row ``n`` (query rows ``n·s`` to
    ``n·s + s-1``) sees key tile ``m`` iff the tile's first key is at or before the row's last query position
    (``m·s <= n·s + s-1 + Sk - Sq``), so a diagonal tile is scored with its whole antidiagonal. A reduced row with no
    real query row, and a key tile with no real key, get no score.
    """
    check_inputs(query, key, block_size, stride, key_padding_mask)
    batch, hq, sq, dim = query.shape
    hkv, sk = key.shape[1], key.shape[2]

    s, group, device = stride, hq // hkv, query.device
    offset = sk - sq
    per_block = block_size // s  # tiles per block
    qb, kb = num_blocks(sq, block_size), num_blocks(sk, block_size)
    nq, nk = qb * per_block, kb * per_block  # tiles, padded to whole blocks
    scale = dim**-0.5 if scale is None else scale

    # Padding and the tail past the sequence become zero vectors: they add nothing to any antidiagonal sum.
    q = query.float()
    k = key.float()
    kpm = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    if kpm is not None:
        k = k * kpm[:, None, :, None]
        q = q * kpm[:, None, offset:, None]
    q = torch.nn.functional.pad(q, (0, 0, 0, nq * s - sq))
    k = torch.nn.functional.pad(k, (0, 0, 0, nk * s - sk))
    # Key tile m: k[m·s], ..., k[m·s + s-1] concatenated; query tile n: the same in reverse order.
    rk = k.reshape(batch, hkv, 1, nk, s * dim)
    rq = q.reshape(batch, hkv, group, nq, s, dim).flip(4).reshape(batch, hkv, group, nq, s * dim)

    # Which tiles hold anything: a reduced query row with a real query row, a key tile with a real key.
    rows_real = torch.arange(nq * s, device=device) < sq
    keys_real = torch.arange(nk * s, device=device) < sk
    if kpm is None:
        row_tile_real = rows_real.view(1, nq, s).any(-1)  # [1, nq]
        key_tile_real = keys_real.view(1, nk, s).any(-1)  # [1, nk]
    else:
        row_pad = torch.nn.functional.pad(kpm[:, offset:], (0, nq * s - sq))
        key_pad = torch.nn.functional.pad(kpm, (0, nk * s - sk))
        row_tile_real = (row_pad & rows_real).view(batch, nq, s).any(-1)
        key_tile_real = (key_pad & keys_real).view(batch, nk, s).any(-1)

    out = torch.zeros(batch, hq, qb, kb, dtype=torch.float32, device=device)
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    blocks_per_chunk = max(1, budget // max(1, batch * hq * per_block * nk * 4))
    tile_first_key = torch.arange(nk, device=device) * s
    for i0 in range(0, qb, blocks_per_chunk):
        i1 = min(qb, i0 + blocks_per_chunk)
        n0, n1 = i0 * per_block, i1 * per_block
        # Key blocks the chunk's last row can see: nothing right of them gets any score.
        last_pos = min(n1 * s, sq) - 1 + offset
        kb_chunk = last_pos // block_size + 1
        m1 = kb_chunk * per_block
        logits = torch.matmul(rq[:, :, :, n0:n1], rk[..., :m1, :].transpose(-1, -2)) * (scale / s)
        logits = logits.reshape(batch, hq, n1 - n0, m1)
        # Tile (n, m) is visible iff its first key is at or before its last query's position.
        row_last_pos = torch.arange(n0, n1, device=device) * s + s - 1 + offset
        allowed = tile_first_key[None, :m1] <= row_last_pos[:, None]  # [rows, m1]
        allowed = allowed[None] & key_tile_real[:, None, :m1]  # [B or 1, rows, m1]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.where(row_tile_real[:, None, n0:n1, None] & allowed[:, None], probs, 0.0)  # NaN rows → 0
        sums = probs.reshape(batch, hq, i1 - i0, per_block, kb_chunk, per_block).sum((3, 5))
        out[:, :, i0:i1, :kb_chunk] = sums
    return out


def check_inputs(
    query: torch.Tensor, key: torch.Tensor, block_size: int, stride: int, key_padding_mask: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` unless the arguments fit :func:`antidiagonal_block_scores` (shared by every backend)."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"expected query [B,Hq,Sq,D] and key [B,Hkv,Sk,D]; got {tuple(query.shape)}, {tuple(key.shape)}")
    batch, hq, sq, dim = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if key.shape[0] != batch or key.shape[3] != dim or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree (batch, head_dim or Hq % Hkv)")
    if sq > sk:
        raise ValueError(f"Sq ({sq}) > Sk ({sk}): the queries must be the last Sq of the Sk positions")
    if stride <= 0 or block_size <= 0 or block_size % stride:
        raise ValueError(f"stride ({stride}) must be a positive divisor of block_size ({block_size})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, sk):
        raise ValueError(f"key_padding_mask must be [B, Sk] = [{batch}, {sk}], got {tuple(key_padding_mask.shape)}")
