"""Fixed (input-independent) block-sparse prefill patterns.

Each method here is a pydantic config whose :meth:`FixedPattern.pattern` returns a boolean block matrix
``[H or 1, QB, KB]`` for given lengths; the same matrix serves every batch row. Sizes are in tokens and are
converted to blocks conservatively: a block is computed when *any* (query, key) pair inside it falls in the
pattern, so a pattern at token granularity is always a subset of what the blocks compute, and "keep everything"
settings (window ≥ length) reproduce dense attention exactly.

Patterns:

- ``sliding_window``: each query sees the previous ``window`` tokens (itself included).
- ``longformer`` (Beltagy et al. 2020): sliding window + ``global_tokens`` leading tokens that every query sees
  and that see everything before them (in a causal decoder, "global rows" means the query blocks holding them
  compute all their visible blocks).
- ``strided`` (Child et al. 2019, "fixed" variant): sliding window + every ``stride``-th key block — the last block
  of each stride-long chunk acts as a summary column.
- ``dilated`` (LongNet, Ding et al. 2023): for each ``(segment, dilation)`` pair, a query block sees key blocks of
  its own segment whose distance to it is a multiple of ``dilation``; the union over pairs, plus the diagonal.
- ``bigbird`` (Zaheer et al. 2020): sliding window + global leading tokens + ``random_blocks`` random earlier
  key blocks per query block and head, from a seeded generator (deterministic per seed and layer).

StreamingLLM (sink + window), the pattern with a decode-time counterpart, lives in :mod:`attnkit.sparsify.streaming`.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from attnkit.kernels import BlockMask
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.method import PrefillLayer, PrefillMethod
from attnkit.registry import register


# --------------------------------------------------------------------------------------- block geometry helpers
def block_spans(q_len: int, kv_len: int, block_size: int, device: torch.device | str = "cpu"):
    """First/last absolute positions of each query block and each key block.

    Returns ``(q_first [QB,1], q_last [QB,1], k_first [1,KB], k_last [1,KB])``; query row ``r`` sits at position
    ``r + kv_len - q_len`` (the queries are the last ``q_len`` positions).
    """
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    offset = kv_len - q_len
    qi = torch.arange(qb, device=device)
    kj = torch.arange(kb, device=device)
    q_first = qi * block_size + offset
    q_last = torch.clamp((qi + 1) * block_size - 1, max=q_len - 1) + offset
    k_first = kj * block_size
    k_last = torch.clamp((kj + 1) * block_size - 1, max=kv_len - 1)
    return q_first[:, None], q_last[:, None], k_first[None, :], k_last[None, :]


def window_blocks(q_len: int, kv_len: int, block_size: int, window: int, device="cpu") -> torch.Tensor:
    """``[QB, KB]``: blocks holding a pair with ``0 <= q - k < window``."""
    q_first, q_last, k_first, k_last = block_spans(q_len, kv_len, block_size, device)
    return (q_first - k_last < window) & (q_last >= k_first)


def leading_token_blocks(q_len: int, kv_len: int, block_size: int, tokens: int, device="cpu") -> torch.Tensor:
    """``[QB, KB]``: key blocks holding any of the first ``tokens`` positions (every query sees them)."""
    _, _, k_first, _ = block_spans(q_len, kv_len, block_size, device)
    qb = num_blocks(q_len, block_size)
    return (k_first < tokens).expand(qb, -1)


# ------------------------------------------------------------------------------------------------ base classes
class FixedPattern(PrefillMethod):
    """A prefill method whose blocks depend only on the lengths (and the layer, for seeded patterns)."""

    def pattern(self, q_len: int, kv_len: int, num_heads: int, layer_idx: int, device) -> torch.Tensor:
        """Boolean ``[H or 1, QB, KB]`` block matrix (the causal restriction is applied by the caller)."""
        raise NotImplementedError

    def make_prefill_layer(self, layer_idx: int, attention) -> PrefillLayer:
        return FixedPatternLayer(self, layer_idx)


class FixedPatternLayer(PrefillLayer):
    """Builds the method's pattern once per (lengths, heads, device) and reuses it."""

    method: FixedPattern

    def __init__(self, method: FixedPattern, layer_idx: int):
        super().__init__(method, layer_idx)
        self._cached: tuple[tuple, BlockMask] | None = None

    def select_blocks(self, query, key, key_padding_mask) -> BlockMask:
        q_len, kv_len, heads = query.shape[-2], key.shape[-2], query.shape[1]
        cache_key = (q_len, kv_len, heads, query.device)
        if self._cached is None or self._cached[0] != cache_key:
            bs = self.method.block_size
            blocks = self.method.pattern(q_len, kv_len, heads, self.layer_idx, query.device)
            blocks = blocks & causal_block_matrix(q_len, kv_len, (bs, bs), query.device)
            self._cached = (cache_key, BlockMask.from_dense(blocks[None], q_len, kv_len, bs))
        return self._cached[1]


