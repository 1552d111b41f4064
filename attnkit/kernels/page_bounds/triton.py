"""Quest's per-token page-bound update in Triton: one launch per layer and decode step (the PyTorch form is a
dozen small kernels). Same signature and semantics as :func:`attnkit.kernels.page_bounds.reference.fold_last_token`.
One program per (row, KV head) reads the new key and its page's bounds and writes the bounds back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fold_kernel(
    k_ptr, min_ptr, max_ptr, last_ptr, pad_ptr,
    stride_kb, stride_kh, stride_ks,
    stride_bb, stride_bh, stride_bp,
    num_heads, length,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
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
    if h == 0:
        tl.store(last_ptr + b, page)


def fold_last_token(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    length: int,
    pad: torch.Tensor,
    page_size: int,
) -> None:
    """See :func:`attnkit.kernels.page_bounds.reference.fold_last_token`."""
    b, h, _, d = keys.shape
    if keys.stride(-1) != 1 or page_min.stride(-1) != 1 or page_max.stride() != page_min.stride():
        raise ValueError("fold_last_token needs the buffers' last dimension contiguous and one layout for min/max")
    _fold_kernel[(b * h,)](
        keys, page_min, page_max, last_page, pad,
        keys.stride(0), keys.stride(1), keys.stride(2),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        h, length,
        PAGE=page_size, D=d, BLOCK_D=triton.next_power_of_2(d),
        num_warps=1,
    )
