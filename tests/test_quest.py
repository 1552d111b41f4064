"""Quest decode: page bounds in the cache, page selection, exactness at full budget, padding, recipes, checkpoints."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnkit
from attnkit.attention import dense_attention
from attnkit.cache import PageBoundsLayer, page_bounds_layer_of
from attnkit.kernels.page_bounds import quantize_bounds
from attnkit.kernels.page_scores import reference as score_ref
from attnkit.kernels.paged_decode import reference as attn_ref
from attnkit.recipe import RecipeError
from attnkit.sparsify.quest import Quest, QuestDecode
from tests.conftest import random_batch


def quest(**settings) -> dict:
    step = {"method": "quest", "page_size": 4, "token_budget": 12, "dense_layers": [0], **settings}
    return {"attnkit": 1, "name": "test-quest", "steps": [step]}


def brute_bounds(keys: torch.Tensor, pad: list[int], page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page min/max straight from the definition: pages of each row start at its first real slot."""
    b, h, s, d = keys.shape
    pages = -(-(s - min(pad)) // page)
    lo = torch.full((b, h, pages, d), float("inf"))
    hi = torch.full((b, h, pages, d), float("-inf"))
    for r in range(b):
        for j in range(pages):
            chunk = keys[r, :, pad[r] + j * page : min(pad[r] + (j + 1) * page, s)]
            if chunk.shape[1]:
                lo[r, :, j], hi[r, :, j] = chunk.amin(1), chunk.amax(1)
    return lo, hi


def brute_oracle(query, key, pad: list[int], page: int, valid, share: bool) -> torch.Tensor:
    """Each page's largest true logit ``max_k q·k`` by loops over rows, query heads and pages (pages from each row's
    first real slot; pages ``>= valid[b]`` score -inf); the max over the GQA group with ``share``."""
    b, hq, _ = query.shape
    hkv = key.shape[1]
    pages = -(-(key.shape[2] - min(pad)) // page)
    want = torch.full((b, hq, pages), float("-inf"))
    for r in range(b):
        for h in range(hq):
            for j in range(int(valid[r])):
                chunk = key[r, h // (hq // hkv), pad[r] + j * page : pad[r] + (j + 1) * page]
                want[r, h, j] = (chunk.float() @ query[r, h].float()).max()
    return want.view(b, hkv, hq // hkv, pages).amax(2) if share else want


def quest_layers(model) -> list[QuestDecode]:
    return [m for m in model.modules() if isinstance(m, QuestDecode) and not m.dense]


# ----------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("int8", [False, True], ids=["bounds", "int8-bounds"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("pads", [[0], [0, 5], [7, 0, 3]], ids=["B1", "B2-pad5", "B3-pad7-3"])
def test_page_bounds_equal_brute_force_after_prefill_and_decode(pads, backend, int8, monkeypatch):
    """Any mix of prefill chunks and decode steps: the bounds equal their definition after every update (decode
    steps fold their token with the PyTorch reference or the Triton kernel), and so does their 8-bit copy
    (``quantize_bounds`` of the exact bounds, bit for bit)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors through Triton need the interpreter (CPU-only machines); GPU: test_quest_kernels")
    monkeypatch.setenv("ATTNKIT_KERNELS", backend)
    g = torch.Generator().manual_seed(len(pads))
    b, h, d, page = len(pads), 2, 8, 4
    layer = PageBoundsLayer(page, int8_bounds=int8)
    steps = [11, 1, 1, 5, 1, 1, 1, 1, 9, 1, 1, 300, 1]  # 300 forces the buffers to grow
    keys = torch.empty(b, h, 0, d)
    for i, new in enumerate(steps):
        k, v = torch.randn(b, h, new, d, generator=g), torch.randn(b, h, new, d, generator=g)
        keys = torch.cat([keys, k], 2)
        out_k, out_v = layer.update(k, v)
        assert torch.equal(out_k, keys) and out_v.shape == out_k.shape
        assert page_bounds_layer_of(out_k) is layer
        mask = torch.arange(keys.shape[2])[None, :] >= torch.tensor(pads)[:, None]
        layer.update_bounds(mask if i == 0 else None)
        lo, hi = brute_bounds(keys, pads, page)
        for r in range(b):  # the rows' own pages (a shorter row's trailing slots are unused)
            n = -(-(keys.shape[2] - pads[r]) // page)
            assert torch.equal(layer.page_min[r, :, :n], lo[r, :, :n]), (i, r)
            assert torch.equal(layer.page_max[r, :, :n], hi[r, :, :n]), (i, r)
            assert int(layer.last_page[r]) == n - 1
            if int8:
                q_min, q_max, scale = quantize_bounds(lo[r, :, :n], hi[r, :, :n])
                assert torch.equal(layer.page_min_int8[r, :, :n], q_min), (i, r)
                assert torch.equal(layer.page_max_int8[r, :, :n], q_max), (i, r)
                assert torch.equal(layer.page_scale[r, :, :n], scale), (i, r)
    assert layer.get_seq_length() == sum(steps)


def test_cache_layer_is_freed_without_the_garbage_collector():
    """The keys view refers to its layer weakly: dropping the cache frees its buffers at once (a cycle would keep
    a finished cache's memory until the collector runs)."""
    gc.disable()
    try:
        layer = PageBoundsLayer(4, int8_bounds=True)
        keys, _ = layer.update(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8))
        layer.update_bounds()
        alive = weakref.ref(layer)
        assert page_bounds_layer_of(keys) is layer
        del layer
        assert alive() is None and page_bounds_layer_of(keys) is None
    finally:
        gc.enable()


def test_cache_rejects_padding_after_real_tokens():
    layer = PageBoundsLayer(4)
    layer.update(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4))
    with pytest.raises(ValueError, match="left padding"):
        layer.update_bounds(torch.tensor([[1, 1, 0, 1, 1, 1]]))


def test_cache_batch_ops_and_crop_keep_bounds_consistent():
    g = torch.Generator().manual_seed(3)
    layer = PageBoundsLayer(4, int8_bounds=True)
    k = torch.randn(2, 1, 10, 4, generator=g)
    layer.update(k, k.clone())
    layer.update_bounds(torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10]).bool())
    layer.batch_select_indices(torch.tensor([1]))
    lo, hi = brute_bounds(k[1:], [0], 4)
    assert layer.keys.shape == (1, 1, 10, 4) and layer.pad.tolist() == [0]
    assert torch.equal(layer.page_min[:, :, :3], lo) and torch.equal(layer.page_max[:, :, :3], hi)
    layer.crop(-3)
    layer.update(k[1:, :, :2], k[1:, :, :2])
    layer.update_bounds()
    keys = torch.cat([k[1:, :, :7], k[1:, :, :2]], 2)
    lo, hi = brute_bounds(keys, [0], 4)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.page_min[:, :, :3], lo)
    q_min, q_max, scale = quantize_bounds(lo, hi)  # the 8-bit copy follows the selection and the crop
    assert torch.equal(layer.page_min_int8[:, :, :3], q_min) and torch.equal(layer.page_max_int8[:, :, :3], q_max)
    assert torch.equal(layer.page_scale[:, :, :3], scale)


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("scoring", ["bound", "int8", "oracle", "slack"])
@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_chosen_pages_and_output_equal_the_reference(share, backend, scoring, monkeypatch):
    """A decode step after a padded prefill: the chosen pages are the top pages of the brute-force scores (the
    bounds' ``Σ max(q·M, q·m)``, the same from the bounds' 8-bit copy with ``bounds_dtype: int8``, or with
    ``scoring: oracle`` each page's largest true logit, or ``q·c + slack·|q|·r`` with ``bound_slack``), the output is
    softmax attention over exactly those pages + the last one."""
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors through Triton need the interpreter (CPU-only machines); GPU: test_quest_kernels")
    monkeypatch.setenv("ATTNKIT_KERNELS", backend)
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, d, page, pads = 2, 6, 2, 16, 4, [0, 6]
    method = Quest(
        page_size=page, token_budget=16, dense_layers=[], share_gqa_group=share,
        scoring="oracle" if scoring == "oracle" else "bound", bounds_dtype="int8" if scoring == "int8" else "model",
        bound_slack=0.4 if scoring == "slack" else 1.0,
    )
    decode = QuestDecode(method, 0, dense=False)
    cache = method.make_cache_layer(0)
    k, v = torch.randn(b, hkv, 45, d, generator=g), torch.randn(b, hkv, 45, d, generator=g)
    mask = torch.arange(45)[None, :] >= torch.tensor(pads)[:, None]
    q = torch.randn(b, hq, 45, d, generator=g)
    key, value = cache.update(k, v)
    assert decode.attend(q, key, value, mask, None) is None  # prefill: not Quest's business
    for _ in range(6):  # decode steps: pages fill up (their bounds folded by the step that scores) and get scored
        k1, v1 = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
        key, value = cache.update(k1, v1)
        q1 = torch.randn(b, hq, 1, d, generator=g)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], 1)
        out = decode.attend(q1, key, value, mask, 0.25)
        lo, hi = brute_bounds(key, pads, page)
        valid = (key.shape[2] - torch.tensor(pads) + page - 1) // page - 1
        for r in range(b):  # the step's own token is in the bounds (folded inside the scoring launch)
            n = int(valid[r]) + 1
            assert torch.equal(cache.page_min[r, :, :n], lo[r, :, :n]) and int(cache.last_page[r]) == n - 1
            assert torch.equal(cache.page_max[r, :, :n], hi[r, :, :n])
            if scoring == "int8":
                assert torch.equal(cache.page_max_int8[r, :, :n], quantize_bounds(lo[r, :, :n], hi[r, :, :n])[1])
        if scoring == "oracle":
            scores = brute_oracle(q1[:, :, 0], key, pads, page, valid, share)
        elif scoring == "int8":
            q_min, q_max, scale = quantize_bounds(lo, hi)
            scores = score_ref.page_scores(q1[:, :, 0], q_min, q_max, valid, share, scale)
            exact = score_ref.page_scores(q1[:, :, 0], lo, hi, valid, share)
            finite = torch.isfinite(exact)
            assert (scores[finite] >= exact[finite] - 1e-5).all()  # still an upper bound
        elif scoring == "slack":  # brute force: the range's centre logit + 0.4 of the bound's slack
            qk = q1[:, :, 0].view(b, hkv, hq // hkv, 1, d)
            c, r = ((hi + lo) / 2)[:, :, None], ((hi - lo) / 2)[:, :, None]
            scores = (qk * c).sum(-1) + 0.4 * (qk.abs() * r).sum(-1)
            scores = scores.masked_fill(torch.arange(scores.shape[-1]) >= valid.view(b, 1, 1, 1), float("-inf"))
            scores = scores.amax(2) if share else scores.reshape(b, hq, -1)
        else:
            scores = score_ref.page_scores(q1[:, :, 0], lo, hi, valid, share)
        want = scores.topk(method.page_budget - 1, dim=-1).indices
        assert decode.last_pages.shape == (b, hkv if share else hq, 3)
        assert torch.equal(decode.last_pages.sort(-1).values, want.sort(-1).values)
        expected = attn_ref.sparse_decode_attention(q1[:, :, 0], key, value, want, page, torch.tensor(pads), 0.25)
        torch.testing.assert_close(out[:, :, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_oracle_scores_are_each_pages_true_largest_logit(share):
    """scoring: oracle ranks pages by the largest q·k of their keys (brute force over each row's pages), padded rows
    included; the selection attends exactly those pages."""
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, d, page, pads, s = 2, 6, 2, 8, 4, [0, 5], 30
    key = torch.randn(b, hkv, s, d, generator=g)
    query = torch.randn(b, hq, d, generator=g)
    pages = -(-(s - min(pads)) // page)
    valid = (s - torch.tensor(pads) + page - 1) // page - 1
    got = score_ref.oracle_page_scores(query, key, torch.tensor(pads), page, pages, valid, share)
    want = brute_oracle(query, key, pads, page, valid, share)
    torch.testing.assert_close(got, want)
    # The oracle never scores below the bound's page (the bound is an upper bound of the true largest logit).
    lo, hi = brute_bounds(key, pads, page)
    bound = score_ref.page_scores(query, lo, hi, valid, share)
    finite = torch.isfinite(want)
    assert (bound[finite] >= got[finite] - 1e-5).all()


def test_oracle_scoring_selects_the_true_best_pages_in_a_decode_step():
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d, page = 1, 4, 2, 8, 4
    method = Quest(page_size=page, token_budget=12, dense_layers=[], scoring="oracle")
    decode = QuestDecode(method, 0, dense=False)
    cache = method.make_cache_layer(0)
    k, v = torch.randn(b, hkv, 33, d, generator=g), torch.randn(b, hkv, 33, d, generator=g)
    key, value = cache.update(k, v)
    decode.attend(torch.randn(b, hq, 33, d, generator=g), key, value, None, None)
    key, value = cache.update(torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g))
    q1 = torch.randn(b, hq, 1, d, generator=g)
    decode.attend(q1, key, value, None, None)
    logits = torch.einsum("hd,hsd->hs", q1[0, :, 0], key[0].repeat_interleave(hq // hkv, 0))[:, :32]
    want = logits.view(hq, 8, page).amax(-1).topk(2, dim=-1).indices  # 34 tokens: 8 complete pages compete
    assert torch.equal(decode.last_pages[0].sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_candidate_page_max_is_the_oracle_at_the_candidates(share):
    """rerank_pages' exact score of a shortlist = the oracle's score of those pages (padded rows, fillers past the
    valid pages and -1 entries score -inf)."""
    g = torch.Generator().manual_seed(13)
    b, hq, hkv, d, page, pads, s = 2, 6, 2, 8, 4, [0, 5], 30
    key = torch.randn(b, hkv, s, d, generator=g)
    query = torch.randn(b, hq, d, generator=g)
    pad = torch.tensor(pads)
    pages = -(-(s - min(pads)) // page)
    valid = (s - pad + page - 1) // page - 1
    oracle = score_ref.oracle_page_scores(query, key, pad, page, pages, valid, share)
    heads = hkv if share else hq
    candidates = torch.stack([torch.randperm(pages, generator=g)[:5] for _ in range(b * heads)]).view(b, heads, 5)
    candidates[0, 0, 0] = -1
    got = score_ref.candidate_page_max(query, key, pad, page, candidates, valid, share)
    want = oracle.gather(-1, candidates.clamp_min(0)).masked_fill(candidates < 0, float("-inf"))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_rerank_of_every_page_selects_what_the_oracle_selects(share):
    """With a shortlist of every page, rerank_pages picks exactly the oracle's pages; with a short one, only pages of
    the bound's shortlist, ranked by their true largest logit."""
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, d, page = 1, 4, 2, 8, 4
    k, v = torch.randn(b, hkv, 41, d, generator=g), torch.randn(b, hkv, 41, d, generator=g)
    q0, q1 = torch.randn(b, hq, 41, d, generator=g), torch.randn(b, hq, 1, d, generator=g)
    k1, v1 = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
    picked = {}
    for name, settings in {"oracle": {"scoring": "oracle"}, "rerank-all": {"rerank_pages": 64},
                           "bound": {}, "rerank-4": {"rerank_pages": 4}}.items():
        method = Quest(page_size=page, token_budget=12, dense_layers=[], share_gqa_group=share, **settings)
        decode, cache = QuestDecode(method, 0, dense=False), method.make_cache_layer(0)
        key, value = cache.update(k, v)
        decode.attend(q0, key, value, None, None)
        key, value = cache.update(k1, v1)
        decode.attend(q1, key, value, None, None)
        picked[name] = decode.last_pages.sort(-1).values
        if name == "rerank-4":
            bound = score_ref.page_scores(q1[:, :, 0], cache.page_min[:, :, :10], cache.page_max[:, :, :10],
                                          cache.last_page, share)
            shortlist = bound.topk(4, dim=-1).indices
            oracle = score_ref.oracle_page_scores(q1[:, :, 0], key, cache.pad, page, 10, cache.last_page, share)
            want = shortlist.gather(-1, oracle.gather(-1, shortlist).topk(2, dim=-1).indices)
            assert torch.equal(picked[name], want.sort(-1).values)
    assert torch.equal(picked["rerank-all"], picked["oracle"])


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_oracle_selecting_every_page_equals_dense_attention(share):
    """The sparse path itself at a budget that holds the context: the oracle's top pages (every complete page; the
    shorter, padded row gets fillers past its pages) + the last page attend exactly what dense attention attends."""
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, d, page, pads, s = 2, 6, 2, 8, 4, [0, 9], 37
    key, value = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    query = torch.randn(b, hq, d, generator=g)
    pad = torch.tensor(pads)
    pages = -(-(s - min(pads)) // page)
    valid = (s - pad + page - 1) // page - 1  # complete pages per row: [9, 7]
    scores = score_ref.oracle_page_scores(query, key, pad, page, pages, valid, share)
    chosen = score_ref.top_pages(scores, int(valid.max()))
    out = attn_ref.sparse_decode_attention(query, key, value, chosen, page, pad, 0.3)
    mask = torch.arange(s)[None, :] >= pad[:, None]
    want = dense_attention(query[:, :, None], key, value, mask, 0.3)[:, :, 0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_scores_stop_before_the_longest_rows_last_page(monkeypatch):
    """The longest row's last page is attended anyway and never scored, so Quest scores only the pages before it:
    at 16 pages + 1 token per row the page scores (and the top-page search's rows) are 16 wide, not 17, and the
    chosen pages still equal the top pages of every scoreable page."""
    import attnkit.sparsify.quest as quest_module

    widths = []
    real_scores = quest_module.page_scores

    def recording(query, page_min, *args, **kwargs):
        widths.append(page_min.shape[2])
        return real_scores(query, page_min, *args, **kwargs)

    monkeypatch.setattr(quest_module, "page_scores", recording)
    monkeypatch.setenv("ATTNKIT_KERNELS", "reference")
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d, page, pads = 2, 4, 2, 16, 4, [0, 3]
    method = Quest(page_size=page, token_budget=16, dense_layers=[])
    decode, cache = QuestDecode(method, 0, dense=False), method.make_cache_layer(0)
    k, v = torch.randn(b, hkv, 64, d, generator=g), torch.randn(b, hkv, 64, d, generator=g)
    mask = torch.arange(64)[None, :] >= torch.tensor(pads)[:, None]
    key, value = cache.update(k, v)
    decode.attend(torch.randn(b, hq, 64, d, generator=g), key, value, mask, None)
    key, value = cache.update(torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g))
    q1 = torch.randn(b, hq, 1, d, generator=g)
    decode.attend(q1, key, value, torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], 1), None)
    assert cache.num_pages() == 17 and widths == [16]
    lo, hi = brute_bounds(key, pads, page)
    valid = (key.shape[2] - torch.tensor(pads) + page - 1) // page - 1
    want = score_ref.page_scores(q1[:, :, 0], lo, hi, valid).topk(method.page_budget - 1, dim=-1).indices
    assert torch.equal(decode.last_pages.long().sort(-1).values, want.sort(-1).values)


def test_sink_pages_are_always_chosen_and_never_twice():
    """sink_pages: 1 puts each row's first page in every head's selection once it is complete; a padded row whose
    first page is still its current page does not get it twice."""
    g = torch.Generator().manual_seed(9)
    b, hq, hkv, d, page = 2, 4, 2, 8, 4
    method = Quest(page_size=page, token_budget=12, dense_layers=[], sink_pages=1)
    decode = QuestDecode(method, 0, dense=False)
    cache = method.make_cache_layer(0)
    pads = [0, 27]  # row 1 has 3 real tokens: its first page is its current page
    k, v = torch.randn(b, hkv, 30, d, generator=g), torch.randn(b, hkv, 30, d, generator=g)
    mask = torch.arange(30)[None, :] >= torch.tensor(pads)[:, None]
    k[0, :, :4] = -k[0, :, :4].abs() * 10  # row 0's first page: a low bound for positive queries
    key, value = cache.update(k, v)
    decode.attend(torch.randn(b, hq, 30, d, generator=g), key, value, mask, None)
    key, value = cache.update(torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g))
    mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], 1)
    q1 = torch.randn(b, hq, 1, d, generator=g).abs()
    out = decode.attend(q1, key, value, mask, None)
    assert (decode.last_pages[0] == 0).sum(-1).eq(1).all()  # page 0 once in every head of row 0
    # Row 1 has only its current page (4 real tokens): its output is plain attention over them, sink or not.
    k1, v1 = key[1, :, 27:].repeat_interleave(hq // hkv, 0), value[1, :, 27:].repeat_interleave(hq // hkv, 0)
    want = torch.softmax(torch.einsum("hd,hsd->hs", q1[1, :, 0], k1) * d**-0.5, -1)
    torch.testing.assert_close(out[1, :, 0], torch.einsum("hs,hsd->hd", want, v1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="leaves no page"):
        Quest(page_size=4, token_budget=8, sink_pages=2)


# ------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("scoring", ["bound", "oracle"])
@pytest.mark.parametrize("pads", [[0, 0], [0, 5]], ids=["unpadded", "padded"])
def test_full_budget_equals_dense_generate(tiny, pads, scoring):
    """Budget ≥ context: generate with Quest (its cache included) gives the dense logits: bit-exact without padding.
    With padding attnkit's attention (a [B, S] key mask) already differs from transformers' SDPA (a 4D mask) in the
    last bits, with or without Quest (streaming_llm with nothing evicted shows the same ~1e-7)."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 30, pad_lengths=pads)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    dense = model.generate(**kwargs)
    attnkit.apply(model, quest(token_budget=64, dense_layers=[], scoring=scoring))
    cache = attnkit.make_cache(model)
    assert isinstance(cache.layers[0], PageBoundsLayer)
    patched = model.generate(**kwargs, past_key_values=cache)
    assert torch.equal(patched.sequences, dense.sequences)
    for a, b in zip(patched.logits, dense.logits, strict=True):
        if any(pads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert all(m.last_pages is None for m in quest_layers(model))  # every step ran dense


def test_small_budget_is_sparse_and_runs_through_generate(tiny):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 40, pad_lengths=[0, 3])
    attnkit.apply(model, quest())
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         past_key_values=attnkit.make_cache(model))
    assert out.shape == (2, 46)
    layers = quest_layers(model)
    assert len(layers) == model.config.num_hidden_layers - 1  # layer 0 is dense
    assert all(m.last_pages is not None and m.last_pages.shape[-1] == 2 for m in layers)


def test_padded_batch_equals_unpadded():
    """Left padding changes nothing: each row pages from its first real token, so it picks the same pages."""
    model, _ = attnkit.load_model("tiny-qwen2", dtype="float32", device="cpu")
    ids, mask = random_batch(model.config.vocab_size, 2, 41, pad_lengths=[0, 7])
    attnkit.apply(model, quest(share_gqa_group=True))
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(input_ids=ids, attention_mask=mask, past_key_values=attnkit.make_cache(model), **gen)
    pages_batch = [m.last_pages.clone() for m in quest_layers(model)]
    for row, pad in enumerate([0, 7]):
        row_ids = ids[row : row + 1, pad:]
        single = model.generate(input_ids=row_ids, attention_mask=torch.ones_like(row_ids),
                                past_key_values=attnkit.make_cache(model), **gen)
        assert torch.equal(single.sequences[0], batch.sequences[row, pad:])
        for a, b in zip(single.logits, batch.logits, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)
        for m, pages in zip(quest_layers(model), pages_batch, strict=True):
            assert torch.equal(m.last_pages[0].sort(-1).values, pages[row].sort(-1).values)


# ------------------------------------------------------------------- fixed capacity (CUDA-graph decode)
@pytest.mark.parametrize("settings", [
    {},
    {"share_gqa_group": True, "bounds_dtype": "int8", "sink_pages": 1},
    {"token_budget": 256},
    {"rerank_pages": 5, "sink_pages": 1},
    {"scoring": "oracle"},
], ids=["sparse", "shared-int8-sink", "budget-holds-all", "rerank-sink", "oracle"])
@pytest.mark.parametrize("pads", [[0, 0], [0, 5]], ids=["unpadded", "padded"])
def test_generate_graphed_eager_steps_equal_generate(tiny, pads, settings, monkeypatch):
    """The fixed-capacity steps (device-side length, whole buffers, scores over the capacity) pick the tokens
    model.generate picks with the growing cache, with sparse selection, shared int8 scoring and a sink page,
    padding, dense layer 0, and a budget that holds every page (all pages through the paged kernel). The buffers'
    unwritten slots and pages are NaN: a step that reads one fails."""
    reserve = PageBoundsLayer._reserve

    def poisoned_reserve(self, need, key_states, value_states):
        fresh = self._keys is None
        reserve(self, need, key_states, value_states)
        if fresh and self._keys is not None:
            for t in (self._keys, self._values, self.page_min, self.page_max, self.page_scale):
                if t is not None:
                    t.fill_(float("nan"))

    monkeypatch.setattr(PageBoundsLayer, "_reserve", poisoned_reserve)
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 37, pad_lengths=pads)
    attnkit.apply(model, quest(**settings))
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                          past_key_values=attnkit.make_cache(model))[:, 37:]
    got = attnkit.generate_graphed(model, ids, 9, attention_mask=mask, cuda_graph=False)
    assert torch.equal(got, want)
    # model.generate itself runs with the fixed-capacity cache too (its 2D mask is not needed at decode)
    fixed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                           past_key_values=attnkit.make_cache(model, max_cache_len=37 + 9))[:, 37:]
    assert torch.equal(fixed, want)
    if "token_budget" not in settings:
        assert all(m.last_pages is not None for m in quest_layers(model))  # the sparse path ran


def test_generate_graphed_chunked_prefill_and_stats(tiny):
    """A prompt prefilled in chunks (left padding inside the first chunk) gives the same tokens; stats are filled."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 33, pad_lengths=[0, 4])
    attnkit.apply(model, quest())
    whole = attnkit.generate_graphed(model, ids, 6, attention_mask=mask, cuda_graph=False)
    stats = {}
    chunked = attnkit.generate_graphed(model, ids, 6, attention_mask=mask, cuda_graph=False, prefill_chunk=10,
                                       stats=stats)
    assert torch.equal(chunked, whole)
    assert stats["prefill_ms"] > 0 and stats["decode_ms_per_token"] > 0 and stats["timed_steps"] == 5


def test_fixed_capacity_cache_state_and_errors(tiny):
    """Decode steps write at the device-side length and return the whole buffers; the bounds equal their
    definition; the capacity is enforced; every layer must be Quest's."""
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 21)
    attnkit.apply(model, quest())
    cache = attnkit.make_cache(model, max_cache_len=24)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[1]
    assert layer.length == 21 and int(layer.length_t) == 21 and layer.keys.shape[-2] == 21
    for i in range(3):
        model(input_ids=ids[:, :1], position_ids=torch.tensor([[21 + i]]), past_key_values=cache, use_cache=True)
    assert layer.length == 24 and int(layer.length_t) == 24 and layer.keys.shape[-2] == 24  # the whole buffer
    lo, hi = brute_bounds(layer.keys, [0], 4)
    assert torch.equal(layer.page_min[:, :, :6], lo) and torch.equal(layer.page_max[:, :, :6], hi)
    with pytest.raises(ValueError, match="holds 24 tokens"):
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="empty cache"):
        layer.make_static(64)
    attnkit.unpatch(model)
    attnkit.apply(model, quest(layers=[1], dense_layers=[]))
    with pytest.raises(ValueError, match="layer 0 has DynamicLayer"):
        attnkit.make_cache(model, max_cache_len=64)
    with pytest.raises(ValueError, match="needs the inputs on a CUDA device"):
        attnkit.generate_graphed(model, ids, 4, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("settings", [{}, {"share_gqa_group": True, "bounds_dtype": "int8"}], ids=["per-head", "shared-int8"])
def test_generate_graphed_cuda_graph_equals_generate(settings):
    """On a GPU: the decode step captured once and replayed gives generate's tokens (padded batch, sparse steps)."""
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cuda")
    ids, mask = random_batch(model.config.vocab_size, 2, 45, pad_lengths=[0, 6])
    ids, mask = ids.cuda(), mask.cuda()
    attnkit.apply(model, quest(**settings))
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          past_key_values=attnkit.make_cache(model))[:, 45:]
    got = attnkit.generate_graphed(model, ids, 12, attention_mask=mask)
    assert torch.equal(got, want)


def test_decode_without_the_quest_cache_selects_the_same(tiny):
    """A plain DynamicCache (no attnkit.make_cache): bounds are recomputed per step, same logits."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 1, 37)
    attnkit.apply(model, quest())
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with_cache = model.generate(**gen, past_key_values=attnkit.make_cache(model))
    without = model.generate(**gen)
    for a, b in zip(with_cache.logits, without.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_save_load_reproduces_quest(tiny, tmp_path):
    model, tokenizer = tiny
    ids, mask = random_batch(model.config.vocab_size, 1, 33)
    attnkit.apply(model, quest(share_gqa_group=True))
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    before = model.generate(**gen, past_key_values=attnkit.make_cache(model))
    attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded, _ = attnkit.load(tmp_path / "ckpt", dtype="float32", device="cpu")
    assert loaded.attnkit_state.recipe == model.attnkit_state.recipe
    after = loaded.generate(**gen, past_key_values=attnkit.make_cache(loaded))
    assert torch.equal(before.sequences, after.sequences)
    for a, b in zip(before.logits, after.logits, strict=True):
        assert torch.equal(a, b)


def test_composes_with_a_prefill_method(tiny):
    """A block-sparse prefill + Quest decode in one recipe; at full budget it generates exactly as the prefill
    method alone, and at a small budget both are sparse."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 70, pad_lengths=[0, 9])
    prefill = {"method": "sliding_window", "window": 32, "block_size": 16}
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    attnkit.apply(model, {"attnkit": 1, "name": "x", "steps": [prefill]})
    alone = model.generate(**gen)
    attnkit.unpatch(model)
    recipe = {"attnkit": 1, "name": "xq", "steps": [prefill, quest(token_budget=128, dense_layers=[])["steps"][0]]}
    attnkit.apply(model, recipe)
    assert model.attnkit_state.layer_methods[0] == {"prefill": "sliding_window", "decode": "quest"}
    both = model.generate(**gen, past_key_values=attnkit.make_cache(model))
    assert model.attnkit_stats.mean_density() < 1.0  # the prefill really was sparse
    for a, b in zip(alone.logits, both.logits, strict=True):
        assert torch.equal(a, b)
    sparse = dict(gen, max_new_tokens=3)
    attnkit.unpatch(model)
    attnkit.apply(model, {"attnkit": 1, "name": "xq", "steps": [prefill, quest()["steps"][0]]})
    model.generate(**sparse, past_key_values=attnkit.make_cache(model))
    assert all(m.last_pages is not None for m in quest_layers(model))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"token_budget": 8, "page_size": 16}, "below one page"),
        ({"token_budget": 40, "page_size": 16}, "not a multiple of page_size"),
        ({"page_size": 12, "token_budget": 48}, "power of two"),
        ({"token_budget": 0}, "greater than 0"),
        ({"page_sise": 16}, "unknown key"),
        ({"scoring": "exact"}, "bound"),
        ({"rerank_pages": 1}, "shortlist must hold"),
        ({"rerank_pages": 8, "scoring": "oracle"}, "already ranks every page"),
        ({"bound_slack": 1.5}, "less than or equal to 1"),
        ({"bound_slack": 0.5, "scoring": "oracle"}, "reads the true logits"),
    ],
)
def test_bad_settings_fail_clearly(settings, message):
    with pytest.raises(RecipeError, match=message):
        attnkit.Recipe.load(quest(**settings))


