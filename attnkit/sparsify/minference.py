"""MInference (Jiang et al. 2024, arXiv 2407.02490): one of three sparse patterns per head, chosen offline.

Each query head runs one pattern, with its own budget:

- ``a_shape`` — attention sinks + a local window (``sink`` and ``local`` tokens), at block granularity;
- ``vertical_slash`` — estimated per input from the last ``last_q`` (64) queries: their softmax attention summed
  over those rows gives a score per key *column*, summed along each diagonal a score per *slash* (a fixed
  query − key distance). The top ``vertical`` columns (the first 30 always kept) and the top ``slash``
  diagonals (the nearest 100 always kept) are computed. Columns stay at token granularity and run through the
  vertical-slash kernel (:mod:`attnkit.kernels.vertical_slash`); diagonals become the key blocks they cross (a
  diagonal crosses at most two blocks of each query block), which is the block-sparse kernel's fast path;
- ``block_sparse`` — query and keys mean-pooled over blocks, and per query block the ``top_blocks`` key blocks
  of highest pooled score (plus its diagonal block, so every query sees itself).

Heads run one kernel launch together: a :class:`~attnkit.kernels.vertical_slash.VerticalSlashMask` holds every
head's blocks, and the vertical-slash heads' columns.

**Pattern search** (:func:`search_patterns`, ``search: true`` or ``attnkit calibrate``). The original builds the
whole attention matrix of a ~30K-token sample and scores a handful of hand-picked budgets. Here the search is
blockwise and works at any length: one dense forward with a hook per layer computes, chunk by chunk of query
rows, the true attention mass per (query block, key column) — ``[B, Hq, QB, Sk]``, never ``Sq × Sk`` — and from
it the exact recall and the exact cost (computed (query, key) pairs, as the kernels compute them) of every
candidate of every pattern on a grid of budgets. Each head takes the candidate of highest recall whose cost is at
most ``target_density`` of the causally visible pairs. Budgets are absolute (tokens, blocks), as in the paper:
at lengths longer than the calibration text the density falls.

The per-head choice lives in two buffers of each layer module (``head_pattern [Hq]``, ``head_budget [Hq, 2]``)
and so in the checkpoint's ``attnkit.safetensors``.

GQA-native (query head ``h`` reads KV head ``h // (Hq // Hkv)``), any batch; with ``key_padding_mask`` the
estimates ignore padding keys and pooled means average real tokens only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from attnkit.kernels import BlockMask
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.kernels.block_mass import column_attention_mass
from attnkit.kernels.vertical_slash import VerticalSlashMask
from attnkit.method import PrefillLayer, PrefillMethod
from attnkit.registry import register
from attnkit.sparsify.fixed import block_spans, leading_token_blocks, window_blocks

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE = range(3)
ALWAYS_COLUMNS = 30  # MInference keeps the first 30 key columns ...
ALWAYS_SLASHES = 100  # ... and the 100 nearest diagonals in every vertical-slash head
ESTIMATE_BYTES = 512 * 2**20  # budget of the fp32 last-query attention [B, Hq, last_q, Sk], chunked over heads

# The search grid: budgets tried per pattern (tokens for a_shape's window and the vertical-slash sizes, key blocks
# for block_sparse). Candidates above the target cost are discarded per head.
SEARCH_LOCAL = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SEARCH_VERTICAL = (30, 100, 250, 500, 1000, 2000, 4000)
SEARCH_SLASH = (100, 200, 400, 800, 1600, 3200, 6400)
SEARCH_TOP_BLOCKS = (2, 4, 8, 16, 32, 64, 100, 200, 400)


# ------------------------------------------------------------------------------------------------ estimation
def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, last_q: int, scale: float, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of the last ``last_q`` queries over all keys, fp32 ``[B, Hq, L, Sk]`` (causal, no padding).

    ``query [B, Hq, Sq, D]``, ``key [B, Hkv, Sk, D]``; the queries are the last ``Sq`` of ``Sk`` positions.
    """
    batch, hq, sq, dim = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    group, rows = hq // hkv, min(last_q, sq)
    q = query[:, :, sq - rows :].float().reshape(batch, hkv, group, rows, dim)
    logits = torch.einsum("bhgrd,bhkd->bhgrk", q, key.float()) * scale
    pos = torch.arange(sk - rows, sk, device=query.device)
    allowed = torch.arange(sk, device=query.device)[None, :] <= pos[:, None]  # [L, Sk]
    if key_padding_mask is not None:
        allowed = allowed[None] & key_padding_mask[:, None, :].bool()  # [B, L, Sk]
        allowed = allowed[:, None, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # a padding row (none at the end with left padding) → 0
    return probs.reshape(batch, hq, rows, sk)


def vertical_slash_scores(probs: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores from the last queries' attention ``probs [B, H, L, Sk]``.

    Returns ``(vertical [B, H, Sk], slash [B, H, Sk])``: ``vertical[j]`` = attention on key ``j`` summed over the
    rows; ``slash[o]`` = attention summed along the diagonal at distance ``o = position - key`` (0 = the main
    diagonal). Row ``i`` sits at position ``Sk - L + i``.
    """
    rows = probs.shape[-2]
    vertical = probs.sum(-2)
    # slash[Sk-1-t] = sum_i probs[i, t - (L-1-i)]: left-pad each row by L-1, then row i read from offset i is a
    # strided view (no gather of an index tensor as large as probs).
    padded = torch.nn.functional.pad(probs, (rows - 1, 0)).contiguous()
    width = padded.shape[-1]
    lead = padded.shape[:-2]
    view = padded.as_strided(
        (*lead, rows, kv_len), (*padded.stride()[:-2], width + 1, 1), padded.storage_offset()
    )
    slash = view.sum(-2).flip(-1)
    return vertical, slash


def top_columns(vertical: torch.Tensor, sizes: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head the ``sizes[h]`` best columns (the first :data:`ALWAYS_COLUMNS` always), sorted ascending.

    ``vertical [B, H, Sk]``, ``sizes`` int ``[H]`` → ``(columns int32 [B, H, V], counts int32 [B, H])``.
    """
    batch, heads = vertical.shape[:2]
    sizes = sizes.clamp(max=kv_len).to(vertical.device)
    width = max(1, int(sizes.max()))
    score = vertical.clone()
    score[..., :ALWAYS_COLUMNS] = float("inf")
    top = score.topk(width, -1).indices  # [B, H, width], best first
    keep = torch.arange(width, device=vertical.device)[None, None, :] < sizes[None, :, None]
    top = torch.where(keep, top, kv_len)  # drop the surplus, then sort: real columns first, ascending
    columns = top.sort(-1).values
    counts = keep.sum(-1, dtype=torch.int32).expand(batch, heads)
    return torch.where(columns < kv_len, columns, 0).to(torch.int32), counts.contiguous()


def slash_blocks(
    slash: torch.Tensor, sizes: torch.Tensor, q_len: int, kv_len: int, block_size: int
) -> torch.Tensor:
    """The key blocks that the top ``sizes[h]`` diagonals (the nearest :data:`ALWAYS_SLASHES` always) cross.

    ``slash [B, H, Sk]`` (score per distance), ``sizes`` int ``[H]`` → bool ``[B, H, QB, KB]``, causally visible.

    A diagonal at distance ``o`` crosses, in query block ``i`` (positions ``i·bs + r`` … ``+ bs - 1``,
    ``r = Sk - Sq``), the key blocks ``i + floor((r - o) / bs)`` and ``i + ceil((r - o) / bs)``: so per head the
    set of block offsets ``kb - qb`` is all that is needed.
    """
    batch, heads, sk = slash.shape
    device = slash.device
    sizes = sizes.clamp(max=sk).to(device)
    width = max(1, int(sizes.max()))
    score = slash.clone()
    score[..., :ALWAYS_SLASHES] = float("inf")
    top = score.topk(width, -1).indices  # [B, H, width] distances
    keep = (torch.arange(width, device=device)[None, None, :] < sizes[None, :, None]).expand(batch, -1, -1)
    r = kv_len - q_len
    lo = torch.div(r - top, block_size, rounding_mode="floor")
    hi = -torch.div(top - r, block_size, rounding_mode="floor")  # ceil((r - o) / bs)
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    shift = qb  # block offsets kb - qb range over [-qb, kb]; clamped ones land on never-read slots 0 and qb+kb+1
    hits = torch.zeros(batch, heads, qb + kb + 2, dtype=torch.int32, device=device)
    for part in (lo, hi):
        index = torch.where(keep, (part + shift).clamp(0, qb + kb + 1), 0)
        hits.scatter_add_(-1, index, keep.to(torch.int32))
    offsets = hits > 0
    rel = torch.arange(kb, device=device)[None, :] - torch.arange(qb, device=device)[:, None] + shift  # [QB, KB]
    blocks = offsets[..., rel]  # [B, H, QB, KB]
    return blocks & causal_block_matrix(q_len, kv_len, (block_size, block_size), device)


def pooled_block_scores(
    query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean-pooled query blocks times mean-pooled key blocks: fp32 ``[B, Hq, QB, KB]``, invisible blocks ``-inf``.

    Means are over real tokens (padding and the tail of the last block excluded).
    """
    batch, hq, sq, dim = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    group = hq // hkv
    qb, kb = num_blocks(sq, block_size), num_blocks(sk, block_size)
    q_real = torch.ones(1, sq, device=query.device)
    k_real = torch.ones(1, sk, device=query.device)
    if key_padding_mask is not None:
        k_real = key_padding_mask.to(torch.float32)
        q_real = k_real[:, sk - sq :]

    def pool(x: torch.Tensor, real: torch.Tensor, blocks: int) -> torch.Tensor:
        x = x.float() * real[:, None, :, None]
        pad = blocks * block_size - x.shape[2]
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(x.shape[0], x.shape[1], blocks, block_size, dim)
        count = torch.nn.functional.pad(real, (0, pad)).reshape(real.shape[0], 1, blocks, block_size).sum(-1)
        return x.sum(3) / count.clamp_min(1)[..., None]

    pq = pool(query, q_real, qb).reshape(batch, hkv, group, qb, dim)
    pk = pool(key, k_real, kb)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", pq, pk).reshape(batch, hq, qb, kb) * scale
    visible = causal_block_matrix(sq, sk, (block_size, block_size), query.device)
    if key_padding_mask is not None:
        real_block = torch.nn.functional.pad(k_real, (0, kb * block_size - sk)).reshape(-1, kb, block_size).any(-1)
        visible = visible[None, None] & real_block[:, None, None, :].bool()
    return scores.masked_fill(~visible, float("-inf"))


def top_blocks(scores: torch.Tensor, sizes: torch.Tensor, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """Per query block the ``sizes[h]`` key blocks of highest pooled score, plus the diagonal block: bool."""
    kb = scores.shape[-1]
    sizes = sizes.clamp(max=kb).to(scores.device)
    width = max(1, int(sizes.max()))
    top = scores.topk(width, -1)
    keep = (torch.arange(width, device=scores.device)[None, None, None, :] < sizes[None, :, None, None])
    keep = keep & torch.isfinite(top.values)
    hits = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    hits.scatter_add_(-1, torch.where(keep, top.indices, 0), keep.to(torch.int32))  # dropped slots add 0
    return (hits > 0) | diagonal_blocks(q_len, kv_len, block_size, scores.device)


def diagonal_blocks(q_len: int, kv_len: int, block_size: int, device) -> torch.Tensor:
    """Bool ``[QB, KB]``: the key blocks holding each query block's own positions."""
    q_first, q_last, k_first, k_last = block_spans(q_len, kv_len, block_size, device)
    return (k_last >= q_first) & (k_first <= q_last)


def a_shape_blocks(
    q_len: int, kv_len: int, block_size: int, sink: torch.Tensor, local: torch.Tensor, device
) -> torch.Tensor:
    """Bool ``[H, QB, KB]``: per head the blocks of its first ``sink[h]`` tokens and its ``local[h]`` window."""
    out = []
    for s, w in zip(sink.tolist(), local.tolist(), strict=True):
        blocks = window_blocks(q_len, kv_len, block_size, max(1, int(w)), device)
        out.append(blocks | leading_token_blocks(q_len, kv_len, block_size, int(s), device))
    return torch.stack(out) & causal_block_matrix(q_len, kv_len, (block_size, block_size), device)


# ---------------------------------------------------------------------------------------------------- method
@register("minference")
class MInference(PrefillMethod):
    """MInference: per head an A-shape, vertical-slash or block-sparse pattern, budgets from an offline search."""

    pattern: Literal["a_shape", "vertical_slash", "block_sparse"] = Field(
        "vertical_slash", description="every head's pattern until a search assigns one per head"
    )
    vertical: int = Field(1000, gt=0, description="vertical_slash: key columns kept (the first 30 always)")
    slash: int = Field(6096, gt=0, description="vertical_slash: diagonals kept (the nearest 100 always)")
    last_q: int = Field(64, gt=0, description="vertical_slash: last queries whose attention estimates the pattern")
    sink: int = Field(128, ge=0, description="a_shape: leading tokens every query sees")
    local: int = Field(4096, gt=0, description="a_shape: recent tokens each query sees, itself included")
    top_blocks: int = Field(100, gt=0, description="block_sparse: key blocks kept per query block (+ the diagonal)")
    search: bool = Field(False, description="choose each head's pattern and budget on calibration text (fit)")
    target_density: float = Field(
        0.15, gt=0, le=1, description="search: the cost cap, as a fraction of the causally visible (query, key) pairs"
    )
    calibration_length: int = Field(4096, gt=0, description="search: tokens of calibration text (built-in corpus)")

    @model_validator(mode="after")
    def _block_size_power_of_two(self) -> MInference:
        if self.block_size & (self.block_size - 1) or self.block_size < 16:
            raise ValueError(f"block_size must be a power of two >= 16 (the kernels' tiles), got {self.block_size}")
        return self

    def default_budget(self, pattern: str) -> tuple[int, int]:
        """The recipe's budget pair for ``pattern``: ``(sink, local)``, ``(vertical, slash)`` or ``(top_blocks, 0)``."""
        return {
            "a_shape": (self.sink, self.local),
            "vertical_slash": (self.vertical, self.slash),
            "block_sparse": (self.top_blocks, 0),
        }[pattern]

    def make_prefill_layer(self, layer_idx: int, attention) -> PrefillLayer:
        heads = attention.config.num_attention_heads
        return MInferenceLayer(self, layer_idx, heads, getattr(attention, "scaling", None))

    def calibration_settings(self, length=None, target_recall=None, target_density=None) -> MInference:
        if target_recall is not None:
            raise ValueError("minference searches patterns for a target cost: use target_density, not target_recall")
        update = {"search": True, "calibration_length": length or self.calibration_length}
        if target_density is not None:
            update["target_density"] = target_density
        return self.model_copy(update=update)

    def fit(self, model, data=None) -> None:
        """The per-head pattern search (only with ``search: true``); see :func:`search_patterns`."""
        if self.search:
            search_patterns(model, self, data)


class MInferenceLayer(PrefillLayer):
    """Builds one :class:`VerticalSlashMask` for all heads of a layer from each head's pattern and budget."""

    method: MInference

    def __init__(self, method: MInference, layer_idx: int, num_heads: int, scale: float | None = None):
        super().__init__(method, layer_idx)
        self.scale = scale
        pattern = PATTERNS.index(method.pattern)
        self.register_buffer("head_pattern", torch.full((num_heads,), pattern, dtype=torch.long))
        budget = torch.tensor(method.default_budget(method.pattern), dtype=torch.long)
        self.register_buffer("head_budget", budget.repeat(num_heads, 1))

    def describe(self) -> list[dict]:
        """Per head ``{pattern, budget}`` in words (for reports and ``attnkit inspect``)."""
        out = []
        for p, (a, b) in zip(self.head_pattern.tolist(), self.head_budget.tolist(), strict=True):
            name = PATTERNS[p]
            budget = {"a_shape": {"sink": a, "local": b}, "vertical_slash": {"vertical": a, "slash": b}}.get(
                name, {"top_blocks": a}
            )
            out.append({"pattern": name, **budget})
        return out

    def select_blocks(self, query, key, key_padding_mask) -> VerticalSlashMask:
        return build_mask(
            query, key, key_padding_mask, self.head_pattern, self.head_budget, self.method, self.scale
        )


def build_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    head_pattern: torch.Tensor,
    head_budget: torch.Tensor,
    method: MInference,
    scale: float | None = None,
) -> VerticalSlashMask:
    """The vertical-slash mask of one layer: ``query [B, Hq, Sq, D]``, ``key [B, Hkv, Sk, D]``, per-head patterns."""
    batch, hq, q_len, dim = query.shape
    kv_len, bs, device = key.shape[-2], method.block_size, query.device
    scale = dim**-0.5 if scale is None else scale
    qb, kb = num_blocks(q_len, bs), num_blocks(kv_len, bs)
    pattern, budget = head_pattern.to(device), head_budget.to(device)
    blocks = torch.zeros(batch, hq, qb, kb, dtype=torch.bool, device=device)
    columns = torch.zeros(batch, hq, 1, dtype=torch.int32, device=device)
    counts = torch.zeros(batch, hq, dtype=torch.int32, device=device)

    heads = (pattern == A_SHAPE).nonzero().flatten()
    if heads.numel():
        blocks[:, heads] = a_shape_blocks(q_len, kv_len, bs, budget[heads, 0], budget[heads, 1], device)[None]

    # The estimates are cheap next to attention (pooled blocks; the last 64 queries), so they run for all heads
    # GQA-natively and the heads of each pattern pick theirs.
    heads = (pattern == BLOCK_SPARSE).nonzero().flatten()
    if heads.numel():
        scores = pooled_block_scores(query, key, bs, scale, key_padding_mask)[:, heads]
        blocks[:, heads] = top_blocks(scores, budget[heads, 0], q_len, kv_len, bs)

    heads = (pattern == VERTICAL_SLASH).nonzero().flatten()
    if heads.numel():
        vertical, slash = estimate_vertical_slash(query, key, method.last_q, scale, key_padding_mask)
        cols, cnt = top_columns(vertical[:, heads], budget[heads, 0], kv_len)
        blocks[:, heads] = slash_blocks(slash[:, heads], budget[heads, 1], q_len, kv_len, bs)
        columns = torch.zeros(batch, hq, cols.shape[-1], dtype=torch.int32, device=device)
        columns[:, heads] = cols
        counts[:, heads] = cnt

    blocks &= causal_block_matrix(q_len, kv_len, (bs, bs), device)
    return VerticalSlashMask(BlockMask.from_dense(blocks, q_len, kv_len, bs), columns.contiguous(), counts)


def estimate_vertical_slash(query, key, last_q, scale, key_padding_mask):
    """:func:`vertical_slash_scores` for every query head, ``(vertical, slash)`` each fp32 ``[B, Hq, Sk]``.

    Chunked over KV-head groups so the fp32 attention of the last queries stays under :data:`ESTIMATE_BYTES`;
    GQA-native (no copies of K).
    """
    batch, hq = query.shape[:2]
    hkv, kv_len = key.shape[1], key.shape[2]
    group, rows = hq // hkv, min(last_q, query.shape[-2])
    per_chunk = max(1, ESTIMATE_BYTES // max(1, batch * group * rows * kv_len * 4 * 3))
    verticals, slashes = [], []
    for h0 in range(0, hkv, per_chunk):
        h1 = min(hkv, h0 + per_chunk)
        probs = last_query_attention(
            query[:, h0 * group : h1 * group], key[:, h0:h1], last_q, scale, key_padding_mask
        )
        v, s = vertical_slash_scores(probs, kv_len)
        verticals.append(v)
        slashes.append(s)
    return torch.cat(verticals, 1), torch.cat(slashes, 1)


# ------------------------------------------------------------------------------------------------------ search
def candidates(method: MInference, kv_len: int) -> list[tuple[int, int, int]]:
    """The search grid: ``(pattern, budget_a, budget_b)`` triples, within the context length."""
    kb = num_blocks(kv_len, method.block_size)
    out = [(A_SHAPE, method.sink, w) for w in SEARCH_LOCAL if w < kv_len]
    out += [(VERTICAL_SLASH, v, s) for v in SEARCH_VERTICAL for s in SEARCH_SLASH if v < kv_len and s < kv_len]
    out += [(BLOCK_SPARSE, k, 0) for k in SEARCH_TOP_BLOCKS if k < kb]
    return out


def _pair_counts(q_len: int, kv_len: int, bs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Causally visible pairs per block ``[QB, KB]`` and visible rows per (query block, key column) ``[QB, Sk]``."""
    q_first, q_last, _k_first, _k_last = block_spans(q_len, kv_len, bs, device)
    keys = torch.arange(kv_len, device=device)[None, :]
    rows_seeing = (q_last - torch.maximum(keys, q_first) + 1).clamp_min(0)  # rows of the block at pos >= key
    pairs = torch.nn.functional.pad(rows_seeing, (0, num_blocks(kv_len, bs) * bs - kv_len))
    pairs = pairs.reshape(rows_seeing.shape[0], -1, bs).sum(-1)
    return pairs.float(), rows_seeing.float()


def evaluate_candidates(
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    method: MInference,
    scale: float,
    grid: list[tuple[int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and cost of every candidate for every query head, on one input.

    Returns float64 ``(recall [C, Hq], cost [C, Hq])``: ``recall`` = mean fraction of each real query row's true
    attention inside the candidate's computed pairs; ``cost`` = computed causally visible pairs over all
    causally visible pairs (blocks as the block kernel computes them, columns outside those blocks one pair
    each), averaged over the batch.
    """
    batch, hq, q_len, _ = query.shape
    kv_len, bs, device = key.shape[-2], method.block_size, query.device
    mass = column_attention_mass(query, key, bs, scale, key_padding_mask)  # [B, Hq, QB, Sk]
    qb, kb = mass.shape[2], num_blocks(kv_len, bs)
    block_mass = torch.nn.functional.pad(mass, (0, kb * bs - kv_len)).reshape(batch, hq, qb, kb, bs).sum(-1)
    rows = mass.sum((-1, -2)).double().clamp_min(1e-30)  # [B, Hq]: real rows
    pairs, rows_seeing = _pair_counts(q_len, kv_len, bs, device)
    total_pairs = pairs.sum().double()

    # Input-dependent scores, computed once per pattern.
    vertical, slash = estimate_vertical_slash(query, key, method.last_q, scale, key_padding_mask)
    pooled = pooled_block_scores(query, key, bs, scale, key_padding_mask)
    recall = torch.zeros(len(grid), hq, dtype=torch.float64)
    cost = torch.zeros(len(grid), hq, dtype=torch.float64)
    for c, (pattern, a, b) in enumerate(grid):
        sizes_a = torch.full((hq,), a, dtype=torch.long)
        sizes_b = torch.full((hq,), b, dtype=torch.long)
        col_mass = torch.zeros(batch, hq, dtype=torch.float64, device=device)
        col_pairs = torch.zeros(batch, hq, dtype=torch.float64, device=device)
        if pattern == A_SHAPE:
            blocks = a_shape_blocks(q_len, kv_len, bs, sizes_a, sizes_b, device)[None].expand(batch, -1, -1, -1)
        elif pattern == BLOCK_SPARSE:
            blocks = top_blocks(pooled, sizes_a, q_len, kv_len, bs)
        else:
            blocks = slash_blocks(slash, sizes_b, q_len, kv_len, bs)
            cols, counts = top_columns(vertical, sizes_a, kv_len)
            valid = torch.arange(cols.shape[-1], device=device) < counts[..., None]  # [B, H, V]
            col_block = cols.long() // bs  # [B, H, V]
            # A column counts only where its key block is not computed already (the kernel skips it there).
            in_blocks = blocks.gather(-1, col_block[:, :, None, :].expand(-1, -1, qb, -1))  # [B, H, QB, V]
            extra = valid[:, :, None, :] & ~in_blocks
            idx = cols.long()[:, :, None, :].expand(-1, -1, qb, -1)
            col_mass = (mass.gather(-1, idx) * extra).sum((-1, -2)).double()
            col_pairs = (rows_seeing[None, None].expand(batch, hq, -1, -1).gather(-1, idx) * extra).sum((-1, -2))
            col_pairs = col_pairs.double()
        visible = causal_block_matrix(q_len, kv_len, (bs, bs), device)
        blocks = blocks & visible
        kept = (block_mass * blocks).sum((-1, -2)).double() + col_mass
        computed = (pairs * blocks).sum((-1, -2)).double() + col_pairs
        recall[c] = (kept / rows).mean(0).cpu()
        cost[c] = (computed / total_pairs).mean(0).cpu()
    return recall, cost


def choose(recall: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """Per head the candidate of highest recall with ``cost <= target`` (ties: the cheaper); if none is cheap
    enough, the cheapest. ``recall, cost [C, H]`` → long ``[H]``."""
    fits = cost <= target + 1e-12
    score = torch.where(fits, recall - 1e-9 * cost, -math.inf)
    best = score.argmax(0)
    cheapest = cost.argmin(0)
    return torch.where(fits.any(0), best, cheapest)


@torch.no_grad()
def search_patterns(model, method: MInference, data=None) -> dict[int, list[dict]]:
    """Set every MInference layer's per-head pattern and budget by the blockwise search (module docstring).

    One forward over the calibration input with the layers' prefill modules detached (the model runs dense, so
    later layers see dense inputs); a forward hook on each layer evaluates the grid on its ``query``/``key``.
    ``data``: token ids ``[B, S]`` or ``[S]``; default ``calibration_length`` tokens of the built-in corpus.
    Returns layer → per-head choices (:meth:`MInferenceLayer.describe`), also in ``model.attnkit_calibration``.
    """
    from attnkit.attention import attention_modules

    modules = {
        idx: a.attnkit
        for idx, a in enumerate(attention_modules(model))
        if getattr(a, "attnkit", None) is not None
        and isinstance(a.attnkit.prefill, MInferenceLayer)
        and a.attnkit.prefill.method is method
    }
    if not modules:
        return {}
    ids = _calibration_ids(model, data, method.calibration_length)
    grid: list[tuple[int, int, int]] = []
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx):
        layer = prefill[idx]

        def run(module, args, kwargs, output):
            query, key = args[0], args[1]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            if query.shape[-2] < 2:
                return
            scale = layer.scale if layer.scale is not None else query.shape[-1] ** -0.5
            if not grid:
                grid.extend(candidates(method, key.shape[-2]))
            results[idx] = evaluate_candidates(query, key, kpm, method, scale, grid)

        return run

    prefill = {idx: m.prefill for idx, m in modules.items()}
    handles = []
    try:
        for idx, module in modules.items():
            module.prefill = None  # dense during calibration
            handles.append(module.register_forward_hook(hook(idx), with_kwargs=True))
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        for idx, module in modules.items():
            module.prefill = prefill[idx]

    table = torch.tensor(grid, dtype=torch.long)
    out = {}
    for idx, (recall, cost) in results.items():
        best = choose(recall, cost, method.target_density)
        layer = prefill[idx]
        layer.head_pattern.copy_(table[best, 0].to(layer.head_pattern))
        layer.head_budget.copy_(table[best, 1:].to(layer.head_budget))
        out[idx] = [
            {**d, "recall": float(recall[c, h]), "density": float(cost[c, h])}
            for h, (d, c) in enumerate(zip(layer.describe(), best.tolist(), strict=True))
        ]
    model.attnkit_calibration = {"minference": out}
    return out


def _calibration_ids(model, data, length: int) -> torch.Tensor:
    """Token ids ``[B, S]`` on the model's device: ``data`` or ``length`` tokens of the built-in corpus."""
    if data is None:
        tokenizer = getattr(model, "attnkit_tokenizer", None)
        if tokenizer is None:
            raise ValueError("calibration needs token ids (data=) or a model loaded by attnkit.load_model")
        from attnkit.eval.fidelity import corpus_ids

        data = corpus_ids(tokenizer, length)
    ids = torch.as_tensor(data)
    return (ids[None] if ids.dim() == 1 else ids).to(next(model.parameters()).device)
