"""SeerAttention: gate maths against brute force, pre-RoPE capture, selection, distillation, checkpoints, settings.

Tiny random models (2 layers, hidden 64, head_dim 16) on CPU. Where training must learn something, the models' q/k
projections are scaled up so that their attention is peaked (a random-init model attends almost uniformly, which
a fresh gate already predicts).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig
from typer.testing import CliRunner

import attnkit
from attnkit.cli import app
from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.kernels.pooled_attention import pooled_attention
from attnkit.recipe import Recipe, RecipeError
from attnkit.registry import get_method
from attnkit.sparsify.seer import (
    CALIBRATION_GRID,
    AttnGate,
    SeerSparsity,
    gate_block_logits,
    select_gate_blocks,
)
from attnkit.sparsify.xattention import anchor_blocks
from attnkit.train import distill as distill_module
from attnkit.train.data import token_sequences
from attnkit.train.distill import distill, distill_gates, layer_losses, seer_gates, teacher_mode
from tests.conftest import random_batch

LOGIT_ATOL = 2e-5
BS = 16


def recipe(**params) -> dict:
    step = {"method": "seer_attention", "block_size": BS, "gate_hidden": 16, "train": {"steps": 0, "seq_len": 128}}
    for key, value in params.items():
        step[key] = {**step[key], **value} if isinstance(step.get(key), dict) else value
    return {"attnkit": 1, "name": "test-seer", "steps": [step]}


def tiny_gqa(hq: int, hkv: int, seed: int = 0, rope: dict | None = None):
    """A 2-layer Llama with ``hq`` query and ``hkv`` KV heads of 16 (hidden ``16 · hq``: Llama checks divisibility)."""
    config = LlamaConfig(
        vocab_size=260, hidden_size=16 * hq, intermediate_size=128, num_hidden_layers=2, num_attention_heads=hq,
        num_key_value_heads=hkv, head_dim=16, max_position_embeddings=4096,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def sharpen(model, factor: float = 8.0):
    """Scale the q/k projections so the attention maps are peaked (something to learn)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def gate(model, layer=0) -> AttnGate:
    return model.model.layers[layer].self_attn.attnkit.prefill