def test_dense_layers_out_of_range(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="dense_layers entry 5 is out of range"):
        attnkit.apply(model, quest(dense_layers=[5]))
    assert not hasattr(model.model.layers[0].self_attn, "attnkit")  # nothing attached


def test_builtin_recipes_load():
    recipe = attnkit.Recipe.load("quest")
    step = recipe.steps[0]
    assert step.method_name == "quest" and step.dense_layers == [0, 1]
    assert all(task for task in recipe.eval.tasks)


def test_two_decode_methods_on_a_layer_are_rejected(tiny):
    model, _ = tiny
    recipe = {"attnkit": 1, "name": "sq", "steps": [{"method": "streaming_llm", "sink": 4, "window": 16},
                                                     quest()["steps"][0]]}
    with pytest.raises(RecipeError, match="gets two decode methods"):
        attnkit.apply(model, recipe)


def test_decode_fidelity_sees_quest(tiny):
    """compare_decode measures decode steps: zero at full budget, positive at a small one."""
    from attnkit.eval.fidelity import compare_decode

    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 60)
    attnkit.apply(model, quest(token_budget=128, dense_layers=[]))
    full = compare_decode(model, ids, decode_tokens=8)
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0
    attnkit.unpatch(model)
    attnkit.apply(model, quest(token_budget=8, dense_layers=[]))
    sparse = compare_decode(model, ids, decode_tokens=8)
    assert sparse["kl"] > 0.0
    assert sparse["nll_dense"] == full["nll_dense"]


