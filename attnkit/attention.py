"""The transformers integration: attnkit's attention function, its mask function, and per-layer dispatch.

attnkit never replaces ``forward``. It registers one name, ``"attnkit"``, with both transformers registries:

- ``AttentionInterface``: :func:`attnkit_attention` receives ``query [B, Hq, Sq, D]`` and ``key/value
  [B, Hkv, Sk, D]`` (post-RoPE, cache already updated, GQA not expanded) and hands them to the
  :class:`AttnkitAttention` module attached to that attention layer (``self_attn.attnkit``); layers without one
  run dense SDPA.
- ``AttentionMaskInterface``: :func:`attnkit_mask`. Without a registered mask function transformers passes no
  mask at all, and padding would be silently ignored. Ours returns the cheap form of the mask: ``None`` for a
  plain causal input, or a 2D key-padding mask ``[B, Sk]`` (True = real token) — never an ``Sq × Sk`` tensor,
  which at 128K tokens would be 16 GB. Mask patterns that are not causal + padding (packed sequences, sliding
  windows set in the model config) fall back to transformers' 4D ``sdpa_mask`` and run dense.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.utils import logging

from attnkit.kernels import block_sparse_attention
from attnkit.kernels.vertical_slash import VerticalSlashMask, vertical_slash_attention
from attnkit.method import DecodeLayer, PrefillLayer, ReplacementLayer

logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATION = "attnkit"


# --------------------------------------------------------------------------------------------------- dense path
def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal SDPA, GQA without copies. ``query [B,Hq,Sq,D]``, ``key/value [B,Hkv,Sk,D]`` → ``[B,Hq,Sq,D]``.

    The queries are the last ``Sq`` of the ``Sk`` positions. ``key_padding_mask [B, Sk]`` (True = real token).
    """
    sq, sk = query.shape[-2], key.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if key_padding_mask is None and sq == sk:
        return nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
    if key_padding_mask is None and sq == 1:
        # Decode: the one query is the last position and sees every key. No mask keeps SDPA on its fused kernels
        # (a [1, Sk] mask sends it to a slower path: 0.72x of dense decode at 64K-128K on an H100).
        return nn.functional.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=gqa)
    mask = None
    if sq > 1:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()
        mask = pad if mask is None else mask & pad
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------- per-layer module
class AttnkitAttention(nn.Module):
    """What attnkit attaches to one attention module: an optional prefill and an optional decode method.

    ``stats`` holds what the last prefill did (its ``block_mask`` or ``dense_fallback``), read by
    ``model.attnkit_stats``, which computes densities only when asked: no host sync on the hot path.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.prefill: PrefillLayer | None = None
        self.decode: DecodeLayer | None = None
        self.replacement: ReplacementLayer | None = None  # computes the whole attention (linear attention)
        self.stats: dict[str, Any] = {}

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor:
        if self.replacement is not None:
            return self.replacement(query, key, value, key_padding_mask, scale)
        sq, sk = query.shape[-2], key.shape[-2]
        if self.decode is not None:
            # A decode method's cache may have evicted keys: map the padding mask onto what is left.
            key_padding_mask = self.decode.key_padding(key_padding_mask, sk)
        if key_padding_mask is not None and key_padding_mask.shape[-1] != sk:
            raise RuntimeError(
                f"layer {self.layer_idx}: padding mask covers {key_padding_mask.shape[-1]} keys but the cache returned "
                f"{sk}; a cache that evicts tokens needs its decode method in the recipe"
            )
        if self.decode is not None:
            out = self.decode.attend(query, key, value, key_padding_mask, scale)
            if out is not None:  # the decode method attended itself (Quest's sparse decode)
                return out
        if sq > 1 and self.prefill is not None:
            if sq < self.prefill.method.min_seq_len:
                self.stats = {"dense_fallback": True, "q_len": sq, "kv_len": sk}
            else:
                block_mask = self.prefill.select_blocks(query, key, key_padding_mask)
                block_mask = block_mask.with_dense_last_rows(self.prefill.method.dense_last_blocks)
                self.stats = {"dense_fallback": False, "q_len": sq, "kv_len": sk, "block_mask": block_mask}
                if isinstance(block_mask, VerticalSlashMask):  # MInference: blocks + token-level key columns
                    return vertical_slash_attention(query, key, value, block_mask, scale, key_padding_mask)
                return block_sparse_attention(query, key, value, block_mask, scale, key_padding_mask)
        return dense_attention(query, key, value, key_padding_mask, scale)


# ------------------------------------------------------------------------------ functions transformers calls
def attnkit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``"attnkit"`` entry of ``AttentionInterface``. Returns ``([B, Sq, Hq, D], None)`` as transformers expects."""
    if dropout:
        raise ValueError("attnkit attention does not implement attention dropout; call model.eval() first")
    layer: AttnkitAttention | None = getattr(module, "attnkit", None)
    if attention_mask is not None and attention_mask.dim() == 4 and layer is not None and layer.replacement is not None:
        raise ValueError(
            f"layer {layer.layer_idx}: the model's attention mask is not causal + padding (a sliding window or packed "
            "sequences set in its config); linear attention cannot express it"
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        # A mask pattern attnkit cannot express as block lists (see the module docstring): dense, exactly.
        if layer is not None and layer.prefill is not None:
            logger.warning_once("attnkit: the model's mask is not causal + padding; sparse prefill runs dense")
        if layer is not None and layer.decode is not None:
            attention_mask = layer.decode.key_padding(attention_mask, key.shape[-2])
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if layer is None:
        out = dense_attention(query, key, value, attention_mask, scaling)
    else:
        out = layer(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def attnkit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``"attnkit"`` entry of ``AttentionMaskInterface``: ``None`` or a key-padding mask ``[B, kv_length]``."""
    if mask_function is not causal_mask_function:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            **{k: v for k, v in kwargs.items() if k in ("device", "use_vmap")},
        )
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    padding = padding[:, kv_offset : kv_offset + kv_length].bool()
    # One host sync per forward (masks are built once per model call, not per layer) buys the fast unpadded path.
    return None if bool(padding.all()) else padding


def register() -> None:
    """Register ``"attnkit"`` with transformers (idempotent; done on ``import attnkit``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attnkit_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attnkit_mask)


# ------------------------------------------------------------------------------------------- model plumbing
def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The model's self-attention modules in layer order (``decoder.layers[i].self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__}: attnkit expects decoder layers with a `self_attn` module "
            "(Llama/Qwen2/Mistral-style); this architecture is not supported"
        )
    return [layer.self_attn for layer in layers]


def attnkit_layers(model: PreTrainedModel) -> Iterator[AttnkitAttention]:
    for attention in attention_modules(model):
        layer = getattr(attention, "attnkit", None)
        if layer is not None:
            yield layer


register()
