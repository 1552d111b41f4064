"""Linearization: replace softmax attention by linear attention whose feature maps are distilled from it.

Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine", arXiv 2402.04347) and LoLCATs (Zhang et al. 2024,
"LoLCATs: On Low-Rank Linearizing of Large Language Models", arXiv 2410.10254; HazyResearch/lolcats):

1. every selected layer's attention becomes causal linear attention ``φq(q) · φk(k)`` with trainable feature maps
   (:class:`LinearAttention`, attached as the layer's attnkit replacement module; the model's q/k/v/o projections
   and RoPE are unchanged, the feature maps read the post-RoPE queries and keys);
2. **attention transfer** (stage 1, :func:`attnkit.train.linearize.transfer_attention`): the model is frozen and
   only the feature maps (and the window factors) train, so that each layer's linear attention output matches its
   softmax attention output on the same inputs (MSE; optionally cross-entropy between the attention weights);
3. **LoRA recovery** (stage 2, optional, :func:`attnkit.train.linearize.finetune_lora`): low-rank adapters on
   q/k/v/o trained with the LM loss or by logit distillation from the original model, merged into the weights.

Feature maps (``feature_map``), applied per head to ``x [B, H, S, D]``:

- ``hedgehog`` (default): ``[softmax(x W), softmax(−x W)]`` over the feature axis, ``W [H, D, feature_dim]``
  trainable per head, identity-initialised (LoLCATs' ``softmax_dim`` + ``untied_head_einsum``; its released configs
  use ``feature_dim: 64``); ``2 · feature_dim`` features, clamped at ``1e-12`` as the reference does;
- ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020), ``D`` features, nothing to train;
- ``performer``: positive random features ``exp(ω·x' − |x'|²/2) / √m`` with ``x' = x · D^(−1/4)`` and fixed
  Gaussian ``ω [H, D, m]`` (FAVOR+, Choromanski et al. 2021; ``m = feature_dim``; queries are stabilised by their
  row max, which cancels in the normalisation); a buffer, saved with the checkpoint;
- ``cosformer``: ``[relu(x) cos(π t / 2M), relu(x) sin(π t / 2M)]`` at absolute position ``t`` (Qin et al. 2022;
  ``M`` = the model's ``max_position_embeddings``); ``2 D`` features, nothing to train.

Queries use one feature map per query head; keys one per key/value head, so GQA stays GQA: the recurrent state is
``[B, Hkv, F, D]`` and the query heads of a group share it.

**Sliding-window hybrid** (``window > 0``, LoLCATs ``lolcats_llama_window_sw``): softmax attention over the last
``window`` keys (the query included) plus linear attention over every older key, under one normalizer, with a
trainable per-head window factor ``w = sigmoid(window_factors)`` (initialised to ``sigmoid(−2.197) = 0.1``) and
linear factor 1 (or ``1 − w`` with ``affine_factors``); see :mod:`attnkit.kernels.linear_attention.reference`.

**Layer hybrids**: ``layers:`` picks the converted layers, and ``keep_softmax_every: N`` keeps every N-th layer
(indices N−1, 2N−1, …) softmax, as Kimi Linear's 3:1 (``N = 4``) or Jamba's 1:7 (``N = 8``) interleaving suggests.

Decode: each linearized layer keeps a :class:`~attnkit.cache.LinearAttentionLayer` (pass ``attnkit.make_cache(model)``
to ``generate``): the state ``(Σ φk vᵀ, Σ φk)`` and, with a window, the last ``window − 1`` keys/values, O(1) in the
context length. With transformers' default ``DynamicCache`` the layer still computes the right output, from the
whole cached history (no memory saving).
With Hedgehog feature maps and no window, the one-token step with that cache is a single fused launch on CUDA
(:func:`attnkit.kernels.linear_attention.hedgehog_decode_step`: both feature maps, the state update in place and
the readout); other feature maps, the window hybrid, and any call with gradients enabled take the eager path.

Limits: attention dropout is not supported (``model.eval()``); the model's mask must be causal + padding (no
configured sliding window or packed sequences); ``cosformer`` positions count from the first slot of the batch
(left padding shifts them); a linearized layer cannot also carry a sparse prefill or decode method; after stage 2
the model's q/k/v/o weights are the LoRA-merged ones (``attnkit.unpatch`` does not bring the original weights back).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from attnkit.cache import LinearAttentionLayer
from attnkit.kernels.linear_attention import (
    causal_linear_attention,
    empty_state,
    fold_state,
    hedgehog_decode_step,
    hedgehog_features,
    window_linear_attention,
)
from attnkit.method import Method, ReplacementLayer
from attnkit.registry import register

FeatureMapName = Literal["hedgehog", "elu", "performer", "cosformer"]
FEATURE_EPS = 1e-12  # LoLCATs clamps its feature maps at this value (keeps every kernel value positive)
_HOOKED = "_attnkit_linear_hooks"  # set on an attention module once its cache-capture hooks are registered


# ---------------------------------------------------------------------------------------------------- config
class AttentionTransfer(BaseModel):
    """Stage 1: train the feature maps (and window factors) to reproduce each layer's softmax attention output."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(100, ge=0, description="optimizer steps (0: keep the feature maps as initialised)")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate (LoLCATs: 1e-2)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine decay to 0")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (None: no clipping)")
    seq_len: int = Field(1024, gt=1, description="tokens per training sequence (LoLCATs: 1024)")
    batch_size: int = Field(1, gt=0, description="sequences per forward, per process")
    grad_accum: int = Field(1, gt=0, description="forwards per optimizer step")
    mse_weight: float = Field(
        1.0, ge=0, description="weight of the MSE between linear and softmax attention outputs"
    )
    xent_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the cross-entropy between softmax and linear attention weights (S×S per head)",
    )
    data: str = Field(
        "builtin:corpus", min_length=1, description='"builtin:corpus", a dataset name, or a local file/folder'
    )
    data_config: str | None = Field(None, description="dataset configuration name")
    data_split: str = Field("train")
    text_field: str = Field("text")
    seed: int = Field(0, description="seed of the data order")
    checkpoint_every: int = Field(
        0, ge=0, description="save a resumable state every N steps (0: only at the end)"
    )
    log_every: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _some_loss(self) -> AttentionTransfer:
        if self.steps and self.mse_weight == 0 and self.xent_weight == 0:
            raise ValueError("mse_weight and xent_weight are both 0: attention transfer would have no loss")
        return self