def test_selection_diagnostic_mass_recall():
    """benchmarks.quest_selection: no score when every page fits the budget; otherwise a recall in (0, 1], the
    oracle's equal to the brute-force softmax mass of its pages, and the alpha scorer equal to page_scores' slack."""
    from benchmarks.quest_selection import attention_probs, mass_recall, score_pages

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g), torch.randn(2, 70, 16, generator=g)
    probs = attention_probs(q, k, 0.25)
    assert mass_recall(probs, q, k, "bound", 8, 80) is None  # 9 pages, the last partial: all fit 10 pages
    for scorer in ("oracle", "bound", "alpha=0.5"):
        r = mass_recall(probs, q, k, scorer, 8, 32)  # 3 of 8 complete pages + the current one
        assert r.shape == (6,) and (r > 0).all() and (r <= 1 + 1e-6).all()
    # Brute force for the oracle: the softmax mass of its 3 best complete pages plus the current page's slots.
    logits = torch.einsum("hgd,hsd->hgs", q.view(2, 3, 16), k).reshape(6, 70)
    brute_probs = torch.softmax(0.25 * logits, -1)
    page_mass = brute_probs[:, :64].view(6, 8, 8).sum(-1)
    best = logits[:, :64].view(6, 8, 8).amax(-1).topk(3)
    want = page_mass.gather(-1, best.indices).sum(-1) + brute_probs[:, 64:].sum(-1)
    torch.testing.assert_close(mass_recall(probs, q, k, "oracle", 8, 32), want)
    lo, hi = k[:, :64].view(2, 8, 8, 16).amin(2), k[:, :64].view(2, 8, 8, 16).amax(2)
    want = score_ref.page_scores(q[None], lo[None], hi[None], torch.tensor([8]), slack=0.5)[0]
    torch.testing.assert_close(score_pages("alpha=0.5", q, k, 8, 8), want, rtol=1e-5, atol=1e-5)
