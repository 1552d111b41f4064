"""Block-max-pooled attention (SeerAttention's target): reference and Triton kernel against a brute-force definition.

The brute force builds the whole ``Sq × Sk`` softmax map in fp64 and pools it by the definition. On CPU the Triton
kernel runs under ``TRITON_INTERPRET=1`` (conftest) at tiny fp32 shapes; the ``gpu`` tests run bf16/fp16 at longer
lengths against the fp32 reference. Pooled values are ratios of probabilities: fp32 inputs match to 1e-5; bf16/fp16
inputs are held to twice the error of the same pooling computed by PyTorch from inputs rounded to that dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.kernels.pooled_attention import pooled_attention, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def brute_pooled(q, k, block, scale=None, kpm=None, causal=True):
    """fp64, the whole attention map at once: softmax per row, max over each block's real rows and keys, normalised."""
    q, k = q.double(), k.double()
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g, off = hq // hkv, sk - sq
    scale = dim**-0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(g, 1)) * scale
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + off
    allowed = allowed[None, None].expand(batch, 1, sq, sk)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    if kpm is not None:
        probs = probs * kpm[:, None, off:, None]
    qb, kb = math.ceil(sq / block), math.ceil(sk / block)
    out = torch.zeros(batch, hq, qb, kb, dtype=torch.float64)
    for i in range(qb):
        for j in range(kb):
            out[..., i, j] = probs[..., i * block : (i + 1) * block, j * block : (j + 1) * block].amax((-1, -2))
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / torch.where(total > 0, total, 1.0), 0.0)


def inputs(b, hq, hkv, sq, sk, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g) * 1.5
    k = torch.randn(b, hkv, sk, d, generator=g) * 1.5
    return q.to(device, dtype), k.to(device, dtype)


CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, block)
    (1, 2, 2, 64, 64, 16, 16),  # MHA, aligned
    (2, 3, 1, 63, 63, 16, 16),  # GQA 3, odd length
    (1, 7, 1, 40, 97, 16, 16),  # GQA 7, Sq < Sk with an offset that is not block-aligned
    (2, 4, 2, 70, 70, 24, 32),  # head_dim 24 (padded in the kernel)
]
IDS = [f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-bs{c[6]}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_brute_force(case):
    b, hq, hkv, sq, sk, d, bs = case
    q, k = inputs(b, hq, hkv, sq, sk, d, seed=sq)
    expected = brute_pooled(q, k, bs)
    got = reference.pooled_attention(q, k, bs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    # chunking (one query block per chunk) changes nothing; rows sum to 1; invisible blocks are exactly 0
    torch.testing.assert_close(reference.pooled_attention(q, k, bs, chunk_bytes=1), got, atol=1e-7, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
    assert not got[..., ~causal_block_matrix(sq, sk, (bs, bs))].any()


def test_reference_padding_scale_and_non_causal():
    q, k = inputs(3, 4, 2, 50, 70, 16, seed=5)
    kpm = torch.ones(3, 70, dtype=torch.bool)
    kpm[1, :13] = False
    kpm[2, :60] = False  # row 2: the first query block holds only padding rows
    got = reference.pooled_attention(q, k, 16, scale=0.3, key_padding_mask=kpm)
    torch.testing.assert_close(got.double(), brute_pooled(q, k, 16, 0.3, kpm), atol=1e-6, rtol=1e-5)
    assert not got[2, :, 0].any()  # no real row: all zero
    non_causal = reference.pooled_attention(q, k, 16, key_padding_mask=kpm, causal=False)
    torch.testing.assert_close(non_causal.double(), brute_pooled(q, k, 16, None, kpm, causal=False), atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise():
    q, k = inputs(1, 3, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="disagree"):
        reference.pooled_attention(q, k, 4)
    q, k = inputs(1, 2, 1, 9, 8, 4)
    with pytest.raises(ValueError, match="Sq"):
        pooled_attention(q, k, 4)


# ----------------------------------------------------------------------------- Triton, under the interpreter on CPU
tri = pytest.importorskip("attnkit.kernels.pooled_attention.triton")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_brute_force(case, nan_empty):
    b, hq, hkv, sq, sk, d, bs = case
    q, k = inputs(b, hq, hkv, sq, sk, d, seed=sq, device=DEVICE)
    got = tri.pooled_attention(q, k, bs)
    assert not got.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    torch.testing.assert_close(got.double().cpu(), brute_pooled(q.cpu(), k.cpu(), bs), atol=1e-5, rtol=1e-4)


def test_triton_padding_and_strided_views(nan_empty):
    b, hq, hkv, s, d = 2, 4, 2, 48, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, s, hq, d, generator=g).to(DEVICE).transpose(1, 2)  # [B, H, S, D] views, as transformers hands them
    k = torch.randn(b, s, hkv, d, generator=g).to(DEVICE).transpose(1, 2)
    kpm = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    kpm[1, :21] = False
    got = tri.pooled_attention(q, k, 16, scale=0.4, key_padding_mask=kpm)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), brute_pooled(q.cpu(), k.cpu(), 16, 0.4, kpm.cpu()), atol=1e-5, rtol=1e-4)


def test_dispatch_forces_reference(monkeypatch):
    q, k = inputs(1, 2, 1, 40, 40, 16, seed=1)
    monkeypatch.setenv("ATTNKIT_KERNELS", "reference")
    torch.testing.assert_close(pooled_attention(q, k, 16), reference.pooled_attention(q, k, 16))
    assert tri.supports(q, 48) is not None and tri.supports(q, 256) is not None


# ------------------------------------------------------------------------------------------------------- GPU
def lowp_error(q, k, bs, kpm, ref):
    """PyTorch's own error: the reference run on inputs rounded to q's dtype, against the fp32-input reference."""
    return (reference.pooled_attention(q.float(), k.float(), bs, key_padding_mask=kpm) - ref).abs().max().item()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    [(1, 32, 8, 4096, 4096, 128, 64), (2, 9, 3, 1025, 1025, 64, 64), (1, 14, 2, 1000, 3000, 64, 64), (1, 8, 8, 2048, 2048, 128, 128)],
    ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-bs{c[6]}",
)
def test_triton_gpu(case, dtype, nan_empty):
    b, hq, hkv, sq, sk, d, bs = case
    q32, k32 = inputs(b, hq, hkv, sq, sk, d, seed=3, device=DEVICE)
    q, k = q32.to(dtype), k32.to(dtype)
    kpm = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    kpm[-1, : sk // 5] = False
    ref = reference.pooled_attention(q32, k32, bs, key_padding_mask=kpm)
    got = tri.pooled_attention(q, k, bs, key_padding_mask=kpm)
    assert not got.isnan().any()
    err = (got - ref).abs().max().item()
    assert err <= 2 * lowp_error(q, k, bs, kpm, ref) + 1e-5, err