class LoraFinetune(BaseModel):
    """Stage 2 (optional): LoRA on the attention projections, merged into the weights afterwards."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(0, ge=0, description="optimizer steps (0: no stage 2)")
    loss: Literal["lm", "distill"] = Field(
        "lm",
        description="lm: next-token cross-entropy; distill: KL(original model ‖ linearized) on the logits",
    )
    temperature: float = Field(1.0, gt=0, description="logit distillation temperature")
    rank: int = Field(8, gt=0, description="LoRA rank (LoLCATs: 8)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (LoLCATs: 16)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (LoLCATs: 1e-4)")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seq_len: int = Field(1024, gt=1)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    data: str = Field("builtin:corpus", min_length=1)
    data_config: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    seed: int = Field(1, description="seed of the data order (differs from stage 1's by default)")
    checkpoint_every: int = Field(0, ge=0)
    log_every: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _targets(self) -> LoraFinetune:
        if not self.target_modules:
            raise ValueError("target_modules must name at least one projection (e.g. q_proj)")
        return self


@register("linearize")
class Linearize(Method):
    """Linear attention with distilled feature maps (Hedgehog), optionally with a softmax window (LoLCATs)."""

    replaces_attention: ClassVar[bool] = True

    feature_map: FeatureMapName = Field("hedgehog", description="hedgehog | elu | performer | cosformer")
    feature_dim: int = Field(
        64, gt=0, description="hedgehog: projection size per head (features: 2×); performer: random features"
    )
    init: Literal["identity", "kaiming"] = Field(
        "identity", description="hedgehog projection init: identity (LoLCATs zero_init) or kaiming-uniform"
    )
    window: int = Field(
        0, ge=0, description="softmax window in tokens (LoLCATs: 64); 0: pure linear attention"
    )
    init_window_factor: float = Field(
        -2.1972245773362196, description="initial window_factors logit (sigmoid → 0.1, LoLCATs' value)"
    )
    affine_factors: bool = Field(
        False, description="linear factor 1 − w instead of 1 (LoLCATs affine_attention_factors)"
    )
    train_window_factors: bool = Field(True, description="window factors train in attention transfer")
    keep_softmax_every: int = Field(
        0,
        ge=0,
        description="layer hybrid: every N-th selected layer index (N−1, 2N−1, …) stays softmax; 0: none",
    )
    chunk_size: int = Field(64, gt=0, description="chunk length of the chunked prefill form")
    seed: int = Field(0, description="seed of the performer random features")
    transfer: AttentionTransfer = Field(default_factory=AttentionTransfer)
    finetune: LoraFinetune = Field(default_factory=LoraFinetune)

    @model_validator(mode="after")
    def _window_map(self) -> Linearize:
        if self.keep_softmax_every == 1:
            raise ValueError("keep_softmax_every: 1 would keep every layer softmax; use 0 (none) or N ≥ 2")
        return self

    def layer_indices(self, num_layers: int) -> list[int]:
        """``layers`` resolved, minus every ``keep_softmax_every``-th layer (kept softmax)."""
        indices = super().layer_indices(num_layers)
        n = self.keep_softmax_every
        return [i for i in indices if not n or (i + 1) % n]

    def make_replacement_layer(self, layer_idx: int, attention: nn.Module) -> LinearAttention:
        return LinearAttention(self, layer_idx, attention)

    def make_cache_layer(self, layer_idx: int) -> LinearAttentionLayer:
        return LinearAttentionLayer(self.window)

    def fit(self, model, data: Any = None) -> None:
        """Stage 1 (attention transfer) then stage 2 (LoRA), each when its ``steps`` > 0. ``data``: token ids
        ``[N, S]`` / ``[S]``, a data source string (overrides the recipe's), or None. Results are appended to
        ``model.attnkit_training``."""
        from attnkit.train.linearize import finetune_lora, transfer_attention

        results = []
        if self.transfer.steps > 0:
            results.append(transfer_attention(model, self, data=data))
        if self.finetune.steps > 0:
            results.append(finetune_lora(model, self, data=data))
        if results:
            model.attnkit_training = [*(getattr(model, "attnkit_training", None) or []), *results]


# ------------------------------------------------------------------------------------------- feature maps
class HedgehogFeatureMap(nn.Module):
    """``[softmax(x W), softmax(−x W)]`` per head: ``x [B, H, S, D]`` → ``[B, H, S, 2·feature_dim]`` (float32)."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, init: str = "identity"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, feature_dim))
        with torch.no_grad():
            # identity: softmax(x) at the start (a rectangular identity when feature_dim ≠ head_dim)
            if init == "identity":
                self.weight.copy_(torch.eye(head_dim, feature_dim).expand(heads, -1, -1))
            else:
                for h in range(heads):
                    nn.init.kaiming_uniform_(self.weight[h])
        self.features = 2 * feature_dim

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return hedgehog_features(x, self.weight, FEATURE_EPS)  # the definition the fused decode kernel matches


class EluFeatureMap(nn.Module):
    """``elu(x) + 1`` (Katharopoulos et al. 2020): ``[B, H, S, D]`` → ``[B, H, S, D]``."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.features = head_dim

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return (nn.functional.elu(x.float()) + 1).clamp_min(FEATURE_EPS)


class PerformerFeatureMap(nn.Module):
    """FAVOR+ positive random features: ``[B, H, S, D]`` → ``[B, H, S, m]``, ``φ(q)·φ(k) ≈ exp(q·k / √D)``."""

    def __init__(self, heads: int, head_dim: int, features: int, seed: int, is_query: bool):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.randn(heads, head_dim, features, generator=g))
        self.features = features
        self.is_query = is_query

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float() * x.shape[-1] ** -0.25
        logits = torch.einsum("bhsd,hdm->bhsm", x, self.omega.float()) - 0.5 * x.pow(2).sum(-1, keepdim=True)
        if self.is_query:  # a per-query constant: cancels between numerator and denominator
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return (torch.exp(logits) * self.features**-0.5).clamp_min(FEATURE_EPS)


class CosFormerFeatureMap(nn.Module):
    """cosFormer: ``[relu(x) cos(π t / 2M), relu(x) sin(π t / 2M)]`` at positions ``t``: ``[B, H, S, 2D]``."""

    def __init__(self, head_dim: int, max_len: int):
        super().__init__()
        self.features = 2 * head_dim
        self.max_len = max_len

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        angle = (math.pi / 2) * positions.to(device=x.device, dtype=torch.float32) / self.max_len
        r = torch.relu(x.float())
        return torch.cat([r * angle.cos()[:, None], r * angle.sin()[:, None]], -1).clamp_min(FEATURE_EPS)


def make_feature_map(
    method: Linearize, heads: int, head_dim: int, config, layer_idx: int, is_query: bool
) -> nn.Module:
    name = method.feature_map
    if name == "hedgehog":
        return HedgehogFeatureMap(heads, head_dim, method.feature_dim, method.init)
    if name == "elu":
        return EluFeatureMap(head_dim)
    if name == "performer":
        # q and k must share ω (the kernel estimate needs the same projections); one draw per layer.
        return PerformerFeatureMap(
            heads, head_dim, method.feature_dim, method.seed * 100_003 + layer_idx, is_query
        )
    max_len = int(getattr(config, "max_position_embeddings", 0) or 8192)
    return CosFormerFeatureMap(head_dim, max_len)


# ------------------------------------------------------------------------------------- per-layer module
class LinearAttention(ReplacementLayer):
    """One layer's linear attention: feature maps, window factors, and the computation at prefill and decode.

    Parameters (saved in ``attnkit.safetensors``): ``q_map.*`` (``Hq`` heads), ``k_map.*`` (``Hkv`` heads; with
    ``performer`` a query head uses its KV head's random projection), and with a window ``window_factors [Hq]`` (logits; ``w = sigmoid``). Float32.
    """

    method: Linearize

    def __init__(self, method: Linearize, layer_idx: int, attention: nn.Module):
        super().__init__(method, layer_idx)
        config = attention.config
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(attention, "head_dim", None)
            or getattr(config, "head_dim", None)
            or config.hidden_size // self.num_heads
        )
        self.cache_index = int(getattr(attention, "layer_idx", layer_idx))
        self.q_map = make_feature_map(method, self.num_heads, self.head_dim, config, layer_idx, True)
        self.k_map = make_feature_map(method, self.num_kv_heads, self.head_dim, config, layer_idx, False)
        if method.feature_map == "performer":  # φq·φk estimates exp(q·k/√D) only if a query head and its key
            # head share ω: one draw per KV head, repeated per group
            groups = self.num_heads // self.num_kv_heads
            self.q_map.omega.copy_(self.k_map.omega.repeat_interleave(groups, 0))
        self.features = self.q_map.features
        if method.window:
            factors = torch.full((self.num_heads,), float(method.init_window_factor))
            if method.train_window_factors:
                self.window_factors = nn.Parameter(factors)
            else:
                self.register_buffer("window_factors", factors)
        self._cache: LinearAttentionLayer | None = None
        _install_hooks(attention)

    def extra_repr(self) -> str:
        m = self.method
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"feature_map={m.feature_map}, features={self.features}, window={m.window}"
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(window factor [Hq], linear factor [Hq] or 1.0)``."""
        w = torch.sigmoid(self.window_factors.float())
        return w, (1 - w) if self.method.affine_factors else 1.0

    def feature_maps(
        self, query: torch.Tensor, key: torch.Tensor, first_position: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(φq(query) [B, Hq, Sq, F], φk(key) [B, Hkv, Sk, F])``; queries are the last ``Sq`` of the ``Sk`` keys,
        which sit at absolute positions ``first_position ..`` (only cosFormer uses positions)."""
        sq, sk = query.shape[-2], key.shape[-2]
        positions = first_position + torch.arange(sk, device=key.device)
        return self.q_map(query, positions[sk - sq :]), self.k_map(key, positions)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor:
        """``query [B, Hq, Sq, D]``, ``key/value [B, Hkv, Sk, D]`` (post-RoPE; with attnkit's cache the window
        buffer then the call's tokens, with another cache every token seen) → ``[B, Hq, Sq, D]``."""
        sq, sk = query.shape[-2], key.shape[-2]
        cache = self._cache
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 2:
                raise ValueError("linear attention takes a 2-D key padding mask [B, seen tokens]")
            key_padding_mask = key_padding_mask[:, -sk:].bool()
        if cache is not None and sq == sk == 1 and self._fused_decode():
            return self._hedgehog_decode(query, key, value, key_padding_mask, cache)
        first = cache.cumulative_length - sk if cache is not None else 0
        q_feat, k_feat = self.feature_maps(query, key, first)
        state = cache.state if cache is not None else None
        m = self.method
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None].to(k_feat.dtype)
        if not m.window:
            if key_padding_mask is not None:
                k_feat = k_feat * real
            if sk > sq:  # a cache holding every token (not attnkit's): fold the history into a state first
                state = fold_state(k_feat[:, :, : sk - sq], value[:, :, : sk - sq], state)
                k_feat, value = k_feat[:, :, sk - sq :], value[:, :, sk - sq :]
            out, new_state = causal_linear_attention(
                q_feat, k_feat, value, state, output_state=cache is not None, chunk_size=m.chunk_size
            )
            if cache is not None:
                cache.commit(new_state, keep=0)
            return out.to(query.dtype)
        w, lin = self.factors()
        out = window_linear_attention(
            query, key, value, q_feat, k_feat, m.window, w, lin, scale, state, key_padding_mask, m.chunk_size
        )
        if cache is not None:  # fold what leaves the next query's window into the state
            keep = min(sk, m.window - 1)
            folded = k_feat[:, :, : sk - keep]
            if key_padding_mask is not None:
                folded = folded * real[:, :, : sk - keep]
            cache.commit(fold_state(folded, value[:, :, : sk - keep], state), keep)
        return out.to(query.dtype)

    def _fused_decode(self) -> bool:
        """Whether a one-token step with attnkit's cache runs the fused Hedgehog decode step: pure linear attention
        (no window), Hedgehog feature maps, no gradients (the step updates the cache's state in place and has no
        backward; training keeps the differentiable path)."""
        return (
            not self.method.window and self.method.feature_map == "hedgehog" and not torch.is_grad_enabled()
        )

    def _hedgehog_decode(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        cache: LinearAttentionLayer,
    ) -> torch.Tensor:
        """The decode step ``query [B, Hq, 1, D]``, ``key/value [B, Hkv, 1, D]`` → ``[B, Hq, 1, D]`` in one launch on
        CUDA (:func:`~attnkit.kernels.linear_attention.hedgehog_decode_step`), updating the cache's state in place;
        the same result as the eager path (feature maps, then :func:`causal_linear_attention`)."""
        state = cache.state
        if state is None:  # a one-token prompt: no prefill has made a state yet
            state = empty_state(query.shape[0], self.num_kv_heads, self.features, self.head_dim, query.device)
        real = None if key_padding_mask is None else key_padding_mask[:, -1]
        out = hedgehog_decode_step(
            query,
            key,
            value,
            self.q_map.weight,
            self.k_map.weight,
            state[0],
            state[1],
            real,
            feature_eps=FEATURE_EPS,
            out_dtype=query.dtype,
        )
        cache.commit(state, keep=0)
        return out

    def attention_weights(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float | None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The linear (or hybrid) attention weights ``[B, Hq, S, S]`` of a stateless call with ``Sq == Sk`` (for
        the cross-entropy loss of attention transfer; O(S²))."""
        batch, hq, seq, dim = query.shape
        hkv = key.shape[1]
        groups = hq // hkv
        q_feat, k_feat = self.feature_maps(query, key)
        if key_padding_mask is not None:
            k_feat = k_feat * key_padding_mask[:, None, :, None].to(k_feat.dtype)
        qg = q_feat.view(batch, hkv, groups, seq, -1)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
        lin = torch.einsum("bhgsf,bhtf->bhgst", qg, k_feat)
        window = self.method.window
        if not window:
            a = lin * causal
        else:
            i = torch.arange(seq, device=query.device)
            in_window = causal & (i[None, :] > i[:, None] - window)
            in_linear = causal & ~in_window
            scale = dim**-0.5 if scale is None else scale
            scores = torch.einsum(
                "bhgsd,bhtd->bhgst", query.float().view(batch, hkv, groups, seq, dim), key.float()
            )
            scores = scores * scale
            if key_padding_mask is not None:
                in_window = in_window & key_padding_mask[:, None, None, None, :].bool()
            scores = scores.masked_fill(~in_window, float("-inf"))
            top = scores.amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            w, lf = self.factors()
            w = w.view(1, hkv, groups, 1, 1)
            lf = lf.view(1, hkv, groups, 1, 1) if torch.is_tensor(lf) else lf
            a = w * torch.exp(scores - top) + lf * lin * in_linear
        a = a / (a.sum(-1, keepdim=True) + 1e-12)
        return a.reshape(batch, hq, seq, seq)


# ------------------------------------------------------------------------------------------------ hooks
def _linear_of(attention: nn.Module) -> LinearAttention | None:
    replacement = getattr(getattr(attention, "attnkit", None), "replacement", None)
    return replacement if isinstance(replacement, LinearAttention) else None


def _attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Hand this call's cache layer to the linear-attention module (transformers passes the cache to the attention
    module, not to the attention function). Only attnkit's :class:`LinearAttentionLayer` carries a state; any other
    cache layer holds every token, and the module then computes from the whole history."""
    layer = _linear_of(module)
    if layer is None:
        return None
    layer._cache = None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if (
        layers is not None
        and layer.cache_index < len(layers)
        and isinstance(layers[layer.cache_index], LinearAttentionLayer)
    ):
        layer._cache = layers[layer.cache_index]
    return None


def _attention_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    layer = _linear_of(module)
    if layer is not None:
        layer._cache = None


def _install_hooks(attention: nn.Module) -> None:
    """Register the (stateless) pre/post hooks on ``attention`` once; they find the module at call time, so they
    outlive ``attnkit.unpatch`` as no-ops and a re-applied recipe reuses them."""
    if attention.__dict__.get(_HOOKED):
        return
    attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
    attention.register_forward_hook(_attention_post_hook, always_call=True)
    attention.__dict__[_HOOKED] = True


def linear_layers(model: nn.Module, method: Linearize | None = None) -> dict[int, LinearAttention]:
    """Layer → the :class:`LinearAttention` attached there (only ``method``'s when given)."""
    from attnkit.attention import attention_modules

    out = {}
    for idx, attention in enumerate(attention_modules(model)):
        layer = _linear_of(attention)
        if layer is not None and (method is None or layer.method is method):
            out[idx] = layer
    return out


__all__ = [
    "AttentionTransfer",
    "CosFormerFeatureMap",
    "EluFeatureMap",
    "HedgehogFeatureMap",
    "LinearAttention",
    "Linearize",
    "LoraFinetune",
    "PerformerFeatureMap",
    "linear_layers",
    "make_feature_map",
]
