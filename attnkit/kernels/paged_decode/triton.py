"""Sparse paged decode attention in Triton, split-K (flash-decoding): same signature and semantics as
:func:`attnkit.kernels.paged_decode.reference.sparse_decode_attention`.

The page list of one (batch row, selection head) — the listed pages plus the row's last page as a final entry — is
cut into ``num_splits`` contiguous runs. Pass 1: one program per (row, selection head, split) walks its run in tiles
of whole pages (``TILE`` tokens), loads each tile's keys and values once at their slots ``pad + page·P + t`` (no
gather copy, no ``repeat_kv``), and keeps an online softmax (running max ``m``, sum ``l``, unnormalized output, in
fp32, ``exp2`` with log2 e folded into the scale) for every query head that reads those pages: the whole GQA group
when the selection is shared (``[B, Hkv, K]`` pages: each page is read once for the group, the group's rows padded
to 16 for a tensor-core dot), one head otherwise. It writes ``(m, l, out)`` per query head and split to fp32
scratch. Pass 2: one program per (row, query head) merges the splits: ``Σ 2^(m_s - m) out_s / Σ 2^(m_s - m) l_s``.
Split counts are chosen so that pass 1 launches about four programs per SM: at batch 1 a 2048-token budget is
spread over the whole GPU instead of 8-32 programs.

Limits (:func:`supports`): head_dim a power of two from 16 to 256, fp16/bf16/fp32, page sizes that are powers of
two up to 256.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.paged_decode.reference import check_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_EMPTY = tl.constexpr(-1.0e30)  # running max of a split that saw no key: finite, so exp2(m_s - m) is 0, never NaN


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, pages_ptr, pad_ptr, acc_ptr, m_ptr, l_ptr, seq_len_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pb, stride_ph, stride_pk,
    stride_ab, stride_ah, stride_as,
    stride_mb, stride_mh,
    num_sel, seq_len, num_listed, entries_per_split, qk_scale,
    GROUP: tl.constexpr, SHARE: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr, SEQ_LEN_FROM_PTR: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if SEQ_LEN_FROM_PTR:  # slots filled in a fixed-capacity cache, kept on the device (CUDA-graph decode)
        seq_len = tl.load(seq_len_ptr).to(tl.int32)
    b = pid // num_sel
    hs = pid % num_sel
    if SHARE:
        hkv = hs
        head0 = hs * GROUP
        rows = GROUP
    else:
        hkv = hs // GROUP
        head0 = hs
        rows = 1
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILE)
    g_ok = offs_g < rows

    q = tl.load(q_ptr + b * stride_qb + (head0 + offs_g)[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    pad = tl.load(pad_ptr + b)
    last = (seq_len - pad + PAGE - 1) // PAGE - 1
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    p_base = pages_ptr + b.to(tl.int64) * stride_pb + hs.to(tl.int64) * stride_ph

    m_i = tl.full([BLOCK_G], _EMPTY, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    start = split * entries_per_split
    stop = tl.minimum(start + entries_per_split, num_listed + 1)  # entry num_listed is the row's last page
    for e in range(start, stop, TILE // PAGE):
        entry = e + offs_t // PAGE
        listed = entry < num_listed
        page = tl.load(p_base + entry * stride_pk, mask=listed & (entry < stop), other=-1).to(tl.int32)
        is_last = entry == num_listed
        page = tl.where(is_last, last, page)
        ok = (entry < stop) & (is_last | ((page >= 0) & (page < last)))
        slot = pad + page * PAGE + offs_t % PAGE
        ok = ok & (slot < seq_len)
        slot64 = slot.to(tl.int64)[:, None]
        k = tl.load(k_base + slot64 * stride_ks + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + slot64 * stride_vs + offs_d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    heads = head0 + offs_g
    a_ptrs = acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
    tl.store(a_ptrs, acc, mask=g_ok[:, None])
    tl.store(m_ptr + b * stride_mb + heads * stride_mh + split, m_i, mask=g_ok)
    tl.store(l_ptr + b * stride_mb + heads * stride_mh + split, l_i, mask=g_ok)


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ob, stride_oh,
    num_heads, num_splits,
    BLOCK_S: tl.constexpr, D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < num_splits
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + offs_s, mask=s_ok, other=_EMPTY)
    l_s = tl.load(l_ptr + b * stride_mb + h * stride_mh + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    w = tl.where(s_ok, w, 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def supports(query: torch.Tensor, key: torch.Tensor, page_size: int) -> str | None:
    """None when the kernel handles these inputs, else why not (the dispatcher then runs the reference)."""
    d = query.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} is not a power of two in [16, 256]"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or key.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype} (need one of fp16/bf16/fp32 for both)"
    if page_size & (page_size - 1) or page_size > 256:
        return f"page_size {page_size} is not a power of two ≤ 256"
    if query.shape[1] // key.shape[1] > 64:
        return "more than 64 query heads per KV head"
    return None


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Splits per (row, selection head): about four pass-1 programs per SM, at most one per tile."""
    return max(1, min(tiles, triton.cdiv(4 * _sm_count(device), max(programs, 1))))


