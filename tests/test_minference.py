"""MInference: estimates and block builders against brute force, exact accounting in the search, dense at
keep-everything budgets, calibration through save/load."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import attnkit
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.registry import get_method
from attnkit.sparsify.minference import (
    A_SHAPE,
    ALWAYS_COLUMNS,
    ALWAYS_SLASHES,
    BLOCK_SPARSE,
    VERTICAL_SLASH,
    build_mask,
    evaluate_candidates,
    last_query_attention,
    slash_blocks,
    top_columns,
    vertical_slash_scores,
)
from tests.conftest import random_batch

LOGIT_ATOL = 2e-5


def recipe(params: dict) -> dict:
    return {"attnkit": 1, "name": "test-minference", "steps": [{"method": "minference", "block_size": 16, **params}]}


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def token_mask(mask, batch, heads):
    """Dense bool ``[B, H, Sq, Sk]`` of the pairs a VerticalSlashMask computes (causal applied)."""
    vs = mask.expand(batch, heads)
    sq, sk = vs.q_len, vs.kv_len
    bs = vs.block_size[0]
    blocks = vs.block_mask.to_dense()
    rows, keys = torch.arange(sq), torch.arange(sk)
    out = blocks[:, :, rows // bs][..., keys // bs]
    cols = torch.zeros(batch, heads, sk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            n = int(vs.column_counts[b, h])
            cols[b, h, vs.columns[b, h, :n].long()] = True
    out = out | cols[:, :, None, :]
    return out & (keys[None, :] <= rows[:, None] + sk - sq)


# ---------------------------------------------------------------------------------------------- estimation
def test_vertical_and_slash_scores_match_loops():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 6, 17, generator=g)
    vertical, slash = vertical_slash_scores(probs, 17)
    torch.testing.assert_close(vertical, probs.sum(-2))
    expected = torch.zeros(2, 3, 17)
    for i in range(6):
        pos = 17 - 6 + i
        for o in range(pos + 1):
            expected[..., o] += probs[..., i, pos - o]
    torch.testing.assert_close(slash, expected)


def test_last_query_attention_is_causal_gqa_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 20, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, :5] = False
    probs = last_query_attention(q, k, 4, 0.3, kpm)
    assert probs.shape == (2, 6, 4, 30)
    for i in range(4):
        pos = 30 - 4 + i
        logits = torch.einsum("bhd,bhkd->bhk", q[:, :, 20 - 4 + i], k.repeat_interleave(3, 1)) * 0.3
        allowed = (torch.arange(30) <= pos)[None, None] & kpm[:, None]
        expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        torch.testing.assert_close(probs[:, :, i], expected)


def test_top_columns_keep_the_first_columns_and_sort():
    vertical = torch.zeros(1, 2, 100)
    vertical[0, 0, 50], vertical[0, 0, 70] = 5.0, 3.0
    columns, counts = top_columns(vertical, torch.tensor([ALWAYS_COLUMNS + 2, ALWAYS_COLUMNS]), 100)
    assert counts.tolist() == [[ALWAYS_COLUMNS + 2, ALWAYS_COLUMNS]]
    assert columns[0, 0, : ALWAYS_COLUMNS + 2].tolist() == [*list(range(ALWAYS_COLUMNS)), 50, 70]
    assert columns[0, 1, :ALWAYS_COLUMNS].tolist() == list(range(ALWAYS_COLUMNS))


@pytest.mark.parametrize(("q_len", "kv_len", "bs"), [(256, 256, 16), (96, 256, 32), (250, 250, 16)])
def test_slash_blocks_cover_exactly_the_blocks_the_diagonals_cross(q_len, kv_len, bs):
    g = torch.Generator().manual_seed(q_len)
    slash = torch.rand(1, 2, kv_len, generator=g)
    sizes = torch.tensor([ALWAYS_SLASHES + 3, ALWAYS_SLASHES + 10])
    got = slash_blocks(slash, sizes, q_len, kv_len, bs)
    score = slash.clone()
    score[..., :ALWAYS_SLASHES] = float("inf")
    expected = torch.zeros_like(got)
    offset = kv_len - q_len
    for h in range(2):
        for o in score[0, h].topk(int(sizes[h])).indices.tolist():
            for row in range(num_blocks(q_len, bs) * bs):  # whole query blocks, as the builder counts them
                key = row + offset - o
                if 0 <= key < kv_len:
                    expected[0, h, row // bs, key // bs] = True
    expected &= causal_block_matrix(q_len, kv_len, (bs, bs))
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------- the search
def test_candidate_recall_and_cost_equal_brute_force():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 160, 8, generator=g) * 2, torch.randn(2, 2, 160, 8, generator=g) * 2
    kpm = torch.ones(2, 160, dtype=torch.bool)
    kpm[1, :9] = False
    method = get_method("minference")(block_size=16, last_q=16)
    grid = [(A_SHAPE, 16, 48), (VERTICAL_SLASH, 40, 110), (BLOCK_SPARSE, 3, 0)]
    recall, cost = evaluate_candidates(q, k, kpm, method, 0.35, grid)
    # brute force: the mask build_mask makes, applied to the full attention matrix
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * 0.35
    causal = torch.ones(160, 160, dtype=torch.bool).tril()
    allowed = causal[None, None] & kpm[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    real_rows = kpm[:, None, :].expand(-1, 4, -1).double()
    for c, (pattern, a, b) in enumerate(grid):
        pattern_t = torch.full((4,), pattern)
        budget = torch.tensor([[a, b]] * 4)
        pairs = token_mask(build_mask(q, k, kpm, pattern_t, budget, method, 0.35), 2, 4)
        kept = (probs * pairs).sum(-1).double()  # [B, H, Sq]
        expected_recall = ((kept * real_rows).sum(-1) / real_rows.sum(-1)).mean(0)
        expected_cost = ((pairs & causal).sum((-1, -2)).double() / causal.sum()).mean(0)
        torch.testing.assert_close(recall[c], expected_recall, atol=1e-5, rtol=0)
        torch.testing.assert_close(cost[c], expected_cost, atol=1e-9, rtol=0)


def test_search_picks_per_head_patterns_within_the_target(tiny, tmp_path):
    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 192, seed=4)
    attnkit.apply(model, recipe({"search": True, "target_density": 0.6, "last_q": 16}), data=ids)
    chosen = model.attnkit_calibration["minference"]
    assert set(chosen) == set(range(model.config.num_hidden_layers))
    for heads in chosen.values():
        assert len(heads) == model.config.num_attention_heads
        for head in heads:
            assert head["pattern"] in ("a_shape", "vertical_slash", "block_sparse")
            assert head["density"] <= 0.6 + 1e-9 and 0 < head["recall"] <= 1 + 1e-9
    # the per-head choice is checkpoint state: reloading gives the same patterns and logits
    patched = logits(model, ids)
    out = attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded, _ = attnkit.load(out, dtype="float32", device="cpu")
    for a, b in zip(model.model.layers, reloaded.model.layers, strict=True):
        assert torch.equal(a.self_attn.attnkit.prefill.head_pattern, b.self_attn.attnkit.prefill.head_pattern)
        assert torch.equal(a.self_attn.attnkit.prefill.head_budget, b.self_attn.attnkit.prefill.head_budget)
    assert torch.equal(logits(reloaded, ids), patched)


# ------------------------------------------------------------------------------------- the model, end to end
@pytest.mark.parametrize(
    "params",
    [
        {"pattern": "vertical_slash", "vertical": 4096, "slash": 4096},
        {"pattern": "a_shape", "sink": 0, "local": 4096},
        {"pattern": "block_sparse", "top_blocks": 4096},
    ],
    ids=["vertical_slash", "a_shape", "block_sparse"],
)
def test_keep_everything_budgets_reproduce_dense(tiny, params):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 3, 150, pad_lengths=[0, 7, 40])
    dense = logits(model, ids, mask)
    attnkit.apply(model, recipe(params))
    patched = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], dense[real], atol=LOGIT_ATOL, rtol=0)
    logits(model, ids[:1])  # unpadded: every visible block (padding-only blocks are skipped above)
    assert model.attnkit_stats.mean_density() == pytest.approx(1.0)


def test_small_budgets_are_sparse_and_finite(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 400)
    attnkit.apply(model, recipe({"pattern": "vertical_slash", "vertical": 40, "slash": 100, "last_q": 16}))
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert 0 < model.attnkit_stats.mean_density() < 0.9


def test_recall_report_counts_columns(tiny):
    from attnkit.eval.fidelity import attention_recall

    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 256, seed=7)
    attnkit.apply(model, recipe({"pattern": "vertical_slash", "vertical": 40, "slash": 110, "last_q": 16}))
    report = attention_recall(model, ids)
    assert report.layers and all(0 < r.recall <= 1 + 1e-6 and 0 < r.density < 1 for r in report.layers)


def test_bad_settings():
    cls = get_method("minference")
    with pytest.raises(ValidationError, match="power of two"):
        cls(block_size=48)
    with pytest.raises(ValidationError):
        cls(target_density=0)
    with pytest.raises(ValidationError):
        cls(pattern="diagonal")
    with pytest.raises(ValueError, match="target_density, not target_recall"):
        cls().calibration_settings(target_recall=0.9)
    assert cls().calibration_settings(length=512, target_density=0.3).search
