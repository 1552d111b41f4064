"""Block-max-pooled softmax attention in Triton: two FlashAttention-style passes over the visible key blocks.

Same signature and semantics as :func:`attnkit.kernels.pooled_attention.reference.pooled_attention`.

One program owns one query block (``block_size`` rows) of one query head. Pass 1 streams the key blocks the block
can see and keeps each row's running max ``m`` and running sum ``l`` of ``exp(s - m)`` (the online softmax of
FlashAttention, in the log2 domain). Pass 2 streams the same key blocks again, turns each score into its final
probability ``exp(s - m) / l`` and writes the largest one of the tile — the max over the block's real rows and the
key block's keys — to ``out[b, h, i, j]``. Key blocks the query block cannot see are written as 0, so every output
element is written (an unwritten one would show in the NaN-poisoned tests). The per-row normalisation of the
``[B, Hq, QB, KB]`` result is one small PyTorch op on the host, as in SeerAttention's own kernel.

Unlike SeerAttention's training kernel this one computes no attention output (attnkit's teacher runs the model's own
dense attention) and stores no per-row ``[Sq, KB]`` maxima between the passes: the second pass recomputes the scores
instead, so its memory is the output alone. GQA is native (query head ``h`` reads KV head ``h // group`` in place).

Limits: ``block_size`` a power of two in [16, 128] (one tile per block), ``head_dim`` ≤ 256 (padded to a power of
two). :func:`supports` says whether inputs qualify; the dispatcher falls back to the reference for the rest.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.block_mask import num_blocks
from attnkit.kernels.pooled_attention.reference import _check_shapes, normalize_rows

_LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _scores(
    q, k_base, stride_kn, offs_m, offs_d, start_n, sk, offset, qk_scale, pad_base, stride_pn,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK: tl.constexpr, D_REAL: tl.constexpr, IEEE: tl.constexpr,
):
    """Scaled scores (log2 domain) of the tile ``[BLOCK rows, BLOCK keys from start_n]``, -inf where not allowed."""
    cols = start_n + tl.arange(0, BLOCK)
    k = tl.load(
        k_base + cols[:, None] * stride_kn + offs_d[None, :],
        mask=(cols[:, None] < sk) & (offs_d[None, :] < D_REAL),
        other=0.0,
    )
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    keep = cols[None, :] < sk
    if CAUSAL:
        keep = keep & (cols[None, :] <= offs_m[:, None] + offset)
    if HAS_PAD:
        pad = tl.load(pad_base + cols * stride_pn, mask=cols < sk, other=0)
        keep = keep & (pad[None, :] != 0)
    return tl.where(keep, s * qk_scale, float("-inf"))


@triton.jit
def _pooled_attention_fwd(
    Q, K, OUT, PAD,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_oi, stride_oj,
    stride_pb, stride_pn,
    num_heads, group, sq, sk, num_kb, qk_scale,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_REAL: tl.constexpr, IEEE: tl.constexpr,
):
    # Late query blocks see the most keys under a causal mask: launch them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group
    offset = sk - sq

    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D_REAL), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    pad_base = PAD + b.to(tl.int64) * stride_pb
    out_row = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + pid_m * stride_oi

    # Rows that take part in the maxima: inside the queries and (with padding) real tokens.
    row_real = offs_m < sq
    if HAS_PAD:
        own = tl.load(pad_base + (offs_m + offset) * stride_pn, mask=row_real, other=0)
        row_real = row_real & (own != 0)

    # Key blocks that hold a visible pair: those starting at or before the block's last row's position.
    n_visible = num_kb
    if CAUSAL:
        last_row = tl.minimum(pid_m * BLOCK + BLOCK - 1, sq - 1)
        n_visible = tl.minimum(num_kb, (last_row + offset) // BLOCK + 1)

    # Pass 1: each row's max m and Σ exp2(s - m).
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, n_visible):
        s = _scores(q, k_base, stride_kn, offs_m, offs_d, j * BLOCK, sk, offset, qk_scale, pad_base, stride_pn,
                    CAUSAL, HAS_PAD, BLOCK, D_REAL, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet: no NaN
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new

    # Pass 2: the tile's largest final probability over the real rows; rows that see no key count as 0.
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(row_real & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    for j in range(0, n_visible):
        s = _scores(q, k_base, stride_kn, offs_m, offs_d, j * BLOCK, sk, offset, qk_scale, pad_base, stride_pn,
                    CAUSAL, HAS_PAD, BLOCK, D_REAL, IEEE)
        p = tl.math.exp2(s - m_fin[:, None]) * inv_l[:, None]
        tl.store(out_row + j * stride_oj, tl.max(tl.max(p, 1), 0))
    for j in range(n_visible, num_kb):
        tl.store(out_row + j * stride_oj, 0.0)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def supports(q: torch.Tensor, block_size: int) -> str | None:
    """``None`` if this kernel can run the inputs, else the reason it cannot (the dispatcher then uses the reference)."""
    if not (_is_pow2(block_size) and 16 <= block_size <= 128):
        return f"block_size must be a power of two in [16, 128], got {block_size}"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (float16, bfloat16, float32 are supported)"
    if not (q.is_cuda or INTERPRET):
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors, tests only)"
    return None


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Block-max-pooled softmax attention on the GPU; arguments, shapes and semantics as in ``reference.py``.

    ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` (any strides with a unit stride on ``D``: ``[B, H, S, D]`` views of
    ``[B, S, H, D]`` projections are read in place), ``key_padding_mask`` bool ``[B, Sk]`` (True = real token).
    Returns float32 ``[B, Hq, QB, KB]``, rows normalised to sum 1.
    """
    batch, hq, sq, dim = _check_shapes(q, k, block_size, key_padding_mask)
    reason = supports(q, block_size)
    if reason is not None:
        raise ValueError(f"the Triton pooled-attention kernel cannot run these inputs: {reason}")
    hkv, sk = k.shape[1], k.shape[2]
    qb, kb = num_blocks(sq, block_size), num_blocks(sk, block_size)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = (k if k.stride(-1) == 1 else k.contiguous()).to(q.dtype)
    out = torch.empty(batch, hq, qb, kb, dtype=torch.float32, device=q.device)
    if sq == 0 or kb == 0:
        return out.zero_()
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=q.device, dtype=torch.uint8)
        pad_strides = pad.stride()
    else:
        pad, pad_strides = out, (0, 0)  # never read (HAS_PAD is False)
    head_dim = max(16, _next_pow2(dim))
    _pooled_attention_fwd[(qb, batch * hq)](
        q, k, out, pad,
        *q.stride()[:3], *k.stride()[:3], *out.stride(), *pad_strides,
        hq, hq // hkv, sq, sk, kb, (dim**-0.5 if scale is None else scale) * _LOG2E,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, BLOCK=block_size, HEAD_DIM=head_dim, D_REAL=dim,
        IEEE=q.dtype == torch.float32,
        **({} if INTERPRET else {"num_warps": 4 if block_size <= 64 else 8, "num_stages": 2}),
    )
    return normalize_rows(out)
