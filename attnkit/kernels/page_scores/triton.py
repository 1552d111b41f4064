"""Quest page scores in Triton: same signature and semantics as
:func:`attnkit.kernels.page_scores.reference.page_scores`.

``max(q_i·M_i, q_i·m_i)`` is ``q_i·M_i`` where ``q_i ≥ 0`` and ``q_i·m_i`` where ``q_i < 0`` (``M_i ≥ m_i``), so a
page's score is two dot products, ``q⁺·M + q⁻·m`` with ``q⁺ = max(q, 0)`` and ``q⁻ = min(q, 0)``. A ``slack`` below 1
(``q·c + slack·|q|·r``, see the reference) is the same two dots with mixed query rows: ``(a q⁺ + b q⁻)·M +
(b q⁺ + a q⁻)·m`` with ``a = (1 + slack) / 2``, ``b = (1 - slack) / 2``, at no extra cost. Tensor-core dots
of the GQA group's query rows (padded to 16) by ``BLOCK_P`` pages of bounds, accumulated in fp32 (bf16/fp16 products
are exact in fp32, so only the summation order differs from the reference). One program scores ``BLOCK_P`` pages of
one (batch, KV head) for every query head of its group, so each bound is read from memory once per decode step:
the op's cost is reading ``2 × pages × D`` bound elements per KV head, ``2 / page_size`` of the KV cache's bytes.

With 8-bit bounds (``page_scale`` given: :func:`attnkit.kernels.page_bounds.quantize_bounds`) the tiles are loaded as
int8, converted to the query's dtype (exact: |values| ≤ 127) for the same two dots, and each page's column of
scores is multiplied by its scale: ``2·D + 4`` bytes per page and KV head instead of ``4·D`` in bf16.

Limits (:func:`supports`): head_dim a power of two from 16 to 256, fp16/bf16/fp32 (bounds of the same dtype or int8),
at most 64 query heads per KV head.

:func:`top_pages` selects the ``k`` best pages of each row in one program per row, without sorting: it finds the
k-th largest score by a bitwise binary search over the scores' order-preserving 32-bit keys (counting passes over
the row, held in registers; the default "bounded" search skips the high bits that bounds on the k-th key decide and
stops once exactly k keys are left), then writes the indices of the scores above it, and of as many as needed
equal to it, in index order (two prefix sums). One launch, no sort, rows of up to 16384 pages (256K tokens at
page 16).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.page_bounds import PendingFold
from attnkit.kernels.page_bounds.triton import fold_args, fold_last_token, fold_token
from attnkit.kernels.page_scores.reference import check_inputs

TOP_PAGES_MAX = 16384  # longest row top_pages keeps in registers; longer rows go to torch.topk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _page_scores_kernel(
    q_ptr, min_ptr, max_ptr, valid_ptr, out_ptr, scale_ptr,
    stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bp,
    stride_ob, stride_oh,
    stride_sb, stride_sh,
    num_kv_heads, num_pages, pages_per_program, mix_a, mix_b,
    # the fused bounds update (FOLD): fold_token's pointers and strides, the cache's length (a host int or a pointer)
    fk_ptr, fmin_ptr, fmax_ptr, flast_ptr, fpad_ptr, fqmin_ptr, fqmax_ptr, fscale_ptr, length_ptr,
    f_skb, f_skh, f_sks, f_sbb, f_sbh, f_sbp, f_sqb, f_sqh, f_sqp, f_ssb, f_ssh,
    length,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr,
    SHARE: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr, INT8: tl.constexpr, MIX: tl.constexpr,
    FOLD: tl.constexpr, PAGE: tl.constexpr, FOLD_INT8: tl.constexpr, LENGTH_FROM_PTR: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < GROUP

    q_ptrs = q_ptr + b * stride_qb + (hkv * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)
    if IEEE:  # fp32 math (also the interpreter's path: its bf16 arithmetic is not reliable)
        q = q.to(tl.float32)
    zero = tl.zeros_like(q)
    q_pos = tl.where(q > 0, q, zero)  # where, not maximum: keeps bf16 (Triton 3.6's maximum promotes it to fp32)
    q_neg = tl.where(q > 0, zero, q)
    if MIX:  # slack < 1: the rows that meet M and m mix both signs (rounded once to the query's dtype)
        q_hi = (mix_a * q_pos.to(tl.float32) + mix_b * q_neg.to(tl.float32)).to(q.dtype)
        q_lo = (mix_b * q_pos.to(tl.float32) + mix_a * q_neg.to(tl.float32)).to(q.dtype)
        q_pos, q_neg = q_hi, q_lo
    if FOLD:
        # This step's token goes into its row's current page, which no program scores (pages ≥ valid are -inf),
        # so one program per (row, KV head) folds it while the others score: no ordering between them is needed.
        # Every program derives the row's page count from the length instead of reading last_page, which the
        # fold rewrites.
        if LENGTH_FROM_PTR:
            length = tl.load(length_ptr).to(tl.int32)
        valid = (length - 1 - tl.load(fpad_ptr + b)) // PAGE
        if tl.program_id(1) == 0:
            fold_token(
                b, hkv, length, fk_ptr, fmin_ptr, fmax_ptr, flast_ptr, fpad_ptr, fqmin_ptr, fqmax_ptr, fscale_ptr,
                f_skb, f_skh, f_sks, f_sbb, f_sbh, f_sbp, f_sqb, f_sqh, f_sqp, f_ssb, f_ssh,
                PAGE=PAGE, D=D, BLOCK_D=D, INT8=FOLD_INT8,
            )
    else:
        valid = tl.load(valid_ptr + b)
    b_off = b.to(tl.int64) * stride_bb + hkv.to(tl.int64) * stride_bh
    first = tl.program_id(1) * pages_per_program
    last = tl.minimum(first + pages_per_program, num_pages)
    # A run of BLOCK_P-page tiles per program: the loop lets the compiler keep STAGES tiles of bounds in flight
    # (one tile per program left the loads latency-bound, ~40 % of HBM bandwidth on an H100).
    for start in tl.range(first, last, BLOCK_P, num_stages=STAGES):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_ok = offs_p < last
        page_off = offs_p.to(tl.int64)[:, None] * stride_bp + offs_d[None, :]
        hi = tl.load(max_ptr + b_off + page_off, mask=p_ok[:, None], other=0)
        lo = tl.load(min_ptr + b_off + page_off, mask=p_ok[:, None], other=0)
        if INT8:  # |values| ≤ 127 are exact in bf16/fp16: the dots stay on tensor cores, the scale comes after
            hi = hi.to(q.dtype)
            lo = lo.to(q.dtype)
        if IEEE:
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
            s = tl.dot(q_pos, tl.trans(hi), input_precision="ieee")
            s = tl.dot(q_neg, tl.trans(lo), s, input_precision="ieee")
        else:
            s = tl.dot(q_pos, tl.trans(hi))
            s = tl.dot(q_neg, tl.trans(lo), s)
        if INT8:
            scale = tl.load(scale_ptr + b.to(tl.int64) * stride_sb + hkv.to(tl.int64) * stride_sh + offs_p,
                            mask=p_ok, other=0.0)
            s = s * scale[None, :]
        s = tl.where((offs_p < valid)[None, :], s, float("-inf"))
        if SHARE:
            s = tl.where(g_ok[:, None], s, float("-inf"))
            best = tl.max(s, axis=0)
            tl.store(out_ptr + b * stride_ob + hkv * stride_oh + offs_p, best, mask=p_ok)
        else:
            o_ptrs = out_ptr + b * stride_ob + (hkv * GROUP + offs_g)[:, None] * stride_oh + offs_p[None, :]
            tl.store(o_ptrs, s, mask=g_ok[:, None] & p_ok[None, :])


@triton.jit
def _candidate_max_kernel(
    q_ptr, k_ptr, cand_ptr, pad_ptr, valid_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_cb, stride_ch,
    stride_ob, stride_oh,
    num_sel, num_cand,
    GROUP: tl.constexpr, SHARE: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
    D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_sel
    hs = pid % num_sel
    if SHARE:  # the group's query rows against KV head hs
        hkv = hs
        head0 = hs * GROUP
        rows = GROUP
    else:  # one query head against its KV head
        hkv = hs // GROUP
        head0 = hs
        rows = 1
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILE)
    g_ok = offs_g < rows
    q = tl.load(q_ptr + b * stride_qb + (head0 + offs_g)[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None],
                other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    pad = tl.load(pad_ptr + b)
    valid = tl.load(valid_ptr + b)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    c_base = cand_ptr + b.to(tl.int64) * stride_cb + hs.to(tl.int64) * stride_ch
    o_base = out_ptr + b.to(tl.int64) * stride_ob + hs.to(tl.int64) * stride_oh
    for i in range(BLOCK_C):
        c = tl.program_id(1) * BLOCK_C + i
        if c < num_cand:
            # The page index broadcast over the tile's slots (a vector: the interpreter rejects masks built from a
            # scalar). Only complete pages (before the row's last) are read: their slots all hold keys.
            page = tl.load(c_base + c + offs_t * 0).to(tl.int32)
            ok = (offs_t < PAGE) & (page >= 0) & (page < valid)
            slot = (pad + page * PAGE + offs_t).to(tl.int64)
            k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(g_ok[:, None] & ok[None, :], s, float("-inf"))
            tl.store(o_base + c, tl.max(tl.max(s, axis=1), axis=0))


def candidate_page_max(
    query: torch.Tensor,
    key: torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    candidates: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.page_scores.reference.candidate_page_max`: one program per (row, selection head) and
    block of candidates, each page's keys read once as one tile (tensor-core dot with the group's query rows)."""
    b, hq, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    heads, num_cand = candidates.shape[1], candidates.shape[2]
    out = torch.empty(b, heads, num_cand, dtype=torch.float32, device=query.device)
    if num_cand == 0:
        return out
    block_c = 16
    share = share_gqa_group and group > 1
    _candidate_max_kernel[(b * heads, triton.cdiv(num_cand, block_c))](
        query, key, candidates, pad.to(device=query.device, dtype=torch.int32),
        valid_pages.to(device=query.device, dtype=torch.int32), out,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        candidates.stride(0), candidates.stride(1),
        out.stride(0), out.stride(1),
        heads, num_cand,
        GROUP=group, SHARE=share, BLOCK_G=max(16, triton.next_power_of_2(group)) if share else 16, PAGE=page_size,
        TILE=max(16, page_size), D=d, BLOCK_C=block_c, IEEE=INTERPRET or query.dtype == torch.float32,
        num_warps=4,
    )
    return out


