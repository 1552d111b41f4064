"""Quest page scores in Triton: same signature and semantics as
:func:`attnkit.kernels.page_scores.reference.page_scores`.

``max(q_i·M_i, q_i·m_i)`` is ``q_i·M_i`` where ``q_i ≥ 0`` and ``q_i·m_i`` where ``q_i < 0`` (``M_i ≥ m_i``), so a
page's score is two dot products, ``q⁺·M + q⁻·m`` with ``q⁺ = max(q, 0)`` and ``q⁻ = min(q, 0)``: tensor-core dots
of the GQA group's query rows (padded to 16) by ``BLOCK_P`` pages of bounds, accumulated in fp32 (bf16/fp16 products
are exact in fp32, so only the summation order differs from the reference). One program scores ``BLOCK_P`` pages of
one (batch, KV head) for every query head of its group, so each bound is read from memory once per decode step:
the op's cost is reading ``2 × pages × D`` bound elements per KV head, ``2 / page_size`` of the KV cache's bytes.

Limits (:func:`supports`): head_dim a power of two from 16 to 256, fp16/bf16/fp32, at most 64 query heads per
KV head.

:func:`top_pages` selects the ``k`` best pages of each row in one program per row, without sorting: it finds the
k-th largest score by a bitwise binary search over the scores' order-preserving 32-bit keys (32 counting passes
over the row, held in registers), then writes the indices of the scores above it, and of as many as needed equal
to it, in index order (two prefix sums). One launch, no sort, rows of up to 16384 pages (256K tokens at page 16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.page_scores.reference import check_inputs

TOP_PAGES_MAX = 16384  # longest row top_pages keeps in registers; longer rows go to torch.topk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _page_scores_kernel(
    q_ptr, min_ptr, max_ptr, valid_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bp,
    stride_ob, stride_oh,
    num_kv_heads, num_pages,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr,
    SHARE: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < GROUP
    p_ok = offs_p < num_pages

    q_ptrs = q_ptr + b * stride_qb + (hkv * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)
    b_off = b.to(tl.int64) * stride_bb + hkv.to(tl.int64) * stride_bh
    page_off = offs_p.to(tl.int64)[:, None] * stride_bp + offs_d[None, :]
    hi = tl.load(max_ptr + b_off + page_off, mask=p_ok[:, None], other=0.0)
    lo = tl.load(min_ptr + b_off + page_off, mask=p_ok[:, None], other=0.0)
    if IEEE:  # fp32 math (also the interpreter's path: its bf16 arithmetic is not reliable)
        q = q.to(tl.float32)
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    zero = tl.zeros_like(q)
    q_pos = tl.where(q > 0, q, zero)  # where, not maximum: keeps bf16 (Triton 3.6's maximum promotes it to fp32)
    q_neg = tl.where(q > 0, zero, q)
    if IEEE:
        s = tl.dot(q_pos, tl.trans(hi), input_precision="ieee")
        s = tl.dot(q_neg, tl.trans(lo), s, input_precision="ieee")
    else:
        s = tl.dot(q_pos, tl.trans(hi))
        s = tl.dot(q_neg, tl.trans(lo), s)

    valid = tl.load(valid_ptr + b)
    s = tl.where((offs_p < valid)[None, :], s, float("-inf"))
    if SHARE:
        s = tl.where(g_ok[:, None], s, float("-inf"))
        best = tl.max(s, axis=0)
        tl.store(out_ptr + b * stride_ob + hkv * stride_oh + offs_p, best, mask=p_ok)
    else:
        o_ptrs = out_ptr + b * stride_ob + (hkv * GROUP + offs_g)[:, None] * stride_oh + offs_p[None, :]
        tl.store(o_ptrs, s, mask=g_ok[:, None] & p_ok[None, :])


def supports(query: torch.Tensor, page_min: torch.Tensor) -> str | None:
    """None when the kernel handles these inputs, else why not (the dispatcher then runs the reference)."""
    d = query.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} is not a power of two in [16, 256]"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or page_min.dtype != query.dtype:
        return f"dtypes {query.dtype}/{page_min.dtype} (need one of fp16/bf16/fp32 for both)"
    if query.shape[1] // page_min.shape[1] > 64:
        return "more than 64 query heads per KV head"
    return None


def page_scores(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.page_scores.reference.page_scores`."""
    check_inputs(query, page_min, page_max, valid_pages)
    reason = supports(query, page_min)
    if reason is not None:
        raise ValueError(f"Triton page scoring does not support these inputs: {reason}")
    if page_min.stride(-1) != 1 or page_max.stride() != page_min.stride():
        page_min, page_max = page_min.contiguous(), page_max.contiguous()
    if query.stride(-1) != 1:
        query = query.contiguous()
    b, hq, d = query.shape
    hkv, pages = page_min.shape[1], page_min.shape[2]
    group = hq // hkv
    out = torch.empty(b, hkv if share_gqa_group else hq, pages, dtype=torch.float32, device=query.device)
    if pages == 0:
        return out
    # 32 pages x 8 warps: no register spills at d 128 on sm_90 (64 pages x 4 warps spills; benchmarks/quest.py).
    block_p = 32 if d <= 128 else 16
    grid = (b * hkv, triton.cdiv(pages, block_p))
    _page_scores_kernel[grid](
        query, page_min, page_max, valid_pages.to(device=query.device, dtype=torch.int32), out,
        query.stride(0), query.stride(1),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        out.stride(0), out.stride(1),
        hkv, pages,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_P=block_p, D=d,
        SHARE=share_gqa_group, IEEE=INTERPRET or query.dtype == torch.float32,
        num_warps=8,
    )
    return out


@triton.jit
def _top_pages_kernel(scores_ptr, out_ptr, stride_s, stride_o, n, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(scores_ptr + row * stride_s + offs, mask=ok, other=float("-inf"))
    bits = x.to(tl.uint32, bitcast=True)
    sign = tl.full([BLOCK], 0x80000000, tl.uint32)
    # Order-preserving keys: negative floats reversed, positive ones above them; slots past the row get 0 (below
    # every float, -inf included).
    key = tl.where((bits & sign) != 0, ~bits, bits | sign)
    key = tl.where(ok, key, tl.zeros([BLOCK], tl.uint32))
    threshold = tl.zeros([BLOCK], tl.uint32)  # broadcast copies of one value: the k-th largest key, bit by bit
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | tl.full([BLOCK], 1 << bit, tl.uint32)
        count = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    above = key > threshold
    equal = key == threshold
    needed = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= needed))
    position = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * stride_o + position, offs, mask=take & ok)


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """See :func:`attnkit.kernels.page_scores.reference.top_pages`; returns int32 indices in increasing order."""
    pages = scores.shape[-1]
    if not 0 <= k <= pages:
        raise ValueError(f"k must be in [0, {pages}], got {k}")
    if pages > TOP_PAGES_MAX or scores.dtype != torch.float32:
        return scores.topk(k, dim=-1, sorted=False).indices
    flat = scores.reshape(-1, pages)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], k, dtype=torch.int32, device=scores.device)
    if k == 0 or flat.shape[0] == 0:
        return out.view(*scores.shape[:-1], k)
    block = max(16, triton.next_power_of_2(pages))
    _top_pages_kernel[(flat.shape[0],)](
        flat, out, flat.stride(0), out.stride(0), pages, k, BLOCK=block, num_warps=16 if block > 4096 else 8,
    )
    return out.view(*scores.shape[:-1], k)
