"""Quest's per-token page-bound update in Triton: one launch per layer and decode step (the PyTorch form is a
dozen small kernels). Same signature and semantics as :func:`attnkit.kernels.page_bounds.reference.fold_last_token`.
One program per (row, KV head) reads the new key and its page's bounds and writes the bounds back (and, with
``int8_bounds``, the page's 8-bit copy: the same arithmetic as :func:`~.reference.quantize_bounds`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.page_bounds.reference import INT8_LIMIT, OUTWARD, SCALE_FACTOR, TINY

# The 8-bit rounding's constants (see the reference), as compile-time constants of the kernels.
_SCALE_FACTOR = tl.constexpr(SCALE_FACTOR)
_OUTWARD = tl.constexpr(OUTWARD)
_TINY = tl.constexpr(TINY)
_LIMIT = tl.constexpr(INT8_LIMIT)


@triton.jit
def fold_token(
    b, h, length,
    k_ptr, min_ptr, max_ptr, last_ptr, pad_ptr, qmin_ptr, qmax_ptr, scale_ptr,
    stride_kb, stride_kh, stride_ks,
    stride_bb, stride_bh, stride_bp,
    stride_qb, stride_qh, stride_qp,
    stride_sb, stride_sh,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
):
    """Fold the key at slot ``length - 1`` of row ``b``, KV head ``h`` into its page's bounds (and 8-bit copy);
    head 0 also writes the row's ``last_page``. Shared by :func:`_fold_kernel` and the score kernel, which runs it
    in the same launch (``attnkit.kernels.page_scores``, ``fold=``)."""
    offs = tl.arange(0, BLOCK_D)
    d_ok = offs < D
    real = length - 1 - tl.load(pad_ptr + b)
    page = real // PAGE
    key = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + (length - 1).to(tl.int64) * stride_ks
                  + offs, mask=d_ok)
    base = b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh + page.to(tl.int64) * stride_bp + offs
    key = key.to(tl.float32)  # min/max of fp32 copies of bf16/fp16 values are exact
    if real % PAGE == 0:
        lo = key
        hi = key
    else:
        lo = tl.minimum(tl.load(min_ptr + base, mask=d_ok).to(tl.float32), key)
        hi = tl.maximum(tl.load(max_ptr + base, mask=d_ok).to(tl.float32), key)
    tl.store(min_ptr + base, lo.to(min_ptr.dtype.element_ty), mask=d_ok)
    tl.store(max_ptr + base, hi.to(max_ptr.dtype.element_ty), mask=d_ok)
    if INT8:  # the stored (rounded) bounds are what the 8-bit copy must contain
        lo = lo.to(min_ptr.dtype.element_ty).to(tl.float32)
        hi = hi.to(max_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.where(d_ok, tl.maximum(tl.abs(lo), tl.abs(hi)), 0.0), axis=0)
        scale = tl.maximum(amax * _SCALE_FACTOR, _TINY)
        x_lo = lo / scale
        x_hi = hi / scale
        q_lo = tl.minimum(tl.maximum(tl.floor(x_lo - tl.abs(x_lo) * _OUTWARD), -_LIMIT), _LIMIT)
        q_hi = tl.minimum(tl.maximum(tl.ceil(x_hi + tl.abs(x_hi) * _OUTWARD), -_LIMIT), _LIMIT)
        q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + page.to(tl.int64) * stride_qp + offs
        tl.store(qmin_ptr + q_off, q_lo.to(tl.int8), mask=d_ok)
        tl.store(qmax_ptr + q_off, q_hi.to(tl.int8), mask=d_ok)
        tl.store(scale_ptr + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + page, scale)
    if h == 0:
        tl.store(last_ptr + b, page)


@triton.jit
def _fold_kernel(
    k_ptr, min_ptr, max_ptr, last_ptr, pad_ptr, qmin_ptr, qmax_ptr, scale_ptr, length_ptr,
    stride_kb, stride_kh, stride_ks,
    stride_bb, stride_bh, stride_bp,
    stride_qb, stride_qh, stride_qp,
    stride_sb, stride_sh,
    num_heads, length,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, LENGTH_FROM_PTR: tl.constexpr,
):
    pid = tl.program_id(0)
    if LENGTH_FROM_PTR:  # the cache's length lives on the device (a decode step replayed from a CUDA graph)
        length = tl.load(length_ptr).to(tl.int32)
    fold_token(
        pid // num_heads, pid % num_heads, length,
        k_ptr, min_ptr, max_ptr, last_ptr, pad_ptr, qmin_ptr, qmax_ptr, scale_ptr,
        stride_kb, stride_kh, stride_ks, stride_bb, stride_bh, stride_bp, stride_qb, stride_qh, stride_qp,
        stride_sb, stride_sh,
        PAGE=PAGE, D=D, BLOCK_D=BLOCK_D, INT8=INT8,
    )


def fold_args(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    int8_bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[tuple, tuple, dict]:
    """:func:`fold_token`'s arguments for these tensors after the layout checks: its pointers, its strides and its
    constexprs (the length is the caller's: a host int or a pointer to load it from)."""
    if keys.stride(-1) != 1 or page_min.stride(-1) != 1 or page_max.stride() != page_min.stride():
        raise ValueError("fold_last_token needs the buffers' last dimension contiguous and one layout for min/max")
    if int8_bounds is None:
        q_min = q_max = scale = page_min  # unused (INT8 false): any pointer of the right kind
        q_strides, s_strides = (0, 0, 0), (0, 0)
    else:
        q_min, q_max, scale = int8_bounds
        if q_min.stride(-1) != 1 or q_max.stride() != q_min.stride() or scale.stride(-1) != 1:
            raise ValueError("fold_last_token needs the 8-bit bounds' last dimension contiguous, one layout for both")
        q_strides, s_strides = q_min.stride()[:3], scale.stride()[:2]
    d = keys.shape[-1]
    pointers = (keys, page_min, page_max, last_page, pad, q_min, q_max, scale)
    strides = (*keys.stride()[:3], *page_min.stride()[:3], *q_strides, *s_strides)
    constexprs = {"PAGE": page_size, "D": d, "BLOCK_D": triton.next_power_of_2(d), "INT8": int8_bounds is not None}
    return pointers, strides, constexprs


def fold_last_token(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    length: int | torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    int8_bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """See :func:`attnkit.kernels.page_bounds.reference.fold_last_token`."""
    b, h = keys.shape[:2]
    pointers, strides, constexprs = fold_args(keys, page_min, page_max, last_page, pad, page_size, int8_bounds)
    on_device = isinstance(length, torch.Tensor)
    _fold_kernel[(b * h,)](
        *pointers, length if on_device else last_page, *strides, h, 0 if on_device else length,
        **constexprs, LENGTH_FROM_PTR=on_device, num_warps=1,
    )