def supports(query: torch.Tensor, page_min: torch.Tensor) -> str | None:
    """None when the kernel handles these inputs, else why not (the dispatcher then runs the reference)."""
    d = query.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} is not a power of two in [16, 256]"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or page_min.dtype not in (query.dtype, torch.int8):
        return f"dtypes {query.dtype}/{page_min.dtype} (need fp16/bf16/fp32 for both, or int8 bounds)"
    if query.shape[1] // page_min.shape[1] > 64:
        return "more than 64 query heads per KV head"
    return None


def page_scores(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
    page_scale: torch.Tensor | None = None,
    slack: float = 1.0,
    fold: PendingFold | None = None,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.page_scores.reference.page_scores`; ``fold`` runs in the same launch."""
    check_inputs(query, page_min, page_max, valid_pages, page_scale, slack, fold)
    reason = supports(query, page_min)
    if reason is not None:
        raise ValueError(f"Triton page scoring does not support these inputs: {reason}")
    if page_min.stride(-1) != 1 or page_max.stride() != page_min.stride():
        page_min, page_max = page_min.contiguous(), page_max.contiguous()
    if query.stride(-1) != 1:
        query = query.contiguous()
    b, hq, d = query.shape
    hkv, pages = page_min.shape[1], page_min.shape[2]
    out = torch.empty(b, hkv if share_gqa_group else hq, pages, dtype=torch.float32, device=query.device)
    if pages == 0:
        if fold is not None:
            fold_last_token(*fold)
        return out
    if page_scale is not None and page_scale.stride(-1) != 1:
        page_scale = page_scale.contiguous()
    _launch_scores(query, page_min, page_max, valid_pages, out, share_gqa_group, **score_config(d), page_scale=page_scale,
                   slack=slack, fold=fold)
    return out


# Launch settings of the score kernel (``benchmarks/quest.py --sweep`` times the alternatives on a GPU): BLOCK_P
# pages per tile, warps, software-pipelining stages, and programs per SM (each program loops over a run of tiles;
# 0: one tile per program). The sweep on an H100 (2026-12-06, 128K tokens, Llama-3-8B heads; RESULTS.md) put these
# first at batch 8 (104 us, 2.58 TB/s of bounds) and within 2 % of the best at batch 1 (21.6 us); the spread over
# all 64 settings was 21-30 us at batch 1 and 104-161 us at batch 8.
SCORE_CONFIG = {"block_p": 64, "warps": 4, "stages": 1, "waves": 0}


def score_config(head_dim: int) -> dict:
    config = dict(SCORE_CONFIG)
    if head_dim > 128:
        config["block_p"] = min(config["block_p"], 16)  # registers: a [BLOCK_P, D] tile of each bound
    return config


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so tests exercise the per-program loop
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_scores(
    query, page_min, page_max, valid_pages, out, share, block_p, warps, stages, waves, page_scale=None, slack=1.0,
    fold=None,
) -> None:
    """Run the score kernel with explicit launch settings (``waves=0``: one tile per program); ``page_scale``:
    the bounds are int8; ``fold``: a :class:`PendingFold` run in the same launch (see :func:`page_scores`)."""
    b, hq, d = query.shape
    hkv, pages = page_min.shape[1], page_min.shape[2]
    group = hq // hkv
    tiles = triton.cdiv(pages, block_p)
    if waves:  # about ``waves`` programs per SM in all, each over consecutive tiles
        per_head = max(1, min(tiles, triton.cdiv(waves * _sm_count(query.device), b * hkv)))
        tiles_per_program = triton.cdiv(tiles, per_head)
    else:
        tiles_per_program = 1
    pages_per_program = tiles_per_program * block_p
    grid = (b * hkv, triton.cdiv(pages, pages_per_program))
    int8 = page_scale is not None
    valid = valid_pages if fold is not None else valid_pages.to(device=query.device, dtype=torch.int32)
    on_device = fold is not None and isinstance(fold.length, torch.Tensor)
    if fold is None:  # the fold's arguments still need pointers of the right kind: unused ones
        f_pointers, f_strides, f_constexprs, length = (out,) * 8, (0,) * 11, {"PAGE": 1, "INT8": False}, 0
    else:
        if d != fold.keys.shape[-1]:
            raise ValueError(f"fold: keys of head_dim {fold.keys.shape[-1]} for a query of head_dim {d}")
        f_pointers, f_strides, f_constexprs = fold_args(
            fold.keys, fold.page_min, fold.page_max, fold.last_page, fold.pad, fold.page_size, fold.int8_bounds
        )
        length = 0 if on_device else fold.length
    _page_scores_kernel[grid](
        query, page_min, page_max, valid, out,
        page_scale if int8 else out,
        query.stride(0), query.stride(1),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        out.stride(0), out.stride(1),
        *(page_scale.stride()[:2] if int8 else (0, 0)),
        hkv, pages, pages_per_program, (1.0 + slack) / 2, (1.0 - slack) / 2,
        *f_pointers, fold.length if on_device else out, *f_strides, length,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_P=block_p, D=d,
        SHARE=share, IEEE=INTERPRET or query.dtype == torch.float32, STAGES=stages, INT8=int8, MIX=slack != 1.0,
        FOLD=fold is not None, PAGE=f_constexprs["PAGE"], FOLD_INT8=f_constexprs["INT8"], LENGTH_FROM_PTR=on_device,
        num_warps=warps,
    )


@triton.jit
def _order_keys(x, ok):
    """Order-preserving uint32 keys of float32 scores: negative floats reversed, positive ones above them; slots
    past the row (``~ok``) get 0, below every float, -inf included."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = tl.full(x.shape, 0x80000000, tl.uint32)
    key = tl.where((bits & sign) != 0, ~bits, bits | sign)
    return tl.where(ok, key, tl.zeros(x.shape, tl.uint32))


@triton.jit
def _store_top(key, threshold, k, offs, ok, out_row_ptr):
    """Write the indices of the ``k`` largest keys (every key above ``threshold``, the k-th largest, then the
    first ties at it) in increasing order."""
    above = key > threshold
    equal = key == threshold
    needed = k - tl.sum(above.to(tl.int32), axis=0)
    take = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=0) <= needed))
    position = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_row_ptr + position, offs, mask=take & ok)


@triton.jit
def _top_pages_kernel(scores_ptr, out_ptr, stride_s, stride_o, n, k, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    key = _order_keys(tl.load(scores_ptr + row * stride_s + offs, mask=ok, other=float("-inf")), ok)
    threshold = tl.zeros([BLOCK], tl.uint32)  # broadcast copies of one value: the k-th largest key, bit by bit
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | tl.full([BLOCK], 1 << bit, tl.uint32)
        count = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    _store_top(key, threshold, k, offs, ok, out_ptr + row * stride_o)


@triton.jit
def _top_pages_bitpairs_kernel(scores_ptr, out_ptr, stride_s, stride_o, n, k, BLOCK: tl.constexpr):
    """The same selection as ``_top_pages_kernel``, two bits of the k-th largest key per pass: the counts at the
    three candidate thresholds of a bit pair share one reduction (packed 21 bits apart in an int64), so 16 block-wide
    reductions instead of 32. Not faster on an H100 (24.5 vs 22.4 us at 128K, batch 1): kept as a measured
    alternative, not the default."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    key = _order_keys(tl.load(scores_ptr + row * stride_s + offs, mask=ok, other=float("-inf")), ok)
    threshold = tl.zeros([BLOCK], tl.uint32)
    field = tl.full([], (1 << 21) - 1, tl.int64)  # a count is at most BLOCK <= 2**14 < 2**21
    for bit in tl.static_range(30, -1, -2):  # the pair (bit + 1, bit)
        c1 = threshold | tl.full([BLOCK], 1 << bit, tl.uint32)
        c2 = threshold | tl.full([BLOCK], 2 << bit, tl.uint32)
        c3 = threshold | tl.full([BLOCK], 3 << bit, tl.uint32)
        packed = (key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 21) + ((key >= c3).to(tl.int64) << 42)
        total = tl.sum(packed, axis=0)
        n1, n2, n3 = total & field, (total >> 21) & field, total >> 42
        # n3 <= n2 <= n1: keep the largest candidate that still has at least k keys at or above it.
        threshold = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, threshold)))
    _store_top(key, threshold, k, offs, ok, out_ptr + row * stride_o)


@triton.jit
def _top_pages_radix_kernel(scores_ptr, out_ptr, stride_s, stride_o, n, k, BLOCK: tl.constexpr):
    """The same selection as ``_top_pages_kernel``, finding the k-th largest key a byte at a time: four histogram
    passes (256 bins of the next byte among the keys that share the bytes found so far) instead of 32 counts."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    key = _order_keys(tl.load(scores_ptr + row * stride_s + offs, mask=ok, other=float("-inf")), ok)
    bins = tl.arange(0, 512)
    prefix = tl.full([], 0, tl.uint32)  # the bytes of the k-th largest key found so far
    known = tl.full([], 0, tl.uint32)  # which bits of prefix are known
    remaining = k  # rank of the k-th largest key among the keys that match prefix
    for shift in tl.static_range(24, -1, -8):
        match = ((key & known) == prefix) & ok
        # Keys that do not match go to bin 256 (outside the 256 bins read): histogram has no mask in Triton 3.6.
        digit = tl.where(match, ((key >> shift) & 255).to(tl.int32), 256)
        hist = tl.histogram(digit, 512)
        hist = tl.where(bins < 256, hist, 0)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching keys with this byte >= bin
        byte = tl.sum(((at_least >= remaining) & (bins < 256)).to(tl.int32), axis=0) - 1  # at_least decreases
        remaining -= tl.sum(tl.where(bins == byte, at_least - hist, 0), axis=0)
        prefix = prefix | (byte.to(tl.uint32) << shift)
        known = known | (tl.full([], 255, tl.uint32) << shift)
    _store_top(key, prefix, k, offs, ok, out_ptr + row * stride_o)


@triton.jit
def _top_pages_bounded_kernel(scores_ptr, out_ptr, stride_s, stride_o, n, k, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """The bitwise search of ``_top_pages_kernel``, shortened at both ends.

    Start: the k-th largest key lies between ``lo``, the smallest of the maxima of ``GROUPS ≥ k`` disjoint groups
    of keys (each maximum is a distinct key, so at least k keys are ≥ lo), and ``hi``, the largest key; the bits
    above the highest bit where lo and hi differ are the k-th key's too, so the search starts below them (the sign
    and most exponent bits of float scores). Stop: as soon as exactly k keys are at or above the threshold, those
    are the top k, whatever the lower bits (the k-th and (k+1)-th keys are told apart long before bit 0 unless
    they are close). Two extra reductions buy the skipped passes."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    key = _order_keys(tl.load(scores_ptr + row * stride_s + offs, mask=ok, other=float("-inf")), ok)
    hi = tl.max(key, axis=0)
    lo = tl.min(tl.max(tl.reshape(key, (GROUPS, BLOCK // GROUPS)), axis=1), axis=0)
    diff = lo ^ hi
    start = tl.full([], -1, tl.int32)  # the highest bit where lo and hi differ (-1: lo == hi == the k-th key)
    for b in tl.static_range(0, 32):
        start = tl.where(((diff >> b) & 1) != 0, b, start)
    # hi with bits start..0 cleared (2 << 31 wraps to 0 in uint32: no common bits, threshold 0)
    low_bits = (tl.full([], 2, tl.uint32) << tl.maximum(start, 0).to(tl.uint32)) - 1
    threshold = tl.where(start < 0, hi, hi & ~low_bits)
    bit = start
    while bit >= 0:
        candidate = threshold | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        count = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
        bit = tl.where(count == k, -1, bit - 1)  # exactly k keys at or above: they are the top k
    _store_top(key, threshold, k, offs, ok, out_ptr + row * stride_o)


# H100, 128K tokens (8192 pages, k 127), per query head, CUDA graph (benchmarks/RESULTS.md, 2026-12-06): bounded
# 17.1 / 25.0 us at batch 1 / 8 (8 warps, the best of 4-32 at 2K and 8K pages), bitwise 22.1 / 32.3 (8 warps; 16: 22.6 /
# 41.9), bit pairs 24.5 / 45.6, radix 42 / 79. Halving the reductions did not pay (each packed int64 pass costs more
# than two 32-bit ones); skipping the passes the bounds decide, and those after exactly k keys remain, did.
TOP_PAGES_KERNEL = "bounded"


def top_pages(scores: torch.Tensor, k: int, kernel: str | None = None, num_warps: int | None = None) -> torch.Tensor:
    """See :func:`attnkit.kernels.page_scores.reference.top_pages`; returns int32 indices in increasing order.
    ``kernel``: "bitwise", "bitpairs", "radix" or "bounded" (default :data:`TOP_PAGES_KERNEL`), four searches for
    the same k-th score (a bit, two bits or a byte of it per pass; bit by bit between bounds, stopping early).
    ``num_warps``: the launch's warps (default 8; 16 on rows longer than 8192 pages for the bounded search, whose
    16384-score block needs 255 registers a thread at 8 warps and 128 at 16 (``benchmarks.quest --kernel-report``),
    and longer than 4096 for the others; ``benchmarks/quest.py --sweep-top-pages`` times the alternatives)."""
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
    kernel = kernel or TOP_PAGES_KERNEL
    kernels = {"bitwise": _top_pages_kernel, "bitpairs": _top_pages_bitpairs_kernel, "radix": _top_pages_radix_kernel,
               "bounded": _top_pages_bounded_kernel}
    if kernel not in kernels:
        raise ValueError(f"top_pages kernel must be one of {sorted(kernels)}, got {kernel!r}")
    extra = {"GROUPS": triton.next_power_of_2(k)} if kernel == "bounded" else {}  # k <= pages, so GROUPS <= BLOCK
    kernels[kernel][(flat.shape[0],)](
        flat, out, flat.stride(0), out.stride(0), pages, k, BLOCK=block,
        num_warps=num_warps or (8 if block <= (8192 if kernel == "bounded" else 4096) else 16), **extra,
    )
    return out.view(*scores.shape[:-1], k)
