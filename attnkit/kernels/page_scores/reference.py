"""Quest page scores in plain PyTorch: the definition the Triton kernel is tested against.

Quest (Tang et al. 2024) keeps, per KV page, the element-wise minimum ``m`` and maximum ``M`` of its keys. For a
query ``q`` the largest logit any key of the page can reach is bounded by

    score(page) = Σ_i max(q_i · M_i, q_i · m_i)

(each term is the largest ``q_i · k_i`` over ``k_i ∈ [m_i, M_i]``). A decode step keeps the pages of highest score.

Written with the centre ``c = (M + m) / 2`` and half-width ``r = (M - m) / 2`` of each channel's range, the bound is
``q·c + Σ_i |q_i| r_i``: the centre's logit plus a slack that grows with the page's spread in the query's large
channels. ``slack`` (an attnkit extension) scales that second term, ``q·c + slack · |q|·r``: 1 is Quest's bound,
smaller values rank pages by a tighter estimate of their largest logit (no longer a bound) that is less swayed by
pages whose keys merely spread widely (``benchmarks/quest_selection.py`` measures what each value keeps).
"""

from __future__ import annotations

import torch

from attnkit.kernels.page_bounds.reference import PendingFold, fold_last_token

PAGE_CHUNK = 1024  # pages per step of the reference loop: bounds the fp32 temporaries at long contexts


def check_inputs(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    valid_pages: torch.Tensor,
    page_scale: torch.Tensor | None = None,
    slack: float = 1.0,
    fold: PendingFold | None = None,
) -> None:
    if fold is not None and fold.last_page is not valid_pages:
        raise ValueError("with fold, valid_pages must be fold.last_page: the fold sets each row's last page")
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"slack must be in [0, 1] (1: Quest's bound), got {slack}")
    if query.dim() != 3 or page_min.dim() != 4 or page_max.shape != page_min.shape:
        raise ValueError(
            f"expected query [B, Hq, D] and page_min/page_max [B, Hkv, pages, D] of one shape, got "
            f"{tuple(query.shape)}, {tuple(page_min.shape)}, {tuple(page_max.shape)}"
        )
    b, hq, d = query.shape
    if page_min.shape[0] != b or page_min.shape[-1] != d or hq % page_min.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and page bounds {tuple(page_min.shape)} disagree on batch, head_dim, or "
            "heads (query heads must be a multiple of KV heads)"
        )
    if valid_pages.shape != (b,):
        raise ValueError(f"valid_pages must be [B] = [{b}], got {tuple(valid_pages.shape)}")
    if page_scale is not None:
        if page_min.dtype != torch.int8 or page_max.dtype != torch.int8:
            raise ValueError(f"with page_scale the bounds must be int8 (quantize_bounds), got {page_min.dtype}")
        if page_scale.shape != page_min.shape[:3] or page_scale.dtype != torch.float32:
            raise ValueError(
                f"page_scale must be float32 [B, Hkv, pages] = {list(page_min.shape[:3])}, got "
                f"{page_scale.dtype} {list(page_scale.shape)}"
            )
    elif page_min.dtype == torch.int8:
        raise ValueError("int8 page bounds need their page_scale")


