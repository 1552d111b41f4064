"""The fused Hedgehog decode step of linear attention: Triton against its PyTorch reference, the reference against
the eager path (feature maps + ``linear_attention_recurrent``), and a linearized tiny model generating the same
tokens and logits through the fused step as through the eager path.

Triton runs under ``TRITON_INTERPRET=1`` on CPU (set by conftest). Outputs come from ``torch.empty`` poisoned with
NaN (``nan_empty``); the state is updated in place, so it lives inside a larger NaN-filled buffer: a missed state
element keeps its old value and fails the comparison, a write or read outside the state's rows and columns shows up
as a changed guard or a NaN in the result. Tolerances: both sides compute in float32 from the same inputs and differ
only in summation order (fp32 ~1e-6 relative).
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.cache import LinearAttentionLayer, make_cache
from attnkit.convert import linearize
from attnkit.convert.linearize import FEATURE_EPS, HedgehogFeatureMap, LinearAttention
from attnkit.kernels.linear_attention import linear_attention_recurrent
from attnkit.kernels.linear_attention import reference as ref
from tests.conftest import random_batch

triton = pytest.importorskip("triton")
tri = pytest.importorskip("attnkit.kernels.linear_attention.triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on a GPU machine the same tests run the compiled kernel

CASES = [  # (B, Hq, Hkv, D, Fh)
    (1, 1, 1, 64, 64),
    (3, 2, 2, 72, 24),
    (3, 3, 1, 64, 24),
    (1, 7, 1, 72, 64),
    (3, 14, 2, 16, 5),
]


def make_inputs(b, hq, hkv, d, fh, dtype=torch.float32, seed=0):
    """Raw q/k/v, random (non-identity) projections, and a positive state that is a view into a NaN-filled buffer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, 1, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, 1, d, generator=g).to(dtype)
    wq = torch.randn(hq, d, fh, generator=g) * d**-0.5
    wk = torch.randn(hkv, d, fh, generator=g) * d**-0.5
    kv = torch.rand(b, hkv, 2 * fh, d, generator=g)
    z = torch.rand(b, hkv, 2 * fh, generator=g) + 1
    return [t.to(DEVICE) for t in (q, k, v, wq, wk)], (kv.to(DEVICE), z.to(DEVICE))


