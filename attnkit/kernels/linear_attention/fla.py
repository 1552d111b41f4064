"""flash-linear-attention (fla) as the CUDA backend of causal linear attention (its Triton kernels need a GPU).

fla 0.6.0: ``fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize)``
takes ``[B, T, H, K]`` layouts and the same number of heads for q and k. attnkit's layout is ``[B, H, S, F]`` with GQA
key/value heads, so this wrapper transposes and, for GQA, repeats the feature-mapped keys and the values over each
query group (fla has no GQA here); the state it returns per query head is the same within a group, so the group's
first head is kept.

fla computes the numerator ``Σ (φq·φk) v`` (``normalize=False``, state ``[B, H, F, D]`` in and out); the normalizer
``φq · (z0 + cumsum φk)`` is computed here in float32 rather than with fla's ``normalize=True``, which accumulates the
key sum in the input dtype (bf16 over 128K tokens). ``scale=1``: attnkit's feature maps carry their own scaling.
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
    groups = hq // hkv
    dtype = dtype or v.dtype
    q = q_feat.to(dtype).transpose(1, 2).contiguous()
    k, vv = k_feat.to(dtype), v.to(dtype)
    if groups > 1:
        k, vv = k.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1)
    k, vv = k.transpose(1, 2).contiguous(), vv.transpose(1, 2).contiguous()
    initial = None
    if state is not None:
        initial = (state[0].repeat_interleave(groups, 1) if groups > 1 else state[0]).float().contiguous()
    num, final = chunk_linear_attn(
        q, k, vv, scale=1.0, initial_state=initial, output_final_state=output_state, normalize=False
    )
    num = num.transpose(1, 2).float().view(batch, hkv, groups, seq, -1)
    z = k_feat.float().cumsum(2)  # [B, Hkv, S, F]
    if state is not None:
        z = z + state[1][:, :, None]
    den = torch.einsum("bhgsf,bhsf->bhgs", q_feat.float().view(batch, hkv, groups, seq, feat), z)
    out = (num / (den[..., None] + eps)).reshape(batch, hq, seq, -1)
    new_state = None
    if output_state:
        new_state = (final[:, ::groups].float(), z[:, :, -1])
    return out, new_state