def page_scores(
    query: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
    page_scale: torch.Tensor | None = None,
    slack: float = 1.0,
    fold: PendingFold | None = None,
) -> torch.Tensor:
    """Quest's upper bound of each page's attention logit, per query head or per GQA group.

    Args:
        query: ``[B, Hq, D]``, the decode step's query (post-RoPE, unscaled).
        page_min, page_max: ``[B, Hkv, P, D]``, element-wise min/max of each page's keys (query head ``h`` reads
            KV head ``h // (Hq / Hkv)``; never expanded).
        valid_pages: ``[B]`` integers; pages ``≥ valid_pages[b]`` of row ``b`` score ``-inf`` (pages that do not
            exist in that row, or that the caller adds on its own, such as Quest's current page).
        share_gqa_group: score once per KV head: the maximum over the group's query heads (an upper bound of the
            largest logit any head of the group can give the page), so the group shares one page selection.
        page_scale: ``[B, Hkv, P]`` float32, or None. Given, ``page_min``/``page_max`` are the 8-bit bounds of
            :func:`attnkit.kernels.page_bounds.quantize_bounds` and stand for ``page_scale · page_min`` etc.
        slack: in [0, 1]; the score is ``q·c + slack · |q|·r`` (module docstring): 1, the default, is the bound.
        fold: this decode step's :class:`~attnkit.kernels.page_bounds.PendingFold`, or None. Given, the step's new
            token is folded into its page's bounds first (``fold_last_token``), which sets ``valid_pages``: it
            must be ``fold.last_page``. The Triton kernel runs the fold inside the scoring launch.

    Returns:
        ``[B, Hq, P]`` float32 scores, or ``[B, Hkv, P]`` with ``share_gqa_group``.
    """
    check_inputs(query, page_min, page_max, valid_pages, page_scale, slack, fold)
    if fold is not None:
        fold_last_token(*fold)
    b, hq, d = query.shape
    hkv, pages = page_min.shape[1], page_min.shape[2]
    q = query.float().view(b, hkv, hq // hkv, 1, d)
    out = torch.empty(b, hkv, hq // hkv, pages, dtype=torch.float32, device=query.device)
    for start in range(0, pages, PAGE_CHUNK):
        hi = page_max[:, :, start : start + PAGE_CHUNK].float()[:, :, None]  # [B, Hkv, 1, chunk, D]
        lo = page_min[:, :, start : start + PAGE_CHUNK].float()[:, :, None]
        if page_scale is not None:
            scale = page_scale[:, :, None, start : start + PAGE_CHUNK, None]
            hi, lo = hi * scale, lo * scale
        if slack == 1.0:
            out[..., start : start + PAGE_CHUNK] = torch.maximum(q * hi, q * lo).sum(-1)
        else:
            centre = q * (hi + lo) / 2
            out[..., start : start + PAGE_CHUNK] = (centre + slack * q.abs() * (hi - lo) / 2).sum(-1)
    index = torch.arange(pages, device=query.device)
    out = out.masked_fill(index >= valid_pages.to(query.device).view(b, 1, 1, 1), float("-inf"))
    if share_gqa_group:
        return out.amax(2)
    return out.reshape(b, hq, pages)


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores of each row: ``scores [..., P]`` → ``[..., k]`` (any order, int64).

    Ties at the k-th value may resolve to any of the tied pages (a backend may pick others than this reference).
    """
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [0, {scores.shape[-1]}], got {k}")
    return scores.topk(k, dim=-1, sorted=False).indices


def oracle_page_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    pages: int,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
) -> torch.Tensor:
    """The largest *true* logit of each page: what Quest's bound estimates, computed by reading every key.

    A diagnostic, not a speedup: selecting pages by this score is the best any page scorer can do at the same
    budget, so Quest with it separates what the bound loses from what the budget loses.

    Args:
        query: ``[B, Hq, D]`` (post-RoPE, unscaled).
        key: ``[B, Hkv, S, D]``, the cache's key slots; row ``b``'s page ``j`` holds slots
            ``pad[b] + j * page_size ..`` (pages start at each row's first real token, as in ``PageBoundsLayer``).
        pad: ``[B]`` leading padding slots per row.
        page_size, pages: page length and how many pages to score (slots past ``S`` count as absent).
        valid_pages, share_gqa_group: as in :func:`page_scores`.

    Returns:
        ``[B, Hq, pages]`` float32, or ``[B, Hkv, pages]`` with ``share_gqa_group``.
    """
    b, hq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    group = hq // hkv
    logits = torch.einsum("bhgd,bhsd->bhgs", query.float().view(b, hkv, group, d), key.float())  # [B, Hkv, G, S]
    slot = pad.to(query.device).long().view(b, 1) + torch.arange(pages * page_size, device=query.device)
    inside = (slot < s).view(b, 1, 1, -1)
    slot = slot.clamp(max=s - 1).view(b, 1, 1, -1).expand(b, hkv, group, -1)
    per_slot = logits.gather(-1, slot).masked_fill(~inside, float("-inf"))
    out = per_slot.view(b, hkv, group, pages, page_size).amax(-1)
    index = torch.arange(pages, device=query.device)
    out = out.masked_fill(index >= valid_pages.to(query.device).view(b, 1, 1, 1), float("-inf"))
    if share_gqa_group:
        return out.amax(2)
    return out.reshape(b, hq, pages)


def candidate_page_max(
    query: torch.Tensor,
    key: torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    candidates: torch.Tensor,
    valid_pages: torch.Tensor,
    share_gqa_group: bool = False,
) -> torch.Tensor:
    """The largest true logit of each *candidate* page: :func:`oracle_page_scores` read for a few pages only (Quest's
    ``rerank_pages``: the bound shortlists, the keys of the shortlist decide).

    Args:
        query: ``[B, Hq, D]`` (post-RoPE, unscaled).
        key: ``[B, Hkv, S, D]``; pages start at each row's first real slot (``pad``), as in :func:`oracle_page_scores`.
        pad: ``[B]`` leading padding slots per row.
        page_size: tokens per page.
        candidates: ``[B, Hq, C]`` page indices per query head, or ``[B, Hkv, C]`` with ``share_gqa_group`` (the
            max over the group's query heads).
        valid_pages: ``[B]``: pages at or past it (the current page, fillers) score -inf, so only complete pages,
            whose slots all hold keys, are read.

    Returns:
        ``[B, Hq or Hkv, C]`` float32.
    """
    b, hq, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    group = hq // hkv
    heads, c = candidates.shape[1], candidates.shape[2]
    pages = candidates.long()
    ok = (pages >= 0) & (pages < valid_pages.to(query.device).long().view(b, 1, 1))  # [B, H, C]
    slots = pad.to(query.device).long().view(b, 1, 1, 1) + pages[..., None] * page_size
    slots = (slots + torch.arange(page_size, device=query.device)).clamp(0, s - 1).view(b, heads, c * page_size)
    kv_head = torch.arange(heads, device=query.device) // (1 if share_gqa_group else group)
    rows = torch.arange(b, device=query.device).view(b, 1, 1)
    picked = key[rows, kv_head.view(1, heads, 1), slots].float()  # [B, H, C·P, D]: only the candidates' keys
    if share_gqa_group:
        logits = torch.einsum("bhgd,bhsd->bhgs", query.float().view(b, hkv, group, d), picked).amax(2)
    else:
        logits = torch.einsum("bhd,bhsd->bhs", query.float(), picked)
    out = logits.view(b, heads, c, page_size).amax(-1)
    return out.masked_fill(~ok, float("-inf"))
