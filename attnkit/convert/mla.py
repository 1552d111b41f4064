"""GQA/MHA → multi-head latent attention (``mla`` method), after TransMLA (Meng et al. 2025) and MHA2MLA (Ji et al. 2025).

Per converted layer, with ``Hq`` query heads, ``Hkv`` KV heads of size ``D`` (pre-RoPE projections ``q, k, v``):

1. **Decoupled RoPE key (RoRoPE).** RoPE rotates each frequency pair ``(i, i + D/2)`` of every head by the same
   angle; written as complex numbers ``z_{h,i} = k_{h,i} + i·k_{h,i+D/2}``, any real orthogonal mix of the *heads* at
   one frequency commutes with it. Per frequency, the mix ``U_i`` is the PCA of the keys over heads (calibration
   second moments), so its first component holds the most key energy. ``rope_dim`` slots keep RoPE: ``rope_dim / 2``
   frequencies (``rope_frequencies``: ``strided`` = every ``D / rope_dim``-th, as TransMLA's collapse; ``highest`` =
   the fastest-rotating ones, as MHA2MLA's S_high) × their first component (more components when ``rope_dim > D``).
   These form one rope key ``k_rope [rope_dim]`` shared by all heads (as DeepSeek's), and each query head gets the
   matching ``q_rope``. The rest of the key (``k_nope = k − its rope-slot part``, per KV head, ``Hkv·D`` values)
   loses RoPE: the one approximation before the low rank (none at ``rope_dim = Hkv·D``).
2. **Joint low rank of keys and values.** ``y = [α·k_nope; v]`` (``α`` balances the key and value energy when
   ``kv_balance``) is compressed by PCA of its calibration second moment (uncentred, biases included):
   ``c = Vᵣᵀ y`` is the latent (``kv_rank`` values, or the smallest rank holding ``energy`` of the variance), and
   ``k_nope ≈ B_k c``, ``v ≈ B_v c``. Exact at full rank (``2·Hkv·D − rope_dim``; higher ranks are an error).
3. **The module** (:class:`MLAAttention`, replacing ``self_attn``): ``q_proj`` gives per head ``[q_nope (D); q_rope]``
   (``q_nope`` is the original query), ``kv_a_proj`` gives ``[c; k_rope]``, ``kv_b_proj`` maps ``c`` to
   ``[k_nope; v]`` per KV head, ``o_proj`` is the original. The cache holds ``c`` and the rotated ``k_rope``:
   ``kv_rank + rope_dim`` values per token and layer (DeepSeek's layout: latent as the "key", rope key as the
   "value" of a transformers cache layer). Two equal paths (tested): *unabsorbed* expands ``c`` to per-head keys and
   values (a GQA attention with key size ``D + rope_dim``, run through attnkit's dispatcher, so prefill sparsity
   still composes); *absorbed* folds ``B_k`` into the query (``q_lat = B_kᵀ q_nope``) and ``B_v`` after the
   attention, an MQA over the latent itself, so the latent is never copied per head (``absorb: decode`` uses it
   for one-token steps, as two batched matmuls over all heads that read the cache in place; longer chunks fold the
   heads into SDPA's query rows).

Exact conversions (tested): ``rope_dim = Hkv·D`` with full rank reproduces the original logits; any setting's
absorbed and unabsorbed paths agree, cached decoding equals the full forward, and ``attnkit.save`` → ``load``
gives the same logits.

:func:`export_deepseek_v3` writes a native ``DeepseekV3ForCausalLM`` checkpoint (dense MLPs,
``first_k_dense_replace`` = all layers) that plain transformers (and vLLM/SGLang) load; see its docstring for what
it can and cannot represent exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from attnkit.attention import AttnkitAttention, attention_modules, dense_attention
from attnkit.convert.conversion import ConversionMethod, calibration_batches, kv_second_moments
from attnkit.registry import register

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ method
@register("mla")
class MLA(ConversionMethod):
    """Convert attention layers to MLA (decoupled RoPE key + joint low-rank latent of keys and values)."""

    conversion_stage = 1

    kv_rank: int | None = Field(
        None, gt=0, description="latent size per token and layer (DeepSeek's kv_lora_rank); overrides energy"
    )
    energy: float = Field(
        0.99, gt=0, le=1, description="per layer, the smallest rank holding this fraction of the [k_nope; v] "
        "calibration energy (when kv_rank is not given)"
    )
    rope_dim: int = Field(64, gt=0, description="size of the shared rope key (even; ≤ head_dim for the DeepSeek export)")
    rope_frequencies: Literal["strided", "highest"] = Field(
        "strided", description="which RoPE frequencies keep rotating: every (head_dim / rope_dim)-th, or the fastest"
    )
    kv_balance: bool = Field(True, description="scale keys to the values' energy before the joint PCA")
    latent_norm: bool = Field(
        False, description="RMSNorm on the latent (DeepSeek's kv_a_layernorm; weight set to the calibration RMS): needed "
        "for an exact DeepSeek-V3 export; before recovery it rescales every token's latent to that one RMS, which "
        "costs (+8 nats held-out NLL on SmolLM2-135M, +2.4 on Qwen2.5-0.5B): recover with it"
    )
    absorb: Literal["decode", "always", "never"] = Field(
        "decode", description="when to run the absorbed (latent-space) path: one-token decode steps, always, never"
    )
    layer_ranks: dict[int, int] | None = Field(
        None, description="latent rank per converted layer (written by the conversion; a checkpoint reloads with it)"
    )

    @model_validator(mode="after")
    def _settings(self) -> MLA:
        if self.rope_dim % 2:
            raise ValueError(f"mla: rope_dim must be even (RoPE rotates pairs), got {self.rope_dim}")
        return self

    # ---------------------------------------------------------------------------------------- geometry
    def rope_slots(self, head_dim: int, kv_heads: int) -> tuple[list[int], int]:
        """(the RoPE frequency indices that keep rotating, components per frequency) for this head geometry."""
        half = head_dim // 2
        if self.rope_dim > kv_heads * head_dim:
            raise ValueError(
                f"mla: rope_dim {self.rope_dim} does not fit: the keys have {kv_heads} heads × {head_dim} = "
                f"{kv_heads * head_dim} dimensions"
            )
        if self.rope_dim // 2 <= half:
            count, per = self.rope_dim // 2, 1
        else:
            if self.rope_dim % head_dim:
                raise ValueError(
                    f"mla: rope_dim {self.rope_dim} > head_dim {head_dim} must be a multiple of head_dim (whole "
                    "components per frequency)"
                )
            count, per = half, self.rope_dim // head_dim
        if self.rope_frequencies == "highest":
            return list(range(count)), per
        if half % count:
            raise ValueError(
                f"mla: strided rope frequencies need rope_dim / 2 = {count} to divide head_dim / 2 = {half} "
                f"(choose rope_dim among {[2 * c for c in range(1, half + 1) if half % c == 0]}, or "
                "rope_frequencies: highest)"
            )
        return list(range(0, half, half // count)), per

    def max_rank(self, head_dim: int, kv_heads: int) -> int:
        return 2 * kv_heads * head_dim - self.rope_dim

    def check(self, model) -> None:
        from attnkit.convert.gqa import _check_plain_attention

        _check_plain_attention(model)
        attentions = attention_modules(model)
        indices = self.layer_indices(len(attentions))
        kv_heads = model.config.num_key_value_heads
        head_dim = attentions[0].head_dim
        if model.config.num_attention_heads % kv_heads:
            raise ValueError(f"mla: {model.config.num_attention_heads} query heads are not a multiple of {kv_heads} KV heads")
        self.rope_slots(head_dim, kv_heads)
        limit = self.max_rank(head_dim, kv_heads)
        ranks = [self.kv_rank] if self.kv_rank is not None else []
        ranks += list((self.layer_ranks or {}).values())
        for rank in ranks:
            if rank > limit:
                raise ValueError(
                    f"mla: kv_rank {rank} is above what fits: the non-RoPE keys and the values span at most "
                    f"2 × {kv_heads} heads × {head_dim} − rope_dim {self.rope_dim} = {limit} dimensions"
                )
        if self.layer_ranks is not None and set(self.layer_ranks) - set(indices):
            raise ValueError(f"mla: layer_ranks names layers {sorted(set(self.layer_ranks) - set(indices))} it does "
                             "not convert")

    # ---------------------------------------------------------------------------------------- convert
    def convert(self, model, data: Any = None) -> dict[str, Any]:
        self.check(model)
        attentions = attention_modules(model)
        indices = self.layer_indices(len(attentions))
        batches = calibration_batches(model, self, data)
        stats = kv_second_moments(model, batches, indices)
        report: dict[str, Any] = {"method": "mla", "calibration_tokens": sum(b.numel() for b in batches), "layers": {}}
        ranks = {}
        decoder_layers = model.get_decoder().layers
        for idx in indices:
            attention = attentions[idx]
            moments = stats[idx]["kv"] / stats[idx]["n"]
            module, info = convert_attention(attention, moments, self, rank=(self.layer_ranks or {}).get(idx))
            decoder_layers[idx].self_attn = module
            ranks[idx] = info["rank"]
            report["layers"][idx] = info
        self.layer_ranks = ranks
        return report

    def restore(self, model) -> None:
        if self.layer_ranks is None:
            raise ValueError("mla: the checkpoint's recipe has no layer_ranks (it was not written by a conversion)")
        attentions = attention_modules(model)
        decoder_layers = model.get_decoder().layers
        for idx in self.layer_indices(len(attentions)):
            attention = attentions[idx]
            if isinstance(attention, MLAAttention):
                continue
            module = MLAAttention.like(attention, self, self.layer_ranks[idx])
            decoder_layers[idx].self_attn = module


# ------------------------------------------------------------------------------------------------ module
class MLALayer(AttnkitAttention):
    """The weights of one MLA layer (under ``self_attn.attnkit``, so they save in ``attnkit.safetensors``), and the
    attnkit dispatcher its unabsorbed attention runs through (prefill/decode methods may still be attached)."""

    converted = True  # attnkit.unpatch keeps this module (the weights live here) and only detaches methods

    def __init__(self, layer_idx: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int, rank: int,
                 rope_frequencies: list[int], rope_per_frequency: int, q_bias: bool, kv_bias: bool, o_bias: bool,
                 latent_norm: bool, eps: float):
        super().__init__(layer_idx)
        self.q_heads, self.kv_heads, self.head_dim, self.rank = q_heads, kv_heads, head_dim, rank
        self.rope_dim = 2 * len(rope_frequencies) * rope_per_frequency
        self.q_proj = nn.Linear(hidden, q_heads * (head_dim + self.rope_dim), bias=q_bias)
        self.kv_a_proj = nn.Linear(hidden, rank + self.rope_dim, bias=kv_bias)
        self.kv_b_proj = nn.Linear(rank, kv_heads * 2 * head_dim, bias=False)
        self.o_proj = nn.Linear(q_heads * head_dim, hidden, bias=o_bias)
        self.latent_norm = nn.RMSNorm(rank, eps=eps) if latent_norm else None
        freqs = torch.tensor(rope_frequencies * rope_per_frequency, dtype=torch.long)
        self.register_buffer("rope_frequency_index", freqs)  # per rope slot: the column of RoPE's cos/sin
        self.register_buffer("latent_rms", torch.ones(()))  # calibration RMS of the latent (the export's norm weight)


class MLAAttention(nn.Module):
    """Drop-in ``self_attn`` of a decoder layer computing multi-head latent attention (see the module docstring).

    ``forward(hidden_states [B, S, hidden], position_embeddings=(cos, sin) [B, S, D], attention_mask, cache)``
    returns ``(out [B, S, hidden], None)``. ``attention_mask``: None (causal), a key-padding mask ``[B, Sk]`` (attnkit's
    mask function) or a 4D mask (other implementations). The cache layer receives ``latent [B, 1, S, rank]`` and
    ``k_rope [B, 1, S, rope_dim]`` (post-RoPE).
    """

    def __init__(self, layer: MLALayer, config, scaling: float, absorb: str):
        super().__init__()
        self.attnkit = layer
        self.layer_idx = layer.layer_idx
        self.head_dim = layer.head_dim
        self.config = config
        self.scaling = scaling
        self.absorb = absorb

    @classmethod
    def like(cls, attention: nn.Module, method: MLA, rank: int) -> MLAAttention:
        """An uninitialised MLA module shaped for ``attention`` (a Llama/Qwen2 ``self_attn``) and ``method``."""
        config = attention.config
        head_dim = attention.head_dim
        q_heads = attention.q_proj.out_features // head_dim
        kv_heads = attention.k_proj.out_features // head_dim
        freqs, per = method.rope_slots(head_dim, kv_heads)
        weight = attention.q_proj.weight
        layer = MLALayer(
            attention.layer_idx, attention.q_proj.in_features, q_heads, kv_heads, head_dim, rank, freqs, per,
            attention.q_proj.bias is not None, attention.k_proj.bias is not None or attention.v_proj.bias is not None,
            attention.o_proj.bias is not None, method.latent_norm, getattr(config, "rms_norm_eps", 1e-6),
        ).to(device=weight.device, dtype=weight.dtype)
        return cls(layer, config, attention.scaling, method.absorb)

    def kv_values_per_token(self) -> int:
        """Values cached per token in this layer: the latent and the shared rope key."""
        return self.attnkit.rank + self.attnkit.rope_dim

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        idx = self.attnkit.rope_frequency_index
        cos = torch.cat([cos[..., idx], cos[..., idx]], -1)[:, None]
        sin = torch.cat([sin[..., idx], sin[..., idx]], -1)[:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs: Any):
        layer = self.attnkit
        cache = cache if cache is not None else past_key_values
        bsz, seq, _ = hidden_states.shape
        d, r, dr = layer.head_dim, layer.rank, layer.rope_dim
        q = layer.q_proj(hidden_states).view(bsz, seq, layer.q_heads, d + dr).transpose(1, 2)
        q_nope, q_rope = q.split([d, dr], -1)
        latent, k_rope = layer.kv_a_proj(hidden_states).split([r, dr], -1)
        if layer.latent_norm is not None:
            latent = layer.latent_norm(latent)
        cos, sin = position_embeddings
        q_rope = self._rope(q_rope, cos, sin)
        k_rope = self._rope(k_rope[:, None], cos, sin)
        latent = latent[:, None]
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)
        absorbed = self.absorb == "always" or (self.absorb == "decode" and seq == 1)
        if absorbed:
            out = self._absorbed(q_nope, q_rope, latent, k_rope, attention_mask)
        else:
            out = self._unabsorbed(q_nope, q_rope, latent, k_rope, attention_mask)
        return layer.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1)), None

    def _attend(self, query, key, value, mask, dispatch: bool) -> torch.Tensor:
        if mask is not None and mask.dim() == 4:  # a 4D mask from another implementation's mask function
            gqa = query.shape[1] != key.shape[1]
            return nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=self.scaling, enable_gqa=gqa)
        if dispatch and self.config._attn_implementation == "attnkit":
            return self.attnkit(query, key, value, mask, self.scaling)
        return dense_attention(query, key, value, mask, self.scaling)

    def _unabsorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Per-KV-head keys ``[k_nope; k_rope]`` and values from the latent: GQA attention of key size D + rope_dim."""
        layer = self.attnkit
        bsz, _, sk, _ = latent.shape
        kv = layer.kv_b_proj(latent[:, 0]).view(bsz, sk, layer.kv_heads, 2 * layer.head_dim).transpose(1, 2)
        k_nope, value = kv.split([layer.head_dim, layer.head_dim], -1)
        key = torch.cat([k_nope, k_rope.expand(-1, layer.kv_heads, -1, -1)], -1)
        query = torch.cat([q_nope, q_rope], -1)
        # Fused SDPA kernels (flash) need equal key and value sizes: pad the values, drop the padding after.
        out = self._attend(query, key, nn.functional.pad(value, (0, key.shape[-1] - value.shape[-1])), mask,
                           dispatch=True)
        return out[..., : layer.head_dim]

    def _latent_attention(self, query, key, latent, key_padding_mask) -> torch.Tensor:
        """Attention of every head over the one latent "head" without copying it per head: the heads are folded
        into the query rows (``[B, 1, Hq·Sq, ·]``), so SDPA sees a single KV head. Causal rows: query ``s`` of a
        chunk of ``Sq`` sees keys ``≤ Sk − Sq + s``."""
        bsz, hq, sq, e = query.shape
        sk = key.shape[-2]
        mask = None
        if sq > 1:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
            mask = causal.repeat(hq, 1)[None, None]  # rows h·Sq + s
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].bool()
            mask = pad if mask is None else mask & pad
        out = nn.functional.scaled_dot_product_attention(
            query.reshape(bsz, 1, hq * sq, e), key, latent, attn_mask=mask, scale=self.scaling)
        return out.view(bsz, hq, sq, latent.shape[-1])

    def _latent_decode(self, q_lat, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """One-token step of the absorbed path: every head attends over the one latent "head".

        ``q_lat [B, Hq, 1, r]``, ``q_rope [B, Hq, 1, rope_dim]``, ``latent [B, 1, Sk, r]``, ``k_rope [B, 1, Sk,
        rope_dim]`` (the cache); ``mask``: None, a key-padding mask ``[B, Sk]`` (True = real token) or a 4D mask
        broadcastable to ``[B, Hq, 1, Sk]`` (bool, True = attend, or additive float). Returns ``[B, Hq, 1, r]``:
        ``softmax(scale·(q_lat·latentᵀ + q_rope·k_ropeᵀ)) · latent``, scores and softmax in fp32; a query that sees
        no key gets zeros (as SDPA). The one query is the last position, so causality needs no mask.
        """
        # Two batched matmuls over all heads ([B, Hq, r] × [B, r, Sk]) instead of cat([latent, k_rope]) + SDPA: no
        # per-step copy of the cache, and SDPA would fall to the math kernel for key size r + rope_dim ≠ value size r.
        lat = latent[:, 0]  # [B, Sk, r]
        scores = torch.bmm(q_lat[:, :, 0] * self.scaling, lat.transpose(1, 2)).float()  # [B, Hq, Sk]
        scores += torch.bmm(q_rope[:, :, 0] * self.scaling, k_rope[:, 0].transpose(1, 2)).float()
        if mask is not None:
            if mask.dim() == 2:
                mask = mask[:, None, :]  # [B, 1, Sk]
            elif mask.dim() == 4:
                mask = mask[:, :, -1]  # [B or 1, Hq or 1, Sk]: the one query row
            else:
                raise ValueError(
                    f"layer {self.layer_idx}: MLA decode expects a [B, Sk] or 4D mask, got {tuple(mask.shape)}")
            if mask.dtype == torch.bool or not mask.is_floating_point():
                scores = scores.masked_fill(~mask.bool(), float("-inf"))
            else:
                scores = scores + mask.float()
        probs = torch.softmax(scores, -1)
        if mask is not None:
            probs = probs.nan_to_num(0.0)  # rows with every key masked: zeros, as SDPA's math kernel
        return torch.bmm(probs.to(lat.dtype), lat)[:, :, None]

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """MQA over the latent: ``q_lat = B_kᵀ q_nope`` per head, values = the latent, then ``B_v`` per head.
        One-token steps run :meth:`_latent_decode`; longer chunks fold the heads into SDPA's query rows."""
        layer = self.attnkit
        per = layer.q_heads // layer.kv_heads
        w = _linear_weight(layer.kv_b_proj).view(layer.kv_heads, 2 * layer.head_dim, layer.rank)
        w_k, w_v = w[:, : layer.head_dim], w[:, layer.head_dim :]  # [Hkv, D, r]
        bsz, hq, sq, d = q_nope.shape
        q_lat = torch.einsum("bgpsd,gdr->bgpsr", q_nope.view(bsz, layer.kv_heads, per, sq, d), w_k)
        q_lat = q_lat.reshape(bsz, hq, sq, layer.rank)
        if sq == 1:
            out_lat = self._latent_decode(q_lat, q_rope, latent, k_rope, mask)  # [B, Hq, 1, r]
        else:
            query = torch.cat([q_lat, q_rope], -1)
            key = torch.cat([latent, k_rope], -1)
            if mask is not None and mask.dim() == 4:
                out_lat = self._attend(query, key, latent, mask, dispatch=False)  # [B, Hq, Sq, r]
            else:
                out_lat = self._latent_attention(query, key, latent, mask)
        out = torch.einsum("bgpsr,gdr->bgpsd", out_lat.view(bsz, layer.kv_heads, per, sq, layer.rank), w_v)
        return out.reshape(bsz, hq, sq, d)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies, LoRA adapters (peft, unmerged, during recovery) included."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight
    weight = base.weight
    if not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name)
    return weight


