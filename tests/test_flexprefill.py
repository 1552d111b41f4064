"""FlexPrefill: the selection against a per-head loop written from the paper's algorithm, dense at full coverage."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import attnkit
from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.registry import get_method
from attnkit.sparsify.flexprefill import cover_count, flexprefill_blocks, sqrt_js_divergence
from tests.conftest import random_batch

LOGIT_ATOL = 2e-5


def recipe(params: dict) -> dict:
    return {"attnkit": 1, "name": "test-flexprefill", "steps": [{"method": "flexprefill", "block_size": 16, **params}]}


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def loop_reference(q, k, bs, gamma, tau, min_budget, max_budget, scale):
    """One head at a time, batch 1, Sq == Sk a multiple of bs, no padding: FlexPrefill's steps as the paper states."""
    _, hq, n, dim = q.shape
    group = hq // k.shape[1]
    nb = n // bs
    min_b = math.ceil(min_budget / bs)
    max_b = nb if max_budget is None else min(nb, math.ceil(max_budget / bs))
    causal_blocks = torch.ones(nb, nb, dtype=torch.bool).tril()
    out = torch.zeros(1, hq, nb, nb, dtype=torch.bool)
    aware_heads = []
    for h in range(hq):
        qh, kh = q[0, h].double(), k[0, h // group].double()
        last = qh[-bs:]
        scores = last @ kh.T * scale
        pos = torch.arange(n - bs, n)
        scores[torch.arange(n)[None, :] > pos[:, None]] = -math.inf
        a = torch.softmax(scores, -1)
        vertical = a.mean(0)
        slash = torch.zeros(n, dtype=torch.float64)
        for i in range(bs):
            for o in range(pos[i] + 1):
                slash[o] += a[i, pos[i] - o] / bs

        def cover(x):
            total, count = 0.0, 0
            for value in sorted(x.tolist(), reverse=True):
                total += value
                if total <= gamma:
                    count += 1
            return count + 1

        nv = min(max(cover(vertical) // bs + 1, min_b), max_b)
        ns = min(max(cover(slash) // bs + 1, min_b), max_b)
        vb, sb = vertical.view(nb, bs).sum(-1), slash.view(nb, bs).sum(-1)
        avg_k = kh.view(nb, bs, dim).mean(1)
        estimate = torch.softmax(last.mean(0) @ avg_k.T * scale, -1)
        m = (estimate + vb) / 2
        js = math.sqrt(0.5 * float((estimate * (estimate / m).log()).sum()) + 0.5 * float((vb * (vb / m).log()).sum()))
        aware = js < tau
        aware_heads.append(aware)
        if aware:
            nv = ns = min_b
        vb[0] = sb[0] = math.inf
        vsel = set(vb.topk(nv).indices.tolist())
        ssel = set(sb.topk(ns).indices.tolist())
        for i in range(nb):
            for j in range(i + 1):
                out[0, h, i, j] = j in vsel or (i - j) in ssel
        if aware:
            avg_q = qh.view(nb, bs, dim).mean(1)
            pooled = (avg_q @ avg_k.T * scale).masked_fill(~causal_blocks, -math.inf)
            probs = torch.softmax(pooled, -1).flatten()
            total = 0.0
            for idx in probs.argsort(descending=True).tolist():
                total += float(probs[idx])
                if total > gamma * nb:
                    break
                out[0, h, idx // nb, idx % nb] = True
    return out & causal_blocks, torch.tensor(aware_heads)


@pytest.mark.parametrize(("tau", "gamma", "min_budget"), [(0.0, 0.9, 16), (1.0, 0.8, 16), (0.3, 0.95, 32)])
def test_selection_matches_the_loop_reference(tau, gamma, min_budget):
    g = torch.Generator().manual_seed(int(tau * 10 + gamma * 100))
    bs, n = 16, 192
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) * 1.5
    k[..., :3, :] *= 3  # a few strong sink-like keys
    method = get_method("flexprefill")(block_size=bs, gamma=gamma, tau=tau, min_budget=min_budget)
    blocks, aware = flexprefill_blocks(q, k, method, 0.4)
    expected, expected_aware = loop_reference(q, k, bs, gamma, tau, min_budget, None, 0.4)
    assert torch.equal(aware[0], expected_aware)
    assert torch.equal(blocks, expected)
    if tau == 0.0:
        assert not aware.any()
    if tau == 1.0:
        assert aware.all()


def test_divergence_and_cover_count():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.5, 0.5])
    assert float(sqrt_js_divergence(p, p)) == 0.0
    assert float(sqrt_js_divergence(p, q)) == pytest.approx(math.sqrt(0.5 * math.log(2)), rel=1e-6)
    assert cover_count(torch.tensor([0.1, 0.6, 0.3]), 0.85).item() == 2  # 0.6 ≤ .85, 0.9 > .85 → 1 + 1


def test_short_inputs_run_dense():
    method = get_method("flexprefill")(block_size=16, min_budget=64)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    blocks, _ = flexprefill_blocks(q, k, method)
    assert torch.equal(blocks[0, 0], causal_block_matrix(64, 64, (16, 16)))


@pytest.mark.parametrize("tau", [0.0, 1.0], ids=["vertical_slash", "query_aware"])
def test_full_coverage_reproduces_dense(tiny, tau):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 3, 150, pad_lengths=[0, 7, 40])
    dense = logits(model, ids, mask)
    attnkit.apply(model, recipe({"gamma": 1.0, "tau": tau, "min_budget": 4096}))
    # min_budget above the length would fall back to dense: set it to 0 so the selection itself runs
    for layer in model.model.layers:
        layer.self_attn.attnkit.prefill.method.min_budget = 0
    patched = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], dense[real], atol=LOGIT_ATOL, rtol=0)


def test_sparse_on_a_longer_input(tiny):
    model, _ = tiny
    ids, _ = random_batch(model.config.vocab_size, 2, 480)
    attnkit.apply(model, recipe({"gamma": 0.7, "tau": 0.1, "min_budget": 32}))
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert 0 < model.attnkit_stats.mean_density() < 1


def test_bad_settings():
    cls = get_method("flexprefill")
    for bad in (0, 1.5):
        with pytest.raises(ValidationError, match=r"gamma must be in \(0, 1\]"):
            cls(gamma=bad)
    with pytest.raises(ValidationError):
        cls(tau=-0.1)
    with pytest.raises(ValidationError, match="max_budget"):
        cls(min_budget=2048, max_budget=1024)
    with pytest.raises(ValidationError, match="power of two"):
        cls(block_size=100)
