"""Causal linear attention: ``reference.py`` (PyTorch, the spec), flash-linear-attention on CUDA (``fla.py``) and a
fused Triton decode step for Hedgehog feature maps (``triton.py``).

:func:`causal_linear_attention` is the dispatching entry point for pure linear attention (prefill, training and the
decode step): one token from a state runs :func:`~.reference.linear_attention_recurrent` (O(F·D) per head); longer
inputs run fla's chunked kernel on CUDA when it is installed, the chunked PyTorch reference otherwise.
``ATTNKIT_KERNELS=reference`` forces the reference (``triton``/``flex`` have no chunked backend here and behave like
``auto``). The sliding-window hybrid (:func:`window_linear_attention`) is PyTorch only: its chunked form
is two-chunk local attention plus a linear prefix, which fla has no kernel for.

:func:`hedgehog_decode_step` is the one-token decode step of pure linear attention with Hedgehog feature maps, fused
from the raw post-RoPE token: feature maps, state update (in place) and normalized readout in one launch. Triton runs
it on CUDA; ``ATTNKIT_KERNELS=reference`` forces the PyTorch reference, ``triton`` forces the kernel (CPU tensors
under ``TRITON_INTERPRET=1``, for tests). Other feature maps (elu, performer, cosformer) and the window hybrid decode
through :func:`causal_linear_attention` / :func:`window_linear_attention` as before.

Backward: the reference is differentiable everywhere; fla's kernels have their own backward. The fused decode step
has none (it updates its state in place): callers use it without gradients only.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.linear_attention import fla as fla_backend
from attnkit.kernels.linear_attention import reference
from attnkit.kernels.linear_attention.reference import (
    DEFAULT_EPS,
    HEDGEHOG_FEATURE_EPS,
    LinearState,
    empty_state,
    fold_state,
    hedgehog_features,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    window_linear_attention_chunked,
    window_linear_attention_quadratic,
)

logger = logging.getLogger(__name__)
_warned: set[str] = set()

__all__ = [
    "LinearState",
    "causal_linear_attention",
    "empty_state",
    "fold_state",
    "hedgehog_decode_step",
    "hedgehog_features",
    "linear_attention_chunked",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "window_linear_attention",
    "window_linear_attention_chunked",
    "window_linear_attention_quadratic",
]


def causal_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    output_state: bool = False,
    chunk_size: int = 64,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, LinearState | None]:
    """Normalized causal linear attention; ``q_feat [B, Hq, S, F]``, ``k_feat [B, Hkv, S, F]``, ``v [B, Hkv, S, D]``,
    ``state`` the sums before these ``S`` tokens. Returns ``(out [B, Hq, S, D] float32, new state or None)``."""
    seq = q_feat.shape[2]
    if seq == 1:
        out, new = linear_attention_recurrent(q_feat, k_feat, v, state, eps=eps)
        return out, new if output_state else None
    name = backend_name()
    if name != "reference" and q_feat.is_cuda:
        reason = fla_backend.supports(q_feat)
        if reason is None and not torch.is_grad_enabled():
            return fla_backend.linear_attention_chunked(q_feat, k_feat, v, state, output_state, eps)
        if reason is not None and reason not in _warned:
            _warned.add(reason)
            logger.warning("attnkit: linear attention runs the PyTorch reference on CUDA: %s", reason)
    return linear_attention_chunked(q_feat, k_feat, v, state, chunk_size, True, eps, output_state)


def window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    window: int,
    window_factor: torch.Tensor | float,
    linear_factor: torch.Tensor | float = 1.0,
    scale: float | None = None,
    state: LinearState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """LoLCATs' sliding-window hybrid (see :mod:`.reference`): the explicit form for short calls (decode: the
    buffer is at most ``window`` keys) and queries up to ``2C``, the chunked form beyond (``C = max(chunk_size,
    window)``)."""
    if q.shape[2] <= 2 * max(chunk_size, window):
        return window_linear_attention_quadratic(
            q, k, v, q_feat, k_feat, window, window_factor, linear_factor, scale, state, key_padding_mask, eps
        )
    return window_linear_attention_chunked(
        q,
        k,
        v,
        q_feat,
        k_feat,
        window,
        window_factor,
        linear_factor,
        scale,
        state,
        key_padding_mask,
        eps,
        chunk_size,
    )


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.linear_attention.triton")
    except ImportError:
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
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.linear_attention.reference.hedgehog_decode_step`
    (``query [B, Hq, 1, D]``, ``key/value [B, Hkv, 1, D]``, state ``[B, Hkv, F, D]`` + ``[B, Hkv, F]`` float32
    updated in place; returns ``out [B, Hq, 1, D]``)."""
    args = (query, key, value, q_weight, k_weight, kv_state, z_state, real, eps, feature_eps, out_dtype)
    name = backend_name()
    if name == "reference":
        return reference.hedgehog_decode_step(*args)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.hedgehog_decode_step(*args)
    if query.is_cuda:
        reason = (
            "Triton is not installed" if tri is None else tri.supports(query, q_weight, kv_state, z_state)
        )
        if reason is None:
            return tri.hedgehog_decode_step(*args)
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("attnkit: the Hedgehog decode step runs the PyTorch reference on CUDA: %s", reason)
    return reference.hedgehog_decode_step(*args)
