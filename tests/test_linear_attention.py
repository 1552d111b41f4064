"""Causal linear attention kernels: quadratic (the spec) == chunked == recurrent, the LoLCATs window hybrid's two
forms against a per-query brute force, state folding, and fla on the GPU.

Tolerances: every reference computes in float32; the forms differ only in summation order, so fp32 inputs agree to
~1e-5 relative. bf16/fp16 inputs are upcast first, so they match the fp32 computation on the upcast inputs exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.kernels.linear_attention import (
    causal_linear_attention,
    empty_state,
    fold_state,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    window_linear_attention,
    window_linear_attention_chunked,
    window_linear_attention_quadratic,
)

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def inputs(batch, hq, hkv, seq, feat, dim, seed=0, device="cpu", keys=None):
    g = torch.Generator().manual_seed(seed)
    keys = seq if keys is None else keys
    q_feat = torch.rand(batch, hq, seq, feat, generator=g) + 1e-3
    k_feat = torch.rand(batch, hkv, keys, feat, generator=g) + 1e-3
    v = torch.randn(batch, hkv, keys, dim, generator=g)
    state = (torch.rand(batch, hkv, feat, dim, generator=g), torch.rand(batch, hkv, feat, generator=g) + 1)
    return [t.to(device) for t in (q_feat, k_feat, v)], tuple(t.to(device) for t in state)


def brute_linear(q_feat, k_feat, v, state=None):
    """out_t = (Σ_{s≤t} (φq_t·φk_s) v_s + φq_t S0) / (Σ_{s≤t} φq_t·φk_s + φq_t·z0), one query at a time, float64."""
    batch, hq, seq, _ = q_feat.shape
    groups = hq // k_feat.shape[1]
    out = torch.zeros(batch, hq, seq, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kh = h // groups
            for t in range(seq):
                w = k_feat[b, kh, : t + 1].double() @ q_feat[b, h, t].double()
                num = w @ v[b, kh, : t + 1].double()
                den = w.sum()
                if state is not None:
                    num = num + q_feat[b, h, t].double() @ state[0][b, kh].double()
                    den = den + q_feat[b, h, t].double() @ state[1][b, kh].double()
                out[b, h, t] = num / den
    return out


CASES = [  # (B, Hq, Hkv, S, F, D, chunk)
    (1, 2, 2, 1, 4, 8, 4),
    (2, 3, 1, 7, 8, 8, 4),
    (1, 6, 2, 63, 16, 8, 16),
    (2, 7, 1, 97, 8, 16, 32),
    (1, 4, 4, 64, 8, 8, 64),
]
IDS = [f"B{b}-Hq{hq}-Hkv{hkv}-S{s}-F{f}-D{d}-C{c}" for b, hq, hkv, s, f, d, c in CASES]


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_quadratic_chunked_recurrent_agree(case, with_state, nan_empty):
    batch, hq, hkv, seq, feat, dim, chunk = case
    (q_feat, k_feat, v), state = inputs(batch, hq, hkv, seq, feat, dim)
    state = state if with_state else None
    spec = linear_attention_quadratic(q_feat, k_feat, v, state)
    if seq <= 16:
        torch.testing.assert_close(spec.double(), brute_linear(q_feat, k_feat, v, state), rtol=1e-5, atol=1e-6)
    chunked, chunked_state = linear_attention_chunked(q_feat, k_feat, v, state, chunk_size=chunk, output_state=True)
    recurrent, recurrent_state = linear_attention_recurrent(q_feat, k_feat, v, state)
    torch.testing.assert_close(chunked, spec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recurrent, spec, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_state, recurrent_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    folded = fold_state(k_feat, v, state)
    for a, b in zip(folded, recurrent_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_two_calls_with_a_state_equal_one_call():
    (q_feat, k_feat, v), _ = inputs(2, 6, 2, 50, 8, 8, seed=3)
    whole, whole_state = linear_attention_chunked(q_feat, k_feat, v, chunk_size=16, output_state=True)
    first, state = linear_attention_chunked(q_feat[:, :, :21], k_feat[:, :, :21], v[:, :, :21], chunk_size=8, output_state=True)
    outs = [first]
    for t in range(21, 50):  # then decode steps, one token at a time
        out, state = causal_linear_attention(q_feat[:, :, t : t + 1], k_feat[:, :, t : t + 1], v[:, :, t : t + 1], state, True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, whole_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(dtype):
    (q_feat, k_feat, v), state = inputs(1, 4, 2, 33, 8, 8)
    low = [t.to(dtype) for t in (q_feat, k_feat, v)]
    out, _ = linear_attention_chunked(*low, state, chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, linear_attention_quadratic(*[t.float() for t in low], state), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    (q_feat, k_feat, v), _ = inputs(1, 4, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        linear_attention_chunked(q_feat[:, :3], k_feat, v)
    with pytest.raises(ValueError, match="as many keys as queries"):
        linear_attention_chunked(q_feat[:, :, :4], k_feat, v)
    with pytest.raises(ValueError, match="window must be at least 1"):
        window_linear_attention_quadratic(q_feat, k_feat, v, q_feat, k_feat, 0, 0.5)


# -------------------------------------------------------------------------------------- sliding-window hybrid
def brute_window(q, k, v, q_feat, k_feat, window, w, lin, scale, state=None, real=None):
    """LoLCATs' hybrid, one query at a time in float64: w·exp(s − max over the window) on the last ``window`` keys,
    lin·φq·φk on the older ones and on the state, one normalizer."""
    batch, hq, sq, _ = q.shape
    length = k.shape[2]
    groups = hq // k.shape[1]
    out = torch.zeros(batch, hq, sq, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kh = h // groups
            wh = float(w[h]) if torch.is_tensor(w) else w
            lh = float(lin[h]) if torch.is_tensor(lin) else lin
            for i in range(sq):
                t = length - sq + i
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = 0.0
                win = [s for s in range(max(0, t - window + 1), t + 1) if real is None or real[b, s]]
                if win:
                    scores = torch.stack([q[b, h, i].double() @ k[b, kh, s].double() * scale for s in win])
                    e = wh * torch.exp(scores - scores.max())
                    num = num + e @ v[b, kh, win].double()
                    den = den + e.sum()
                for s in range(0, t - window + 1):
                    if real is not None and not real[b, s]:
                        continue
                    a = lh * (q_feat[b, h, i].double() @ k_feat[b, kh, s].double())
                    num, den = num + a * v[b, kh, s].double(), den + a
                if state is not None:
                    num = num + lh * (q_feat[b, h, i].double() @ state[0][b, kh].double())
                    den = den + lh * (q_feat[b, h, i].double() @ state[1][b, kh].double())
                out[b, h, i] = num / den
    return out


WINDOW_CASES = [  # (B, Hq, Hkv, Sq, L, D, F, window, chunk)
    (1, 2, 2, 9, 9, 8, 4, 1, 4),
    (2, 3, 1, 13, 20, 8, 4, 4, 4),
    (1, 4, 2, 37, 41, 8, 8, 8, 8),
    (2, 6, 2, 63, 63, 8, 8, 5, 16),
    (1, 7, 1, 97, 100, 16, 8, 16, 8),
]
WINDOW_IDS = [f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-L{c[4]}-W{c[7]}-C{c[8]}" for c in WINDOW_CASES]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=WINDOW_IDS)
def test_window_hybrid_forms_agree_with_brute_force(case):
    batch, hq, hkv, sq, length, dim, feat, window, chunk = case
    g = torch.Generator().manual_seed(7)
    q = torch.randn(batch, hq, sq, dim, generator=g)
    k = torch.randn(batch, hkv, length, dim, generator=g)
    v = torch.randn(batch, hkv, length, dim, generator=g)
    q_feat = torch.rand(batch, hq, sq, feat, generator=g) + 1e-3
    k_feat = torch.rand(batch, hkv, length, feat, generator=g) + 1e-3
    state = (torch.rand(batch, hkv, feat, dim, generator=g), torch.rand(batch, hkv, feat, generator=g) + 1)
    w = torch.rand(hq, generator=g)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[-1, : length // 5] = False  # left padding in the last row
    scale = dim**-0.5
    for lin in (1.0, 1 - w):
        spec = window_linear_attention_quadratic(q, k, v, q_feat, k_feat, window, w, lin, scale, state, real)
        chunked = window_linear_attention_chunked(q, k, v, q_feat, k_feat, window, w, lin, scale, state, real, chunk_size=chunk)
        torch.testing.assert_close(chunked, spec, rtol=1e-5, atol=1e-5)
        if sq <= 40:
            brute = brute_window(q, k, v, q_feat, k_feat, window, w, lin, scale, state, real)
            torch.testing.assert_close(spec.double(), brute, rtol=1e-5, atol=1e-6)
        dispatched = window_linear_attention(q, k, v, q_feat, k_feat, window, w, lin, scale, state, real, chunk_size=chunk)
        torch.testing.assert_close(dispatched, spec, rtol=1e-5, atol=1e-5)


def test_window_covering_everything_is_softmax_attention():
    """With the window over every key and no state, the hybrid is causal softmax attention (whatever w is)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 30, 8, generator=g) for _ in range(3))
    q_feat, k_feat = torch.rand(1, 4, 30, 4, generator=g), torch.rand(1, 4, 30, 4, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for fn in (window_linear_attention_quadratic, window_linear_attention_chunked):
        out = fn(q, k, v, q_feat, k_feat, 30, torch.full((4,), 0.3))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_empty_state_is_no_state():
    (q_feat, k_feat, v), _ = inputs(2, 4, 2, 11, 8, 8)
    zero = empty_state(2, 2, 8, 8, "cpu")
    torch.testing.assert_close(linear_attention_quadratic(q_feat, k_feat, v, zero), linear_attention_quadratic(q_feat, k_feat, v))


# ------------------------------------------------------------------------------------------------------ fla
@pytest.mark.parametrize("groups", [1, 3])
def test_fla_wrapper_layouts_gqa_and_state_on_cpu(groups, monkeypatch):
    """The fla wrapper's transposes, GQA repeat, state in/out and fp32 normalizer, with fla's own naive recurrent
    linear attention (plain PyTorch, same signature) standing in for its Triton kernel, which needs a GPU."""
    fla_ops = pytest.importorskip("fla.ops.linear_attn")
    naive = pytest.importorskip("fla.ops.linear_attn.naive")
    from attnkit.kernels.linear_attention import fla as fla_backend

    monkeypatch.setattr(fla_ops, "chunk_linear_attn", naive.naive_recurrent_linear_attn)
    (q_feat, k_feat, v), state = inputs(2, 2 * groups, 2, 37, 8, 16, seed=12)
    out, new_state = fla_backend.linear_attention_chunked(q_feat, k_feat, v, state, output_state=True)
    ref, ref_state = linear_attention_chunked(q_feat, k_feat, v, state, output_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_state, ref_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 8, 8, 1025, 64, 64), (2, 14, 2, 777, 128, 64), (1, 32, 8, 4096, 128, 128)],
                         ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-F{c[4]}-D{c[5]}")
