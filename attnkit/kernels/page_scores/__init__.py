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
from attnkit.kernels.page_bounds import PendingFold
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
    slack: float = 1.0,
    fold: PendingFold | None = None,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.page_scores.reference.page_scores`."""
    args = (query, page_min, page_max, valid_pages, share_gqa_group, page_scale, slack, fold)
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


def candidate_page_max(
    query: torch.Tensor,
    key: torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    candidates: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
) -> torch.Tensor:
    """Dispatching entry point; see :func:`attnkit.kernels.page_scores.reference.candidate_page_max` (Triton for
    CUDA inputs the score kernel supports, with a power-of-two page size up to 256)."""
    args = (query, key, pad, page_size, candidates, valid_pages, share_gqa_group)
    name = backend_name()
    if name == "reference":
        return reference.candidate_page_max(*args)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.candidate_page_max(*args)
    if query.is_cuda and tri is not None and tri.supports(query, key) is None and key.dtype == query.dtype \
            and page_size <= 256 and not page_size & (page_size - 1):
        return tri.candidate_page_max(*args)
    return reference.candidate_page_max(*args)


__all__ = ["candidate_page_max", "page_scores", "top_pages"]