def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    pad: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: torch.Tensor | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.paged_decode.reference.sparse_decode_attention`; ``num_splits`` overrides the
    split count and ``num_warps`` the split kernel's warps (tests and tuning: ``benchmarks/quest.py``)."""
    check_inputs(query, key, value, pages, page_size, pad)
    reason = supports(query, key, page_size)
    if reason is not None:
        raise ValueError(f"Triton sparse decode attention does not support these inputs: {reason}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    b, hq, d = query.shape
    hkv, slots = key.shape[1], key.shape[2]
    group = hq // hkv
    share = pages.shape[1] == hkv and group > 1
    num_sel = pages.shape[1]
    num_listed = pages.shape[2]
    if pad is None:
        pad = torch.zeros(b, dtype=torch.int32, device=query.device)
    pad = pad.to(device=query.device, dtype=torch.int32)
    if num_listed == 0:
        pages = torch.full((b, num_sel, 1), -1, dtype=torch.int32, device=query.device)
    tile = max(page_size, 64)
    pages_per_tile = tile // page_size
    tiles = triton.cdiv(num_listed + 1, pages_per_tile)
    splits = num_splits or _num_splits(b * num_sel, tiles, query.device)
    splits = max(1, min(splits, tiles))
    entries_per_split = triton.cdiv(tiles, splits) * pages_per_tile
    splits = triton.cdiv(num_listed + 1, entries_per_split)

    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=query.device)
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=query.device)
    l_sum = torch.empty_like(m)
    scale = d**-0.5 if scale is None else scale
    ieee = INTERPRET or query.dtype == torch.float32
    on_device = seq_len is not None
    _split_kernel[(b * num_sel, splits)](
        query, key, value, pages, pad, acc, m, l_sum, seq_len if on_device else pad,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        pages.stride(0), pages.stride(1), pages.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        num_sel, 0 if on_device else slots, num_listed, entries_per_split, scale * _LOG2E,
        GROUP=group, SHARE=share, BLOCK_G=max(16, triton.next_power_of_2(group)) if share else 16,
        PAGE=page_size, TILE=tile, D=d, IEEE=ieee, SEQ_LEN_FROM_PTR=on_device,
        # 4 warps spill a little on sm_90 (255 registers, ~20 spill loads/stores; 8 warps: 210, none) and are still
        # as fast or faster at every split count: 101.9-106.6 vs 108.4-142.3 us per head at batch 8, 128K, H100
        # (benchmarks.quest's attention_settings_graph, RESULTS.md 2026-12-06).
        num_warps=num_warps, num_stages=3,
    )
    out = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
    _combine_kernel[(b * hq,)](
        acc, m, l_sum, out,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        hq, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d,
        num_warps=4,
    )
    return out
