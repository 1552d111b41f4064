"""The Hedgehog linear-attention decode step as one Triton kernel: same signature and semantics as
:func:`attnkit.kernels.linear_attention.reference.hedgehog_decode_step`.

The eager step is a chain of small launches (the query and key feature maps: a projection, two softmaxes, a
concatenation and a clamp each; the state update, the readout, the normalizer). Here one program per (batch row,
KV head) does all of it for the ``G = Hq / Hkv`` query heads that share the KV head, reading the head's state once:

1. the key's and the ``G`` queries' projections ``x W`` (``[Fh]`` and ``[G, Fh]``), accumulated over ``D`` in tiles
   of ``BLOCK_D``; their two softmaxes over the feature axis, clamped at ``feature_eps``, kept as halves
   ``φ⁺ = softmax(xW)`` and ``φ⁻ = softmax(−xW)`` (feature ``f`` and ``Fh + f`` of the state);
2. ``z += real · φk`` (stored in place) and the normalizers ``φq · z + eps`` (``[G]``);
3. per ``D`` tile: ``S[:, tile] += φk v[tile]ᵀ`` (loaded, updated, stored in place) and
   ``out[:, tile] = φq S[:, tile] / normalizer``.

Every state element is read and written by exactly one program, so updating in place is race-free; splitting ``D``
across programs would not be (each program needs the whole updated ``z``). Everything is float32; the inputs may be
fp16/bf16/fp32 and the weights any float dtype.

Limits (:func:`supports`): Hedgehog only (other feature maps keep the eager path), ``Fh ≤ 256`` and ``G · Fh ≤ 2048``
(each padded to a power of two; e.g. ``G ≤ 32`` at ``Fh = 64``), the state float32 with a unit stride on its last
axis; any ``D`` (masked tiles). Untuned: ``block_d`` and ``num_warps`` come from a register-budget rule, not from
GPU measurements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.linear_attention.reference import (
    DEFAULT_EPS,
    HEDGEHOG_FEATURE_EPS,
    check_hedgehog_decode,
)

# BLOCK_G · BLOCK_F · BLOCK_D, the size of the kernel's 3-D products: 16 fp32 values a thread at 8 warps. Compiled
# offline for sm_90 (ptxas only, never run on a GPU) at D 64-256, Fh 24-256, G 1-32: 97-255 registers, no spills;
# twice this tile at 4 warps spilled. Not timed.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 8
# BLOCK_G · BLOCK_F at most (G 32 × Fh 64 with 8-wide D tiles: 255 registers, no spills)
_MAX_GROUP_FEATURES = 2048


@triton.jit
def _two_softmaxes(proj, ok, feature_eps):
    """``(softmax(proj), softmax(−proj))`` over axis 1 of ``[R, BLOCK_F]``, clamped at ``feature_eps``; lanes
    outside ``ok`` (padding of the feature axis) are 0."""
    pos = tl.where(ok, proj, float("-inf"))
    pos = tl.exp(pos - tl.max(pos, axis=1)[:, None])
    pos = pos / tl.sum(pos, axis=1)[:, None]
    neg = tl.where(ok, -proj, float("-inf"))
    neg = tl.exp(neg - tl.max(neg, axis=1)[:, None])
    neg = neg / tl.sum(neg, axis=1)[:, None]
    pos = tl.where(ok, tl.maximum(pos, feature_eps), 0.0)
    neg = tl.where(ok, tl.maximum(neg, feature_eps), 0.0)
    return pos, neg


@triton.jit
def _hedgehog_decode_kernel(
    q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, kv_ptr, z_ptr, real_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_wqh, stride_wqd, stride_wkh, stride_wkd,
    stride_sb, stride_sh, stride_sf, stride_zb, stride_zh, stride_ob, stride_oh, stride_real,
    num_kv_heads, eps, feature_eps,
    D: tl.constexpr, FH: tl.constexpr, GROUP: tl.constexpr, HAS_REAL: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    hkv = (pid % num_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_f = tl.arange(0, BLOCK_F)
    offs_t = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    f_ok = offs_f < FH
    heads = hkv * GROUP + offs_g  # the query heads that read this KV head

    # 1. projections over D, in tiles
    proj_k = tl.zeros([BLOCK_F], dtype=tl.float32)
    proj_q = tl.zeros([BLOCK_G, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_t
        d_ok = offs_d < D
        k = tl.load(k_ptr + b * stride_kb + hkv * stride_kh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        wk = tl.load(
            wk_ptr + hkv * stride_wkh + offs_d[:, None] * stride_wkd + offs_f[None, :],
            mask=d_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        proj_k += tl.sum(k[:, None] * wk, axis=0)
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        wq = tl.load(
            wq_ptr
            + heads[:, None, None] * stride_wqh
            + offs_d[None, :, None] * stride_wqd
            + offs_f[None, None, :],
            mask=g_ok[:, None, None] & d_ok[None, :, None] & f_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        proj_q += tl.sum(q[:, :, None] * wq, axis=1)
    k_pos, k_neg = _two_softmaxes(proj_k[None, :], f_ok[None, :], feature_eps)  # [1, BLOCK_F]
    q_pos, q_neg = _two_softmaxes(proj_q, f_ok[None, :], feature_eps)  # [BLOCK_G, BLOCK_F]
    if HAS_REAL:  # a padded row's key joins neither sum
        keep = tl.load(real_ptr + b * stride_real).to(tl.float32)
        k_pos = k_pos * keep
        k_neg = k_neg * keep

    # 2. z += φk (in place), normalizers φq · z + eps
    z_pos_ptrs = z_ptr + b * stride_zb + hkv * stride_zh + offs_f[None, :]
    z_neg_ptrs = z_pos_ptrs + FH
    z_pos = tl.load(z_pos_ptrs, mask=f_ok[None, :], other=0.0) + k_pos
    z_neg = tl.load(z_neg_ptrs, mask=f_ok[None, :], other=0.0) + k_neg
    tl.store(z_pos_ptrs, z_pos, mask=f_ok[None, :])
    tl.store(z_neg_ptrs, z_neg, mask=f_ok[None, :])
    den = tl.sum(q_pos * z_pos, axis=1) + tl.sum(q_neg * z_neg, axis=1) + eps  # [BLOCK_G]

    # 3. per D tile: S += φk vᵀ (in place), out = φq S / normalizer
    k_pos_col = tl.reshape(k_pos, [BLOCK_F])[:, None]
    k_neg_col = tl.reshape(k_neg, [BLOCK_F])[:, None]
    s_base = kv_ptr + b * stride_sb + hkv * stride_sh
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_t
        d_ok = offs_d < D
        v = tl.load(v_ptr + b * stride_vb + hkv * stride_vh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s_ok = f_ok[:, None] & d_ok[None, :]
        s_pos_ptrs = s_base + offs_f[:, None] * stride_sf + offs_d[None, :]
        s_neg_ptrs = s_pos_ptrs + FH * stride_sf
        s_pos = tl.load(s_pos_ptrs, mask=s_ok, other=0.0) + k_pos_col * v[None, :]
        s_neg = tl.load(s_neg_ptrs, mask=s_ok, other=0.0) + k_neg_col * v[None, :]
        tl.store(s_pos_ptrs, s_pos, mask=s_ok)
        tl.store(s_neg_ptrs, s_neg, mask=s_ok)
        num = tl.sum(q_pos[:, :, None] * s_pos[None, :, :], axis=1)
        num += tl.sum(q_neg[:, :, None] * s_neg[None, :, :], axis=1)  # [BLOCK_G, BLOCK_D]
        out = num / den[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )


def _pow2(n: int) -> int:
    """``n`` rounded up to a power of two (the kernel's block sizes)."""
    return triton.next_power_of_2(n)


def supports(
    query: torch.Tensor, q_weight: torch.Tensor, kv_state: torch.Tensor, z_state: torch.Tensor
) -> str | None:
    """None when the kernel handles these inputs, else why not (the dispatcher then runs the reference)."""
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {query.dtype} (need fp16/bf16/fp32)"
    if q_weight.shape[-1] > 256:
        return f"feature_dim {q_weight.shape[-1]} > 256"
    group = query.shape[1] // kv_state.shape[1]
    if _pow2(group) * _pow2(q_weight.shape[-1]) > _MAX_GROUP_FEATURES:
        return f"{group} query heads per KV head × feature_dim {q_weight.shape[-1]} (padded) > {_MAX_GROUP_FEATURES}"
    if kv_state.dtype != torch.float32 or z_state.dtype != torch.float32:
        return f"state dtypes {kv_state.dtype}/{z_state.dtype} (need float32)"
    if kv_state.stride(-1) != 1 or z_state.stride(-1) != 1:
        return "the state's last axis is not contiguous (updated in place, so it is not copied)"
    return None


def hedgehog_decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    kv_state: torch.Tensor,
    z_state: torch.Tensor,
    real: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    feature_eps: float = HEDGEHOG_FEATURE_EPS,
    out_dtype: torch.dtype = torch.float32,
    block_d: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """See :func:`attnkit.kernels.linear_attention.reference.hedgehog_decode_step` (``kv_state``/``z_state`` are
    updated in place). ``block_d`` (a power of two) and ``num_warps`` override the launch settings (tests, tuning)."""
    check_hedgehog_decode(query, key, value, q_weight, k_weight, kv_state, z_state, real)
    reason = supports(query, q_weight, kv_state, z_state)
    if reason is not None:
        raise ValueError(f"Triton Hedgehog decode does not support these inputs: {reason}")
    # Inputs: only the last axis must be unit-stride (transformers' post-RoPE views usually are already).
    query, key, value, q_weight, k_weight = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, q_weight, k_weight)
    )
    batch, hq, _, dim = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    fh = q_weight.shape[-1]
    block_g, block_f = _pow2(group), _pow2(fh)
    if block_d is None:
        block_d = min(triton.next_power_of_2(dim), max(8, _TILE_ELEMENTS // (block_g * block_f)))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")
    num_warps = num_warps or _NUM_WARPS
    out = torch.empty(batch, hq, 1, dim, dtype=out_dtype, device=query.device)
    has_real = real is not None
    if has_real and real.device != query.device:
        real = real.to(query.device)
    _hedgehog_decode_kernel[(batch * hkv,)](
        query, key, value, q_weight, k_weight, kv_state, z_state, real if has_real else z_state, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        q_weight.stride(0), q_weight.stride(1), k_weight.stride(0), k_weight.stride(1),
        kv_state.stride(0), kv_state.stride(1), kv_state.stride(2), z_state.stride(0), z_state.stride(1),
        out.stride(0), out.stride(1), real.stride(0) if has_real else 0,
        hkv, eps, feature_eps,
        D=dim, FH=fh, GROUP=group, HAS_REAL=has_real,
        BLOCK_G=block_g, BLOCK_F=block_f, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return out
