"""Fidelity tools: block attention mass (vs an fp64 brute force), NLL, dense-vs-patched logits, attention recall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.attention import attention_modules
from attnkit.eval.fidelity import attention_recall, compare_logits, nll
from attnkit.kernels.block_mass import block_attention_mass
from tests.conftest import random_batch


def recipe(window: int, **extra) -> dict:
    step = {"method": "sliding_window", "window": window, "block_size": 16, **extra}
    return {"attnkit": 1, "name": "t", "steps": [step]}


# ------------------------------------------------------------------------------------------ brute force
def brute_probs(q, k, scale=None, kpm=None, causal=True) -> torch.Tensor:
    """fp64 ``[B, Hq, Sq, Sk]`` softmax matrix (K repeated per GQA group; rows that see nothing are 0)."""
    batch, hq, sq, dim = q.shape
    sk = k.shape[2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(hq // k.shape[1], 1))
    scores = scores * (dim**-0.5 if scale is None else scale)
    allowed = torch.ones(batch, 1, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def brute_mass(probs, block_size, kpm=None) -> torch.Tensor:
    """Block sums of ``probs`` averaged over the real rows of each query block, by explicit loops."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    batch, heads, sq, sk = probs.shape
    real = torch.ones(batch, sq, dtype=torch.bool) if kpm is None else kpm[:, sk - sq :]
    qb, kb = -(-sq // bq), -(-sk // bk)
    out = torch.zeros(batch, heads, qb, kb, dtype=torch.float64)
    for i in range(qb):
        rows = real[:, i * bq : (i + 1) * bq].double()  # [B, rows]
        for j in range(kb):
            per_row = probs[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].sum(-1)  # [B, H, rows]
            out[:, :, i, j] = (per_row * rows[:, None]).sum(-1) / rows.sum(-1).clamp_min(1)[:, None]
    return out


def left_padding(batch: int, sk: int, pads: list[int]) -> torch.Tensor:
    kpm = torch.ones(batch, sk, dtype=torch.bool)
    for b, pad in enumerate(pads):
        kpm[b, :pad] = False
    return kpm


# ------------------------------------------------------------------------------------ block_attention_mass
MASS_CASES = [
    # (hq, hkv, sq, sk, block_size, pads, causal)
    (4, 4, 97, 130, 16, None, True),
    (6, 2, 97, 130, (16, 32), [0, 40], True),
    (7, 1, 97, 130, 16, [3, 60], True),
    (7, 1, 130, 130, (16, 32), [0, 20], True),
    (3, 1, 97, 97, (32, 16), [50, 0], True),
    (6, 2, 97, 130, 16, [0, 40], False),
]


@pytest.mark.parametrize("hq, hkv, sq, sk, block_size, pads, causal", MASS_CASES)
def test_block_mass_matches_fp64_brute_force(hq, hkv, sq, sk, block_size, pads, causal):
    g = torch.Generator().manual_seed(hq * 1000 + sq)
    q = torch.randn(2, hq, sq, 16, generator=g) * 2
    k = torch.randn(2, hkv, sk, 16, generator=g) * 2
    kpm = None if pads is None else left_padding(2, sk, pads)
    mass = block_attention_mass(q, k, block_size, scale=0.3, key_padding_mask=kpm, causal=causal)
    expected = brute_mass(brute_probs(q, k, 0.3, kpm, causal), block_size, kpm)
    assert mass.dtype == torch.float32 and mass.shape == expected.shape
    torch.testing.assert_close(mass.double(), expected, atol=2e-6, rtol=0)
    # Rows sum to 1, except query blocks without a real row, which are all 0.
    bq = block_size if isinstance(block_size, int) else block_size[0]
    real = torch.ones(2, sq, dtype=torch.bool) if kpm is None else kpm[:, sk - sq :]
    has_real = torch.stack([real[:, i : i + bq].any(-1) for i in range(0, sq, bq)], -1)  # [B, QB]
    torch.testing.assert_close(mass.sum(-1), has_real[:, None].float().expand_as(mass.sum(-1)), atol=1e-5, rtol=0)
    if causal:  # blocks without a causally visible pair hold exactly nothing
        from attnkit.kernels.block_mask import causal_block_matrix

        bs = (block_size, block_size) if isinstance(block_size, int) else block_size
        assert not mass[..., ~causal_block_matrix(sq, sk, bs)].any()


def test_block_mass_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 97, 16, generator=g)
    k = torch.randn(2, 2, 130, 16, generator=g)
    kpm = left_padding(2, 130, [0, 45])
    one_chunk = block_attention_mass(q, k, (16, 32), key_padding_mask=kpm, chunk_bytes=2**40)
    row_bytes = 4 * 2 * 6 * 130
    for rows in (1, 7, 16, 50):  # one row per chunk; chunks that straddle query blocks; block-aligned; uneven
        chunked = block_attention_mass(q, k, (16, 32), key_padding_mask=kpm, chunk_bytes=rows * row_bytes)
        torch.testing.assert_close(chunked, one_chunk, atol=1e-6, rtol=0)


def test_block_mass_half_precision_inputs():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 70, 16, generator=g).bfloat16()
    k = torch.randn(1, 2, 70, 16, generator=g).bfloat16()
    mass = block_attention_mass(q, k, 16)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), brute_mass(brute_probs(q, k), 16), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ nll
