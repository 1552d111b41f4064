"""Vertical-slash attention forward in Triton: FlashAttention-2 online softmax over listed key blocks, then columns.

Same signature and semantics as :func:`attnkit.kernels.vertical_slash.reference.vertical_slash_attention`.

One program computes ``BLOCK_M`` query rows of one query head (``BLOCK_M`` divides the mask's query block, so the
program's rows share one block list) and keeps one online-softmax state (running max ``m_i``, running sum ``l_i``,
unnormalized output ``acc``) across two phases:

1. **Blocks** (the slash bands and the local window): the listed key blocks in ascending order, in ``BLOCK_N``-wide
   tiles, by the block-sparse kernel's own tile loop (``block_sparse.triton._attend_tiles``): the unmasked prefix
   of the list with no mask arithmetic, the suffix that crosses the diagonal (or the end of the keys) masked.
2. **Columns** (the vertical lines): the head's column list in chunks of ``BLOCK_C`` token indices; K/V rows are
   gathered by index (one pointer per row; a row is ``D`` contiguous elements, so each is a coalesced read). A
   column is skipped, and its K/V row not read, when
   (a) it lies after the program's last query position: the list is sorted, so a scalar binary search finds the
       end once and the loop stops there;
   (b) its key block is listed for this query block (phase 1 computed it already; counted once): a vectorized
       binary search of the column's block index in the sorted block list, ``bit_length(KB)`` gathered loads of
       ``BLOCK_C`` list slots, all from a list of a few hundred bytes that stays in L1;
   (c) it is padding (``key_padding_mask``).
   The per-element causal condition (``key <= row position``) is applied to every column tile.

GQA is native: query head ``h`` reads KV head ``h // group`` from the caller's ``[B, Hkv, Sk, D]`` tensors (strided
views are read in place). Rows that see no key are written as zeros, never NaN.

Limits: those of the block-sparse kernel (block sizes powers of two ≥ 16, ``head_dim`` ≤ 256; see
:func:`supports`). Skipped columns (b) still occupy lanes of their chunk: the tile's matmul is computed and masked,
so a list whose columns mostly fall inside listed blocks wastes tensor-core work, not memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.block_sparse import triton as block_sparse_triton
from attnkit.kernels.block_sparse.triton import _LOG2E, _attend_tiles, _needs_int64, _next_pow2, _tma_ok
from attnkit.kernels.vertical_slash.mask import VerticalSlashMask
from attnkit.kernels.vertical_slash.reference import check_shapes

INTERPRET = block_sparse_triton.INTERPRET


@triton.jit
def _unmasked_prefix(idx_row, idx_stride, count, last_full, KB_POW2: tl.constexpr):
    """How many leading list slots hold key blocks ``<= last_full`` (the list is sorted: they are a prefix)."""
    if KB_POW2 <= 2048:  # one vector load of the whole list
        slots = tl.arange(0, KB_POW2)
        listed = tl.load(idx_row + slots * idx_stride, mask=slots < count, other=2**30)
        n_plain = tl.sum((listed <= last_full).to(tl.int32), 0)
    else:  # very long lists: scan in chunks so the vector stays in registers
        n_plain = tl.zeros_like(count)
        slots = tl.arange(0, 2048)
        for c in range(0, count, 2048):
            listed = tl.load(idx_row + (c + slots) * idx_stride, mask=c + slots < count, other=2**30)
            n_plain += tl.sum((listed <= last_full).to(tl.int32), 0)
    return n_plain


@triton.jit
def _columns_before(col_row, col_stride, n_col, last_pos, STEPS: tl.constexpr):
    """Scalar binary search: how many of the sorted columns ``col_row[0:n_col]`` are ``<= last_pos``."""
    lo = 0
    hi = n_col
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(col_row + mid * col_stride, mask=active, other=0)
        right = active & (c <= last_pos)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (c > last_pos), mid, hi)
    return lo


@triton.jit
def _in_block_list(target, idx_row, idx_stride, count, BLOCK_C: tl.constexpr, STEPS: tl.constexpr):
    """Vectorized binary search: whether each key block index in ``target [BLOCK_C]`` is in the sorted list."""
    lo = tl.zeros([BLOCK_C], dtype=tl.int32)
    hi = tl.zeros([BLOCK_C], dtype=tl.int32) + count
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(idx_row + mid * idx_stride, mask=active, other=0)
        lo = tl.where(active & (val < target), mid + 1, lo)
        hi = tl.where(active & (val >= target), mid, hi)
    hit = tl.load(idx_row + lo * idx_stride, mask=lo < count, other=-1)
    return hit == target


@triton.jit
def _attend_columns(
    acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, pad_base, stride_pn,
    col_row, col_stride, n_visible, idx_row, idx_stride, count, sk, offset, qk_scale,
    HAS_PAD: tl.constexpr, LARGE_INDEX: tl.constexpr, BLOCK_C: tl.constexpr, COL_STAGES: tl.constexpr,
    MASK_BK: tl.constexpr, KB_STEPS: tl.constexpr, D_REAL: tl.constexpr, IEEE: tl.constexpr,
):
    """Online softmax over the columns in list slots ``[0, n_visible)``, ``BLOCK_C`` gathered K/V rows at a time.

    The loop's own pipeline depth (``COL_STAGES``, 2): with the kernel's 3 stages the pipeliner also stages the
    binary search's dependent loads, and the 128-row config spills ~1 KB per thread (``benchmarks.kernel_report``-style
    compile for sm_90 with Triton 3.6).
    """
    offs_c = tl.arange(0, BLOCK_C)
    for start in tl.range(0, n_visible, BLOCK_C, num_stages=COL_STAGES):
        slot = start + offs_c
        cols = tl.load(col_row + slot * col_stride, mask=slot < n_visible, other=0)
        # (cols < sk) only guards memory against a malformed list (check_columns rejects one).
        keep_col = (slot < n_visible) & (cols < sk)
        keep_col = keep_col & ~_in_block_list(cols // MASK_BK, idx_row, idx_stride, count, BLOCK_C, KB_STEPS)
        if HAS_PAD:
            pad = tl.load(pad_base + cols * stride_pn, mask=keep_col, other=0)
            keep_col = keep_col & (pad != 0)
        if LARGE_INDEX:
            rows = cols.to(tl.int64)
        else:
            rows = cols
        load_mask = keep_col[:, None] & (offs_d[None, :] < D_REAL)  # skipped columns are not read
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=load_mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=load_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        keep = keep_col[None, :] & (cols[None, :] <= offs_m[:, None] + offset)
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with every key masked so far keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _vertical_slash_fwd(
    Q, K, V, OUT, COUNTS, INDICES, COLUMNS, COLUMN_COUNTS, PAD, desc_k, desc_v,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_is,
    stride_colb, stride_colh, stride_cols,
    stride_ncb, stride_nch,
    stride_pb, stride_pn,
    num_heads, group, sq, sk, num_m_programs, qk_scale,
    HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, LARGE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, COL_STAGES: tl.constexpr, MASK_BQ: tl.constexpr,
    MASK_BK: tl.constexpr, KB_POW2: tl.constexpr, KB_STEPS: tl.constexpr, COL_STEPS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_REAL: tl.constexpr, IEEE: tl.constexpr,
):
    # Late query tiles see the most keys under a causal mask: launch them first so the tail of the grid is short.
    pid_m = num_m_programs - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group
    offset = sk - sq
    D_PADDED: tl.constexpr = HEAD_DIM != D_REAL

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if LARGE_INDEX:
        q_rows = offs_m.to(tl.int64)[:, None] * stride_qm
    else:
        q_rows = offs_m[:, None] * stride_qm
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D_REAL), other=0.0)

    qblock = start_m // MASK_BQ
    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + qblock * stride_cm)
    idx_row = INDICES + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qblock.to(tl.int64) * stride_im
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    pad_base = PAD + b.to(tl.int64) * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Phase 1, the listed blocks: slots [0, n_plain) need no element mask (wholly at or before the first row's
    # position and inside the keys), the rest do.
    if HAS_PAD:
        n_plain = 0
    else:
        last_full = tl.minimum(sk // MASK_BK - 1, (start_m + offset + 1) // MASK_BK - 1)
        n_plain = _unmasked_prefix(idx_row, stride_is, count, last_full, KB_POW2)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, b, h_kv,
        pad_base, stride_pn, idx_row, stride_is, 0, n_plain, sk, offset, qk_scale,
        False, True, HAS_PAD, USE_TMA, WARP_SPEC, LARGE_INDEX, BLOCK_N, MASK_BK, HEAD_DIM, D_PADDED, D_REAL, IEEE,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, b, h_kv,
        pad_base, stride_pn, idx_row, stride_is, n_plain, count, sk, offset, qk_scale,
        True, True, HAS_PAD, USE_TMA, WARP_SPEC, LARGE_INDEX, BLOCK_N, MASK_BK, HEAD_DIM, D_PADDED, D_REAL, IEEE,
    )

    # Phase 2, the columns: only those up to the program's last query position can be seen by any of its rows.
    col_row = COLUMNS + b.to(tl.int64) * stride_colb + h.to(tl.int64) * stride_colh
    n_col = tl.load(COLUMN_COUNTS + b * stride_ncb + h * stride_nch)
    last_pos = tl.minimum(start_m + BLOCK_M, sq) - 1 + offset
    n_visible = _columns_before(col_row, stride_cols, n_col, last_pos, COL_STEPS)
    acc, l_i, m_i = _attend_columns(
        acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, pad_base, stride_pn,
        col_row, stride_cols, n_visible, idx_row, stride_is, count, sk, offset, qk_scale,
        HAS_PAD, LARGE_INDEX, BLOCK_C, COL_STAGES, MASK_BK, KB_STEPS, D_REAL, IEEE,
    )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if LARGE_INDEX:
        o_rows = offs_m.to(tl.int64)[:, None] * stride_om
    else:
        o_rows = offs_m[:, None] * stride_om
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + o_rows + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D_REAL))


# ------------------------------------------------------------------------------------------------ launcher
def supports(q: torch.Tensor, mask: VerticalSlashMask) -> str | None:
    """``None`` if this kernel can run the inputs, else the reason it cannot (the dispatcher then uses the reference)."""
    return block_sparse_triton.supports(q, mask.block_mask)


def default_config(head_dim: int, block_size: tuple[int, int], dtype: torch.dtype) -> dict:
    """The block-sparse kernel's measured tile config for phase 1, plus the column phase's ``BLOCK_C`` (columns
    gathered per tile) and ``COL_STAGES`` (its pipeline depth).

    ``BLOCK_C`` is at most 64: with 128 gathered rows the 128-row config spills registers on sm_90.
    """
    cfg = dict(block_sparse_triton.default_config(head_dim, block_size, dtype))
    cfg["BLOCK_C"] = min(64, cfg["BLOCK_N"])
    cfg["COL_STAGES"] = 2
    return cfg


def _broadcast_strides(t: torch.Tensor, lead: int) -> list[int]:
    """Strides with the first ``lead`` size-1 (broadcast) dimensions read at stride 0."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(lead)] + list(t.stride()[lead:])


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: VerticalSlashMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Vertical-slash attention on the GPU; arguments, shapes and semantics as in ``reference.py``.

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (any strides with a unit stride on ``D``; transposed views from a
    ``[B, S, H, D]`` projection are read in place), ``key_padding_mask`` bool ``[B, Sk]`` (True = real token).
    ``config`` overrides the tile sizes / launch settings of :func:`default_config`.
    Returns a new ``[B, Hq, Sq, D]`` tensor in ``q.dtype``.
    """
    check_shapes(q, k, v, mask, key_padding_mask)
    reason = supports(q, mask)
    if reason is not None:
        raise ValueError(f"the Triton vertical-slash kernel cannot run these inputs: {reason}")
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bq, bk = mask.block_size
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if sq == 0:
        return out

    cfg = default_config(dim, (bq, bk), q.dtype)
    cfg.update(config or {})
    block_m, block_n, block_c = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_C"]
    if bq % block_m or bk % block_n:
        raise ValueError(f"BLOCK_M {block_m} / BLOCK_N {block_n} must divide the mask's block size {(bq, bk)}")
    if block_c < 16 or block_c & (block_c - 1):
        raise ValueError(f"BLOCK_C {block_c} must be a power of two >= 16 (a tensor-core tile)")

    lists = [mask.block_mask.kv_num_blocks, mask.block_mask.kv_indices, mask.columns, mask.column_counts]
    counts, indices, columns, column_counts = (t.to(device=q.device, dtype=torch.int32) for t in lists)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=q.device, dtype=torch.uint8)
        pad_strides = pad.stride()
    else:
        pad, pad_strides = counts, (0, 0)  # never read (HAS_PAD is False)

    head_dim = max(16, _next_pow2(dim))
    use_tma = bool(cfg.get("USE_TMA", False)) and _tma_ok(k, v, dim, head_dim)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k = TensorDescriptor.from_tensor(k, [1, 1, block_n, head_dim])
        desc_v = TensorDescriptor.from_tensor(v, [1, 1, block_n, head_dim])
    else:
        desc_k = desc_v = None

    num_m = -(-sq // block_m)
    grid = (num_m, batch * hq)
    _vertical_slash_fwd[grid](
        q, k, v, out, counts, indices, columns, column_counts, pad, desc_k, desc_v,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_broadcast_strides(counts, 2), *_broadcast_strides(indices, 2),
        *_broadcast_strides(columns, 2), *_broadcast_strides(column_counts, 2),
        *pad_strides,
        hq, hq // hkv, sq, sk, num_m, (dim**-0.5 if scale is None else scale) * _LOG2E,
        HAS_PAD=key_padding_mask is not None, USE_TMA=use_tma,
        WARP_SPEC=use_tma and bool(cfg.get("WARP_SPEC", False)),
        LARGE_INDEX=bool(cfg.get("LARGE_INDEX", False)) or _needs_int64(q, k, v, out),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, COL_STAGES=cfg["COL_STAGES"], MASK_BQ=bq, MASK_BK=bk,
        KB_POW2=_next_pow2(indices.shape[-1]), KB_STEPS=indices.shape[-1].bit_length(),
        COL_STEPS=columns.shape[-1].bit_length(),
        HEAD_DIM=head_dim, D_REAL=dim, IEEE=q.dtype == torch.float32,
        **{key: val for key, val in cfg.items() if key in ("num_warps", "num_stages")},
    )
    return out
