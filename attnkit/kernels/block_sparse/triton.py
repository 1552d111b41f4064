"""Block-sparse attention forward in Triton: FlashAttention-2 online softmax over the listed key blocks only.

Same signature and semantics as :func:`attnkit.kernels.block_sparse.reference.block_sparse_attention`.

One program computes ``BLOCK_M`` query rows of one query head. It reads its query block's list from the
:class:`~attnkit.kernels.block_mask.BlockMask` (``kv_num_blocks`` / ``kv_indices``, broadcast over batch or heads
through zero strides) and visits those key blocks in ascending order, in ``BLOCK_N``-wide tiles. GQA is native:
query head ``h`` reads KV head ``h // group`` straight from the caller's ``[B, Hkv, Sk, D]`` tensors; programs of one
group run next to each other, so the group's shared K/V tiles are served from L2.

Masking costs nothing where it is not needed. The lists are sorted, so the key blocks that need an element mask
(they cross the causal diagonal of the program's rows, or the end of the keys) form a suffix of the list; the kernel
counts the unmasked prefix once, runs it with no mask arithmetic, and masks only the suffix. With a key padding mask
every tile is masked.

Rows that see no key (an empty list, or every listed key masked) are written as zeros, never NaN.

Limits: block sizes must be powers of two ≥ 16 (a query block of 16 fills one tensor-core tile); ``head_dim`` up to
256 (padded to a power of two inside the kernel). :func:`supports` says whether inputs qualify; the dispatcher
falls back to the reference for the rest. Row offsets are int32 unless a (batch, head) slice spans 2**31 elements
(``LARGE_INDEX``, ~512K tokens in a ``[B, S, H, D]`` layout): int64 offsets cost the 128×128 config register spills.

Measured on an H100 and explained in ``benchmarks/RESULTS.md``; ``python -m benchmarks.kernel_report`` shows the
compiled resources (registers, spills, shared memory) without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.block_mask import BlockMask
from attnkit.kernels.block_sparse.reference import _check_shapes

_LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, offs_m, offs_d,
    k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, b, h_kv, pad_base, stride_pn,
    idx_row, idx_stride, first, last,
    sk, offset, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr, LARGE_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, MASK_BK: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PADDED: tl.constexpr, D_REAL: tl.constexpr, IEEE: tl.constexpr,
):
    """Online softmax over list slots ``[first, last)``, each a ``MASK_BK``-wide key block in ``BLOCK_N`` tiles.

    Scores are kept in the log2 domain (``qk_scale`` includes log2 e). ``m_i`` is the running row max of the scaled
    scores, ``l_i`` the running row sum of ``exp2(score - m_i)``, ``acc`` the unnormalized output.
    """
    SUB: tl.constexpr = MASK_BK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for it in tl.range(first * SUB, last * SUB, warp_specialize=WARP_SPEC):
        kb = tl.load(idx_row + (it // SUB) * idx_stride)
        start_n = kb * MASK_BK + (it % SUB) * BLOCK_N
        cols = start_n + offs_n
        if USE_TMA:
            # The copy engine zero-fills rows past Sk: no load mask, even in the last block.
            k = desc_k.load([b, h_kv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
            v = desc_v.load([b, h_kv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        else:
            if LARGE_INDEX:
                k_ptrs = k_base + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
                v_ptrs = v_base + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
            else:
                k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
                v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
            if MASKED or D_PADDED:
                load_mask = (cols[:, None] < sk) & (offs_d[None, :] < D_REAL)
                k = tl.load(k_ptrs, mask=load_mask, other=0.0)
                v = tl.load(v_ptrs, mask=load_mask, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASKED:
            keep = cols[None, :] < sk
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + offset)
            if HAS_PAD:
                pad = tl.load(pad_base + cols * stride_pn, mask=cols < sk, other=0)
                keep = keep & (pad[None, :] != 0)
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with every key masked so far keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # Accumulate in place (the tensor cores add into acc's registers).
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd(
    Q, K, V, OUT, COUNTS, INDICES, PAD, desc_k, desc_v,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_is,
    stride_pb, stride_pn,
    num_heads, group, sq, sk, num_m_programs, qk_scale,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    LARGE_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_BQ: tl.constexpr, MASK_BK: tl.constexpr,
    KB_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, D_REAL: tl.constexpr, IEEE: tl.constexpr,
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
    if LARGE_INDEX:  # row * stride can pass 2**31 (~512K tokens in a [B, S, H, D] layout): int64 offsets
        q_rows = offs_m.to(tl.int64)[:, None] * stride_qm
    else:  # int32 offsets: the measured kernel (int64 ones spill registers in the 128x128 config)
        q_rows = offs_m[:, None] * stride_qm
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_rows + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D_REAL), other=0.0)

    qblock = start_m // MASK_BQ
    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + qblock * stride_cm)
    idx_row = INDICES + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qblock.to(tl.int64) * stride_im

    # Slots [0, n_plain) hold key blocks that need no element mask: wholly at or before the first row's position
    # (hence visible to every row of this tile) and wholly inside the keys. The list is sorted, so the masked
    # blocks are a suffix. (Counting them from the list's last few slots instead of the whole list measured 5 %
    # slower on an H100: the extra branch costs the main loop more than the scan.)
    last_full = sk // MASK_BK - 1
    if CAUSAL:
        last_full = tl.minimum(last_full, (start_m + offset + 1) // MASK_BK - 1)
    if HAS_PAD:
        n_plain = 0
    elif KB_POW2 <= 2048:  # one vector load of the whole list (every length measured so far takes this path)
        slots = tl.arange(0, KB_POW2)
        listed = tl.load(idx_row + slots * stride_is, mask=slots < count, other=2**30)
        n_plain = tl.sum((listed <= last_full).to(tl.int32), 0)
    else:  # very long lists: scan in chunks so the vector stays in registers
        n_plain = 0
        slots = tl.arange(0, 2048)
        for c in range(0, count, 2048):
            listed = tl.load(idx_row + (c + slots) * stride_is, mask=c + slots < count, other=2**30)
            n_plain += tl.sum((listed <= last_full).to(tl.int32), 0)

    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    pad_base = PAD + b.to(tl.int64) * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, b, h_kv,
        pad_base, stride_pn, idx_row, stride_is, 0, n_plain, sk, offset, qk_scale,
        False, CAUSAL, HAS_PAD, USE_TMA, WARP_SPEC, LARGE_INDEX, BLOCK_N, MASK_BK, HEAD_DIM, D_PADDED, D_REAL, IEEE,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, offs_m, offs_d, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, b, h_kv,
        pad_base, stride_pn, idx_row, stride_is, n_plain, count, sk, offset, qk_scale,
        True, CAUSAL, HAS_PAD, USE_TMA, WARP_SPEC, LARGE_INDEX, BLOCK_N, MASK_BK, HEAD_DIM, D_PADDED, D_REAL, IEEE,
    )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if LARGE_INDEX:
        o_rows = offs_m.to(tl.int64)[:, None] * stride_om
    else:
        o_rows = offs_m[:, None] * stride_om
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + o_rows + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D_REAL))


# ------------------------------------------------------------------------------------------------ launcher
def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    # Plain Python: triton.next_power_of_2 is a jit function, ~10 us per call from the host.
    return 1 << max(0, x - 1).bit_length()


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a row offset inside one (batch, head) slice can pass int32 (the kernel then uses int64 offsets)."""
    return any(t.shape[2] * t.stride(2) >= 2**31 for t in tensors)


