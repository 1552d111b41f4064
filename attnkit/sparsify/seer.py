"""SeerAttention (Gao et al. 2024, arXiv 2410.13276): block-sparse prefill chosen by a small learned gate per layer.

The gate (:class:`AttnGate`) looks at the layer's queries and keys *before* RoPE, compressed per 64-token block,
and predicts how the layer's attention spreads over key blocks; the blocks it rates highly are computed, the rest
skipped. It is trained by self-distillation (:mod:`attnkit.train.distill`): the frozen model runs dense attention and
each gate learns to match its layer's block-max-pooled attention map (:mod:`attnkit.kernels.pooled_attention`).

Gate (as in the reference ``AttnGate``, ``Qavg_Kmaxminavg`` with two linear layers):

1. pool: each query block's pre-RoPE queries by average (``q_pooling``), each key block's pre-RoPE keys by max, min
   and average (``k_pooling``), the pools concatenated along the feature axis (``len(pooling) × head_dim``);
2. project per head to ``gate_hidden`` features with no bias: every query head has its own Q weight
   ``[len(q_pooling)·D, gate_hidden]``; every KV head has one K weight, shared by the query heads of its GQA group
   (the reference's ``MultiHeadLinear`` with ``num_k_head`` heads);
3. block RoPE: rotate the projected vectors with RoPE of dimension ``gate_hidden`` and the model's ``rope_theta``,
   at the position of each block's first token (block index × block size, as the reference's
   ``position_ids[:, ::block_size]``; query blocks of a chunk sit ``Sk - Sq`` further on);
4. scores ``q·k / sqrt(gate_hidden)`` over the key blocks the query block may see (block-causal, see
   :func:`~attnkit.kernels.block_mask.causal_block_matrix`; key blocks holding only padding are excluded), softmax.

Selection (:func:`select_gate_blocks`): ``mode: threshold`` keeps the blocks whose gate probability is at least
``threshold`` (the reference keeps ``> threshold``); ``mode: density`` keeps ``ceil(density × visible)`` blocks per
row, highest probability first. Either way the first key block and the diagonal block(s) (those holding the query
block's own positions) are always kept, and the last ``dense_last_blocks`` query blocks are computed dense (the
reference's ``last_block_dense`` keeps the last two). Density 1, or a threshold below every probability, keeps every
visible block, so the model then equals dense attention.

Threshold calibration (``calibrate_recall`` / ``calibrate_density``, or ``attnkit calibrate``): a fixed threshold
means different things at different lengths (an unsure gate spreads ~1 / visible-blocks over a row), so after
training each query head can get its own threshold, the one that reaches a target share of the *true* attention mass
(or stays within a target density) on calibration text (:func:`calibrate_thresholds`, the same procedure as
XAttention's). The thresholds are a buffer of the gate, saved in ``attnkit.safetensors`` with its weights.

Pre-RoPE q/k. transformers' attention function only receives q/k after RoPE. attnkit reads the pre-RoPE ones where
the model computes them, without replacing any ``forward``: the gate registers, once per attention module, a forward
pre-hook and a forward hook (``always_call``) on ``self_attn``. For a prefill call that will use the gate (more than
one query, at least ``min_seq_len``, the ``"attnkit"`` implementation active) the pre-hook attaches forward hooks to
``q_proj``/``k_proj`` (``q_norm``/``k_norm`` where the model normalises q/k before RoPE, as Qwen3 does) that keep a
reference to their outputs; ``select_blocks`` reads them; the post-hook removes the capture hooks and drops the
references. So the pre-RoPE tensors live only while that one attention module runs (one layer at a time, no copies),
decode steps (one query) and dense fallbacks capture nothing, and the values are exact: they *are* the projections
(Qwen2's q/k bias included). This was preferred over undoing RoPE from the post-RoPE tensors, which needs every
token's position id (left-padded ``generate`` shifts them per row, a plain forward does not; the attention function
is not told which) and loses precision in bf16.

Chunked prefill (``Sq < Sk``): the current chunk's keys come from the hook; the earlier keys exist only post-RoPE in
the cache, so they are rotated back with the model's RoPE frequencies at the positions before the chunk's first
position id (captured by the pre-hook), i.e. assuming the cached keys are the contiguous positions before the chunk
(true for transformers' DynamicCache/StaticCache, not for caches that evict tokens). Where nothing was captured
(``select_blocks`` called directly) the queries and keys are rotated back assuming positions ``0 .. Sk - 1``.

Conventions beyond the reference (one unpadded sequence, ``Sq == Sk``): padding tokens are left out of every pool
(a block with no real token pools to 0 and, as a key block, is never scored), query blocks tile the chunk's rows from
row 0 and key blocks the keys from key 0 (:mod:`attnkit.kernels.block_mask`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from attnkit.attention import ATTN_IMPLEMENTATION
from attnkit.kernels import BlockMask
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.method import PrefillLayer, PrefillMethod
from attnkit.registry import register
from attnkit.sparsify.xattention import anchor_blocks

Pooling = Literal["avg", "max", "min"]
MASKED_LOGIT = -1e30  # finite, so a row with nothing visible softmaxes to uniform rather than NaN
_HOOKED = "_attnkit_seer_hooks"  # set on an attention module once its pre/post hooks are registered
_DISTILL_GATE = "_attnkit_seer_distill"  # the gate a distillation run is training on this attention module


# ---------------------------------------------------------------------------------------------------- config
class SeerSparsity(BaseModel):
    """How the gate's block probabilities become the computed blocks."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["threshold", "density"] = Field(
        "threshold", description="threshold: keep blocks with gate probability >= threshold; density: top blocks per row"
    )
    threshold: float = Field(5e-4, description="mode threshold: the smallest gate probability kept, in (0, 1)")
    density: float | None = Field(
        None, description="mode density: fraction of each row's visible key blocks kept (highest first), in (0, 1]"
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"threshold must be in (0, 1), got {value}")
        return value

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"density must be in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _density_given(self) -> SeerSparsity:
        if self.mode == "density" and self.density is None:
            raise ValueError("sparsity.density is required with mode: density (a fraction in (0, 1])")
        return self


