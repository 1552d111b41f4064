"""Quest (Tang et al. 2024): query-aware sparse decode over pages of the KV cache.

The cache (:class:`~attnkit.cache.PageBoundsLayer`) keeps, for every page of ``page_size`` keys, their element-wise
minimum ``m`` and maximum ``M``, updated as tokens arrive. At each decode step, per layer:

1. **score** every page with the upper bound of its attention logit, ``Σ_i max(q_i·M_i, q_i·m_i)`` (with
   ``bound_slack`` below 1, an attnkit extension: ``q·c + slack·|q|·r``, ``c`` and ``r`` the centre and half-width
   of each channel's key range, a tighter estimate that is no longer a bound), per query head
   or, with ``share_gqa_group``, once per KV head (the max over the group's query heads: every head of the group
   then reads the same pages, so each page is read once per group); with ``bounds_dtype: int8`` from 8-bit bounds
   rounded outward (still an upper bound; half the bytes of bf16 bounds: an attnkit extension, not in the paper);
2. **select** the ``token_budget / page_size - 1`` best pages among the complete ones (``top_pages``: a one-launch
   Triton selection on a GPU, ``torch.topk`` elsewhere) plus the current, last page, which is always attended (as
   in Quest's kernels). With ``rerank_pages: N`` (an attnkit extension) the bound only shortlists its N best
   pages, and the shortlist is ranked by each page's true largest logit (its keys read: N·page_size per head),
   which undoes the bound's misrankings inside the shortlist;
3. **attend** to the selected pages only (:func:`attnkit.kernels.paged_decode.sparse_decode_attention`, split-K).

A fixed-capacity cache (``attnkit.make_cache(model, max_cache_len=N)``, what :func:`attnkit.generate_graphed`
uses) runs the same three steps over the whole capacity with the filled length read on the device, so a decode step
can be captured once as a CUDA graph.

Scoring reads ``2/page_size`` of the keys' bytes, attention reads ``token_budget`` tokens: at 128K tokens, page 16
and budget 2048 that is about 1/12 of the bytes of dense decode attention.

Prefill is untouched: it runs dense, or the prefill method of the same recipe (SeerAttention, XAttention, ...).
While every page of every row fits in the budget, decode runs dense attention, exactly. The first
``dense_layers`` (default ``[0, 1]``, as in the paper: the first layers' attention is not sparse enough) decode
densely; they keep Quest's cache, whose buffers grow without re-copying the cache at every step.

Batches: left padding is handled by paging each row from its first real token (see ``PageBoundsLayer``), so a
padded row selects exactly the pages it would select unpadded.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from attnkit.cache import PageBoundsLayer, page_bounds_layer_of
from attnkit.kernels.page_bounds import PendingFold, fold_last_token
from attnkit.kernels.page_scores import candidate_page_max, page_scores, top_pages
from attnkit.kernels.page_scores.reference import oracle_page_scores
from attnkit.kernels.paged_decode import sparse_decode_attention
from attnkit.method import DecodeLayer, Method
from attnkit.registry import register

logger = logging.getLogger(__name__)


@register("quest")
class Quest(Method):
    """Query-aware page selection at decode: page bounds in the cache, top pages within a token budget."""

    page_size: int = Field(16, gt=0, description="tokens per page (a power of two); bounds cost 2/page_size of the keys")
    token_budget: int = Field(
        1024, gt=0, description="tokens attended per decode step and head, the current page included (whole pages)"
    )
    dense_layers: list[int] = Field(
        default_factory=lambda: [0, 1],
        description="layers that decode densely (negative counts from the end); the paper keeps layers 0 and 1 dense",
    )
    share_gqa_group: bool = Field(
        False,
        description="score pages once per KV head (max over its query heads) so a GQA group reads one set of pages; "
        "false scores and selects per query head, as the paper (MHA) does",
    )
    scoring: Literal["bound", "oracle"] = Field(
        "bound",
        description="bound: Quest's page score Σ max(q·M, q·m) from the page bounds; oracle (a diagnostic that reads "
        "every key, no speedup): each page's true largest logit, the best any page scorer can select at this budget",
    )
    bound_slack: float = Field(
        1.0, ge=0.0, le=1.0,
        description="1: Quest's bound Σ max(q·M, q·m) = q·c + |q|·r (c, r: each page's per-channel key range centre "
        "and half-width). Below 1 (an attnkit extension) pages are ranked by q·c + bound_slack·|q|·r, which stops "
        "pages whose keys merely spread widely from outranking the page that holds the largest logit (same bytes, "
        "same kernel; benchmarks/quest_selection.py and RESULTS.md measure what it keeps)",
    )
    bounds_dtype: Literal["model", "int8"] = Field(
        "model",
        description="model: page bounds in the keys' dtype (the paper); int8: scored from an 8-bit copy (one float32 "
        "scale per page and head, rounded outward so it still bounds every logit, looser by at most the scale per "
        "channel): scoring reads 2·D + 4 bytes per page and head instead of 4·D in bf16",
    )
    rerank_pages: int = Field(
        0, ge=0,
        description="0: the paper's Quest. N: the bound shortlists its N best pages, then the shortlist is ranked "
        "by each page's true largest logit (reading the shortlist's keys, N·page_size per head) and the best "
        "token_budget/page_size - 1 are attended: the bound's misrankings inside the shortlist cost nothing (an "
        "attnkit extension; one Triton launch on a GPU, not yet timed)",
    )
    sink_pages: int = Field(
        0, ge=0,
        description="always attend each row's first pages (the attention sink, as StreamingLLM keeps), inside the "
        "budget; 0 is the paper's Quest. The bound can rank the sink page low although it holds most of a head's "
        "attention (benchmarks/RESULTS.md)",
    )

    @field_validator("page_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1) or value > 256:
            raise ValueError(
                f"page_size must be a power of two up to 256 (the decode kernel's tiles hold whole pages), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _budget_in_pages(self) -> Quest:
        if self.token_budget < self.page_size:
            raise ValueError(
                f"token_budget {self.token_budget} is below one page (page_size {self.page_size}): Quest always "
                "attends the current page, so the budget must hold at least one page"
            )
        if self.sink_pages >= self.token_budget // self.page_size:
            raise ValueError(
                f"sink_pages {self.sink_pages} leaves no page of the budget ({self.token_budget // self.page_size} pages, "
                "the current one included) for the pages Quest selects"
            )
        if self.rerank_pages and self.rerank_pages < self.token_budget // self.page_size - 1:
            raise ValueError(
                f"rerank_pages {self.rerank_pages} is below the pages chosen per step "
                f"({self.token_budget // self.page_size - 1}): the shortlist must hold at least as many pages"
            )
        if self.bound_slack != 1.0 and self.scoring == "oracle":
            raise ValueError("bound_slack shapes the bound's score; scoring: oracle reads the true logits")
        if self.rerank_pages and self.scoring == "oracle":
            raise ValueError("rerank_pages re-ranks the bound's shortlist; scoring: oracle already ranks every page")
        if self.token_budget % self.page_size:
            raise ValueError(
                f"token_budget {self.token_budget} is not a multiple of page_size {self.page_size}: pages are "
                f"attended whole (use {self.token_budget // self.page_size * self.page_size} or "
                f"{-(-self.token_budget // self.page_size) * self.page_size})"
            )
        return self

    @property
    def page_budget(self) -> int:
        """Pages attended per decode step and head, the current page included."""
        return self.token_budget // self.page_size

    def dense_layer_indices(self, num_layers: int) -> set[int]:
        """``dense_layers`` resolved against a model with ``num_layers`` layers."""
        out = set()
        for i in self.dense_layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"quest: dense_layers entry {i} is out of range for a model with {num_layers} layers")
            out.add(j)
        return out

    def make_decode_layer(self, layer_idx: int, attention: nn.Module) -> QuestDecode:
        dense = layer_idx in self.dense_layer_indices(attention.config.num_hidden_layers)
        return QuestDecode(self, layer_idx, dense=dense)

    def make_cache_layer(self, layer_idx: int) -> PageBoundsLayer:
        # Only the layer index is known here: a negative dense_layers entry keeps its (unused) bounds.
        return PageBoundsLayer(
            self.page_size, track_bounds=layer_idx not in self.dense_layers, int8_bounds=self.bounds_dtype == "int8"
        )


class QuestDecode(DecodeLayer):
    """Per-layer Quest decode: keeps the cache's page bounds current and attends to the selected pages.

    After a sparse decode step, ``last_pages`` holds the selection: ``[B, Hq or Hkv, page_budget - 1]`` page indices
    (per row, counted from its first real token; entries at or past the row's last page are unused fillers), the
    last page being attended in addition.
    """

    method: Quest

    def __init__(self, method: Quest, layer_idx: int, dense: bool):
        super().__init__(method, layer_idx)
        self.dense = dense
        self.last_pages: torch.Tensor | None = None

    def key_padding(self, key_padding_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
        # A fixed-capacity cache returns its whole buffer at decode (kv_len = capacity, more slots than the mask
        # covers): the step pages from each row's first real token (the padding the cache read at the prefill), so
        # the mask is not needed.
        if key_padding_mask is not None and key_padding_mask.shape[-1] < kv_len:
            return None
        return key_padding_mask

    def attend(self, query, key, value, key_padding_mask, scale):
        cache = page_bounds_layer_of(key)
        if isinstance(cache, PageBoundsLayer) and cache.max_cache_len is not None:
            return self._attend_fixed_capacity(cache, query, key, value, key_padding_mask, scale)
        if self.dense:
            return None
        if not isinstance(cache, PageBoundsLayer) or cache.length != key.shape[-2] or not cache.track_bounds:
            if query.shape[-2] > 1:
                return None
            cache = self._bounds_without_cache(key, value)
        method = self.method
        # A decode step that scores pages leaves its own token's bounds update to _choose_pages (the score launch).
        sparse = query.shape[-2] == 1 and cache.pad is not None and cache.num_pages() > method.page_budget
        fold = cache.update_bounds(key_padding_mask, defer_one_token=sparse)
        if query.shape[-2] > 1:
            return None  # prefill: the recipe's prefill method, or dense
        if cache.num_pages() <= method.page_budget:
            self.last_pages = None
            return None  # every page of every row fits: dense attention, exactly
        query = query[:, :, 0]
        # Every row's last page is at most the longest row's, page num_pages() - 1, and is never scored (it is
        # attended anyway): the scores stop before it. At 128K tokens + a few that keeps 8192 pages, not 8193, in
        # the top-page search, whose row must fit a power-of-two block held in registers.
        chosen = self._choose_pages(query, key, cache, cache.num_pages() - 1, fold)
        out = sparse_decode_attention(query, key, value, chosen, method.page_size, cache.pad, scale)
        return out[:, :, None]

    def _choose_pages(
        self, query: torch.Tensor, key: torch.Tensor, cache: PageBoundsLayer, pages: int,
        fold: PendingFold | None = None,
    ):
        """The pages to attend besides each row's last one: ``[B, Hq or Hkv, page_budget - 1]``, chosen among the
        first ``pages`` pages of the bounds (pages at or past a row's last page score -inf: fillers), kept in
        ``last_pages``. ``query``: ``[B, Hq, D]``; ``fold``: the step's deferred bounds update (bound scoring
        runs it in its launch)."""
        method = self.method
        if method.scoring == "oracle":
            if fold is not None:
                fold_last_token(*fold)
            scores = oracle_page_scores(query, key, cache.pad, method.page_size, pages, cache.last_page,
                                        method.share_gqa_group)
        elif cache.int8_bounds:
            scores = page_scores(
                query, cache.page_min_int8[:, :, :pages], cache.page_max_int8[:, :, :pages], cache.last_page,
                method.share_gqa_group, cache.page_scale[:, :, :pages], slack=method.bound_slack, fold=fold,
            )
        else:
            scores = page_scores(
                query, cache.page_min[:, :, :pages], cache.page_max[:, :, :pages], cache.last_page,
                method.share_gqa_group, slack=method.bound_slack, fold=fold,
            )
        if method.sink_pages:
            # Complete pages below sink_pages win every comparison; a row whose sink page is its current page
            # (valid < sink) leaves it alone, so no page is chosen twice.
            sink = torch.arange(pages, device=scores.device) < torch.clamp(
                cache.last_page, max=method.sink_pages
            ).view(-1, 1, 1)
            scores = scores.masked_fill(sink, float("inf"))
        if method.rerank_pages:
            scores = self._rerank(scores, query, key, cache)
        self.last_pages = top_pages(scores, method.page_budget - 1)
        return self.last_pages

    def _rerank(self, scores: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cache: PageBoundsLayer):
        """Keep the bound's ``rerank_pages`` best pages, scored again by their true largest logit (``[B, H, P]``
        in, the same shape out: -inf outside the shortlist). Forced pages (+inf: the sink) stay forced."""
        method = self.method
        shortlist = top_pages(scores, min(method.rerank_pages, scores.shape[-1])).long()
        exact = candidate_page_max(query, key, cache.pad, method.page_size, shortlist, cache.last_page,
                                   method.share_gqa_group)
        exact = torch.where(scores.gather(-1, shortlist) == float("inf"), float("inf"), exact)
        return torch.full_like(scores, float("-inf")).scatter_(-1, shortlist, exact)

    def _attend_fixed_capacity(self, cache, query, key, value, key_padding_mask, scale):
        """A decode step on a fixed-capacity cache (``key``/``value``: the whole ``[B, Hkv, capacity, D]`` buffers,
        filled up to the device-side ``cache.length_t``): every launch has the same shapes at every step, nothing is
        read back to the host, so the step can be captured once in a CUDA graph. Pages are scored over the whole
        capacity (pages past each row's last page score -inf and are ignored as fillers); dense layers, and budgets
        that hold every page of the capacity, attend to all pages with the same kernel."""
        method, p = self.method, self.method.page_size
        capacity_pages = -(-key.shape[-2] // p)
        sparse = not self.dense and cache.track_bounds and capacity_pages > method.page_budget
        fold = cache.update_bounds(key_padding_mask, defer_one_token=sparse and query.shape[-2] == 1)
        if query.shape[-2] > 1:
            return None  # prefill: the recipe's prefill method, or dense
        query = query[:, :, 0]
        if not sparse:
            if cache.all_pages is None:
                cache.all_pages = torch.arange(capacity_pages, dtype=torch.int32, device=key.device).view(1, 1, -1)
            chosen = cache.all_pages.expand(key.shape[0], key.shape[1], -1)  # the last page is added by the kernel
            self.last_pages = None
        else:  # over the whole capacity's bounds
            # Every row's last page is at most the capacity's last, capacity_pages - 1: the scores stop before it.
            chosen = self._choose_pages(query, key, cache, capacity_pages - 1, fold)
        out = sparse_decode_attention(query, key, value, chosen, p, cache.pad, scale, seq_len=cache.length_t)
        return out[:, :, None]

    def _bounds_without_cache(self, key: torch.Tensor, value: torch.Tensor) -> PageBoundsLayer:
        """Without Quest's cache (generate was not given ``attnkit.make_cache(model)``), compute the bounds of the
        whole cache at this step: the same selection, at the cost of reading every key."""
        if not getattr(QuestDecode, "_warned", False):
            QuestDecode._warned = True
            logger.warning(
                "attnkit: Quest decodes without its page-bounds cache and recomputes the bounds every step; "
                "pass past_key_values=attnkit.make_cache(model) to generate"
            )
        cache = PageBoundsLayer(self.method.page_size, int8_bounds=self.method.bounds_dtype == "int8")
        cache.update(key, value)
        return cache
