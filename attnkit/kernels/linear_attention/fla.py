"""flash-linear-attention (fla) as the CUDA backend of causal linear attention (its Triton kernels need a GPU).

fla 0.6.0: ``fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize)``
takes ``[B, T, H, K]`` layouts and the same number of heads for q and k. attnkit's layout is ``[B, H, S, F]`` with GQA
key/value heads, so this wrapper transposes and, for GQA, repeats the feature-mapped keys and the values over each
query group (fla has no GQA here); the state it returns per query head is the same within a group, so the group's
first head is kept.

fla computes the numerator ``Σ (φq·φk) v`` (``normalize=False``, state ``[B, H, F, D]`` in and out); the normalizer
``φq · (z0 + cumsum φk)`` is computed here in float32 rather than with fla's ``normalize=True``, which accumulates the
key sum in the input dtype (bf16 over 128K tokens). ``scale=1``: attnkit's feature maps carry their own scaling.

Layout work around the kernel, kept to one pass per tensor: each input is cast, transposed and (for GQA) expanded
over its query group by a single ``copy_`` into the buffer fla reads, and the output is divided by the normalizer
straight into a ``[B, Hq, S, D]`` float32 tensor. The key sum ``z`` is a two-level (chunked) cumulative sum: a
single ``cumsum`` over the token axis of ``[B, Hkv, S, F]`` runs, on CUDA, PyTorch's outer-dimension scan
(``tensor_kernel_scan_outer_dim`` in ATen's ``ScanUtils.cuh``): one thread per ``(b, h, f)`` column, B·Hkv·F = 1024
threads walking all S tokens one after another, which took ~50 ms at S = 128K on an H100.
"""

from __future__ import annotations

import torch

from attnkit.kernels.linear_attention.reference import DEFAULT_EPS, LinearState


def available() -> bool:
    try:
        import fla.ops.linear_attn  # noqa: F401
    except Exception:  # ImportError (fla or einops missing), or a Triton/driver error on import
        return False
    return True


def supports(q_feat: torch.Tensor) -> str | None:
    """None when fla can run these inputs, else the reason it cannot."""
    if not q_feat.is_cuda:
        return "fla's kernels need CUDA tensors"
    if not available():
        return "flash-linear-attention is not importable (pip install flash-linear-attention einops)"
    return None


def linear_attention_chunked(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    output_state: bool = False,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, LinearState | None]:
    """Normalized causal linear attention with fla's chunked kernel; the same contract as
    :func:`attnkit.kernels.linear_attention.reference.linear_attention_chunked` (output float32). ``dtype``: what the
    kernel runs in (default ``v``'s dtype)."""
    from fla.ops.linear_attn import chunk_linear_attn

    batch, hq, seq, feat = q_feat.shape
    hkv = k_feat.shape[1]
    dim = v.shape[-1]
    groups = hq // hkv
    dtype = dtype or v.dtype
    # fla's [B, T, H, ·] layout, cast and GQA-expanded in one copy each (head h reads KV head h // groups)
    q = torch.empty(batch, seq, hq, feat, dtype=dtype, device=q_feat.device)
    q.copy_(q_feat.transpose(1, 2))
    k = torch.empty(batch, seq, hkv, groups, feat, dtype=dtype, device=k_feat.device)
    k.copy_(k_feat.transpose(1, 2)[:, :, :, None].expand(batch, seq, hkv, groups, feat))
    vv = torch.empty(batch, seq, hkv, groups, dim, dtype=dtype, device=v.device)
    vv.copy_(v.transpose(1, 2)[:, :, :, None].expand(batch, seq, hkv, groups, dim))
    initial = None
    if state is not None:
        initial = state[0].float()[:, :, None].expand(batch, hkv, groups, feat, dim).reshape(batch, hq, feat, dim)
    num, final = chunk_linear_attn(
        q, k.view(batch, seq, hq, feat), vv.view(batch, seq, hq, dim), scale=1.0, initial_state=initial,
        output_final_state=output_state, normalize=False,
    )
    z = key_cumsum(k_feat, None if state is None else state[1])  # [B, Hkv, S, F] float32
    den = (q_feat.float().view(batch, hkv, groups, seq, feat) * z[:, :, None]).sum(-1)  # [B, Hkv, G, S]
    num = num.view(batch, seq, hkv, groups, dim).permute(0, 2, 3, 1, 4)  # a view of fla's [B, T, H, D]
    den = den.add_(eps)[..., None]
    if torch.is_grad_enabled() and (num.requires_grad or den.requires_grad):  # ``out=`` has no backward
        out = (num / den).contiguous()
    else:  # bf16 numerator / fp32 normalizer → fp32 [B, Hq, S, D] in one pass
        out = torch.empty(batch, hkv, groups, seq, dim, dtype=torch.float32, device=v.device)
        torch.div(num, den, out=out)
    new_state = None
    if output_state:
        new_state = (final[:, ::groups].float(), z[:, :, -1])
    return out.view(batch, hq, seq, dim), new_state


def key_cumsum(k_feat: torch.Tensor, z0: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """``z0 + cumsum(k_feat, 2)`` in float32 for ``k_feat [B, H, S, F]`` (``z0 [B, H, F]``), in two levels: an
    inclusive sum inside chunks of ``chunk`` tokens, plus the exclusive sum of the chunk totals, which is scanned
    along its last axis. Both scans are short or parallel on CUDA (see the module docstring)."""
    batch, heads, seq, feat = k_feat.shape
    pad = (-seq) % chunk
    k = k_feat.float()
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    n = (seq + pad) // chunk
    local = k.view(batch, heads, n, chunk, feat).cumsum(3)
    totals = local[:, :, :, -1].transpose(2, 3).contiguous()  # [B, H, F, N]: the scan axis innermost
    prior = torch.zeros_like(totals)  # exclusive: chunk n gets the totals of chunks < n
    prior[..., 1:] = totals[..., :-1].cumsum(-1)
    if z0 is not None:
        prior = prior + z0[..., None]
    local += prior.transpose(2, 3)[:, :, :, None]
    return local.view(batch, heads, n * chunk, feat)[:, :, :seq]