class SeerTraining(BaseModel):
    """Self-distillation of the gates (:func:`attnkit.train.distill.distill_gates`); ``steps: 0`` trains nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(200, ge=0, description="optimizer steps (0: leave the gates as initialised)")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate (reference: 1e-3)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps, then cosine decay to 0 (reference: 20)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (reference: 0)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (None: no clipping)")
    seq_len: int = Field(4096, gt=0, description="tokens per training sequence")
    batch_size: int = Field(1, gt=0, description="sequences per forward, per process")
    grad_accum: int = Field(1, gt=0, description="forwards per optimizer step")
    data: str = Field(
        "builtin:corpus",
        min_length=1,
        description='"builtin:corpus" (offline prose), a Hugging Face dataset name, or a local file/folder for `datasets`',
    )
    data_config: str | None = Field(None, description="dataset configuration name (e.g. wikitext-103-raw-v1)")
    data_split: str = Field("train", description="dataset split")
    text_field: str = Field("text", description="dataset column holding the text")
    seed: int = Field(0, description="seed of the gate initialisation and of the data order")
    loss_skip_fraction: float = Field(
        0.25, ge=0, lt=1, description="leading fraction of query blocks left out of the loss (reference: the first quarter)"
    )
    checkpoint_every: int = Field(0, ge=0, description="save a resumable training state every N steps (0: only at the end)")
    log_every: int = Field(1, gt=0, description="log the loss every N steps")


@register("seer_attention")
class SeerAttention(PrefillMethod):
    """SeerAttention: a learned per-layer gate predicts each query block's attention over key blocks."""

    gate_hidden: int = Field(128, gt=0, description="gate feature size per head (even: block RoPE rotates pairs)")
    q_pooling: list[Pooling] = Field(default_factory=lambda: ["avg"], description="query-block pools, concatenated")
    k_pooling: list[Pooling] = Field(
        default_factory=lambda: ["max", "min", "avg"], description="key-block pools, concatenated"
    )
    sparsity: SeerSparsity = Field(default_factory=SeerSparsity)
    train: SeerTraining = Field(default_factory=SeerTraining)
    calibrate_recall: float | None = Field(
        None,
        description="if set (threshold mode), fit per-head thresholds after training: each head gets the largest value "
        "of CALIBRATION_GRID whose selected blocks hold this fraction of the true attention mass on calibration text "
        "(None: `sparsity.threshold` for every head)",
    )
    calibrate_density: float | None = Field(
        None,
        description="if set (threshold mode), fit per-head thresholds after training: each head gets the smallest value "
        "of CALIBRATION_GRID whose selected blocks are at most this fraction of the causally visible blocks on "
        "calibration text (exclusive with calibrate_recall)",
    )
    calibration_length: int = Field(2048, gt=0, description="tokens of calibration text (built-in corpus by default)")

    @field_validator("calibrate_recall", "calibrate_density")
    @classmethod
    def _target_range(cls, value: float | None, info) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{info.field_name} must be in (0, 1], got {value}")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value < 1 or value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value

    @field_validator("gate_hidden")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"gate_hidden must be even (block RoPE rotates pairs of features), got {value}")
        return value

    @field_validator("q_pooling", "k_pooling")
    @classmethod
    def _poolings(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one pooling (avg, max, min) is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"poolings must not repeat, got {value}")
        return value

    @model_validator(mode="after")
    def _sequence_holds_blocks(self) -> SeerAttention:
        if self.train.seq_len < 2 * self.block_size:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must hold at least two blocks of block_size ({self.block_size})"
            )
        if self.calibrate_recall is not None and self.calibrate_density is not None:
            raise ValueError("calibrate_recall and calibrate_density are exclusive: set one target")
        if self.calibrating and self.sparsity.mode != "threshold":
            raise ValueError("calibrate_recall / calibrate_density fit thresholds: they need sparsity.mode: threshold")
        return self

    @property
    def calibrating(self) -> bool:
        """Whether :meth:`fit` calibrates per-head thresholds after training."""
        return self.calibrate_recall is not None or self.calibrate_density is not None

    def calibration_settings(self, length=None, target_recall=None, target_density=None) -> SeerAttention:
        """Per-head threshold calibration (after training, in :meth:`fit`) to ``target_recall`` of the true
        attention mass or within ``target_density`` of the visible blocks; neither: the step's own target, else
        recall 0.95. Switches ``sparsity.mode`` to ``threshold``."""
        if target_recall is None and target_density is None:
            target_recall = self.calibrate_recall if self.calibrate_density is None else None
            target_density = self.calibrate_density
            if target_recall is None and target_density is None:
                target_recall = 0.95
        return self.model_validate(
            {
                **self.model_dump(),
                "sparsity": {**self.sparsity.model_dump(), "mode": "threshold"},
                "calibrate_recall": target_recall,
                "calibrate_density": target_density,
                "calibration_length": length or self.calibration_length,
            }
        )

    def make_prefill_layer(self, layer_idx: int, attention: nn.Module) -> AttnGate:
        return AttnGate(self, layer_idx, attention)

    def fit(self, model, data: Any = None) -> None:
        """Train this method's gates by self-distillation with the ``train`` settings (nothing if ``steps`` is 0),
        then, with a calibration target, calibrate their per-head thresholds (:meth:`calibrate`).

        ``data``: token ids ``[N, S]`` / ``[S]``, a data source string (overrides ``train.data``), or None for
        ``train.data``, tokenized with the tokenizer ``attnkit.load_model`` attached to the model. Token ids are
        also the calibration text; otherwise calibration reads ``calibration_length`` tokens of the built-in corpus.
        The training's :class:`~attnkit.train.distill.DistillResult` is appended to ``model.attnkit_training``.
        """
        if self.train.steps > 0:
            from attnkit.train.distill import distill_gates

            result = distill_gates(model, self, data=data)
            model.attnkit_training = [*(getattr(model, "attnkit_training", None) or []), result]
        self.calibrate(model, data if torch.is_tensor(data) else None)

    def calibrate(self, model, data: torch.Tensor | None = None) -> dict[int, list[float]]:
        """Set this method's per-head gate thresholds from ``calibrate_recall`` / ``calibrate_density`` (nothing
        when neither is set); see :func:`calibrate_thresholds`."""
        if not self.calibrating:
            return {}
        return calibrate_thresholds(model, self, data)


