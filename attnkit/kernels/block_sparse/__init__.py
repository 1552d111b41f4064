"""Block-sparse attention: ``reference.py`` (PyTorch, the spec) and backends of the same signature.

Backends: ``reference`` (runs anywhere), ``triton`` (``triton.py``, the fast one: CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` for tests), ``flex`` (FlexAttention on the same mask; a peer in benchmarks).

Dispatch (:func:`block_sparse_attention`): ``ATTNKIT_KERNELS`` = ``reference`` / ``triton`` / ``flex`` forces one;
unset or ``auto`` runs Triton for CUDA inputs it supports and the reference otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from attnkit.kernels.block_sparse import flex, reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton", "flex")
_warned: set[str] = set()


def _triton() -> ModuleType | None:
    """The Triton backend, or None where Triton is not installed (CPU-only installs)."""
    try:
        return importlib.import_module("attnkit.kernels.block_sparse.triton")
    except ImportError:
        return None


def backend_name() -> str:
    name = os.environ.get("ATTNKIT_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"ATTNKIT_KERNELS must be one of {list(BACKENDS)}; got {name!r}")
    return name


def block_sparse_attention(q, k, v, block_mask, scale=None, key_padding_mask=None, causal=True):
    """Dispatching entry point; see :func:`attnkit.kernels.block_sparse.reference.block_sparse_attention`."""
    name = backend_name()
    if name == "reference":
        return reference.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
    if name == "flex":
        return flex.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
    tri = _triton()
    if name == "triton":
        if tri is None:
            raise RuntimeError("ATTNKIT_KERNELS=triton but Triton is not installed (pip install triton)")
        return tri.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
    if q.is_cuda:
        reason = "Triton is not installed" if tri is None else tri.supports(q, block_mask)
        if reason is None:
            return tri.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
        if reason not in _warned:  # a slow path on a GPU deserves one line in the log
            _warned.add(reason)
            logger.warning("attnkit: block-sparse attention runs the PyTorch reference on CUDA: %s", reason)
    return reference.block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