# ------------------------------------------------------------------------------------------------ the math
def rope_basis(moments: torch.Tensor, kv_heads: int, head_dim: int, freqs: list[int], per: int) -> torch.Tensor:
    """``E [rope_dim, Hkv·D]``: orthonormal rows; ``k_rope = E k`` over the keys of all heads (rotate-half layout:
    the real parts of the slots, then their imaginary parts). Per frequency the head mix is the PCA of the keys
    (real part of ``E[z_a · conj(z_b)]``), components by decreasing energy."""
    half = head_dim // 2
    key = moments[: kv_heads * head_dim, : kv_heads * head_dim]
    rows_re, rows_im = [], []
    for c in range(per):
        for f in freqs:
            re_idx = torch.arange(kv_heads) * head_dim + f
            im_idx = re_idx + half
            gram = key[re_idx][:, re_idx] + key[im_idx][:, im_idx]
            values, vectors = torch.linalg.eigh(gram.cpu())
            u = vectors[:, torch.argsort(values, descending=True)[c]]
            e_re = torch.zeros(kv_heads * head_dim, dtype=torch.float64)
            e_im = torch.zeros(kv_heads * head_dim, dtype=torch.float64)
            e_re[re_idx], e_im[im_idx] = u, u
            rows_re.append(e_re)
            rows_im.append(e_im)
    return torch.stack(rows_re + rows_im)


