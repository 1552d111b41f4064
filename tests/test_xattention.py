"""XAttention: antidiagonal scoring and threshold selection against brute-force definitions; exact at τ = 1."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import attnkit
from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.registry import get_method
from attnkit.sparsify.xattention import anchor_blocks, antidiagonal_block_scores, select_blocks_by_threshold
from tests.conftest import random_batch

LOGIT_ATOL = 2e-5


# ------------------------------------------------------------------------------------------ brute-force scoring
def brute_scores(q, k, block, stride, scale=None, kpm=None):
    """fp64 loops: per reduced query row, softmax over visible key tiles of their antidiagonal sums, summed per block."""
    q, k = q.double().numpy(), k.double().numpy()
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group, off = hq // hkv, sk - sq
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, hq, math.ceil(sq / block), math.ceil(sk / block), dtype=torch.float64)

    def real_key(b, j):
        return j < sk and (kpm is None or bool(kpm[b, j]))

    def real_query(b, r):
        return r < sq and (kpm is None or bool(kpm[b, r + off]))

    for b in range(batch):
        for h in range(hq):
            for n in range(math.ceil(sq / stride)):
                if not any(real_query(b, n * stride + a) for a in range(stride)):
                    continue
                logits = {}
                for m in range(math.ceil(sk / stride)):
                    if m * stride > n * stride + stride - 1 + off:  # no visible pair in the tile
                        continue
                    if not any(real_key(b, m * stride + c) for c in range(stride)):
                        continue
                    total = 0.0
                    for t in range(stride):  # the tile's antidiagonal: row index falls as key index rises
                        r, j = n * stride + stride - 1 - t, m * stride + t
                        if real_query(b, r) and real_key(b, j):
                            total += float(q[b, h, r] @ k[b, h // group, j])
                    logits[m] = total * scale / stride
                top = max(logits.values())
                z = sum(math.exp(v - top) for v in logits.values())
                for m, v in logits.items():
                    out[b, h, n * stride // block, m * stride // block] += math.exp(v - top) / z
    return out


@pytest.mark.parametrize(
    ("sq", "sk", "hq", "hkv", "block", "stride", "pads"),
    [
        (96, 96, 2, 2, 32, 4, None),  # aligned
        (90, 90, 2, 2, 32, 4, None),  # length not a multiple of the stride or block
        (40, 100, 2, 2, 16, 4, None),  # Sq < Sk, offset not block-aligned
        (64, 64, 6, 2, 32, 8, None),  # GQA 3
        (70, 70, 3, 1, 16, 4, [0, 23]),  # left padding (not stride-aligned), GQA 3
        (24, 70, 2, 2, 16, 2, [5, 41]),  # Sq < Sk with padding
    ],
)
def test_scores_match_brute_force(sq, sk, hq, hkv, block, stride, pads):
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    batch = 2
    q = torch.randn(batch, hq, sq, 8, generator=g) * 2
    k = torch.randn(batch, hkv, sk, 8, generator=g) * 2
    kpm = None
    if pads is not None:
        kpm = torch.ones(batch, sk, dtype=torch.bool)
        for b, p in enumerate(pads):
            kpm[b, :p] = False
    expected = brute_scores(q, k, block, stride, kpm=kpm)
    got = antidiagonal_block_scores(q, k, block, stride, key_padding_mask=kpm)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # chunking over query blocks changes nothing; an explicit scale is honoured
    tiny_chunks = antidiagonal_block_scores(q, k, block, stride, key_padding_mask=kpm, chunk_bytes=1)
    torch.testing.assert_close(tiny_chunks, got, atol=1e-6, rtol=0)
    scaled = antidiagonal_block_scores(q, k, block, stride, scale=0.1, key_padding_mask=kpm)
    torch.testing.assert_close(scaled.double(), brute_scores(q, k, block, stride, 0.1, kpm), atol=1e-5, rtol=1e-5)
    # nothing outside the causally visible blocks
    assert not got[..., ~causal_block_matrix(sq, sk, (block, block))].any()


# ---------------------------------------------------------------------------------------- brute-force selection
def brute_select(scores, threshold, visible, anchors):
    out = torch.zeros(scores.shape, dtype=torch.bool)
    batch, heads, qb, kb = scores.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(qb):
                vis = [j for j in range(kb) if visible[i, j]]
                row = {j: float(scores[b, h, i, j]) for j in vis}
                required = threshold * math.fsum(row.values())
                forced = [j for j in vis if anchors[i, j]]
                kept = sum(row[j] for j in forced)
                for j in forced:
                    out[b, h, i, j] = True
                rest = sorted((j for j in vis if j not in forced), key=lambda j: (-row[j], j))
                for j in rest:
                    if kept >= required:
                        break
                    out[b, h, i, j] = True
                    kept += row[j]
                if threshold >= 1:
                    for j in vis:
                        out[b, h, i, j] = True
    return out


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(128, 128, 16), (40, 100, 16), (50, 130, 32)])
@pytest.mark.parametrize("threshold", [0.2, 0.6, 0.9, 0.99, 1.0])
def test_selection_matches_brute_force(q_len, kv_len, block, threshold):
    visible = causal_block_matrix(q_len, kv_len, (block, block))
    anchors = anchor_blocks(q_len, kv_len, block)
    g = torch.Generator().manual_seed(7)
    scores = torch.rand((2, 3, *visible.shape), generator=g, dtype=torch.float64) ** 3  # skewed, no ties
    scores = scores.float()
    got = select_blocks_by_threshold(scores, threshold, visible, anchors)
    assert torch.equal(got, brute_select(scores.double(), threshold, visible, anchors))
    assert not (got & ~visible).any()
    assert (got | ~(anchors & visible)).all()


def test_default_anchors_are_first_and_diagonal_when_aligned():
    visible = causal_block_matrix(96, 160, (32, 32))
    scores = torch.rand(1, 2, *visible.shape, generator=torch.Generator().manual_seed(1))
    default = select_blocks_by_threshold(scores, 0.5, visible)
    assert torch.equal(default, select_blocks_by_threshold(scores, 0.5, visible, anchor_blocks(96, 160, 32)))


def test_anchor_blocks_geometry():
    # offset 60, blocks of 16: query block 0 holds positions 60..75 (key blocks 3, 4), block 2 holds 92..99
    anchors = anchor_blocks(40, 100, 16)
    assert [torch.nonzero(row).flatten().tolist() for row in anchors] == [[0, 3, 4], [0, 4, 5], [0, 5, 6]]
    assert torch.equal(anchor_blocks(64, 64, 16), torch.eye(4, dtype=torch.bool) | (torch.arange(4) == 0)[None])


def test_ties_break_by_block_order():
    visible = causal_block_matrix(128, 128, (16, 16))
    scores = visible.float()[None, None]  # every visible block scores 1
    got = select_blocks_by_threshold(scores, 0.5, visible, anchor_blocks(128, 128, 16))[0, 0]
    # row 7: 8 visible blocks, needs 4; blocks 0 and 7 forced, then the two lowest-index ones
    assert torch.nonzero(got[7]).flatten().tolist() == [0, 1, 2, 7]
    assert torch.equal(got, select_blocks_by_threshold(scores, 0.5, visible, anchor_blocks(128, 128, 16))[0, 0])


def test_real_scores_keep_first_and_diagonal_and_nothing_invisible():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 100, 16, generator=g) * 3, torch.randn(2, 2, 180, 16, generator=g) * 3
    kpm = torch.ones(2, 180, dtype=torch.bool)
    kpm[1, :50] = False
    scores = antidiagonal_block_scores(q, k, 16, 4, key_padding_mask=kpm)
    visible, anchors = causal_block_matrix(100, 180, (16, 16)), anchor_blocks(100, 180, 16)
    for threshold in (0.01, 0.5, 0.95):
        got = select_blocks_by_threshold(scores, threshold, visible, anchors)
        assert (got[..., anchors]).all()
        assert not (got & ~visible).any()
    assert torch.equal(select_blocks_by_threshold(scores, 1.0, visible, anchors), visible.expand_as(scores))
    sparse = select_blocks_by_threshold(scores, 0.5, visible, anchors)
    assert sparse.sum() < visible.sum() * 8


# ------------------------------------------------------------------------------------------------- on models
def recipe(params: dict) -> dict:
    return {"attnkit": 1, "name": "test-xattention", "steps": [{"method": "xattention", "block_size": 16, **params}]}


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_threshold_one_reproduces_dense(tiny):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 3, 150, pad_lengths=[0, 7, 40])
    dense = logits(model, ids, mask)
    attnkit.apply(model, recipe({"stride": 4, "threshold": 1.0}))
    patched = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], dense[real], atol=LOGIT_ATOL, rtol=0)
    assert model.attnkit_stats.mean_density() == pytest.approx(1.0)


def test_low_threshold_is_sparse(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 300)
    dense = logits(model, ids)
    attnkit.apply(model, recipe({"stride": 4, "threshold": 0.5}))
    patched = logits(model, ids)
    density = model.attnkit_stats.mean_density()
    assert 0 < density < 1, density
    # the first query block sees only block 0, which is always kept
    torch.testing.assert_close(patched[:, :16], dense[:, :16], atol=LOGIT_ATOL, rtol=0)


def test_save_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 200)
    attnkit.apply(model, recipe({"stride": 8, "threshold": 0.7}))
    patched = logits(model, ids)
    assert model.attnkit_stats.mean_density() < 1
    out = attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded, _ = attnkit.load(out, dtype="float32", device="cpu")
    assert torch.equal(logits(reloaded, ids), patched)
    assert reloaded.attnkit_stats.mean_density() == pytest.approx(model.attnkit_stats.mean_density())


# ---------------------------------------------------------------------------------------------------- config
def test_defaults_and_bad_settings():
    cls = get_method("xattention")
    m = cls()
    assert (m.block_size, m.stride, m.threshold, m.min_seq_len) == (64, 8, 0.9, 0)
    assert cls(block_size=128, stride=16).to_step()["stride"] == 16
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValidationError, match=r"threshold must be in \(0, 1\]"):
            cls(threshold=bad)
    with pytest.raises(ValidationError, match=r"stride \(6\) must divide block_size \(64\)"):
        cls(stride=6)
    with pytest.raises(ValueError, match="must divide block_size"):
        m.block_size = 60
    with pytest.raises(ValueError, match="must be a positive divisor"):
        antidiagonal_block_scores(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), 16, 5)


# ------------------------------------------------------------------------------------------------ calibration
def test_uncalibrated_heads_share_the_recipe_threshold(tiny):
    model, _ = tiny
    attnkit.apply(model, recipe({"stride": 4, "threshold": 0.7}))
    layer = model.model.layers[0].self_attn.attnkit.prefill
    assert torch.equal(layer.thresholds, torch.full((model.config.num_attention_heads,), 0.7))


def test_calibrated_thresholds_reach_the_target_recall(tiny, tmp_path):
    from attnkit.eval.fidelity import attention_recall
    from attnkit.sparsify.xattention import CALIBRATION_GRID

    model, tokenizer = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 320, seed=3)
    attnkit.apply(model, recipe({"stride": 4, "calibrate_recall": 0.9}), data=ids)
    thresholds = model.model.layers[0].self_attn.attnkit.prefill.thresholds
    assert all(min(abs(t - g) for g in CALIBRATION_GRID) < 1e-6 for t in thresholds.tolist())
    # Layer 0 sees the same input as during calibration: every head reaches the target, so their mean does too.
    report = attention_recall(model, ids)
    layer0 = next(r for r in report.layers if r.layer == 0)
    assert layer0.recall >= 0.9 - 1e-6 and layer0.density < 1
    # The calibrated thresholds are checkpoint tensors: they come back exactly.
    patched = logits(model, ids)
    out = attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded, _ = attnkit.load(out, dtype="float32", device="cpu")
    assert torch.equal(reloaded.model.layers[0].self_attn.attnkit.prefill.thresholds, thresholds)
    assert torch.equal(logits(reloaded, ids), patched)


def test_calibrating_to_full_recall_is_dense_on_the_calibration_text(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 200, seed=5)
    dense = logits(model, ids)
    attnkit.apply(model, recipe({"stride": 4, "calibrate_recall": 1.0}), data=ids)
    torch.testing.assert_close(logits(model, ids), dense, atol=2e-5, rtol=0)


def test_calibration_settings_are_checked():
    cls = get_method("xattention")
    for bad in (0, 1.2):
        with pytest.raises(ValidationError, match=r"calibrate_recall must be in \(0, 1\]"):
            cls(calibrate_recall=bad)