# ------------------------------------------------------------------------------------------------ gate maths
def pool_blocks(x: torch.Tensor, block_size: int, kinds: list[str], real: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``x [B, H, S, D]`` over blocks of ``block_size`` tokens: float32 ``[B, H, NB, len(kinds) · D]``.

    ``kinds`` in ``avg``/``max``/``min``, concatenated in that order along the features. ``real``: optional bool
    ``[B, S]``; only real tokens are pooled (a short last block pools the tokens it has). A block with no real
    token pools to 0.
    """
    batch, _, seq, _ = x.shape
    full = seq // block_size
    parts = []
    for start, stop in ((0, full * block_size), (full * block_size, seq)):
        if stop == start:
            continue
        n = (stop - start) // block_size if stop - start >= block_size else 1
        seg = x[:, :, start:stop].unflatten(2, (n, -1))  # [B, H, n, L, D]
        mask = None if real is None else real[:, start:stop].reshape(batch, 1, n, -1, 1)
        count = torch.full((1, 1, n, 1), float(seg.shape[3]), device=x.device) if mask is None else mask.sum(3).float()
        pools = []
        for kind in kinds:
            if kind == "avg":
                total = (seg if mask is None else seg.masked_fill(~mask, 0)).sum(3, dtype=torch.float32)
                pools.append(total / count.clamp_min(1.0))
            else:
                fill = float("-inf") if kind == "max" else float("inf")
                masked = seg if mask is None else seg.masked_fill(~mask, fill)
                value = (masked.amax(3) if kind == "max" else masked.amin(3)).float()
                pools.append(value if mask is None else torch.where(count > 0, value, 0.0))
        parts.append(torch.cat(pools, -1))
    return torch.cat(parts, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x [B, H, N, R]`` (Llama's half-split layout) to ``positions [N]`` or ``[B, N]``; ``inverse`` undoes it."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    if angles.dim() == 3:  # per batch row: [B, 1, N, R/2]
        angles = angles[:, None]
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos(), emb.sin()
    return x * cos - rotate_half(x) * sin if inverse else x * cos + rotate_half(x) * sin


def gate_block_logits(
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    block_size: int,
    q_pooling: list[str],
    k_pooling: list[str],
    rope_inv_freq: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's block scores before the softmax.

    Args:
        q_pre: ``[B, Hq, Sq, D]`` pre-RoPE queries (the last ``Sq`` of ``Sk`` positions).
        k_pre: ``[B, Hkv, Sk, D]`` pre-RoPE keys.
        q_weight: ``[Hq, len(q_pooling) · D, F]``; k_weight: ``[Hkv, len(k_pooling) · D, F]`` (``F`` = gate_hidden).
        rope_inv_freq: ``[F / 2]`` block-RoPE frequencies.
        key_padding_mask: optional bool ``[B, Sk]`` (True = real token).

    Returns:
        ``(logits, visible)``: float32 ``[B, Hq, QB, KB]`` (:data:`MASKED_LOGIT` where not visible) and bool
        ``[B or 1, 1, QB, KB]``: key blocks the query block may see (block-causal) that hold a real key.
    """
    batch, hq, sq, _ = q_pre.shape
    hkv, sk = k_pre.shape[1], k_pre.shape[2]
    offset = sk - sq
    bs = block_size
    qb, kb = num_blocks(sq, bs), num_blocks(sk, bs)
    kpm = None if key_padding_mask is None else key_padding_mask.to(device=q_pre.device, dtype=torch.bool)
    pooled_q = pool_blocks(q_pre, bs, q_pooling, None if kpm is None else kpm[:, offset:])
    pooled_k = pool_blocks(k_pre, bs, k_pooling, kpm)
    gq = torch.einsum("bhnc,hcf->bhnf", pooled_q, q_weight.float())  # [B, Hq, QB, F]
    gk = torch.einsum("bhnc,hcf->bhnf", pooled_k, k_weight.float())  # [B, Hkv, KB, F]
    device = q_pre.device
    gq = apply_rope(gq, offset + torch.arange(qb, device=device) * bs, rope_inv_freq)
    gk = apply_rope(gk, torch.arange(kb, device=device) * bs, rope_inv_freq)
    features = gq.shape[-1]
    logits = torch.einsum("bhgnf,bhmf->bhgnm", gq.view(batch, hkv, hq // hkv, qb, features), gk)
    logits = logits.reshape(batch, hq, qb, kb) * features**-0.5
    visible = causal_block_matrix(sq, sk, (bs, bs), device)[None, None]
    if kpm is not None:
        key_blocks_real = torch.nn.functional.pad(kpm, (0, kb * bs - sk)).view(batch, kb, bs).any(-1)
        visible = visible & key_blocks_real[:, None, None, :]
    return logits.masked_fill(~visible, MASKED_LOGIT), visible


def select_gate_blocks(
    probs: torch.Tensor,
    visible: torch.Tensor,
    q_len: int,
    kv_len: int,
    block_size: int,
    sparsity: SeerSparsity,
    dense_last_blocks: int = 0,
    threshold: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate probabilities ``[B, H, QB, KB]`` → the blocks to compute (bool, same shape).

    ``visible`` (bool, broadcastable): the blocks the gate scored. Threshold mode keeps visible blocks with
    ``probs >= threshold`` (``threshold``: a float or a tensor broadcastable to ``probs[..., :1]``, e.g. ``[H, 1, 1]``
    per head; default ``sparsity.threshold``); density mode keeps, per row, ``ceil(density × visible count)`` blocks, the forced ones
    first and then by descending probability (ties in block order). Always kept: the first key block and the
    diagonal block(s) (:func:`~attnkit.sparsify.xattention.anchor_blocks`); every visible block of the last
    ``dense_last_blocks`` query blocks. Nothing outside the causally visible blocks is ever kept.
    """
    device = probs.device
    qb, kb = probs.shape[-2:]
    causal = causal_block_matrix(q_len, kv_len, (block_size, block_size), device)
    forced = anchor_blocks(q_len, kv_len, block_size, device) & causal
    visible = visible.to(device=device, dtype=torch.bool) & causal
    if sparsity.mode == "threshold":
        keep = visible & (probs >= (sparsity.threshold if threshold is None else threshold))
    else:
        count = visible.sum(-1, keepdim=True).double()
        wanted = torch.ceil(count * sparsity.density - 1e-9)
        priority = torch.where(forced & visible, 2.0 + probs, torch.where(visible, probs, -1.0))
        order = torch.sort(priority.expand(probs.shape), dim=-1, descending=True, stable=True).indices
        n_forced = (forced & visible).sum(-1, keepdim=True)
        take = torch.arange(kb, device=device) < torch.maximum(wanted.long(), n_forced)
        keep = torch.zeros(probs.shape, dtype=torch.bool, device=device).scatter_(-1, order, take.expand(probs.shape))
        keep = keep & visible
    keep = keep | forced
    if dense_last_blocks:
        dense_rows = torch.arange(qb, device=device) >= qb - dense_last_blocks
        keep = keep | (dense_rows[:, None] & causal)
    return keep


# ----------------------------------------------------------------------------------------------------- gate
class AttnGate(PrefillLayer):
    """One layer's SeerAttention gate: pooled pre-RoPE q/k → per-head projections → block RoPE → block softmax.

    Parameters (saved in ``attnkit.safetensors``): ``q_weight [Hq, len(q_pooling)·D, gate_hidden]`` and
    ``k_weight [Hkv, len(k_pooling)·D, gate_hidden]``, float32, initialised ``N(0, initializer_range)`` from a
    generator seeded by ``train.seed`` and the layer index (as the reference's ``_init_weights``); and the buffer
    ``thresholds [Hq]``, threshold mode's cut-off per query head (``sparsity.threshold``, or calibrated).
    """

    method: SeerAttention

    def __init__(self, method: SeerAttention, layer_idx: int, attention: nn.Module):
        super().__init__(method, layer_idx)
        config = attention.config
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(attention, "head_dim", None)
            or getattr(config, "head_dim", None)
            or config.hidden_size // self.num_heads
        )
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attention, name, None), nn.Module):
                raise ValueError(
                    f"{type(attention).__name__} has no `{name}` module: SeerAttention reads the pre-RoPE queries and "
                    "keys from separate q_proj/k_proj projections (Llama/Qwen2/Mistral-style attention)"
                )
        hidden = method.gate_hidden
        self.q_weight = nn.Parameter(torch.empty(self.num_heads, len(method.q_pooling) * self.head_dim, hidden))
        self.k_weight = nn.Parameter(torch.empty(self.num_kv_heads, len(method.k_pooling) * self.head_dim, hidden))
        self.reset_parameters(float(getattr(config, "initializer_range", 0.02)))
        # Threshold-mode cut-off per query head: the recipe's, or calibrated ones (saved in attnkit.safetensors).
        self.register_buffer("thresholds", torch.full((self.num_heads,), float(method.sparsity.threshold)))
        theta = _rope_theta(config)
        self.register_buffer(
            "block_inv_freq", theta ** -(torch.arange(0, hidden, 2, dtype=torch.float32) / hidden), persistent=False
        )
        head_inv_freq, self.rope_scaling = _model_rope_frequencies(config, self.head_dim)
        self.register_buffer("head_inv_freq", head_inv_freq, persistent=False)
        # Capture state, alive only while the attention module runs (see the module docstring).
        self._q: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._position_ids: torch.Tensor | None = None
        self._handles: list = []
        _install_hooks(attention)

    def reset_parameters(self, std: float = 0.02) -> None:
        g = torch.Generator().manual_seed(self.method.train.seed * 100_003 + self.layer_idx)
        with torch.no_grad():
            for weight in (self.q_weight, self.k_weight):
                weight.copy_(torch.randn(weight.shape, generator=g) * std)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"gate_hidden={self.method.gate_hidden}, block_size={self.method.block_size}"
        )

    # ------------------------------------------------------------------------------------------- pre-RoPE q/k
    def _begin_capture(self, attention: nn.Module, position_ids: torch.Tensor | None) -> None:
        self._end_capture()
        q_src = getattr(attention, "q_norm", None)
        k_src = getattr(attention, "k_norm", None)
        q_src = q_src if isinstance(q_src, nn.Module) else attention.q_proj
        k_src = k_src if isinstance(k_src, nn.Module) else attention.k_proj
        self._position_ids = position_ids
        self._handles = [q_src.register_forward_hook(self._store_q), k_src.register_forward_hook(self._store_k)]

    def _end_capture(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._q = self._k = self._position_ids = None

    def _store_q(self, module, args, output) -> None:
        self._q = output

    def _store_k(self, module, args, output) -> None:
        self._k = output

    def _unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo the model's RoPE on post-RoPE ``x [B, H, N, D]`` at ``positions [B or 1, N]`` (float32 result)."""
        rot = 2 * self.head_inv_freq.numel()
        xf = x.float()
        back = apply_rope(xf[..., :rot], positions, self.head_inv_freq, inverse=True) / self.rope_scaling
        return back if rot == xf.shape[-1] else torch.cat((back, xf[..., rot:]), -1)

    def pre_rope(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE ``(q [B, Hq, Sq, D], k [B, Hkv, Sk, D])`` for the post-RoPE ``query``/``key`` of this call.

        The captured projections when the hooks saw this call (earlier cached keys rotated back), otherwise
        ``query``/``key`` rotated back at positions ``Sk - Sq ..`` / ``0 ..`` (see the module docstring).
        """
        batch, hq, sq, dim = query.shape
        hkv, sk = key.shape[1], key.shape[2]
        q_cap, k_cap = self._q, self._k
        if (
            q_cap is not None
            and k_cap is not None
            and tuple(q_cap.shape[:2]) == (batch, sq)
            and tuple(k_cap.shape[:2]) == (batch, sq)
            and q_cap.numel() == batch * sq * hq * dim
            and k_cap.numel() == batch * sq * hkv * dim
        ):
            q_pre = q_cap.view(batch, sq, hq, dim).transpose(1, 2)
            k_new = k_cap.view(batch, sq, hkv, dim).transpose(1, 2)
            past = sk - sq
            if past == 0:
                return q_pre, k_new
            steps = torch.arange(past, device=key.device)
            ids = self._position_ids
            start = ids[:, :1].to(key.device) - past if ids is not None else torch.zeros(1, 1, device=key.device)
            k_old = self._unrotate(key[:, :, :past], start + steps)
            return q_pre, torch.cat((k_old.to(k_new.dtype), k_new), 2)
        positions = torch.arange(sk, device=key.device)[None]
        return self._unrotate(query, positions[:, sk - sq :]), self._unrotate(key, positions)

    # ------------------------------------------------------------------------------------------------ scoring
    def block_logits(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, Hq, QB, KB], visible)`` of :func:`gate_block_logits` for this call's post-RoPE q/k."""
        q_pre, k_pre = self.pre_rope(query, key)
        m = self.method
        return gate_block_logits(
            q_pre, k_pre, self.q_weight, self.k_weight, m.block_size, m.q_pooling, m.k_pooling,
            self.block_inv_freq, key_padding_mask,
        )

    def block_probabilities(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, visible)``: the gate's softmax over visible key blocks, ``[B, Hq, QB, KB]``, 0 elsewhere."""
        logits, visible = self.block_logits(query, key, key_padding_mask)
        return torch.softmax(logits, -1) * visible, visible

    @torch.no_grad()
    def select_blocks(self, query, key, key_padding_mask) -> BlockMask:
        m = self.method
        q_len, kv_len = query.shape[-2], key.shape[-2]
        probs, visible = self.block_probabilities(query, key, key_padding_mask)
        keep = select_gate_blocks(
            probs, visible, q_len, kv_len, m.block_size, m.sparsity, m.dense_last_blocks, self.thresholds.view(-1, 1, 1)
        )
        return BlockMask.from_dense(keep, q_len, kv_len, m.block_size)


# ---------------------------------------------------------------------------------------------------- hooks
def _gate_of(attention: nn.Module) -> AttnGate | None:
    """The gate that reads this attention module's q/k now: the one being distilled, else the attached prefill."""
    gate = attention.__dict__.get(_DISTILL_GATE)
    if gate is not None:
        return gate
    prefill = getattr(getattr(attention, "attnkit", None), "prefill", None)
    return prefill if isinstance(prefill, AttnGate) else None


def _attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    gate = _gate_of(module)
    if gate is None:
        return None
    gate._end_capture()
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not torch.is_tensor(hidden) or hidden.dim() != 3:
        return None
    q_len = hidden.shape[1]
    if _DISTILL_GATE in module.__dict__:
        wanted = q_len > 1
    else:
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        wanted = q_len >= max(2, gate.method.min_seq_len) and implementation == ATTN_IMPLEMENTATION
    if wanted:
        gate._begin_capture(module, kwargs.get("position_ids"))
    return None


def _attention_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    gate = _gate_of(module)
    if gate is not None:
        gate._end_capture()


def _install_hooks(attention: nn.Module) -> None:
    """Register the (stateless) pre/post hooks on ``attention`` once; they find the gate at call time, so they
    outlive ``attnkit.unpatch`` as no-ops and a re-applied recipe reuses them."""
    if attention.__dict__.get(_HOOKED):
        return
    attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
    attention.register_forward_hook(_attention_post_hook, always_call=True)
    attention.__dict__[_HOOKED] = True


def distilling(attention: nn.Module, gate: AttnGate | None) -> None:
    """Mark ``gate`` as the one reading ``attention``'s q/k while it is out of the dispatcher (None: unmark)."""
    if gate is None:
        attention.__dict__.pop(_DISTILL_GATE, None)
    else:
        attention.__dict__[_DISTILL_GATE] = gate


# ------------------------------------------------------------------------------------------------ calibration
# Candidate thresholds, ascending (1, 1.5, 2, 3, 5, 7 per decade): a gate probability is ~1 / (visible key blocks)
# when the gate is unsure, so the useful cut-off depends on the length; calibration picks it per head.
CALIBRATION_GRID = tuple(round(m * 10.0**e, 12) for e in range(-6, 0) for m in (1, 1.5, 2, 3, 5, 7))


@torch.no_grad()
def calibrate_thresholds(model, method: SeerAttention, data: torch.Tensor | None = None) -> dict[int, list[float]]:
    """Set each gate's per-head threshold (``AttnGate.thresholds``) from ``method``'s calibration target.

    One forward pass over the calibration input with dense attention (the gates only read their layers' q/k, as
    in distillation, so later layers see dense inputs). At each gated layer: the gate's block probabilities, the
    true block attention mass (:func:`~attnkit.kernels.block_mass.block_attention_mass`, blockwise) and, for every
    value of :data:`CALIBRATION_GRID`, the blocks :func:`select_gate_blocks` keeps (anchors and
    ``dense_last_blocks`` included), per query head: the fraction of the true mass they hold (weighted by real
    query rows) and the fraction of the causally visible blocks they are.

    With ``calibrate_recall``: the largest grid value whose recall reaches it (the smallest value if none does).
    With ``calibrate_density``: the smallest grid value whose density is at most it (the largest if none is).

    ``data``: token ids ``[B, S]`` / ``[S]``; default ``calibration_length`` tokens of the built-in corpus, tokenized
    with the tokenizer ``attnkit.load_model`` attached to the model. Returns layer → thresholds (also in
    ``model.attnkit_calibration["seer_attention"]``).
    """
    from attnkit.attention import attention_modules
    from attnkit.kernels.block_mass import block_attention_mass, query_block_rows
    from attnkit.train.distill import seer_gates, teacher_mode

    gates = seer_gates(model, method)
    if not gates:
        return {}
    if data is None:
        tokenizer = getattr(model, "attnkit_tokenizer", None)
        if tokenizer is None:
            raise ValueError("SeerAttention calibration needs token ids (data=) or a model loaded by attnkit.load_model")
        from attnkit.eval.fidelity import corpus_ids

        data = corpus_ids(tokenizer, method.calibration_length)
    ids = torch.as_tensor(data)
    ids = (ids[None] if ids.dim() == 1 else ids).to(next(model.parameters()).device)
    grid = torch.tensor(CALIBRATION_GRID, dtype=torch.float64)
    n = len(CALIBRATION_GRID)
    kept = {i: torch.zeros(n, g.num_heads, dtype=torch.float64) for i, g in gates.items()}
    blocks = {i: torch.zeros(n, g.num_heads, dtype=torch.float64) for i, g in gates.items()}
    total = {i: torch.zeros(gates[i].num_heads, dtype=torch.float64) for i in gates}
    visible_blocks = {i: 0.0 for i in gates}
    bs = method.block_size

    def hook(idx: int, gate: AttnGate):
        def run(module, args, kwargs, output):
            query, key = args[0], args[1]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            scale = args[4] if len(args) > 4 else kwargs.get("scale")
            q_len, kv_len = query.shape[-2], key.shape[-2]
            if q_len < max(2, method.min_seq_len):
                return
            probs, visible = gate.block_probabilities(query, key, kpm)
            mass = block_attention_mass(query, key, bs, scale, kpm).double()  # [B, Hq, QB, KB]
            rows = query_block_rows(q_len, kv_len, bs, kpm, query.device).double()[:, None]  # [B or 1, 1, QB]
            causal = causal_block_matrix(q_len, kv_len, (bs, bs), query.device)
            total[idx] += (mass.sum(-1) * rows).sum((0, 2)).cpu()
            visible_blocks[idx] += float((visible & causal).expand(query.shape[0], 1, -1, -1).sum())
            for g, tau in enumerate(CALIBRATION_GRID):
                keep = select_gate_blocks(
                    probs, visible, q_len, kv_len, bs, method.sparsity, method.dense_last_blocks, threshold=tau
                )
                kept[idx][g] += ((mass * keep).sum(-1) * rows).sum((0, 2)).cpu()
                blocks[idx][g] += keep.sum((0, 2, 3)).double().cpu()

        return run

    attentions = attention_modules(model)
    handles = []
    with teacher_mode(model, gates):
        try:
            for idx, gate in gates.items():
                handles.append(attentions[idx].attnkit.register_forward_hook(hook(idx, gate), with_kwargs=True))
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    missing = sorted(i for i in gates if not visible_blocks[i])
    if missing:
        raise ValueError(
            f"SeerAttention calibration: layers {missing} saw no prefill of at least min_seq_len "
            f"({method.min_seq_len}) tokens; use longer calibration text (calibration_length)"
        )

    out = {}
    steps = torch.arange(1, n + 1)[:, None]
    for idx, gate in gates.items():
        if method.calibrate_density is None:
            recall = kept[idx] / total[idx].clamp_min(1e-30)  # [grid, Hq], falls as the threshold rises
            reached = recall >= method.calibrate_recall - 1e-12
            choice = (reached.long() * steps).argmax(0)  # the last (largest) value reaching it; 0 when none does
        else:
            density = blocks[idx] / visible_blocks[idx]  # [grid, Hq], falls as the threshold rises
            within = density <= method.calibrate_density + 1e-12
            choice = torch.where(within.any(0), within.long().argmax(0), n - 1)  # the first (smallest) within it
        gate.thresholds.copy_(grid[choice].to(gate.thresholds))
        out[idx] = gate.thresholds.tolist()
    model.attnkit_calibration = {**(getattr(model, "attnkit_calibration", None) or {}), "seer_attention": out}
    return out


# -------------------------------------------------------------------------------------------------- RoPE config
def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    return {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def _rope_theta(config) -> float:
    return float(_rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _model_rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """The model's RoPE ``inv_freq`` (over the rotated part of ``head_dim``) and its cos/sin scaling, as transformers'
    rotary embeddings compute them (only used to rotate cached keys back; the captured q/k need none of it)."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    factor = float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
            return inv_freq.float(), float(scaling)
    dim = int(head_dim * factor)
    dim -= dim % 2
    theta = float(params.get("rope_theta", 10000.0))
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0


__all__ = [
    "CALIBRATION_GRID",
    "AttnGate",
    "SeerAttention",
    "SeerSparsity",
    "SeerTraining",
    "apply_rope",
    "calibrate_thresholds",
    "gate_block_logits",
    "pool_blocks",
    "select_gate_blocks",
]
