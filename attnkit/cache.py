"""transformers Cache layers that carry attnkit state, and the cache a patched model generates with.

``make_cache(model)`` builds a :class:`AttnkitCache` (a ``DynamicCache``) whose layers come from each layer's
decode method (plain ``DynamicLayer`` where there is none). Pass it to ``generate``::

    out = model.generate(**inputs, past_key_values=attnkit.make_cache(model))

(attnkit's lm-eval model does this for you.)

Layers here keep transformers' conventions: keys/values ``[B, Hkv, S, D]`` post-RoPE, and ``get_seq_length`` is the
number of tokens *seen*, so positions keep counting after eviction. ``get_mask_sizes`` reports every seen token
(offset 0): the model-level padding mask then covers all of them, and the layer's decode module maps it onto the
keys that were kept (:meth:`attnkit.method.DecodeLayer.key_padding`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer


class SinkWindowLayer(DynamicLayer):
    """StreamingLLM's cache: the first ``sink`` tokens plus the most recent tokens, ``sink + window`` in all.

    After every update it stores at most ``sink + window - 1`` tokens, so a decode step attends to exactly
    ``sink + window`` keys (itself included) and memory stays bounded however long generation runs. A prefill
    chunk sees all of its own keys (the prefill method decides which blocks it computes); only what is *stored*
    is trimmed.

    Keys keep their original rotary positions (no re-rotation), so relative distances are the true ones.
    """

    is_sliding = False  # masks are built for all seen tokens; see the module docstring

    def __init__(self, sink: int, window: int):
        super().__init__()
        if sink < 0 or window <= 0:
            raise ValueError(f"sink must be ≥ 0 and window > 0, got sink={sink}, window={window}")
        self.sink = sink
        self.window = window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        keep_recent = self.window - 1
        if keys.shape[-2] > self.sink + keep_recent:
            self.keys = torch.cat([keys[..., : self.sink, :], keys[..., keys.shape[-2] - keep_recent :, :]], dim=-2)
            self.values = torch.cat(
                [values[..., : self.sink, :], values[..., values.shape[-2] - keep_recent :, :]], dim=-2
            )
        else:
            self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.sink + self.window

    def stored_tokens(self) -> int:
        """Tokens held right now (≤ ``sink + window - 1``)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sink+window cache has evicted tokens and cannot be cropped")


class LinearAttentionLayer(DynamicLayer):
    """A linear-attention layer's cache: the recurrent state plus, for the sliding-window hybrid, its window.

    Holds ``kv_state [B, Hkv, F, D]`` and ``z_state [B, Hkv, F]`` (float32; the sums of ``φ(k) vᵀ`` and ``φ(k)`` over
    every token already folded in) and ``keys``/``values [B, Hkv, ≤ window − 1, D]``: the most recent tokens, which
    the next query still sees through the softmax window. Memory is O(1) in the context length.

    The protocol, per attention call: :meth:`update` (called by the model) appends the call's keys/values to the
    kept ones and returns that buffer; the layer's linear-attention module computes the output from the buffer and
    the state, then calls :meth:`commit` with the new state and how many of the buffer's last tokens to keep.
    ``get_seq_length`` counts every token seen (positions keep counting).
    """

    is_sliding = False  # masks cover all seen tokens; the module maps them onto the buffer

    def __init__(self, window: int = 0):
        super().__init__()
        if window < 0:
            raise ValueError(f"window must be ≥ 0, got {window}")
        self.window = window
        self.cumulative_length = 0
        self.kv_state: torch.Tensor | None = None
        self.z_state: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(kv_state, z_state)``, or None before the first commit."""
        return None if self.kv_state is None else (self.kv_state, self.z_state)

    def commit(self, state: tuple[torch.Tensor, torch.Tensor], keep: int) -> None:
        """Store the new recurrent ``state`` and keep only the buffer's last ``keep`` tokens."""
        self.kv_state, self.z_state = state[0].detach(), state[1].detach()
        stored = self.keys.shape[-2]
        start = max(0, stored - keep)
        self.keys = self.keys[..., start:, :]
        self.values = self.values[..., start:, :]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def stored_tokens(self) -> int:
        """Tokens held as keys/values right now (≤ ``window − 1``)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def state_bytes(self) -> int:
        """Bytes of the recurrent state (what replaces the KV cache)."""
        return sum(t.numel() * t.element_size() for t in (self.kv_state, self.z_state) if t is not None)

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.kv_state = self.z_state = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a linear-attention cache has folded its tokens into a state and cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.kv_state is not None:
            self.kv_state = self.kv_state.repeat_interleave(repeats, dim=0)
            self.z_state = self.z_state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.kv_state is not None:
            self.kv_state, self.z_state = self.kv_state[indices], self.z_state[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))
        if self.kv_state is not None:
            self.kv_state = self.kv_state.index_select(0, beam_idx.to(self.kv_state.device))
            self.z_state = self.z_state.index_select(0, beam_idx.to(self.z_state.device))


class AttnkitCache(DynamicCache):
    """A ``DynamicCache`` whose per-layer cache layers are chosen by the patched model's decode methods."""

    def __init__(self, layers: list):
        super().__init__()
        self.layers = layers
        self.layer_class_to_replicate = None


def make_cache(model: PreTrainedModel) -> AttnkitCache | None:
    """The cache to generate with, or ``None`` when no layer of ``model`` has a decode method.

    Also ``None`` while the model runs dense (inside :func:`attnkit.dense` or after ``unpatch``): a dense run
    must see the whole KV cache, not an evicting one.
    """
    from attnkit.attention import ATTN_IMPLEMENTATION, attention_modules

    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        return None

    layers, any_decode = [], False
    for idx, attention in enumerate(attention_modules(model)):
        patch = getattr(attention, "attnkit", None)
        if patch is not None and patch.decode is not None:
            layers.append(patch.decode.method.make_cache_layer(idx))
            any_decode = True
        elif patch is not None and getattr(patch, "replacement", None) is not None:
            layers.append(patch.replacement.method.make_cache_layer(idx))
            any_decode = True
        else:
            layers.append(DynamicLayer())
    return AttnkitCache(layers) if any_decode else None
