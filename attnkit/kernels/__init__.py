"""Kernels, one folder per op: ``reference.py`` (plain PyTorch, runs anywhere, the spec) and faster backends."""

from attnkit.kernels.block_mask import BlockMask, causal_block_matrix
from attnkit.kernels.block_sparse import block_sparse_attention

__all__ = ["BlockMask", "block_sparse_attention", "causal_block_matrix"]