def test_fla_backend_matches_the_reference(case, dtype):
    from attnkit.kernels.linear_attention import fla as fla_backend

    if not fla_backend.available():
        pytest.skip("flash-linear-attention is not installed")
    batch, hq, hkv, seq, feat, dim = case
    (q_feat, k_feat, v), state = inputs(batch, hq, hkv, seq, feat, dim, device="cuda")
    q_feat, k_feat = q_feat / feat, k_feat / feat  # softmax-like features: rows summing to about 1
    low = [t.to(dtype) for t in (q_feat, k_feat, v)]
    out, new_state = fla_backend.linear_attention_chunked(*low, state, output_state=True)
    ref, ref_state = linear_attention_chunked(*[t.float() for t in low], state, output_state=True)
    same_dtype, _ = linear_attention_chunked(*low, state)  # the reference's own rounding of the inputs
    rel = (out - ref).norm() / ref.norm()
    assert math.isfinite(rel.item()) and rel < 5e-3, f"relative RMSE {rel:.2e}"
    for a, b in zip(new_state, ref_state, strict=True):
        assert ((a - b).norm() / b.norm()) < 5e-3
    assert same_dtype.shape == out.shape


# ------------------------------------------------------------- fast paths (decode step, fla wrapper without fla)
def fake_chunk_linear_attn(q, k, v, scale=1.0, initial_state=None, output_final_state=False, normalize=True):
    """fla's ``chunk_linear_attn`` contract (``[B, T, H, ·]``, same heads for q/k/v, unnormalized numerator,
    float32 state ``[B, H, K, V]``) in plain PyTorch, so the wrapper's layout work runs on a CPU without fla."""
    assert not normalize and scale == 1.0 and q.shape[2] == k.shape[2] == v.shape[2]
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    num, final = linear_attention_chunked(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None if initial_state is None else
        (initial_state, torch.zeros(initial_state.shape[:-1])), normalize=False, output_state=True,
    )
    return num.to(v.dtype).transpose(1, 2).contiguous(), final[0] if output_final_state else None


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
@pytest.mark.parametrize("case", [(1, 3, 1, 1, 8, 16), (2, 6, 2, 37, 8, 16), (1, 4, 4, 130, 16, 8)],
                         ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-F{c[4]}-D{c[5]}")
def test_fla_wrapper_without_fla_matches_the_reference(case, with_state, monkeypatch):
    """The wrapper's one-copy cast/transpose/GQA expansion, chunked key sum and fused division, on a CPU, with a
    stand-in kernel that follows fla's contract (``float32`` kernel dtype: the comparison is exact up to order)."""
    import sys
    import types

    from attnkit.kernels.linear_attention import fla as fla_backend

    module = types.ModuleType("fla.ops.linear_attn")
    module.chunk_linear_attn = fake_chunk_linear_attn
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", module)
    batch, hq, hkv, seq, feat, dim = case
    (q_feat, k_feat, v), state = inputs(batch, hq, hkv, seq, feat, dim, seed=21)
    state = state if with_state else None
    out, new_state = fla_backend.linear_attention_chunked(q_feat, k_feat, v, state, output_state=True)
    ref, ref_state = linear_attention_chunked(q_feat, k_feat, v, state, output_state=True)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_state, ref_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    low, _ = fla_backend.linear_attention_chunked(q_feat, k_feat, v.bfloat16(), state)  # bf16 kernel inputs
    assert ((low - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize("seq", [1, 63, 64, 65, 200])
def test_key_cumsum_is_the_running_key_sum(seq):
    from attnkit.kernels.linear_attention.fla import key_cumsum

    g = torch.Generator().manual_seed(seq)
    k_feat, z0 = torch.rand(2, 3, seq, 5, generator=g), torch.rand(2, 3, 5, generator=g)
    torch.testing.assert_close(key_cumsum(k_feat, z0), z0[:, :, None] + k_feat.double().cumsum(2).float())
    torch.testing.assert_close(key_cumsum(k_feat.bfloat16()), k_feat.bfloat16().double().cumsum(2).float())


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "numerator"])
@pytest.mark.parametrize("case", [(1, 32, 8, 128, 128), (2, 7, 1, 12, 5), (3, 6, 3, 4, 9)],
                         ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-F{c[3]}-D{c[4]}")
def test_decode_step_matches_the_spec(case, normalize):
    """The batched one-token step (GQA through a [B, Hkv, G, F] view, bf16 values upcast inside the state update)
    == the quadratic spec on the same token with the same state, and the state == folding the token in."""
    batch, hq, hkv, feat, dim = case
    (q_feat, k_feat, v), state = inputs(batch, hq, hkv, 1, feat, dim, seed=5)
    v = v.bfloat16()
    out, new_state = linear_attention_recurrent(q_feat, k_feat, v, state, normalize=normalize)
    ref = linear_attention_quadratic(q_feat, k_feat, v, state, normalize=normalize)
    # fp32, summation order only: the unnormalized numerator is O(F), so its tolerance scales with its size
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().amax()))
    for a, b in zip(new_state, fold_state(k_feat, v, state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    fresh, _ = linear_attention_recurrent(q_feat, k_feat, v, normalize=normalize)
    torch.testing.assert_close(fresh, linear_attention_quadratic(q_feat, k_feat, v, normalize=normalize))
