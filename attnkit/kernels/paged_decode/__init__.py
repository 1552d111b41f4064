"""Sparse paged decode attention (Quest's attention over the chosen pages): ``reference.py`` (PyTorch, the spec)
and ``triton.py`` (split-K / flash-decoding, same signature).

Dispatch (:func:`sparse_decode_attention`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` forces one; unset,
``auto`` or ``flex`` runs Triton for CUDA inputs it supports and the reference otherwise.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.paged_decode import reference

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.paged_decode.triton")
    except ImportError:
        return None


def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    page_size: int,
    pad: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.paged_decode.reference.sparse_decode_attention`."""
    args = (query, key, value, pages, page_size, pad, scale, seq_len)
    name = backend_name()
    if name == "reference":
        return reference.sparse_decode_attention(*args)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.sparse_decode_attention(*args)
    if query.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(query, key, page_size)
        if reason is None:
            return tri.sparse_decode_attention(*args)
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("attnkit: sparse decode attention runs the PyTorch reference on CUDA: %s", reason)
    return reference.sparse_decode_attention(*args)


__all__ = ["sparse_decode_attention"]
