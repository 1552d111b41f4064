"""Block attention mass: how much true softmax attention each (query block, key block) pair carries.

``reference.py`` holds the plain-PyTorch definition (runs anywhere). It is the oracle that sparse-attention
methods are measured against (:func:`attnkit.eval.fidelity.attention_recall`) and trained towards.
"""

from attnkit.kernels.block_mass.reference import block_attention_mass, column_attention_mass, query_block_rows

__all__ = ["block_attention_mass", "column_attention_mass", "query_block_rows"]