@torch.no_grad()
def convert_attention(attention: nn.Module, moments: torch.Tensor, method: MLA, rank: int | None = None
                      ) -> tuple[MLAAttention, dict[str, Any]]:
    """One Llama/Qwen2 ``self_attn`` → an :class:`MLAAttention` (see the module docstring); returns it and
    ``{rank, rope_dim, energy kept, key/value reconstruction error on calibration}``."""
    d = attention.head_dim
    q_heads = attention.q_proj.out_features // d
    kv_heads = attention.k_proj.out_features // d
    per_q = q_heads // kv_heads
    freqs, per = method.rope_slots(d, kv_heads)
    moments = moments.cpu()
    kd = kv_heads * d

    def w(lin):
        return lin.weight.detach().double().cpu(), None if lin.bias is None else lin.bias.detach().double().cpu()

    wq, bq = w(attention.q_proj)
    wk, bk = w(attention.k_proj)
    wv, bv = w(attention.v_proj)
    hidden = wq.shape[1]
    basis = rope_basis(moments, kv_heads, d, freqs, per)  # [dr, kd]
    dr = basis.shape[0]
    nope = torch.eye(kd, dtype=torch.float64) - basis.T @ basis  # projector removing the rope slots
    key_energy = torch.trace(nope @ moments[:kd, :kd] @ nope)
    value_energy = torch.trace(moments[kd:, kd:])
    balance = method.kv_balance and key_energy > 1e-9 * value_energy  # no non-RoPE keys left: nothing to balance
    alpha = float(torch.sqrt(value_energy / key_energy)) if balance else 1.0
    transform = torch.block_diag(alpha * nope, torch.eye(kd, dtype=torch.float64))
    cov = transform @ moments @ transform.T
    # A small ridge on the directions a latent may use (non-rope keys, values): calibration text that spans fewer
    # dimensions than the layer's input (e.g. few distinct tokens) still gives a full-rank latent that is exact.
    cov = cov + 1e-9 * float(torch.trace(cov)) / (2 * kd) * (transform @ transform.T)
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    limit = method.max_rank(d, kv_heads)
    if rank is None:
        if method.kv_rank is not None:
            rank = method.kv_rank
        else:
            share = torch.cumsum(values, 0) / values.sum().clamp_min(1e-30)
            rank = int(torch.searchsorted(share, torch.tensor(method.energy - 1e-12, dtype=share.dtype))) + 1
            rank = max(1, min(rank, limit))
    if rank > limit:
        raise ValueError(f"mla: kv_rank {rank} is above what fits ({limit} = 2·Hkv·D − rope_dim)")
    vr = vectors[:, :rank]  # [2kd, r]
    w_y = torch.cat([wk, wv])
    b_y = None if bk is None and bv is None else torch.cat([
        bk if bk is not None else torch.zeros(kd, dtype=torch.float64),
        bv if bv is not None else torch.zeros(kd, dtype=torch.float64)])
    a_weight = vr.T @ transform @ w_y  # [r, hidden]
    a_bias = None if b_y is None else vr.T @ transform @ b_y
    b_k = vr[:kd] / alpha  # [kd, r]
    b_v = vr[kd:]
    rope_w = basis @ wk  # [dr, hidden]
    rope_b = None if bk is None else basis @ bk
    # queries: per head [original q (D); its rope-slot coordinates (dr)]
    owner = torch.arange(q_heads) // per_q
    basis_h = basis.view(dr, kv_heads, d)  # rope rows restricted to each KV head's block
    wq_h = wq.view(q_heads, d, hidden)
    q_rope_w = torch.einsum("hrd,hdi->hri", basis_h.permute(1, 0, 2)[owner], wq_h)  # [Hq, dr, hidden]
    q_weight = torch.cat([wq_h, q_rope_w], 1).reshape(q_heads * (d + dr), hidden)
    q_bias = None
    if bq is not None:
        bq_h = bq.view(q_heads, d)
        q_bias = torch.cat([bq_h, torch.einsum("hrd,hd->hr", basis_h.permute(1, 0, 2)[owner], bq_h)], 1).flatten()
    kv_b = torch.cat([b_k.view(kv_heads, d, rank), b_v.view(kv_heads, d, rank)], 1).reshape(kv_heads * 2 * d, rank)
    kv_a_w = torch.cat([a_weight, rope_w])
    kv_a_b = None
    if a_bias is not None or rope_b is not None:
        kv_a_b = torch.cat([a_bias if a_bias is not None else torch.zeros(rank, dtype=torch.float64),
                            rope_b if rope_b is not None else torch.zeros(dr, dtype=torch.float64)])

    module = MLAAttention.like(attention, method, rank)
    layer = module.attnkit
    kept = float(values[:rank].sum() / values.sum().clamp_min(1e-30))
    latent_rms = math.sqrt(float(values[:rank].sum()) / rank)
    dtype = layer.q_proj.weight.dtype
    layer.q_proj.weight.copy_(q_weight.to(dtype))
    if q_bias is not None:
        layer.q_proj.bias.copy_(q_bias.to(dtype))
    layer.kv_a_proj.weight.copy_(kv_a_w.to(dtype))
    if layer.kv_a_proj.bias is not None:
        layer.kv_a_proj.bias.copy_(kv_a_b.to(dtype))
    layer.kv_b_proj.weight.copy_(kv_b.to(dtype))
    layer.o_proj.weight.copy_(attention.o_proj.weight)
    if attention.o_proj.bias is not None:
        layer.o_proj.bias.copy_(attention.o_proj.bias)
    layer.latent_rms.fill_(latent_rms)
    if layer.latent_norm is not None:
        layer.latent_norm.weight.fill_(latent_rms)
    # relative reconstruction error of k_nope / v on calibration (second moments: exact, no second pass)
    resid = torch.eye(2 * kd, dtype=torch.float64) - vr @ vr.T
    err = resid @ cov @ resid
    info = {
        "rank": rank, "rope_dim": dr, "energy_kept": round(kept, 6), "kv_balance": round(alpha, 4),
        "key_error": _relative(err[:kd, :kd], cov[:kd, :kd]),
        "value_error": _relative(err[kd:, kd:], cov[kd:, kd:]),
        "kv_values_per_token": [2 * kd, rank + dr],
    }
    return module, info