@functools.cache
def _major_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_ok(k: torch.Tensor, v: torch.Tensor, dim: int, head_dim: int) -> bool:
    """The bulk tensor copy engine (Hopper and newer) needs 16-byte aligned strides and an unpadded head_dim."""
    if INTERPRET or not k.is_cuda or _major_capability(k.device.index) < 9 or dim != head_dim:
        return False
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in (k, v))


def supports(q: torch.Tensor, block_mask: BlockMask) -> str | None:
    """``None`` if this kernel can run the inputs, else the reason it cannot (the dispatcher then uses the reference)."""
    bq, bk = block_mask.block_size
    if not (_is_pow2(bq) and _is_pow2(bk) and bq >= 16 and bk >= 16):
        return f"block sizes must be powers of two >= 16, got {block_mask.block_size}"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (float16, bfloat16, float32 are supported)"
    if not (q.is_cuda or INTERPRET):
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors, tests only)"
    return None


def default_config(head_dim: int, block_size: tuple[int, int], dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings, measured on an H100 (``python -m benchmarks.attention --tune``).

    ``BLOCK_M`` query rows per program, ``BLOCK_N`` keys per tile (both divide the mask's blocks), ``USE_TMA``
    loads K/V with the bulk tensor copy engine where the hardware and strides allow it.
    """
    bq, bk = block_size
    block_m = min(bq, 128 if head_dim <= 128 else 64)
    block_n = min(bk, 128 if head_dim <= 128 else 64)
    if dtype == torch.float32:  # fp32 tiles take twice the registers and shared memory
        block_m, block_n = min(block_m, 64), min(block_n, 32)
    if INTERPRET:
        return {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if block_m >= 128:  # two warpgroups of 64 rows each
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 3, "USE_TMA": True}
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2, "USE_TMA": True}


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """Block-sparse attention on the GPU; arguments, shapes and semantics as in ``reference.py``.

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (any strides with a unit stride on ``D``; transposed views from a
    ``[B, S, H, D]`` projection are read in place), ``key_padding_mask`` bool ``[B, Sk]`` (True = real token).
    ``config`` overrides the tile sizes / launch settings of :func:`default_config` (used by the tuner).
    Returns a new ``[B, Hq, Sq, D]`` tensor in ``q.dtype``.
    """
    _check_shapes(q, k, v, block_mask, key_padding_mask)
    reason = supports(q, block_mask)
    if reason is not None:
        raise ValueError(f"the Triton block-sparse kernel cannot run these inputs: {reason}")
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bq, bk = block_mask.block_size
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if sq == 0:
        return out

    cfg = dict(default_config(dim, (bq, bk), q.dtype))
    cfg.update(config or {})
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if bq % block_m or bk % block_n:
        raise ValueError(f"BLOCK_M {block_m} / BLOCK_N {block_n} must divide the mask's block size {(bq, bk)}")

    counts, indices = block_mask.kv_num_blocks, block_mask.kv_indices
    if counts.device != q.device:
        counts, indices = counts.to(q.device), indices.to(q.device)
    counts = counts.to(torch.int32)
    indices = indices.to(torch.int32)
    # Broadcast dimensions (size 1) are read with stride 0 by every batch row / head.
    cs = [0 if counts.shape[i] == 1 else counts.stride(i) for i in range(2)] + [counts.stride(2)]
    ids = [0 if indices.shape[i] == 1 else indices.stride(i) for i in range(2)] + list(indices.stride()[2:])
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
    _block_sparse_fwd[grid](
        q, k, v, out, counts, indices, pad, desc_k, desc_v,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *cs, *ids, *pad_strides,
        hq, hq // hkv, sq, sk, num_m, (dim**-0.5 if scale is None else scale) * _LOG2E,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, USE_TMA=use_tma,
        WARP_SPEC=use_tma and bool(cfg.get("WARP_SPEC", False)),
        LARGE_INDEX=bool(cfg.get("LARGE_INDEX", False)) or _needs_int64(q, k, v, out),
        BLOCK_M=block_m, BLOCK_N=block_n, MASK_BQ=bq, MASK_BK=bk,
        KB_POW2=_next_pow2(indices.shape[-1]),
        HEAD_DIM=head_dim, D_REAL=dim, IEEE=q.dtype == torch.float32,
        **{key: val for key, val in cfg.items() if key in ("num_warps", "num_stages")},
    )
    return out
