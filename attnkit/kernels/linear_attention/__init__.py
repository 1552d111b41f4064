"""Causal linear attention: ``reference.py`` (PyTorch, the spec) and flash-linear-attention on CUDA (``fla.py``).

:func:`causal_linear_attention` is the dispatching entry point for pure linear attention (prefill, training and the
decode step): one token from a state runs :func:`~.reference.linear_attention_recurrent` (O(F·D) per head); longer
inputs run fla's chunked kernel on CUDA when it is installed, the chunked PyTorch reference otherwise.
``ATTNKIT_KERNELS=reference`` forces the reference (``triton``/``flex`` have no linear-attention backend here and
behave like ``auto``). The sliding-window hybrid (:func:`window_linear_attention`) is PyTorch only: its chunked form
is two-chunk local attention plus a linear prefix, which fla has no kernel for.

Backward: the reference is differentiable everywhere; fla's kernels have their own backward.
"""

from __future__ import annotations

import logging

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.linear_attention import fla as fla_backend
from attnkit.kernels.linear_attention.reference import (
    DEFAULT_EPS,
    LinearState,
    empty_state,
    fold_state,
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