# --------------------------------------------------------------------------------------------------- patterns
@register("sliding_window")
class SlidingWindow(FixedPattern):
    """Each query attends to the previous ``window`` tokens, itself included."""

    window: int = Field(1024, gt=0, description="tokens each query sees, itself included")

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        return window_blocks(q_len, kv_len, self.block_size, self.window, device)[None]


@register("longformer")
class Longformer(FixedPattern):
    """Sliding window plus ``global_tokens`` leading tokens that are seen by, and see, everything causal."""

    window: int = Field(1024, gt=0, description="local window in tokens, the query itself included")
    global_tokens: int = Field(64, ge=0, description="leading tokens with global attention")

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        bs = self.block_size
        blocks = window_blocks(q_len, kv_len, bs, self.window, device)
        blocks |= leading_token_blocks(q_len, kv_len, bs, self.global_tokens, device)
        q_first, _, _, _ = block_spans(q_len, kv_len, bs, device)
        blocks |= q_first < self.global_tokens  # global query rows compute every visible block
        return blocks[None]


@register("strided")
class Strided(FixedPattern):
    """Sparse Transformer "fixed" pattern: sliding window plus the last key block of every ``stride`` tokens."""

    window: int = Field(1024, gt=0, description="local window in tokens")
    stride: int = Field(512, gt=0, description="chunk length in tokens (a multiple of block_size)")

    @field_validator("stride")
    @classmethod
    def _stride_multiple(cls, value: int, info) -> int:
        block = info.data.get("block_size", 64)
        if value % block:
            raise ValueError(f"stride ({value}) must be a multiple of block_size ({block})")
        return value

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        bs = self.block_size
        blocks = window_blocks(q_len, kv_len, bs, self.window, device)
        per_chunk = self.stride // bs
        kb = num_blocks(kv_len, bs)
        summary = (torch.arange(kb, device=device) % per_chunk) == per_chunk - 1
        return (blocks | summary[None, :])[None]


@register("dilated")
class Dilated(FixedPattern):
    """LongNet dilated attention at block granularity: a union of (segment length, dilation) patterns."""

    segments: list[tuple[int, int]] = Field(
        default_factory=lambda: [(2048, 1), (4096, 2), (8192, 4)],
        description="(segment length in tokens, dilation in blocks) pairs; the pattern is their union",
    )

    @field_validator("segments")
    @classmethod
    def _check_segments(cls, value):
        if not value:
            raise ValueError("segments must list at least one (segment_length, dilation) pair")
        for length, dilation in value:
            if length <= 0 or dilation <= 0:
                raise ValueError(f"segment length and dilation must be positive, got ({length}, {dilation})")
        return value

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        bs = self.block_size
        q_first, q_last, k_first, k_last = block_spans(q_len, kv_len, bs, device)
        qi, kj = q_first // bs, k_first // bs
        blocks = (q_last >= k_first) & (q_first <= k_last)  # the diagonal blocks
        for length, dilation in self.segments:
            same_segment = (q_first // length == k_first // length) | (q_last // length == k_last // length)
            blocks |= same_segment & ((qi - kj) % dilation == 0)
        return blocks[None]


@register("bigbird")
class BigBird(FixedPattern):
    """Sliding window + global leading tokens + seeded random key blocks per query block and head."""

    window: int = Field(512, gt=0, description="local window in tokens")
    global_tokens: int = Field(64, ge=0, description="leading tokens every query sees and that see everything")
    random_blocks: int = Field(3, ge=0, description="random earlier key blocks per query block and head")
    seed: int = Field(0, description="seed of the random blocks (combined with the layer index)")

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        bs = self.block_size
        base = window_blocks(q_len, kv_len, bs, self.window, device)
        base |= leading_token_blocks(q_len, kv_len, bs, self.global_tokens, device)
        q_first, _, _, _ = block_spans(q_len, kv_len, bs, device)
        base |= q_first < self.global_tokens
        qb, kb = base.shape
        if self.random_blocks == 0:
            return base[None]
        # Random scores drawn on the CPU so the pattern is identical on every device; the top `random_blocks`
        # scores among each row's causally visible blocks are kept.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer_idx)
        scores = torch.rand(num_heads, qb, kb, generator=generator).to(device)
        visible = causal_block_matrix(q_len, kv_len, (bs, bs), device)
        scores = scores.masked_fill(~visible, -1.0)
        k = min(self.random_blocks, kb)
        top = scores.topk(k, dim=-1).indices
        chosen = torch.zeros(num_heads, qb, kb, dtype=torch.bool, device=device)
        chosen.scatter_(-1, top, True)
        return base[None] | (chosen & visible)