# ------------------------------------------------------------------------------------------- gate vs brute force
def brute_gate_probs(q_pre, k_pre, qw, kw, bs, theta, kpm=None):
    """fp64 loops over heads and blocks: pools, per-head (Q) / per-KV-head (K) projections, block RoPE, softmax."""
    q_pre, k_pre, qw, kw = q_pre.double(), k_pre.double(), qw.double(), kw.double()
    batch, hq, sq, _ = q_pre.shape
    hkv, sk = k_pre.shape[1], k_pre.shape[2]
    off, feat = sk - sq, qw.shape[-1]
    qb, kb = math.ceil(sq / bs), math.ceil(sk / bs)
    inv = theta ** -(torch.arange(0, feat, 2, dtype=torch.float64) / feat)

    def rope(x, pos):  # pairs (d, d + F/2) rotated by pos · inv[d]
        half = feat // 2
        c, s = torch.cos(pos * inv), torch.sin(pos * inv)
        return torch.cat([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])

    out = torch.zeros(batch, hq, qb, kb, dtype=torch.float64)
    for b in range(batch):
        real = torch.ones(sk, dtype=torch.bool) if kpm is None else kpm[b]
        for h in range(hq):
            g = h // (hq // hkv)
            qs, ks, visible = [], [], []
            for i in range(qb):
                rows = [r for r in range(i * bs, min(sq, (i + 1) * bs)) if real[r + off]]
                pooled = q_pre[b, h, rows].mean(0) if rows else torch.zeros(q_pre.shape[-1], dtype=torch.float64)
                qs.append(rope(pooled @ qw[h], off + i * bs))
            for j in range(kb):
                keys = [t for t in range(j * bs, min(sk, (j + 1) * bs)) if real[t]]
                if keys:
                    x = k_pre[b, g, keys]
                    pooled = torch.cat([x.amax(0), x.amin(0), x.mean(0)])
                else:
                    pooled = torch.zeros(3 * k_pre.shape[-1], dtype=torch.float64)
                ks.append(rope(pooled @ kw[g], j * bs))
                visible.append(bool(keys))
            for i in range(qb):
                last_pos = min(sq - 1, (i + 1) * bs - 1) + off
                cols = [j for j in range(kb) if j * bs <= last_pos and visible[j]]
                scores = torch.stack([qs[i] @ ks[j] for j in cols]) / math.sqrt(feat)
                out[b, h, i, cols] = torch.softmax(scores, 0)
    return out


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2), (7, 1)], ids=["gqa1", "gqa3", "gqa7"])
def test_gate_shapes_masks_and_maths(hq, hkv):
    model = tiny_gqa(hq, hkv)
    attnkit.apply(model, recipe(sparsity={"mode": "threshold", "threshold": 0.2}))
    g = gate(model)
    assert tuple(g.q_weight.shape) == (hq, 16, 16) and tuple(g.k_weight.shape) == (hkv, 3 * 16, 16)
    # the gate's probabilities = the per-head / per-group brute force (left padding in row 1, Sq < Sk)
    gen = torch.Generator().manual_seed(hq)
    q, k = torch.randn(2, hq, 70, 16, generator=gen), torch.randn(2, hkv, 100, 16, generator=gen)
    kpm = torch.ones(2, 100, dtype=torch.bool)
    kpm[1, :37] = False
    logits_, visible = gate_block_logits(q, k, g.q_weight, g.k_weight, BS, ["avg"], ["max", "min", "avg"], g.block_inv_freq, kpm)
    probs = torch.softmax(logits_, -1) * visible
    expected = brute_gate_probs(q, k, g.q_weight.detach(), g.k_weight.detach(), BS, 10000.0, kpm)
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=1e-4)
    # on the model: one mask per (batch row, query head), causal, first and diagonal blocks kept
    ids, mask = random_batch(260, 2, 100, pad_lengths=[0, 21])
    logits(model, ids, mask)
    masks = model.attnkit_stats.block_masks()
    assert set(masks) == {0, 1}
    blocks = masks[0].to_dense()
    assert tuple(blocks.shape) == (2, hq, 7, 7)
    assert not (blocks & ~causal_block_matrix(100, 100, (BS, BS))).any()
    assert blocks[..., anchor_blocks(100, 100, BS)].all()
    assert 0 < model.attnkit_stats.mean_density() < 1


# --------------------------------------------------------------------------------------------- pre-RoPE q/k
def test_pre_rope_capture_is_the_projection_output(tiny):
    model, _ = tiny  # tiny-qwen2 has q/k bias: it is part of the projections
    attnkit.apply(model, recipe())
    attention = model.model.layers[1].self_attn
    g = attention.attnkit.prefill
    seen = {}

    def projection(name):
        def hook(module, args, output):
            seen[name] = output.detach().clone()

        return hook

    def at_attention(module, args, kwargs, output):
        query, key = args[0], args[1]
        seen["pre"] = g.pre_rope(query, key)
        seen["captured"] = (g._q is not None, len(g._handles))
        seen["unrotated"] = (g._unrotate(query, torch.arange(query.shape[-2])[None]), g._unrotate(key, torch.arange(key.shape[-2])[None]))

    handles = [
        attention.q_proj.register_forward_hook(projection("q")),
        attention.k_proj.register_forward_hook(projection("k")),
        attention.attnkit.register_forward_hook(at_attention, with_kwargs=True),
    ]
    ids, _ = random_batch(model.config.vocab_size, 2, 70)
    logits(model, ids)
    q_pre, k_pre = seen["pre"]
    heads, kv_heads, dim = g.num_heads, g.num_kv_heads, g.head_dim
    assert torch.equal(q_pre, seen["q"].view(2, 70, heads, dim).transpose(1, 2))
    assert torch.equal(k_pre, seen["k"].view(2, 70, kv_heads, dim).transpose(1, 2))
    assert seen["captured"] == (True, 2)
    # undoing RoPE from the post-RoPE tensors gives the same (the fallback when nothing was captured)
    torch.testing.assert_close(seen["unrotated"][0], q_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["unrotated"][1], k_pre, atol=1e-5, rtol=1e-5)
    # after the forward nothing is held and no capture hook is left on the projections
    assert g._q is None and g._k is None and not g._handles
    assert not attention.q_proj._forward_hooks.keys() - {h.id for h in handles}
    # decode steps (one query) capture nothing
    seen.clear()
    out = model(input_ids=ids[:, :40], use_cache=True)
    with torch.no_grad():
        model(input_ids=ids[:, 40:41], past_key_values=out.past_key_values, use_cache=True)
    assert seen["captured"] == (False, 0)
    for handle in handles:
        handle.remove()
    # unpatching leaves the (stateless) hooks as no-ops: the model runs as before
    dense_before = logits(model, ids)
    attnkit.unpatch(model)
    torch.testing.assert_close(logits(model, ids), dense_before, atol=LOGIT_ATOL, rtol=0)


LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope-default", "rope-llama3"])
def test_chunked_prefill_scores_match_full_prefill(rope):
    """The second chunk's earlier keys come from the cache, post-RoPE, and are rotated back with the model's RoPE."""
    model = sharpen(tiny_gqa(6, 2, rope=rope))
    attnkit.apply(model, recipe(sparsity={"mode": "threshold", "threshold": 0.05}))
    g = gate(model, 1)
    probs = []
    hook = model.model.layers[1].self_attn.attnkit.register_forward_hook(
        lambda m, args, kwargs, out: probs.append(g.block_probabilities(args[0], args[1], args[3])[0]), with_kwargs=True
    )
    ids, _ = random_batch(260, 1, 160, seed=4)
    logits(model, ids)
    full = probs.pop()
    full_blocks = model.attnkit_stats.block_masks()[1].to_dense()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :96], past_key_values=cache, use_cache=True)
        probs.clear()
        model(input_ids=ids[:, 96:], past_key_values=cache, use_cache=True)
    chunk = probs.pop()  # query blocks 6..9 of the full run
    torch.testing.assert_close(chunk, full[:, :, 6:], atol=1e-5, rtol=1e-4)
    assert torch.equal(model.attnkit_stats.block_masks()[1].to_dense(), full_blocks[:, :, 6:])
    hook.remove()


# ----------------------------------------------------------------------------------------------------- target
def brute_pool(attn, bs):
    """Pool an attention-probability map ``[B, H, S, S]`` by the definition (block max, rows normalised)."""
    s = attn.shape[-1]
    n = math.ceil(s / bs)
    out = torch.zeros(*attn.shape[:2], n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[..., i, j] = attn[..., i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].double().amax((-1, -2))
    return out / out.sum(-1, keepdim=True)


def test_distillation_target_is_the_models_pooled_attention():
    model = sharpen(tiny_gqa(6, 2))
    ids, _ = random_batch(260, 1, 90, seed=2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions  # [B, Hq, S, S] per layer
    model.set_attn_implementation("sdpa")
    attnkit.apply(model, recipe())
    targets = {}
    gates = seer_gates(model)
    handles = [
        model.model.layers[i].self_attn.attnkit.register_forward_hook(
            lambda m, args, kwargs, out, i=i: targets.__setitem__(i, pooled_attention(args[0], args[1], BS, args[4], args[3])),
            with_kwargs=True,
        )
        for i in gates
    ]
    with teacher_mode(model, gates), torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for i in gates:
        torch.testing.assert_close(targets[i].double(), brute_pool(eager[i], BS), atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- selection
def test_selection_rules():
    q_len = kv_len = 8 * BS
    visible = causal_block_matrix(q_len, kv_len, (BS, BS))[None, None]
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 8, 8, generator=g).masked_fill(~visible, -1e30) * 3, -1) * visible
    anchors = anchor_blocks(q_len, kv_len, BS)

    keep = select_gate_blocks(probs, visible, q_len, kv_len, BS, SeerSparsity(threshold=0.2))
    assert torch.equal(keep, ((probs >= 0.2) & visible) | anchors)
    for density in (0.3, 0.5, 1.0):
        keep = select_gate_blocks(probs, visible, q_len, kv_len, BS, SeerSparsity(mode="density", density=density))
        count = visible.sum(-1)
        wanted = torch.maximum(torch.ceil(count * density - 1e-9), (anchors & visible[0, 0]).sum(-1))
        assert torch.equal(keep.sum(-1), wanted.long().expand(2, 3, 8))
        assert keep[..., anchors].all() and not (keep & ~visible).any()
        # the non-forced blocks kept are the most probable ones
        rest = torch.where(anchors | ~visible, -1.0, probs)
        kept_min = torch.where(keep & ~anchors, rest, 2.0).amin(-1)
        dropped_max = torch.where(~keep & visible & ~anchors, rest, -1.0).amax(-1)
        assert (kept_min >= dropped_max).all()
    keep = select_gate_blocks(probs, visible, q_len, kv_len, BS, SeerSparsity(mode="density", density=1.0))
    assert torch.equal(keep, visible.expand_as(keep))
    keep = select_gate_blocks(probs, visible, q_len, kv_len, BS, SeerSparsity(threshold=0.999), dense_last_blocks=2)
    assert torch.equal(keep[:, :, -2:], visible[:, :, -2:].expand(2, 3, 2, 8))
    assert torch.equal(keep[:, :, :-2], (((probs >= 0.999) & visible) | anchors)[:, :, :-2])


@pytest.mark.parametrize("sparsity", [{"mode": "density", "density": 1.0}, {"mode": "threshold", "threshold": 1e-12}])
def test_keep_everything_reproduces_dense(tiny, sparsity):
    model, _ = tiny
    ids, mask = random_batch(model.config.vocab_size, 3, 150, pad_lengths=[0, 7, 40])
    dense = logits(model, ids, mask)
    attnkit.apply(model, recipe(sparsity=sparsity))
    patched = logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], dense[real], atol=LOGIT_ATOL, rtol=0)
    assert model.attnkit_stats.block_masks()  # the gate really ran
    # greedy generation with the gate at full density = without it
    prompt = ids[:1, :80]
    with_gate = model.generate(prompt, max_new_tokens=6, do_sample=False)
    attnkit.unpatch(model)
    assert torch.equal(with_gate, model.generate(prompt, max_new_tokens=6, do_sample=False))