def test_nll_matches_cross_entropy(tiny):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 60, pad_lengths=[0, 9])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(2, -1)
    # Loss index i = target position i + 1; a target counts if it and its predecessor are real.
    valid = (mask[:, 1:] & mask[:, :-1]).bool()
    for offset in (0, 1, 25):
        keep = valid.clone()
        keep[:, : max(offset, 1) - 1] = False
        expected = float(losses[keep].mean())
        assert nll(model, ids, offset, mask) == pytest.approx(expected, abs=1e-5)
    assert nll(model, ids[0]) == pytest.approx(float(losses[0].mean()), abs=1e-5)  # 1D input, no padding


def test_dense_vs_dense_is_identical(tiny):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 80, pad_lengths=[0, 13])
    out = compare_logits(model, ids, 10, mask)  # unpatched: both runs dense
    assert out["kl"] <= 1e-6 and out["top1_agreement"] == 1.0
    assert out["nll_dense"] == out["nll_patched"] == pytest.approx(nll(model, ids, 10, mask), abs=1e-6)
    assert out["positions"] == 2 * 70 - (13 - 10)


# ------------------------------------------------------------------------------------------------ recall
def test_keep_everything_has_full_recall(tiny):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 150, pad_lengths=[0, 37])
    attnkit.apply(model, recipe(10_000))
    report = attention_recall(model, ids, mask)
    assert [r.layer for r in report.layers] == list(range(model.config.num_hidden_layers))
    assert not report.skipped
    for row in report.layers:
        assert row.recall == pytest.approx(1.0, abs=1e-5)
        assert row.oracle_recall == pytest.approx(1.0, abs=1e-5)
        assert row.density == 1.0
    out = compare_logits(model, ids, 0, mask)
    assert out["kl"] < 1e-6 and out["top1_agreement"] == 1.0


def test_sparse_recall_is_below_the_oracle(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 1, 300)
    attnkit.apply(model, recipe(32))
    report = attention_recall(model, ids)
    assert len(report.layers) == model.config.num_hidden_layers
    for row in report.layers:
        assert 0 < row.recall <= row.oracle_recall + 1e-6 and row.oracle_recall <= 1 + 1e-6
        assert row.density < 1
    assert report.density == pytest.approx(model.attnkit_stats.mean_density())
    out = compare_logits(model, ids, 100)
    assert out["kl"] > 0 and out["positions"] == 200


def test_recall_matches_brute_force(tiny):
    """Layer 0 of a sparse recipe on a left-padded batch, recomputed in fp64 from the captured q/k."""
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 2, 200, pad_lengths=[0, 45])
    attnkit.apply(model, recipe(40))
    layer = attention_modules(model)[0].attnkit
    captured = {}

    def capture(module, args, output):
        captured["q"], captured["k"], captured["kpm"], captured["scale"] = args[0], args[1], args[3], args[4]
        captured["blocks"] = module.stats["block_mask"].to_dense()

    handle = layer.register_forward_hook(capture)
    try:
        report = attention_recall(model, ids, mask)
    finally:
        handle.remove()
    q, k, kpm, blocks = captured["q"], captured["k"], captured["kpm"], captured["blocks"]
    batch, heads, sq, _ = q.shape
    sk, bs = k.shape[2], 16
    assert kpm is not None and heads % k.shape[1] == 0
    probs = brute_probs(q, k, captured["scale"], kpm)  # [B, H, Sq, Sk]
    blocks = blocks.expand(batch, heads, -1, -1)
    tokens = blocks[:, :, torch.arange(sq) // bs][..., torch.arange(sk) // bs]  # [B, H, Sq, Sk]
    real = kpm[:, sk - sq :]
    per_row = (probs * tokens).sum(-1)  # [B, H, Sq]
    recall = float(per_row.permute(0, 2, 1)[real].mean())
    # Oracle: per (b, h, query block), the same number of visible blocks with the largest mean row mass.
    mass = brute_mass(probs, bs, kpm)
    from attnkit.kernels.block_mask import causal_block_matrix

    visible = causal_block_matrix(sq, sk, (bs, bs))
    oracle_num, weight = 0.0, 0.0
    for b in range(batch):
        for h in range(heads):
            for i in range(mass.shape[2]):
                n_rows = int(real[b, i * bs : (i + 1) * bs].sum())
                count = int((blocks[b, h, i] & visible[i]).sum())
                top = mass[b, h, i][visible[i]].sort(descending=True).values[:count].sum()
                oracle_num += n_rows * float(top)
                weight += n_rows
    row = report.layers[0]
    assert row.layer == 0
    assert row.recall == pytest.approx(recall, abs=1e-5)
    assert row.oracle_recall == pytest.approx(oracle_num / weight, abs=1e-5)
    assert 0 < row.recall < row.oracle_recall < 1


def test_recall_skips_dense_layers():
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    ids, _ = random_batch(model.config.vocab_size, 1, 64)
    attnkit.apply(model, recipe(16, layers=[-1]))
    report = attention_recall(model, ids)
    assert [r.layer for r in report.layers] == [1] and "not patched" in report.skipped[0]
    attnkit.unpatch(model)
    attnkit.apply(model, recipe(16, min_seq_len=100))
    report = attention_recall(model, ids)
    assert report.layers == [] and report.recall is None
    assert all("dense fallback" in why for why in report.skipped.values()) and len(report.skipped) == 2
    attnkit.unpatch(model)
    with pytest.raises(ValueError, match="patched"):
        attention_recall(model, ids)
