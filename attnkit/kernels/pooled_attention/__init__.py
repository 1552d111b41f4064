"""Block-max-pooled softmax attention: SeerAttention's distillation target (``reference.py`` is the definition).

Backends: ``reference`` (PyTorch, runs anywhere) and ``triton`` (``triton.py``: CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` for tests). :func:`pooled_attention` runs Triton for CUDA inputs it supports and the
reference otherwise; ``ATTNKIT_KERNELS=reference`` forces the reference and ``ATTNKIT_KERNELS=triton`` the kernel
(``flex`` has no pooled-attention backend and behaves like ``auto``).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.pooled_attention import reference

logger = logging.getLogger(__name__)
_warned: set[str] = set()

__all__ = ["pooled_attention"]


def _triton() -> ModuleType | None:
    try:
        return importlib.import_module("attnkit.kernels.pooled_attention.triton")
    except ImportError:
        return None


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.pooled_attention.reference.pooled_attention`."""
    name = backend_name()
    if name == "reference":
        return reference.pooled_attention(q, k, block_size, scale, key_padding_mask, causal)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.pooled_attention(q, k, block_size, scale, key_padding_mask, causal)
    if q.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(q, block_size)
        if reason is None:
            return tri.pooled_attention(q, k, block_size, scale, key_padding_mask, causal)
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("attnkit: pooled attention runs the PyTorch reference on CUDA: %s", reason)
    return reference.pooled_attention(q, k, block_size, scale, key_padding_mask, causal)