# ------------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_resumes(tmp_path, monkeypatch):
    model = sharpen(tiny_gqa(6, 2))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    attnkit.apply(model, recipe(train={"lr": 1e-2, "warmup_steps": 2, "batch_size": 2, "loss_skip_fraction": 0.0}))
    method = model.attnkit_state.recipe.steps[0]
    gates = seer_gates(model)
    ids, _ = random_batch(260, 2, 128, seed=9)

    def loss():
        with torch.no_grad():
            return float(sum(layer_losses(model, gates, ids, skip_fraction=0.0).values()))

    before = loss()
    method.train = method.train.model_copy(update={"steps": 8, "checkpoint_every": 4})
    result = distill_gates(model, method, data=ids, out_dir=tmp_path / "run", show_progress=False)
    after = loss()
    assert after < 0.85 * before, (before, after)
    assert result.steps == 8 and len(result.history) == 8 and result.tokens == 8 * 2 * 128
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and set(rows[0]["layers"]) == {"0", "1"}
    assert (tmp_path / "run" / "state.pt").is_file() and (tmp_path / "run" / "loss.png").is_file()
    # the base model is untouched and its parameters' flags are restored; only the gates learned
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(p.requires_grad for p in model.parameters())
    # resuming: a run stopped after 4 of 8 steps and started again ends where the uninterrupted run did
    straight = {i: {k: v.clone() for k, v in g.state_dict().items()} for i, g in gates.items()}
    for g in gates.values():
        g.reset_parameters()
    calls = {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return layer_losses(*args, **kwargs)

    monkeypatch.setattr(distill_module, "layer_losses", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        distill_gates(model, method, data=ids, out_dir=tmp_path / "split", show_progress=False)
    monkeypatch.setattr(distill_module, "layer_losses", layer_losses)
    resumed = distill_gates(model, method, data=ids, out_dir=tmp_path / "split", show_progress=False)
    assert resumed.resumed_from == 4 and [r["step"] for r in resumed.history] == list(range(1, 9))
    for i, g in gates.items():
        for name, value in g.state_dict().items():
            torch.testing.assert_close(value, straight[i][name], atol=1e-6, rtol=1e-5)
    # a state written with other training settings is refused; other selection settings are not training settings
    lr = method.train.lr
    method.train = method.train.model_copy(update={"lr": 5e-3})
    with pytest.raises(ValueError, match="other settings"):
        distill_gates(model, method, data=ids, out_dir=tmp_path / "split", show_progress=False)
    method.train = method.train.model_copy(update={"lr": lr, "steps": 9})
    method.sparsity, method.calibrate_recall = SeerSparsity(threshold=0.3), 0.9
    again = distill_gates(model, method, data=ids, out_dir=tmp_path / "split", show_progress=False)
    assert again.resumed_from == 8 and again.steps == 9


def test_apply_trains_and_save_load_round_trip(tmp_path):
    model = sharpen(tiny_gqa(6, 2))
    _, tokenizer = attnkit.load_model("tiny-llama")
    ids, _ = random_batch(260, 2, 128, seed=1)
    attnkit.apply(model, recipe(train={"steps": 3, "lr": 1e-2}, sparsity={"threshold": 0.2}), data=ids)
    trained = gate(model).q_weight.detach().clone()
    untrained = tiny_gqa(6, 2)  # the initial weights are seeded: an untrained application starts where training did
    attnkit.apply(untrained, recipe())
    assert not torch.equal(trained, gate(untrained).q_weight)
    patched = logits(model, ids)
    blocks = {i: m.to_dense() for i, m in model.attnkit_stats.block_masks().items()}
    assert 0 < model.attnkit_stats.mean_density() < 1
    out = attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded, _ = attnkit.load(out, dtype="float32", device="cpu")
    assert torch.equal(gate(reloaded).q_weight, trained)
    assert torch.equal(logits(reloaded, ids), patched)
    assert {i: m.to_dense() for i, m in reloaded.attnkit_stats.block_masks().items()}.keys() == blocks.keys()
    for i, m in reloaded.attnkit_stats.block_masks().items():
        assert torch.equal(m.to_dense(), blocks[i])
    # a plain from_pretrained of the checkpoint is the dense model
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("attnkit" in k for k in plain.state_dict())


def test_distill_pipeline_writes_checkpoint_and_training_files(tmp_path):
    spec = recipe(train={"steps": 2, "seq_len": 64, "data": "builtin:corpus"})
    report = distill(spec, model="tiny-llama", out=tmp_path / "seer", show_progress=False, steps=3)
    out = tmp_path / "seer"
    assert report.results[0].steps == 3 and report.results[0].out_dir == out / "train"
    assert (out / "attnkit.safetensors").is_file() and (out / "train" / "loss.jsonl").is_file()
    assert not (tmp_path / "seer.train").exists()
    reloaded, _ = attnkit.load(out)
    assert reloaded.attnkit_state.recipe.steps[0].train.steps == 3
    with pytest.raises(attnkit.checkpoint.CheckpointError, match="already exists"):
        distill(spec, model="tiny-llama", out=out, show_progress=False)


def test_cli_distill_refuses_then_resumes_an_interrupted_run(tmp_path, monkeypatch):
    spec = tmp_path / "seer.yaml"
    spec.write_text(Recipe.load(recipe(train={"steps": 4, "seq_len": 64, "checkpoint_every": 2, "lr": 1e-2})).to_yaml())
    out, staging = tmp_path / "ckpt", tmp_path / "ckpt.train"
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["distill", "--recipe", str(spec), "--model", "tiny-llama", "--out", str(out), "--data", "builtin:corpus"]
    calls = {"n": 0}

    def counted(*a, **k):  # crashes in the first run's third step
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return layer_losses(*a, **k)

    monkeypatch.setattr(distill_module, "layer_losses", counted)
    crashed = runner.invoke(app, args)
    assert crashed.exit_code == 2 and "simulated crash" in crashed.output
    assert not out.exists() and torch.load(staging / "state.pt", weights_only=True)["step"] == 2
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "unfinished training run" in refused.output and "--resume" in refused.output
    resumed = runner.invoke(app, [*args, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "4 steps" in resumed.output and f"loss curve: {out / 'train' / 'loss.jsonl'}" in resumed.output
    rows = [json.loads(line) for line in (out / "train" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["tokens"] == 4 * 64
    assert calls["n"] == 3 + 2  # the resumed run did only steps 3 and 4
    assert not staging.exists() and torch.load(out / "train" / "state.pt", weights_only=True)["step"] == 4
    reloaded, _ = attnkit.load(out)
    assert reloaded.attnkit_state.recipe.steps[0].train.steps == 4
    # `python -m attnkit distill` (what `accelerate launch -m attnkit distill` runs) reaches the same command
    shown = subprocess.run([sys.executable, "-m", "attnkit", "distill", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--resume" in shown.stdout and "--seq-len" in shown.stdout


# ------------------------------------------------------------------------------------------------ calibration
def layer0_recall_density(eager_probs, blocks, bs):
    """Per-head recall (true mass inside ``blocks``) and density of layer 0's blocks, by brute force from the
    eager attention probabilities ``[1, H, S, S]`` (every row real, whole blocks)."""
    s = eager_probs.shape[-1]
    n = s // bs
    mass = eager_probs.double().view(1, -1, n, bs, n, bs).sum(-1).mean(3)  # [1, H, QB, KB], rows sum to 1
    visible = causal_block_matrix(s, s, (bs, bs))
    recall = (mass * blocks).sum((-1, -2)) / mass.sum((-1, -2))
    density = (blocks & visible).sum((-1, -2)).double() / visible.sum()
    return recall[0], density[0]


@pytest.mark.parametrize("target", [("recall", 0.9), ("density", 0.5)], ids=["recall0.9", "density0.5"])
def test_threshold_calibration_reaches_its_target_per_head(target, tmp_path):
    kind, value = target
    model = sharpen(tiny_gqa(6, 2))
    ids, _ = random_batch(260, 1, 160, seed=5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions[0]
    model.set_attn_implementation("sdpa")
    spec = recipe(train={"steps": 4, "lr": 1e-2, "warmup_steps": 0}, **{f"calibrate_{kind}": value})
    attnkit.apply(model, spec, data=ids)  # trains on ids, then calibrates on them
    thresholds = gate(model).thresholds.clone()
    assert set(model.attnkit_calibration["seer_attention"]) == {0, 1}
    grid = torch.tensor(CALIBRATION_GRID, dtype=thresholds.dtype)
    index = (thresholds[:, None] == grid).long().argmax(-1)
    assert torch.equal(grid[index], thresholds)  # every head got a grid value
    assert ((index > 0) & (index < len(CALIBRATION_GRID) - 1)).any(), thresholds  # not all at a grid end
    patched = logits(model, ids)
    recall, density = layer0_recall_density(eager, model.attnkit_stats.block_masks()[0].to_dense(), BS)
    # one grid step further (less mass for recall, more blocks for density) misses the target, per head
    step = 1 if kind == "recall" else -1
    movable = (index + step >= 0) & (index + step < len(CALIBRATION_GRID))
    gate(model).thresholds.copy_(grid[torch.where(movable, index + step, index)])
    logits(model, ids)
    recall_next, density_next = layer0_recall_density(eager, model.attnkit_stats.block_masks()[0].to_dense(), BS)
    if kind == "recall":
        assert (recall >= value - 1e-6).all(), recall
        assert (recall_next[movable] < value).all(), recall_next
    else:
        assert (density <= value + 1e-6).all(), density
        assert (density_next[movable] > value).all(), density_next
    # the calibrated thresholds travel with the checkpoint
    gate(model).thresholds.copy_(thresholds)
    _, tokenizer = attnkit.load_model("tiny-llama")
    reloaded, _ = attnkit.load(attnkit.save(model, tmp_path / "ckpt", tokenizer=tokenizer))
    assert torch.equal(gate(reloaded).thresholds, thresholds)
    assert torch.equal(logits(reloaded, ids), patched)


def test_calibration_settings():
    m = Recipe.load(recipe(sparsity={"mode": "density", "density": 0.4})).steps[0]
    calibrated = m.calibration_settings(length=512, target_density=0.3)
    assert (calibrated.sparsity.mode, calibrated.calibrate_density, calibrated.calibrate_recall) == ("threshold", 0.3, None)
    assert calibrated.calibration_length == 512 and m.sparsity.mode == "density"  # a copy
    assert m.calibration_settings().calibrate_recall == 0.95
    assert Recipe.load("seer_attention").steps[0].calibration_settings().calibrate_recall == 0.95
    with pytest.raises(RecipeError, match="exclusive"):
        Recipe.load(recipe(calibrate_recall=0.9, calibrate_density=0.3))
    with pytest.raises(RecipeError, match=r"need sparsity\.mode: threshold"):
        Recipe.load(recipe(calibrate_recall=0.9, sparsity={"mode": "density", "density": 0.5}))
    with pytest.raises(RecipeError, match=r"calibrate_recall must be in \(0, 1\]"):
        Recipe.load(recipe(calibrate_recall=1.5))


# ---------------------------------------------------------------------------------------------------- data
def test_token_sequences(tmp_path):
    _, tokenizer = attnkit.load_model("tiny-llama")
    first = token_sequences("builtin:corpus", tokenizer, 50, seed=3)
    again = token_sequences("builtin:corpus", tokenizer, 50, seed=3)
    a = [next(first) for _ in range(4)]
    assert all(torch.equal(x, next(again)) for x in a) and all(x.shape == (50,) for x in a)
    shards = [token_sequences("builtin:corpus", tokenizer, 50, seed=3, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(next(shards[0]), a[0]) and torch.equal(next(shards[1]), a[1])
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(f"line {i} of a small local text file" for i in range(40)))
    local = token_sequences(str(text), tokenizer, 64)
    assert next(local).shape == (64,)
    ids = torch.arange(12).view(3, 4)
    rows = token_sequences(ids, seq_len=99)
    assert [next(rows).tolist() for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="built-in"):
        next(token_sequences("builtin:nope", tokenizer, 8))


# -------------------------------------------------------------------------------------------------- settings
def test_defaults_and_bad_settings():
    cls = get_method("seer_attention")
    m = cls()
    assert (m.block_size, m.gate_hidden, m.q_pooling, m.k_pooling) == (64, 128, ["avg"], ["max", "min", "avg"])
    assert (m.sparsity.mode, m.sparsity.threshold, m.dense_last_blocks, m.min_seq_len) == ("threshold", 5e-4, 0, 0)
    assert m.to_step()["train"]["data"] == "builtin:corpus"
    bad = [
        ({"sparsity": {"threshold": 0}}, r"threshold must be in \(0, 1\)"),
        ({"sparsity": {"threshold": 1.0}}, r"threshold must be in \(0, 1\)"),
        ({"sparsity": {"mode": "density", "density": 0}}, r"density must be in \(0, 1\]"),
        ({"sparsity": {"mode": "density", "density": 1.5}}, r"density must be in \(0, 1\]"),
        ({"sparsity": {"mode": "density"}}, "sparsity.density is required"),
        ({"sparsity": {"mode": "topk"}}, "mode"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"gate_hidden": 15}, "gate_hidden must be even"),
        ({"q_pooling": []}, "at least one pooling"),
        ({"k_pooling": ["max", "max"]}, "must not repeat"),
        ({"k_pooling": ["median"]}, "k_pooling"),
        ({"train": {"seq_len": 100}}, r"must hold at least two blocks"),
        ({"train": {"lr": 0}}, "lr"),
        ({"train": {"step": 5}}, "step"),
        ({"dense_last_blocks": -1}, "dense_last_blocks"),
    ]
    for params, message in bad:
        with pytest.raises(ValidationError, match=message):
            cls.model_validate(params)
    with pytest.raises(RecipeError, match=r"steps\[0\] \(seer_attention\): sparsity.threshold: threshold must be in"):
        Recipe.load(recipe(sparsity={"threshold": 2.0}))
    with pytest.raises(ValueError, match="threshold must be in"):
        m.sparsity.threshold = 3.0
    builtin = Recipe.load("seer_attention")
    assert builtin.steps[0].method_name == "seer_attention" and builtin.eval.lengths == [2048]
    assert (builtin.steps[0].sparsity.mode, builtin.steps[0].calibrate_recall) == ("threshold", 0.95)


def test_convert_writes_the_loss_curve_to_the_run_folder(tmp_path):
    from attnkit.pipeline import convert

    steps = recipe(train={"steps": 2, "lr": 1e-2, "seq_len": 128, "checkpoint_every": 0})
    ids, _ = random_batch(260, 2, 128, seed=2)
    convert(steps, model="tiny-llama", out=tmp_path / "run", evaluate=False, data=ids, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
