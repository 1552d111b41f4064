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

import weakref

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from attnkit.kernels.page_bounds import PendingFold, fold_last_token, quantize_bounds


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
            self.keys = torch.cat(
                [keys[..., : self.sink, :], keys[..., keys.shape[-2] - keep_recent :, :]], dim=-2
            )
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


def page_bounds_layer_of(keys: torch.Tensor) -> PageBoundsLayer | None:
    """The :class:`PageBoundsLayer` whose ``update`` returned ``keys`` (still alive), or None."""
    ref = getattr(keys, "attnkit_cache_layer", None)
    return ref() if ref is not None else None


class PageBoundsLayer(DynamicLayer):
    """Quest's cache: keys and values, plus the element-wise min and max of every page's keys.

    Storage: ``keys``/``values`` are ``[B, Hkv, S, D]`` views of buffers that grow by an eighth (at least 256 slots)
    when full, so a decode step writes one token instead of re-concatenating the whole cache (``DynamicLayer``
    copies all ``S`` tokens every step). ``page_min``/``page_max`` are ``[B, Hkv, pages, D]`` in the keys' dtype.

    Pages are counted per row from the row's first real token: with ``pad[b]`` leading padding slots (left padding,
    as ``generate`` pads a batch), page ``j`` of row ``b`` holds slots ``pad[b] + j·page_size`` onwards. Padding is
    thus never inside a page, and a padded row has exactly the pages (and bounds) of the same row unpadded. The
    padding is read from the attention mask on the first :meth:`update_bounds` call (the prefill); later tokens are
    real.

    Bounds are folded in incrementally by :meth:`update_bounds`, which the Quest decode module calls on every
    forward (prefill: every new page, per row; decode: one token, the last page's bounds updated in place, or
    started when the token opens a new page). ``track_bounds=False`` keeps only the growing buffers (Quest's dense
    layers). ``int8_bounds=True`` also keeps an 8-bit copy of the bounds (``page_min_int8``/``page_max_int8 [B, Hkv,
    pages, D]`` and ``page_scale [B, Hkv, pages]`` float32, rounded outward: see
    :func:`attnkit.kernels.page_bounds.quantize_bounds`), rewritten whenever a page's bounds change; Quest then
    scores pages from it and reads about half the bytes.

    Fixed capacity (:meth:`make_static`, what :func:`attnkit.generate_graphed` sets up): the buffers are allocated
    once for ``max_cache_len`` slots and never move, and a decode step (one token after the prefill) writes its key
    and value at a *device-side* length (``length_t``, int64 ``[1]``, advanced on the GPU), returns the whole
    ``[B, Hkv, max_cache_len, D]`` buffers, and Quest's kernels read the filled length from ``length_t``: the step
    has no host-side value that changes from token to token, so it can be captured once as a CUDA graph and
    replayed. The host-side ``length`` still advances on eager steps; a replayed graph advances only the device
    (:meth:`sync_length` reads it back).

    The keys view carries a weak reference to this layer (:func:`page_bounds_layer_of` resolves it): transformers
    hands the attention function the tensors ``update`` returned but not the cache, and this is how the decode module
    finds the bounds that belong to exactly those keys. Weak, because the layer holds the view: a strong reference
    would make a cycle that keeps a finished cache's GPU memory until the garbage collector runs.
    """

    is_sliding = False
    supports_early_init = False  # buffers are sized on the first update

    def __init__(self, page_size: int = 16, track_bounds: bool = True, int8_bounds: bool = False):
        super().__init__()
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = page_size
        self.track_bounds = track_bounds
        self.int8_bounds = int8_bounds and track_bounds
        self.max_cache_len: int | None = None  # fixed capacity (make_static), else the buffers grow
        self._clear()

    def _clear(self) -> None:
        self.length = 0  # slots stored (padding included)
        self.bounded = 0  # slots folded into the page bounds
        self._keys: torch.Tensor | None = None  # [B, Hkv, capacity, D]
        self._values: torch.Tensor | None = None
        self.page_min: torch.Tensor | None = None  # [B, Hkv, page capacity, D]
        self.page_max: torch.Tensor | None = None
        self.page_min_int8: torch.Tensor | None = None  # [B, Hkv, page capacity, D] int8 (int8_bounds)
        self.page_max_int8: torch.Tensor | None = None
        self.page_scale: torch.Tensor | None = None  # [B, Hkv, page capacity] float32
        self.pad: torch.Tensor | None = None  # [B] int32, leading padding slots per row
        self.last_page: torch.Tensor | None = None  # [B] int32, index of each row's last (current) page
        self.min_pad = 0  # min over rows of pad, on the host (how many pages the longest row has)
        self._pad_host: list[int] = []
        self.length_t: torch.Tensor | None = None  # [1] int64 on the device, = length (fixed capacity only)
        self.all_pages: torch.Tensor | None = None  # [1, 1, capacity pages]: every page listed (fixed-capacity dense)

    def make_static(self, max_cache_len: int) -> None:
        """Fix the capacity at ``max_cache_len`` slots (padding included): allocated once on the first update, decode
        steps then run at a device-side length (see the class docstring). Call before the first update."""
        if self.is_initialized and self.length:
            raise ValueError("make_static must be called on an empty cache (before the prefill)")
        if max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
        self.max_cache_len = max_cache_len

    @property
    def static_decode(self) -> bool:
        """True when the next one-token update is a fixed-capacity decode step (device-side length)."""
        return self.max_cache_len is not None and self.length > 0

    def sync_length(self) -> None:
        """Read the device-side length back after decode steps replayed from a CUDA graph (one host sync)."""
        if self.length_t is not None:
            self.length = self.bounded = int(self.length_t.item())
            self._publish()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        need = self.length + key_states.shape[-2]
        self._reserve(need, key_states, value_states)
        if self.static_decode and key_states.shape[-2] == 1:
            # Written at the device-side length: the same kernels at every step (capturable in a CUDA graph).
            self._keys.index_copy_(2, self.length_t, key_states)
            self._values.index_copy_(2, self.length_t, value_states)
            self.length_t += 1
            self.length = need
            self._publish(whole=True)
            return self.keys, self.values
        self._keys[:, :, self.length : need] = key_states
        self._values[:, :, self.length : need] = value_states
        self.length = need
        if self.max_cache_len is not None:
            self.length_t.fill_(need)
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _reserve(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[2]
        if need <= capacity:
            return
        if self.max_cache_len is not None:
            if capacity or need > self.max_cache_len:
                raise ValueError(
                    f"this fixed-capacity cache holds {self.max_cache_len} tokens (padding included) and would need "
                    f"{need}: make the cache with a larger max_cache_len"
                )
            self.length_t = torch.zeros(1, dtype=torch.long, device=key_states.device)
            capacity = self.max_cache_len
        else:
            capacity = need + max(need // 8, 256)
        b, h, _, d = key_states.shape
        keys = key_states.new_empty(b, h, capacity, d)
        values = value_states.new_empty(b, h, capacity, value_states.shape[-1])
        if self.length:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values
        if self.track_bounds:
            pages = -(-capacity // self.page_size) + 1
            page_min = key_states.new_empty(b, h, pages, d)
            page_max = key_states.new_empty(b, h, pages, d)
            used = 0 if self.page_min is None else self.page_min.shape[2]
            if used:
                page_min[:, :, :used] = self.page_min
                page_max[:, :, :used] = self.page_max
            self.page_min, self.page_max = page_min, page_max
            if self.int8_bounds:
                q_min = key_states.new_empty(b, h, pages, d, dtype=torch.int8)
                q_max = key_states.new_empty(b, h, pages, d, dtype=torch.int8)
                scale = key_states.new_empty(b, h, pages, dtype=torch.float32)
                if used:
                    q_min[:, :, :used] = self.page_min_int8
                    q_max[:, :, :used] = self.page_max_int8
                    scale[:, :, :used] = self.page_scale
                self.page_min_int8, self.page_max_int8, self.page_scale = q_min, q_max, scale

    def _publish(self, whole: bool = False) -> None:
        """Expose the stored slots as ``keys``/``values`` (``whole``: the whole fixed-capacity buffers)."""
        end = self._keys.shape[2] if whole else self.length
        self.keys = self._keys[:, :, :end]
        self.values = self._values[:, :, :end]
        self.keys.attnkit_cache_layer = weakref.ref(self)

    # ----------------------------------------------------------------------------------------- page bounds
    def num_pages(self) -> int:
        """Pages of the longest row (the bounds' used extent)."""
        return -(-(self.length - self.min_pad) // self.page_size)

    def update_bounds(
        self, key_padding_mask: torch.Tensor | None = None, defer_one_token: bool = False
    ) -> PendingFold | None:
        """Fold the tokens stored since the last call into the page bounds.

        ``key_padding_mask [B, S]`` (True = real token) or None; read on the first call only, to find each row's
        leading padding. It must be left padding (``0…0 1…1`` per row).

        ``defer_one_token``: when the only new token is one decode token, do not fold it here but return its
        :class:`~attnkit.kernels.page_bounds.PendingFold`, which the caller must run in this step (Quest passes it
        to ``page_scores(fold=...)``, which folds it inside the scoring launch). Returns None otherwise.
        """
        if self.pad is None and self.length and (self.track_bounds or self.max_cache_len is not None):
            self._set_padding(key_padding_mask)  # fixed-capacity dense layers need the padding too
        if not self.track_bounds or self.bounded == self.length:
            return None
        pending = None
        if self.length - self.bounded == 1 and self.bounded > 0:
            pending = self._pending_fold()
            if not defer_one_token:
                fold_last_token(*pending)
                pending = None
        else:
            self._fold_rows()
        self.bounded = self.length
        return pending

    def _set_padding(self, key_padding_mask: torch.Tensor | None) -> None:
        b = self._keys.shape[0]
        if key_padding_mask is None:
            pad = torch.zeros(b, dtype=torch.int32, device=self.device)
        else:
            if key_padding_mask.dim() != 2 or key_padding_mask.shape != (b, self.length):
                raise ValueError(
                    f"Quest's page bounds need a key padding mask [B, S] = [{b}, {self.length}], got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            real = key_padding_mask.bool()
            first = torch.where(real.any(-1), real.int().argmax(-1), self.length)
            left_padded = torch.arange(self.length, device=real.device)[None, :] >= first[:, None]
            if not torch.equal(left_padded, real):
                raise ValueError(
                    "Quest pages each row from its first real token and needs left padding (each mask row 0…0 1…1); "
                    "this batch's mask has padding after a real token"
                )
            pad = first.to(device=self.device, dtype=torch.int32)
        self.pad = pad
        self._pad_host = pad.tolist()
        self.min_pad = min(self._pad_host)

    def _fold_rows(self) -> None:
        """Recompute, per row, every page from the first one holding an unfolded token (the partial page's old
        tokens are re-read: at most ``page_size - 1``)."""
        p = self.page_size
        for row, pad in enumerate(self._pad_host):
            first_page = max(self.bounded - pad, 0) // p
            lo = pad + first_page * p
            if lo >= self.length:
                continue
            chunk = self._keys[row, :, lo : self.length]  # [H, L, D]
            pages = -(-chunk.shape[1] // p)
            fill = pages * p - chunk.shape[1]
            if fill:  # a repeat of the last key changes neither the min nor the max
                chunk = torch.cat([chunk, chunk[:, -1:].expand(-1, fill, -1)], dim=1)
            chunk = chunk.view(chunk.shape[0], pages, p, chunk.shape[-1])
            self.page_min[row, :, first_page : first_page + pages] = chunk.amin(2)
            self.page_max[row, :, first_page : first_page + pages] = chunk.amax(2)
            if self.int8_bounds:
                span = slice(first_page, first_page + pages)
                q_min, q_max, scale = quantize_bounds(self.page_min[row, :, span], self.page_max[row, :, span])
                self.page_min_int8[row, :, span], self.page_max_int8[row, :, span] = q_min, q_max
                self.page_scale[row, :, span] = scale
        self.last_page = ((self.length - 1 - self.pad) // p).to(torch.int32)

    def _pending_fold(self) -> PendingFold:
        """The update of one decode token per row: its page's bounds tightened in place, or started if the token
        opens the page (one Triton launch on a GPU: :func:`attnkit.kernels.page_bounds.fold_last_token`)."""
        return PendingFold(
            self._keys, self.page_min, self.page_max, self.last_page,
            self.length_t if self.max_cache_len is not None else self.length, self.pad, self.page_size,
            (self.page_min_int8, self.page_max_int8, self.page_scale) if self.int8_bounds else None,
        )

    # ------------------------------------------------------------------------ transformers' cache plumbing
    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        self.bounded = 0  # recomputed from the kept keys on the next update_bounds
        if self.length_t is not None:
            self.length_t.fill_(self.length)
        self._publish()

    def _map_rows(self, fn) -> None:
        for name in ("_keys", "_values", "page_min", "page_max", "page_min_int8", "page_max_int8", "page_scale", "pad",
                     "last_page"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        if self.pad is not None:
            self._pad_host = self.pad.tolist()
            self.min_pad = min(self._pad_host) if self._pad_host else 0
        if self._keys is not None:
            self._publish()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self):
        raise NotImplementedError("Quest's page-bounds cache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("Quest's page-bounds cache does not support offloading")


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous and alone in its storage, else a compact copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


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
        """Store the new recurrent ``state`` and keep only the buffer's last ``keep`` tokens.

        The layer owns its state tensors: a view into a larger buffer (fla's prefill returns the last token of its
        ``[B, Hkv, S, F]`` key sums, and a strided slice of a per-query-head state) is copied once, so the buffer is
        freed and the fused decode step may update the state in place."""
        self.kv_state, self.z_state = _owned(state[0].detach()), _owned(state[1].detach())
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
        raise NotImplementedError(
            "a linear-attention cache has folded its tokens into a state and cannot be cropped"
        )

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


def make_cache(model: PreTrainedModel, max_cache_len: int | None = None) -> AttnkitCache | None:
    """The cache to generate with, or ``None`` when no layer of ``model`` has a decode method.

    Also ``None`` while the model runs dense (inside :func:`attnkit.dense` or after ``unpatch``): a dense run
    must see the whole KV cache, not an evicting one.

    ``max_cache_len``: a fixed-capacity cache (prompt + new tokens, padding included) whose decode steps can be
    captured as a CUDA graph (:func:`attnkit.generate_graphed`); every layer must then decode with Quest.
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
    if not any_decode:
        return None
    if max_cache_len is not None:
        for idx, layer in enumerate(layers):
            if not isinstance(layer, PageBoundsLayer):
                raise ValueError(
                    f"a fixed-capacity cache needs Quest's cache in every layer; layer {idx} has "
                    f"{type(layer).__name__} (apply quest with layers: all; list dense layers in dense_layers)"
                )
            layer.make_static(max_cache_len)
    return AttnkitCache(layers)