def _relative(error: torch.Tensor, total: torch.Tensor) -> float:
    """Relative squared reconstruction error (0 where there is nothing to reconstruct)."""
    denominator = float(torch.trace(total))
    return 0.0 if denominator <= 1e-12 else round(float(torch.trace(error)) / denominator, 6)


# ------------------------------------------------------------------------------------------------ export
@torch.no_grad()
def export_deepseek_v3(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> dict[str, Any]:
    """Write an MLA-converted ``model`` as a native ``DeepseekV3ForCausalLM`` checkpoint in ``out``.

    Layout: ``q_lora_rank`` None (one ``q_proj``), ``kv_lora_rank`` = the largest layer rank (smaller latents are
    zero-padded, exactly), ``qk_nope_head_dim = v_head_dim = head_dim``, ``qk_rope_head_dim = rope_dim``,
    ``rope_interleave`` false (attnkit's rope key is in rotate-half layout), dense MLPs everywhere
    (``first_k_dense_replace`` = number of layers), the model's MLP/norm/embedding weights unchanged.

    What maps exactly: the rope key and query (the kept frequencies are every ``head_dim/rope_dim``-th, which is
    DeepSeek's RoPE of dimension ``rope_dim`` at the same ``rope_theta``; ``highest`` maps with
    ``rope_theta^(rope_dim/head_dim)``), the latent and its up-projection (per query head), the softmax scale (folded
    into ``q_proj``), k/v biases (``attention_bias``: the latent's bias). What does not (reported in the returned dict
    and in ``attnkit-export.json``, with a warning):

    - DeepSeek normalises the latent (``kv_a_layernorm``). Exact when the model was converted with
      ``latent_norm: true`` (and recovered with it). Otherwise (the built-in ``mla`` recipe's default) the norm is
      inserted with the calibration RMS of the latent as its weight, which matches only tokens whose latent has that
      RMS: every token's latent is rescaled to that one RMS, as in a ``latent_norm: true`` conversion before
      recovery (on SmolLM2-135M that cost +8 nats of held-out NLL, benchmarks/RESULTS.md), and the weights were not
      trained with it. An approximation, reported and warned about; for an exact export convert with
      ``latent_norm: true`` and recover.
    - DeepSeek-V3's ``q_proj`` has no bias: a query bias (Qwen2) is dropped.

    Needs every layer converted, one rope slot per frequency (``rope_dim ≤ head_dim``) and default RoPE (no
    scaling: DeepSeek's YaRN is not the model's RoPE). Returns ``{"exact": bool, "approximations": [...], ...}``.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    attentions = attention_modules(model)
    if not all(isinstance(a, MLAAttention) for a in attentions):
        raise ValueError("export_deepseek_v3 needs every layer converted to MLA (mla step with `layers: all`)")
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"export_deepseek_v3: RoPE type {rope.get('rope_type')!r} has no exact DeepSeek-V3 "
                         "equivalent (only default RoPE exports)")
    layers = [a.attnkit for a in attentions]
    d, dr = layers[0].head_dim, layers[0].rope_dim
    if any(layer.rope_dim != dr or layer.head_dim != d for layer in layers) or dr > d:
        raise ValueError("export_deepseek_v3 needs one rope_dim ≤ head_dim for all layers (one rope slot per frequency)")
    freqs = layers[0].rope_frequency_index.tolist()
    half = d // 2
    if freqs == list(range(0, half, half // len(freqs))):
        theta = rope["rope_theta"]
    elif freqs == list(range(len(freqs))):
        theta = rope["rope_theta"] ** (dr / d)
    else:
        raise ValueError(f"export_deepseek_v3: rope frequencies {freqs} are not a DeepSeek RoPE schedule")
    q_heads = layers[0].q_heads
    rank = max(layer.rank for layer in layers)
    kv_bias = layers[0].kv_a_proj.bias is not None
    scale_fix = attentions[0].scaling * math.sqrt(d + dr)  # DeepSeek scales scores by (nope + rope)^-1/2
    approximations: list[str] = []
    if any(layer.latent_norm is None for layer in layers):
        approximations.append("latent RMSNorm (kv_a_layernorm) inserted with the calibration RMS as its weight: the "
                              "model was converted without latent_norm, and every token's latent is now rescaled to "
                              "that RMS (can cost much quality; for an exact export convert with latent_norm: true "
                              "and recover)")
    q_bias = max((float(layer.q_proj.bias.abs().max()) for layer in layers if layer.q_proj.bias is not None), default=0.0)
    if q_bias > 0:
        approximations.append(f"query bias dropped (DeepSeek-V3's q_proj has none; largest |bias| {q_bias:.3g})")
    mlp = model.get_decoder().layers[0].mlp
    ds_config = DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=mlp.down_proj.in_features,
        moe_intermediate_size=mlp.down_proj.in_features, num_hidden_layers=len(layers), num_attention_heads=q_heads,
        num_key_value_heads=q_heads, first_k_dense_replace=len(layers), q_lora_rank=None, kv_lora_rank=rank,
        qk_rope_head_dim=dr, qk_nope_head_dim=d, v_head_dim=d, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_interleave=False, attention_bias=kv_bias,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=getattr(config, "pad_token_id", None),
    )
    state = {}
    for key, value in model.state_dict().items():
        if ".self_attn." not in key:
            state[key] = value
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}.self_attn."
        r = layer.rank
        pad = rank - r
        state[prefix + "q_proj.weight"] = layer.q_proj.weight * scale_fix
        w_a = layer.kv_a_proj.weight
        state[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat([w_a[:r], w_a.new_zeros(pad, w_a.shape[1]), w_a[r:]])
        if kv_bias:
            b_a = layer.kv_a_proj.bias
            state[prefix + "kv_a_proj_with_mqa.bias"] = torch.cat([b_a[:r], b_a.new_zeros(pad), b_a[r:]])
            o_bias = layer.o_proj.bias
            state[prefix + "o_proj.bias"] = o_bias if o_bias is not None else w_a.new_zeros(config.hidden_size)
        norm = layer.latent_norm.weight if layer.latent_norm is not None else layer.latent_rms.expand(r)
        norm = norm * math.sqrt(r / rank)  # RMS over the zero-padded latent is sqrt(r / rank) times smaller
        state[prefix + "kv_a_layernorm.weight"] = torch.cat([norm, norm.new_full((pad,), 1.0)])
        w_b = layer.kv_b_proj.weight.view(layer.kv_heads, 2 * d, r)
        w_b = w_b.repeat_interleave(q_heads // layer.kv_heads, 0).reshape(q_heads * 2 * d, r)
        state[prefix + "kv_b_proj.weight"] = torch.cat([w_b, w_b.new_zeros(q_heads * 2 * d, pad)], 1)
        state[prefix + "o_proj.weight"] = layer.o_proj.weight
    weight = next(model.parameters())
    with torch.device("meta"):
        native = DeepseekV3ForCausalLM(ds_config)
    native.load_state_dict({k: v.detach().to(weight.dtype) for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        native.tie_weights()
    report = {"exact": not approximations, "approximations": approximations, "kv_lora_rank": rank,
              "qk_rope_head_dim": dr, "rope_theta": theta, "layer_ranks": [layer.rank for layer in layers],
              "kv_values_per_token_per_layer": rank + dr}
    for note in approximations:
        logger.warning("DeepSeek-V3 export: %s", note)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (overwrite=True replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        native.save_pretrained(tmp)
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "attnkit_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "attnkit-export.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
