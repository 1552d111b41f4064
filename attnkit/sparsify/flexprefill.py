"""FlexPrefill (Lai et al. 2025, arXiv 2502.20766): per input and head, query-aware blocks or vertical-slash blocks.

Per query head, from the last query block ``Q̂`` (the last ``block_size`` queries):

1. ``a`` = the true softmax attention of ``Q̂`` over all keys (causal), and from it, averaged over ``Q̂``'s rows,
   the attention per key (*vertical*) and per diagonal distance (*slash*); both also sum-pooled per block.
2. ``â`` = softmax over key blocks of ``mean(Q̂) · mean-pooled K`` — what the pooled estimate predicts.
3. The head is **query-aware** iff the square-root Jensen–Shannon divergence between ``â`` and the block-pooled
   vertical attention is below ``tau``: the pooled estimate is then trusted, and every query block's pooled
   attention ``softmax(mean(Q_i) · mean-pooled K)`` picks blocks — the largest pooled scores over *all* query
   blocks, taken together, until they cover ``gamma`` of the total (the reference's global ``score_cover_idx``).
   Otherwise the head is **vertical-slash**: enough key blocks of highest vertical score and enough diagonals of
   highest slash score to cover ``gamma`` of each (counted in tokens, rounded up to blocks), clipped to
   ``[min_budget, max_budget]`` tokens; query-aware heads keep ``min_budget`` of each as well.
4. The first key block and the diagonal are always kept. Vertical block ``v`` is computed by every query block that
   can see it; slash block ``s`` by each query block at block distance ``s`` from its diagonal.

Everything is block-granular (the block-sparse kernel runs it). Inputs of at most ``max(2 · block_size,
min_budget)`` query tokens run dense, as in the reference.

Differences from the reference (batch 1, ``Sq == Sk``, no padding): any batch, ``Sq < Sk`` (the block distance
is measured from the diagonal block of each query block), padding keys excluded from every estimate, and the
divergence treats ``0 · log 0`` as 0 (the reference's ``p * log(p / m)`` gives NaN there, which silently made such
heads vertical-slash). GQA-native: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator

from attnkit.kernels import BlockMask
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.method import PrefillLayer, PrefillMethod
from attnkit.registry import register
from attnkit.sparsify.minference import estimate_vertical_slash, pooled_block_scores


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JSD(p, q))`` over the last dim (natural log), with ``0 · log 0 = 0``. Inputs are distributions."""
    m = (p + q) / 2
    kl_pm = torch.special.xlogy(p, p) - torch.special.xlogy(p, m)
    kl_qm = torch.special.xlogy(q, q) - torch.special.xlogy(q, m)
    return (0.5 * kl_pm.sum(-1) + 0.5 * kl_qm.sum(-1)).clamp_min(0).sqrt()


def cover_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """How many of the largest entries (last dim) cover ``gamma`` of their sum: the reference's
    ``score_cover_topk`` (entries whose running sum stays <= ``gamma``, plus one). ``scores`` sum to 1 per row."""
    running = scores.sort(-1, descending=True).values.cumsum(-1)
    return (running <= gamma).sum(-1) + 1


def block_sum_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum over consecutive ``block_size`` entries of the last dim (the tail block may be short)."""
    n = x.shape[-1]
    blocks = num_blocks(n, block_size)
    return torch.nn.functional.pad(x, (0, blocks * block_size - n)).reshape(*x.shape[:-1], blocks, block_size).sum(-1)


@register("flexprefill")
class FlexPrefill(PrefillMethod):
    """FlexPrefill: per input and head, query-aware or vertical-slash blocks covering ``gamma`` of the attention."""

    block_size: int = Field(128, gt=0, description="query and key block size in tokens (the paper uses 128)")
    gamma: float = Field(0.9, description="attention coverage each head's blocks reach, in (0, 1)")
    tau: float = Field(0.1, ge=0, le=1, description="query-aware iff sqrt-JS divergence < tau (0: never)")
    min_budget: int = Field(1024, ge=0, description="tokens of vertical and of slash blocks at least kept")
    max_budget: int | None = Field(None, gt=0, description="tokens of vertical and of slash blocks at most kept")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _budgets(self) -> FlexPrefill:
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.max_budget is not None and self.max_budget < self.min_budget:
            raise ValueError(f"max_budget ({self.max_budget}) < min_budget ({self.min_budget})")
        return self

    def make_prefill_layer(self, layer_idx: int, attention) -> PrefillLayer:
        return FlexPrefillLayer(self, layer_idx, getattr(attention, "scaling", None))


class FlexPrefillLayer(PrefillLayer):
    """Chooses each head's pattern and blocks from the input (no state)."""

    method: FlexPrefill

    def __init__(self, method: FlexPrefill, layer_idx: int, scale: float | None = None):
        super().__init__(method, layer_idx)
        self.scale = scale
        self.last_query_aware: torch.Tensor | None = None  # bool [B, Hq] of the last input (for reports)

    def select_blocks(self, query, key, key_padding_mask) -> BlockMask:
        blocks, query_aware = flexprefill_blocks(query, key, self.method, self.scale, key_padding_mask)
        self.last_query_aware = query_aware
        q_len, kv_len = query.shape[-2], key.shape[-2]
        return BlockMask.from_dense(blocks, q_len, kv_len, self.method.block_size)


