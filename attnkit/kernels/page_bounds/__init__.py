"""Quest's per-token page-bound update: ``reference.py`` (PyTorch, the spec) and ``triton.py`` (same signature).

Dispatch (:func:`fold_last_token`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` forces one; otherwise Triton
runs for CUDA tensors (when installed) and the reference elsewhere.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.page_bounds import reference
from attnkit.kernels.page_bounds.reference import PendingFold, quantize_bounds


def _triton() -> ModuleType | None:
    try:
        return importlib.import_module("attnkit.kernels.page_bounds.triton")
    except ImportError:
        return None


def fold_last_token(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    length: int | torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    int8_bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Dispatching entry point; see :func:`attnkit.kernels.page_bounds.reference.fold_last_token`."""
    args = (keys, page_min, page_max, last_page, length, pad, page_size, int8_bounds)
    name = backend_name()
    if name == "reference":
        return reference.fold_last_token(*args)
    tri = _triton()
    if name == "triton" and tri is None:
        raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
    if tri is not None and (name == "triton" or keys.is_cuda):
        return tri.fold_last_token(*args)
    return reference.fold_last_token(*args)


__all__ = ["PendingFold", "fold_last_token", "quantize_bounds"]
