"""Vertical-slash sparse attention (MInference): ``reference.py`` (PyTorch, the spec) and ``triton.py``.

The mask (:class:`VerticalSlashMask`, ``mask.py``) is a :class:`~attnkit.kernels.block_mask.BlockMask` for the slash
bands and the local window plus per-head vertical key columns at token granularity.

Dispatch (:func:`vertical_slash_attention`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` forces one (``flex``,
which has no vertical-slash backend, runs the reference); unset or ``auto`` runs Triton for CUDA inputs it supports
and the reference otherwise.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.vertical_slash import reference
from attnkit.kernels.vertical_slash.mask import VerticalSlashMask

__all__ = ["VerticalSlashMask", "vertical_slash_attention"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.vertical_slash.triton")
    except ImportError:
        return None


def vertical_slash_attention(q, k, v, mask: VerticalSlashMask, scale=None, key_padding_mask=None):
    """Dispatching entry point; see :func:`attnkit.kernels.vertical_slash.reference.vertical_slash_attention`."""
    name = backend_name()
    if name in ("reference", "flex"):
        return reference.vertical_slash_attention(q, k, v, mask, scale, key_padding_mask)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.vertical_slash_attention(q, k, v, mask, scale, key_padding_mask)
    if q.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(q, mask)
        if reason is None:
            return tri.vertical_slash_attention(q, k, v, mask, scale, key_padding_mask)
        if reason not in _warned:  # a slow path on a GPU deserves one line in the log
            _warned.add(reason)
            logger.warning("attnkit: vertical-slash attention runs the PyTorch reference on CUDA: %s", reason)
    return reference.vertical_slash_attention(q, k, v, mask, scale, key_padding_mask)