def flexprefill_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    method: FlexPrefill,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill's selection: bool blocks ``[B, Hq, QB, KB]`` and the query-aware heads ``[B, Hq]``.

    ``query [B, Hq, Sq, D]``, ``key [B, Hkv, Sk, D]`` (post-RoPE); the queries are the last ``Sq`` positions.
    """
    batch, hq, q_len, dim = query.shape
    kv_len, bs, device = key.shape[-2], method.block_size, query.device
    scale = dim**-0.5 if scale is None else scale
    qb, kb = num_blocks(q_len, bs), num_blocks(kv_len, bs)
    visible = causal_block_matrix(q_len, kv_len, (bs, bs), device)
    if q_len <= max(2 * bs, method.min_budget):  # the reference's dense fallback
        return visible.expand(batch, hq, qb, kb).clone(), torch.zeros(batch, hq, dtype=torch.bool, device=device)

    # 1. The last query block's true attention, averaged over its rows, per key and per diagonal distance.
    rows = min(bs, q_len)
    vertical, slash = estimate_vertical_slash(query, key, bs, scale, key_padding_mask)  # [B, Hq, Sk] each
    vertical, slash = vertical / rows, slash / rows
    min_blocks = -(-method.min_budget // bs)
    max_blocks = kb if method.max_budget is None else min(kb, -(-method.max_budget // bs))
    n_vertical = (cover_count(vertical, method.gamma) // bs + 1).clamp(min_blocks, max_blocks)  # [B, Hq]
    n_slash = (cover_count(slash, method.gamma) // bs + 1).clamp(min_blocks, max_blocks)
    vertical_blocks = block_sum_pool(vertical, bs)  # [B, Hq, KB]
    slash_blocks = block_sum_pool(slash, bs)  # [B, Hq, KB]: block distance d covers distances d·bs … d·bs+bs-1

    # 2.–3. Pooled estimate of the last query block vs its true block attention.
    pooled = pooled_block_scores(query, key, bs, scale, key_padding_mask)  # [B, Hq, QB, KB], -inf invisible
    estimate = torch.softmax(pooled[:, :, -1], -1).nan_to_num(0.0)  # the last query block's row
    query_aware = sqrt_js_divergence(estimate, vertical_blocks) < method.tau  # [B, Hq]
    n_vertical = torch.where(query_aware, min_blocks, n_vertical)
    n_slash = torch.where(query_aware, min_blocks, n_slash)

    # 4. Vertical and slash blocks (first block and diagonal always), then the query-aware heads' pooled blocks.
    vertical_blocks[..., 0] = float("inf")
    slash_blocks[..., 0] = float("inf")
    chosen_vertical = _top_mask(vertical_blocks, n_vertical)  # [B, Hq, KB]
    chosen_slash = _top_mask(slash_blocks, n_slash)  # [B, Hq, KB] over block distances
    diag = (torch.arange(qb, device=device) * bs + kv_len - q_len) // bs  # the key block of each query block's start
    distance = diag[:, None] - torch.arange(kb, device=device)[None, :]  # [QB, KB]
    blocks = chosen_vertical[:, :, None, :] | chosen_slash.gather(
        -1, distance.clamp(0, kb - 1).reshape(1, 1, -1).expand(batch, hq, -1)
    ).reshape(batch, hq, qb, kb) & (distance >= 0)
    # With Sq < Sk a query block can span two key blocks: its last rows' diagonal block is kept too.
    last_row_block = (torch.clamp((torch.arange(qb, device=device) + 1) * bs, max=q_len) - 1 + kv_len - q_len) // bs
    blocks |= (torch.arange(kb, device=device)[None, :] == last_row_block[:, None])

    if bool(query_aware.any()):
        row_probs = torch.softmax(pooled, -1).nan_to_num(0.0)  # [B, Hq, QB, KB]
        flat = row_probs.flatten(-2)
        order = flat.sort(-1, descending=True)
        # The reference keeps entries while the running sum stays <= gamma · (number of query blocks).
        keep = order.values.cumsum(-1) <= method.gamma * qb
        aware = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order.indices, keep).view_as(row_probs)
        blocks |= aware & query_aware[..., None, None]
    return blocks & visible, query_aware


def _top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool like ``scores [B, H, N]``: per row the ``counts[b, h]`` largest entries."""
    n = scores.shape[-1]
    order = scores.argsort(-1, descending=True)
    rank_keep = torch.arange(n, device=scores.device)[None, None, :] < counts[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_keep)
