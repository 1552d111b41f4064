"""flash-linear-attention (fla) as the CUDA backend of causal linear attention (its Triton kernels need a GPU).

fla 0.6.0: ``fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize)``
takes ``[B, T, H, K]`` layouts, the same number of heads for q and k, and with ``normalize=True`` a state tuple
``(kv [B, H, K, V], z [B, 1, H, K])``. attnkit's layout is ``[B, H, S, F]`` with GQA key/value heads, so this
wrapper transposes and, for GQA, repeats the (feature-mapped) keys and values over each query group (fla has no
GQA here); the state it returns per query head is the same within a group, so the group's first head is kept.
``scale=1``: attnkit's feature maps already include whatever scaling they want, and a scale would cancel in the
normalized output anyway.
"""

from __future__ import annotations

import torch

from attnkit.kernels.linear_attention.reference import LinearState


def available() -> bool:
    try:
        import fla.ops.linear_attn  # noqa: F401
    except Exception:  # ImportError, or a Triton/driver error on import
        return False
    return True


def supports(q_feat: torch.Tensor) -> str | None:
    """None when fla can run these inputs, else the reason it cannot."""
    if not q_feat.is_cuda:
        return "fla's kernels need CUDA tensors"
    if not available():
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    return None


def linear_attention_chunked(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    normalize: bool = True,
    output_state: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, LinearState | None]:
    """fla's chunked linear attention with attnkit's layouts; see
    :func:`attnkit.kernels.linear_attention.reference.linear_attention_chunked`. ``dtype``: the dtype the kernel
    runs in (default ``v``'s); the output is float32 like the reference's."""
    from fla.ops.linear_attn import chunk_linear_attn

    hq, hkv = q_feat.shape[1], k_feat.shape[1]
    groups = hq // hkv
    dtype = dtype or v.dtype
    q = q_feat.to(dtype).transpose(1, 2)
    k = k_feat.to(dtype)
    vv = v.to(dtype)
    if groups > 1:
        k = k.repeat_interleave(groups, 1)
        vv = vv.repeat_interleave(groups, 1)
    k, vv = k.transpose(1, 2), vv.transpose(1, 2)
    initial = None
    if state is not None:
        kv0 = state[0].repeat_interleave(groups, 1).contiguous() if groups > 1 else state[0].contiguous()
        if normalize:
            z0 = state[1].repeat_interleave(groups, 1) if groups > 1 else state[1]
            initial = (kv0, z0[:, None].to(dtype).contiguous())
        else:
            initial = kv0
    out, final = chunk_linear_attn(
        q.contiguous(), k.contiguous(), vv.contiguous(), scale=1.0, initial_state=initial,
        output_final_state=output_state, normalize=normalize,
    )
    out = out.transpose(1, 2).float()
    new_state = None
    if output_state:
        if normalize:
            kv, z = final
            z = z[:, 0]
        else:
            kv, z = final, fold_z(k_feat, state)
        new_state = (kv[:, ::groups].float(), z[:, ::groups].float())
    return out, new_state


def fold_z(k_feat: torch.Tensor, state: LinearState | None) -> torch.Tensor:
    z = k_feat.float().sum(2)
    return z if state is None else z + state[1]