def guarded(
    kv: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv, z)`` copied into views of NaN buffers one row and three columns larger (returned as well)."""
    b, h, f, d = kv.shape
    kv_buf = torch.full((b, h, f + 1, d + 3), float("nan"), device=kv.device)
    z_buf = torch.full((b, h, f + 2), float("nan"), device=kv.device)
    kv_view, z_view = kv_buf[:, :, :f, :d], z_buf[:, :, :f]
    kv_view.copy_(kv)
    z_view.copy_(z)
    return kv_view, z_view, kv_buf, z_buf


def assert_guards_intact(kv_buf: torch.Tensor, z_buf: torch.Tensor, f: int, d: int) -> None:
    assert kv_buf[:, :, f:].isnan().all() and kv_buf[:, :, :, d:].isnan().all()
    assert z_buf[:, :, f:].isnan().all()


@pytest.mark.parametrize("padded", [False, True], ids=["all-real", "padded-row"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-Fh{}".format(*c))
def test_triton_matches_reference(case, padded, nan_empty):
    b, hq, _, d, fh = case
    (q, k, v, wq, wk), (kv, z) = make_inputs(*case, seed=sum(case))
    real = None
    if padded:  # a strided view, as the decode step gets it: the last column of the key padding mask
        real = torch.ones(b, 5, dtype=torch.bool, device=DEVICE)[:, -1]
        real[b // 2] = False
    kv_ref, z_ref = kv.clone(), z.clone()
    want = ref.hedgehog_decode_step(q, k, v, wq, wk, kv_ref, z_ref, real)
    kv_tri, z_tri, kv_buf, z_buf = guarded(kv, z)
    got = tri.hedgehog_decode_step(q, k, v, wq, wk, kv_tri, z_tri, real)
    assert got.shape == (b, hq, 1, d) and got.dtype == torch.float32
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv_tri, kv_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_tri, z_ref, rtol=1e-5, atol=1e-6)
    assert_guards_intact(kv_buf, z_buf, 2 * fh, d)
    if padded:  # a padded row's key adds nothing, bit for bit
        assert torch.equal(kv_tri[b // 2], kv[b // 2]) and torch.equal(z_tri[b // 2], z[b // 2])


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-Fh{}".format(*c))
def test_every_state_element_is_written(case):
    """From a zero state every updated element is ``φk v`` (one product, ``φk ≥ feature_eps > 0``): compared with
    no absolute tolerance, an element the kernel skips (left at 0) fails even where ``φk`` is clamped tiny."""
    d, fh = case[3:]
    (q, k, v, wq, wk), (kv, z) = make_inputs(*case, seed=5)
    kv.zero_()
    z.zero_()
    kv_ref, z_ref = kv.clone(), z.clone()
    ref.hedgehog_decode_step(q, k, v, wq, wk, kv_ref, z_ref)
    kv_tri, z_tri, kv_buf, z_buf = guarded(kv, z)
    tri.hedgehog_decode_step(q, k, v, wq, wk, kv_tri, z_tri)
    assert (kv_ref != 0).all() and (z_ref > 0).all()
    torch.testing.assert_close(kv_tri, kv_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(z_tri, z_ref, rtol=1e-5, atol=0)
    assert_guards_intact(kv_buf, z_buf, 2 * fh, d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_low_precision_inputs_and_output(dtype, nan_empty):
    """fp16/bf16 q/k/v are upcast inside, as in the reference; ``out_dtype`` rounds the float32 result once."""
    case = (2, 6, 2, 64, 24)
    (q, k, v, wq, wk), (kv, z) = make_inputs(*case, dtype=dtype, seed=7)
    kv_ref, z_ref, kv_tri, z_tri = kv.clone(), z.clone(), kv.clone(), z.clone()
    want = ref.hedgehog_decode_step(q, k, v, wq, wk, kv_ref, z_ref, out_dtype=dtype)
    got = tri.hedgehog_decode_step(q, k, v, wq.to(dtype), wk.to(dtype), kv_tri, z_tri, out_dtype=dtype)
    want_bf = ref.hedgehog_decode_step(
        q, k, v, wq.to(dtype), wk.to(dtype), kv.clone(), z.clone(), out_dtype=dtype
    )
    assert got.dtype == dtype
    torch.testing.assert_close(
        got, want_bf, rtol=1e-2, atol=1e-3
    )  # the same (rounded) weights: one output rounding
    torch.testing.assert_close(kv_tri, kv_ref, rtol=2e-2, atol=1e-3)  # weights rounded to `dtype` vs float32
    assert want.dtype == dtype


def test_launch_settings_agree(nan_empty):
    case = (2, 8, 2, 72, 24)
    (q, k, v, wq, wk), (kv, z) = make_inputs(*case, seed=3)
    outs = []
    for block_d, warps in [(None, None), (16, 2), (128, 4)]:
        kv_i, z_i = kv.clone(), z.clone()
        outs.append(
            (tri.hedgehog_decode_step(q, k, v, wq, wk, kv_i, z_i, block_d=block_d, num_warps=warps), kv_i)
        )
    for out, state in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state, outs[0][1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        tri.hedgehog_decode_step(q, k, v, wq, wk, kv, z, block_d=24)


@pytest.mark.parametrize("padded", [False, True], ids=["all-real", "padded-row"])
@pytest.mark.parametrize("case", [(1, 4, 4, 16, 16), (3, 6, 2, 24, 7)], ids=["mha", "gqa3"])
def test_reference_is_the_eager_path(case, padded):
    """The reference == the module's feature maps (``HedgehogFeatureMap``), padded keys zeroed as ``forward`` does,
    then ``linear_attention_recurrent``; the state it updates in place is the one that path returns."""
    b, hq, hkv, d, fh = case
    (q, k, v, wq, wk), (kv, z) = make_inputs(*case, seed=11)
    qmap, kmap = HedgehogFeatureMap(hq, d, fh).to(DEVICE), HedgehogFeatureMap(hkv, d, fh).to(DEVICE)
    with torch.no_grad():
        qmap.weight.copy_(wq)
        kmap.weight.copy_(wk)
    mask = torch.ones(b, 1, dtype=torch.bool, device=DEVICE)
    if padded:
        mask[0] = False
    with torch.no_grad():
        q_feat, k_feat = qmap(q), kmap(k) * mask[:, None, :, None]
        torch.testing.assert_close(ref.hedgehog_features(q, wq, FEATURE_EPS), q_feat, rtol=0, atol=0)
        want, (kv_want, z_want) = linear_attention_recurrent(q_feat, k_feat, v, (kv, z))
    kv_got, z_got = kv.clone(), z.clone()
    got = ref.hedgehog_decode_step(q, k, v, wq, wk, kv_got, z_got, mask[:, 0] if padded else None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close((kv_got, z_got), (kv_want, z_want), rtol=0, atol=0)


def test_bad_inputs_are_refused():
    (q, k, v, wq, wk), (kv, z) = make_inputs(2, 4, 2, 16, 8)
    for fn in (ref.hedgehog_decode_step, tri.hedgehog_decode_step):
        with pytest.raises(ValueError, match="one token"):
            fn(q.expand(2, 4, 3, 16), k, v, wq, wk, kv, z)
        with pytest.raises(ValueError, match="feature-map weights"):
            fn(q, k, v, wq[:, :, :4], wk, kv, z)
        with pytest.raises(ValueError, match="state must be"):
            fn(q, k, v, wq, wk, kv[:, :, :8], z)
        with pytest.raises(ValueError, match="float32"):
            fn(q, k, v, wq, wk, kv.double(), z.double())
        with pytest.raises(ValueError, match="real must be"):
            fn(q, k, v, wq, wk, kv, z, torch.ones(3, dtype=torch.bool))
    assert "contiguous" in tri.supports(q, wq, kv.transpose(2, 3).contiguous().transpose(2, 3), z)
    assert "feature_dim" in tri.supports(q, torch.empty(4, 16, 300), kv, z)
    assert "query heads per KV head" in tri.supports(
        torch.empty(1, 64, 1, 16), torch.empty(64, 16, 64), kv[:, :1], z
    )


def test_cache_commit_owns_its_state():
    """A state that is a view into a larger buffer (fla's prefill returns such views) is copied once on commit, so
    the buffer is freed and the in-place step cannot write into anything else; an owned state is kept as is."""
    layer = LinearAttentionLayer()
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    big_kv, big_z = torch.rand(1, 6, 8, 4), torch.rand(1, 2, 100, 8)
    layer.commit((big_kv[:, ::3], big_z[:, :, -1]), keep=0)
    for t, src in ((layer.kv_state, big_kv[:, ::3]), (layer.z_state, big_z[:, :, -1])):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 4 and torch.equal(t, src)
    kv, z = layer.kv_state, layer.z_state
    layer.commit((kv, z), keep=0)
    assert layer.kv_state.data_ptr() == kv.data_ptr() and layer.z_state.data_ptr() == z.data_ptr()


# ------------------------------------------------------------------------------------------------ model level
def recipe(**step) -> dict:
    base = {"method": "linearize", "feature_dim": 12, "init": "kaiming", "transfer": {"steps": 0}}
    return {"attnkit": 1, "name": "linear-decode-test", "steps": [{**base, **step}]}


def spy_on_fused_step(monkeypatch) -> list:
    calls = []
    real_step = linearize.hedgehog_decode_step

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(linearize, "hedgehog_decode_step", spy)
    return calls


@torch.no_grad()
def generate(model, ids, mask, new_tokens):
    cache = make_cache(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1), cache


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_generate_with_the_fused_step_equals_the_eager_path(backend, monkeypatch):
    """tiny-qwen2 (GQA 3:1, head_dim 16), Hedgehog with 12 projections (24 features), a left-padded batch: the fused
    decode step gives the eager path's tokens, logits and final state."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("CPU tensors through Triton need the interpreter (CPU-only machines); GPU: the kernel tests")
    model, _ = attnkit.load_model("tiny-qwen2", dtype="float32", device="cpu")
    attnkit.apply(model, recipe())
    ids, mask = random_batch(model.config.vocab_size, 2, 9, pad_lengths=[0, 3], seed=3)
    new = 5
    with monkeypatch.context() as m:
        m.setattr(LinearAttention, "_fused_decode", lambda self: False)
        eager_ids, eager_logits, eager_cache = generate(model, ids, mask, new)
    calls = spy_on_fused_step(monkeypatch)
    monkeypatch.setenv("ATTNKIT_KERNELS", backend)
    fused_ids, fused_logits, fused_cache = generate(model, ids, mask, new)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * (new - 1)  # the first new token comes from the prefill
    assert torch.equal(fused_ids, eager_ids)
    torch.testing.assert_close(fused_logits, eager_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_cache.layers, eager_cache.layers, strict=True):
        torch.testing.assert_close((a.kv_state, a.z_state), (b.kv_state, b.z_state), rtol=1e-5, atol=1e-5)
        assert a.stored_tokens() == 0


@pytest.mark.parametrize(
    "step", [{"window": 3}, {"feature_map": "elu"}, {}], ids=["window-hybrid", "elu", "with-grad"]
)
def test_the_eager_path_is_kept_elsewhere(step, monkeypatch):
    """The window hybrid, other feature maps and calls with gradients enabled never take the fused step."""
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    attnkit.apply(model, recipe(**step))
    calls = spy_on_fused_step(monkeypatch)
    ids, _ = random_batch(model.config.vocab_size, 1, 6, seed=1)
    cache = make_cache(model)
    with torch.set_grad_enabled(not step):
        model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True)
    assert calls == []
