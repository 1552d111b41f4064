"""XAttention's antidiagonal block scoring: ``reference.py`` (PyTorch, the spec) and ``triton.py`` (same signature).

Dispatch (:func:`antidiagonal_block_scores`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` forces one; unset,
``auto`` or ``flex`` (this op has no FlexAttention form) runs Triton for CUDA inputs it supports and the reference
otherwise.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from attnkit.kernels.antidiagonal import reference
from attnkit.kernels.block_sparse import backend_name

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.antidiagonal.triton")
    except ImportError:
        return None


def antidiagonal_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.antidiagonal.reference.antidiagonal_block_scores`."""
    args = (query, key, block_size, stride, scale, key_padding_mask, chunk_bytes)
    name = backend_name()
    if name == "reference":
        return reference.antidiagonal_block_scores(*args)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.antidiagonal_block_scores(*args)
    if query.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(query, block_size, stride)
        if reason is None:
            return tri.antidiagonal_block_scores(*args)
        if reason not in _warned:  # a slow path on a GPU deserves one line in the log
            _warned.add(reason)
            logger.warning("attnkit: antidiagonal scoring runs the PyTorch reference on CUDA: %s", reason)
    return reference.antidiagonal_block_scores(*args)


__all__ = ["antidiagonal_block_scores"]
