"""StreamingLLM (Xiao et al. 2023): attention sinks + a recent window, at prefill and at decode.

- Prefill: a block-sparse pattern — every query block computes the key blocks holding the first ``sink`` tokens
  and those within ``window`` tokens of it.
- Decode (``evict: true``, the default): a :class:`~attnkit.cache.SinkWindowLayer` keeps only ``sink + window``
  tokens, so the KV cache stops growing. With ``evict: false`` decode attends to the whole cache (prefill-only
  sparsity).

With ``sink + window`` ≥ the sequence length both reproduce dense attention exactly.

Batches with left padding: sinks are the first ``sink`` *slots* of the batch, so a padded row's sinks are its
padding (masked) until its real tokens fall out of the window; batch rows of very different lengths lose their
sinks. Generate such batches one length-bucket at a time if that matters.
"""

from __future__ import annotations

import torch
from pydantic import Field

from attnkit.cache import SinkWindowLayer
from attnkit.method import DecodeLayer
from attnkit.registry import register
from attnkit.sparsify.fixed import FixedPattern, leading_token_blocks, window_blocks


@register("streaming_llm")
class StreamingLLM(FixedPattern):
    """Sink + window attention; prefill blocks and (optionally) a decode cache that really evicts."""

    sink: int = Field(64, ge=0, description="leading tokens always attended (attention sinks)")
    window: int = Field(1024, gt=0, description="most recent tokens attended, the query itself included")
    evict: bool = Field(True, description="decode with a cache that keeps only sink + window tokens")

    def pattern(self, q_len, kv_len, num_heads, layer_idx, device):
        bs = self.block_size
        blocks = window_blocks(q_len, kv_len, bs, self.window, device)
        blocks |= leading_token_blocks(q_len, kv_len, bs, self.sink, device)
        return blocks[None]

    def make_decode_layer(self, layer_idx: int, attention) -> DecodeLayer | None:
        return SinkWindowDecode(self, layer_idx) if self.evict else None

    def make_cache_layer(self, layer_idx: int) -> SinkWindowLayer:
        return SinkWindowLayer(self.sink, self.window)


class SinkWindowDecode(DecodeLayer):
    """Maps a mask over all seen keys (last dim) onto the sink + recent keys the cache returned."""

    method: StreamingLLM

    def key_padding(self, key_padding_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
        if key_padding_mask is None or key_padding_mask.shape[-1] == kv_len:
            return key_padding_mask
        sink = self.method.sink
        recent = kv_len - sink
        seen = key_padding_mask.shape[-1]
        return torch.cat([key_padding_mask[..., :sink], key_padding_mask[..., seen - recent :]], -1)
