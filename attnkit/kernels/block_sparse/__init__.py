"""Block-sparse attention: ``reference.py`` (PyTorch, the spec) and backends of the same signature.

Dispatch (:func:`block_sparse_attention`): ``ATTNKIT_KERNELS`` = ``reference`` forces the reference, ``flex``
runs FlexAttention (``flex.py``) on the same mask; otherwise the fastest backend available for the inputs'
device is used (the Triton kernel on CUDA once it lands; the reference elsewhere).
"""

from __future__ import annotations

import os

from attnkit.kernels.block_sparse import flex, reference

_BACKENDS = {"auto": reference, "reference": reference, "flex": flex}


def block_sparse_attention(q, k, v, block_mask, scale=None, key_padding_mask=None, causal=True):
    """Dispatching entry point; see :func:`attnkit.kernels.block_sparse.reference.block_sparse_attention`."""
    name = os.environ.get("ATTNKIT_KERNELS", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"ATTNKIT_KERNELS must be one of {sorted(_BACKENDS)}; got {name!r}")
    return _BACKENDS[name].block_sparse_attention(q, k, v, block_mask, scale, key_padding_mask, causal)
