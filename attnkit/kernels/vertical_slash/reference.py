"""Vertical-slash attention in plain PyTorch: the definition of correct for every faster backend.

Computes, for each query row, softmax attention over the union of (a) the keys in the key blocks listed for the
row's query block and (b) the listed vertical key columns, restricted to keys that are causally visible
(``key <= row + Sk - Sq``) and not padding. The union is a set: a column inside a listed block counts once. Scores
are accumulated in fp32. Rows that see no key at all produce zeros (never NaN).

Memory: the query rows are processed in chunks so that one chunk's score matrix stays under ~256 MB; nothing of
size ``Sq × Sk`` is held for the whole input.
"""

from __future__ import annotations

import torch

from attnkit.kernels.vertical_slash.mask import VerticalSlashMask

_CHUNK_BYTES = 256 * 2**20


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: VerticalSlashMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention restricted to ``mask``'s key blocks and key columns (always causal).

    Args:
        q: ``[B, Hq, Sq, D]`` queries; ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` reads KV head
            ``h // (Hq // Hkv)``; K/V are never expanded).
        k, v: ``[B, Hkv, Sk, D]`` keys and values, ``Sk >= Sq``; the queries are the last ``Sq`` positions.
        mask: :class:`VerticalSlashMask` with ``B`` in {1, B}, ``H`` in {1, Hq}, ``q_len == Sq``, ``kv_len == Sk``.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: optional bool ``[B, Sk]``, True = real token, False = padding (never attended).

    Returns:
        ``[B, Hq, Sq, D]`` in ``q.dtype``.
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    check_shapes(q, k, v, mask, key_padding_mask)
    group = hq // hkv
    scale = dim**-0.5 if scale is None else scale
    bq, bk = mask.block_size
    offset = sk - sq
    qb_kb = mask.block_mask.shape[2:]

    blocks = mask.block_mask.to_dense().expand(batch, hq, -1, -1).reshape(batch, hkv, group, *qb_kb)
    columns = mask.column_dense().expand(batch, hq, -1).reshape(batch, hkv, group, 1, sk)
    key_block = torch.arange(sk, device=q.device) // bk
    key_pos = torch.arange(sk, device=q.device)

    qf = q.float().view(batch, hkv, group, sq, dim)
    kf, vf = k.float(), v.float()
    out = torch.empty(batch, hkv, group, sq, dim, dtype=torch.float32, device=q.device)

    rows_per_chunk = max(bq, _CHUNK_BYTES // max(1, 4 * batch * hq * sk) // bq * bq)
    for start in range(0, sq, rows_per_chunk):
        stop = min(sq, start + rows_per_chunk)
        rows = torch.arange(start, stop, device=q.device)
        # [B, Hkv, G, rows, Sk]: the listed blocks expanded to tokens, or'ed with the columns (a set: no double count).
        allowed = blocks[:, :, :, rows // bq][..., key_block] | columns
        allowed = allowed & (key_pos[None, :] <= rows[:, None] + offset)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, None, :].bool()
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qf[:, :, :, start:stop], kf) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(-1, keepdim=True)
        probs = torch.softmax(torch.where(seen, scores, 0.0), dim=-1) * allowed
        out[:, :, :, start:stop] = torch.einsum("bhgqk,bhkd->bhgqd", probs, vf)
    return out.view(batch, hq, sq, dim).to(q.dtype)


def check_shapes(q, k, v, mask: VerticalSlashMask, key_padding_mask) -> None:
    """Raise a ``ValueError`` naming the mismatch if the inputs and ``mask`` do not fit together."""
    if not isinstance(mask, VerticalSlashMask):
        raise TypeError(f"mask must be a VerticalSlashMask, got {type(mask).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B,Hq,Sq,D] and k, v [B,Hkv,Sk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, hq, sq, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, head_dim, or Hq % Hkv != 0)")
    if (mask.q_len, mask.kv_len) != (sq, k.shape[2]):
        raise ValueError(f"mask is for (Sq, Sk) = ({mask.q_len}, {mask.kv_len}), inputs are ({sq}, {k.shape[2]})")
    for part, (mb, mh) in (("block_mask", mask.block_mask.shape[:2]), ("columns", tuple(mask.columns.shape[:2]))):
        if mb not in (1, batch) or mh not in (1, hq):
            raise ValueError(f"mask {part} batch/heads ({mb}, {mh}) must be 1 or match ({batch}, {hq})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be [B, Sk] = [{batch}, {k.shape[2]}], got {tuple(key_padding_mask.shape)}"
        )
