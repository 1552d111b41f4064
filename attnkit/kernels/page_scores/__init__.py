"""Quest page scoring: ``reference.py`` (PyTorch, the spec) and ``triton.py`` (same signature).

Dispatch (:func:`page_scores`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` forces one; unset, ``auto`` or
``flex`` (this op has no FlexAttention form) runs Triton for CUDA inputs it supports and the reference otherwise.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.page_scores import reference

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.page_scores.triton")
    except ImportError:
        return None


def page_scores(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
    page_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.page_scores.reference.page_scores`."""
    args = (query, page_min, page_max, valid_pages, share_gqa_group, page_scale)
    name = backend_name()
    if name == "reference":
        return reference.page_scores(*args)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.page_scores(*args)
    if query.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(query, page_min)
        if reason is None:
            return tri.page_scores(*args)
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("attnkit: Quest page scoring runs the PyTorch reference on CUDA: %s", reason)
    return reference.page_scores(*args)


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.page_scores.reference.top_pages` (Triton on CUDA: one
    selection kernel instead of ``torch.topk``)."""
    name = backend_name()
    if name == "reference":
        return reference.top_pages(scores, k)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.top_pages(scores, k)
    if scores.is_cuda and tri is not None:
        return tri.top_pages(scores, k)
    return reference.top_pages(scores, k)


__all__ = ["page_scores", "top_pages"]
