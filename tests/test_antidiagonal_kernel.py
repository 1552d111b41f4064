"""The Triton antidiagonal scoring kernel (XAttention) against the PyTorch reference, and the op's dispatcher.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest before Triton is imported) at small shapes in
fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong, not the kernel's). On a CUDA machine the ``gpu`` tests
run the full matrix: bf16/fp16/fp32, head_dim 64/128, blocks 64/128, strides 4/8/16, lengths to 4K, GQA 1/3/4,
padding, Sq < Sk.

Tolerance: the kernel and the reference sum the same fp32 products (fp16/bf16 products are exact in fp32), only in
a different order, so fp32 inputs must agree to rtol 1e-4 / atol 1e-5; fp16/bf16 inputs are read in their own
dtype by the kernel and upcast by the reference, and get rtol 1e-3 / atol 1e-4 (the tensor cores' accumulation
order differs more). Every output element must be written: ``nan_empty`` poisons the kernel's ``torch.empty``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from attnkit.kernels.antidiagonal import antidiagonal_block_scores, reference
from attnkit.kernels.antidiagonal import triton as tri

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def inputs(b, hq, hkv, sq, sk, d, dtype, seed=0, device=DEVICE):
    """q ``[B, Hq, Sq, D]`` and k ``[B, Hkv, Sk, D]`` as transformers passes them: transposed ``[B, S, H, D]`` views."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g) * 2
    k = torch.randn(b, sk, hkv, d, generator=g) * 2
    return q.to(device, dtype).transpose(1, 2), k.to(device, dtype).transpose(1, 2)


def left_padding(b, sk, pads, device=DEVICE):
    kpm = torch.ones(b, sk, dtype=torch.bool, device=device)
    for row, p in enumerate(pads):
        kpm[row, :p] = False
    return kpm


def check(q, k, block, stride, kpm=None, scale=None):
    out = tri.antidiagonal_block_scores(q, k, block, stride, scale=scale, key_padding_mask=kpm)
    ref = reference.antidiagonal_block_scores(q, k, block, stride, scale=scale, key_padding_mask=kpm)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    return out


# ------------------------------------------------------------------------------- CPU, under the interpreter
INTERP_CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, block, stride, dtype, left padding per batch row)
    (1, 1, 1, 63, 63, 16, 16, 4, torch.float32, None),  # odd length, MHA
    (2, 3, 1, 97, 97, 16, 32, 8, torch.float32, (0, 13)),  # GQA 3, left padding not stride-aligned
    (2, 2, 2, 63, 150, 24, 16, 4, torch.float16, (5, 41)),  # Sq < Sk, padding into the queries, head_dim 24 → 32
    (2, 3, 1, 200, 211, 16, 64, 4, torch.float32, (0, 70)),  # block 64: 16 tiles per block, BLOCK_M = 16
    (1, 2, 2, 97, 97, 16, 64, 16, torch.float16, None),  # stride 16: 4 tiles per block, 4 query blocks per program
    (2, 2, 2, 97, 160, 8, 16, 2, torch.float32, (0, 100)),  # row 1: the first real queries are padding; D 8 → 16
]


@pytest.mark.parametrize(
    "case",
    INTERP_CASES,
    ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-blk{c[6]}-s{c[7]}-{str(c[8])[6:]}"
    + ("-pad" if c[9] else ""),
)
def test_kernel_matches_reference(case, nan_empty):
    b, hq, hkv, sq, sk, d, block, stride, dtype, pads = case
    q, k = inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq + sk)
    assert q.stride(2) == hq * d  # a [B, S, H, D] layout, read in place as transformers hands it over
    kpm = None if pads is None else left_padding(b, sk, pads)
    out = check(q, k, block, stride, kpm)
    # Each query block's row sums to its number of real reduced rows.
    if kpm is None:
        real_rows = torch.ones(sq, dtype=torch.bool, device=DEVICE)
        rows = torch.nn.functional.pad(real_rows, (0, -sq % block)).view(-1, block // stride, stride).any(-1).sum(-1)
        torch.testing.assert_close(out.sum(-1), rows.float().expand_as(out.sum(-1)), rtol=1e-5, atol=1e-4)


def test_scale_chunk_bytes_and_contiguous_inputs(nan_empty):
    q, k = inputs(2, 4, 2, 50, 70, 16, torch.float32, seed=3)
    q, k = q.contiguous(), k.contiguous()
    kpm = left_padding(2, 70, (0, 30))
    check(q, k, 16, 4, kpm, scale=0.3)
    # chunk_bytes only tunes the reference's memory; the kernel accepts and ignores it.
    out = tri.antidiagonal_block_scores(q, k, 16, 4, key_padding_mask=kpm, chunk_bytes=1)
    torch.testing.assert_close(out, tri.antidiagonal_block_scores(q, k, 16, 4, key_padding_mask=kpm), rtol=0, atol=0)


def test_tile_configs_agree(nan_empty):
    """Other tile sizes (several query blocks per program, several key blocks per step) compute the same thing."""
    q, k = inputs(1, 2, 1, 90, 120, 16, torch.float32, seed=4)
    expect = reference.antidiagonal_block_scores(q, k, 16, 4)
    configs = (
        {"BLOCK_M": 32, "BLOCK_N": 16},
        {"BLOCK_M": 16, "BLOCK_N": 32},
        {"LARGE_INDEX": True},
        {"ONE_PASS": False},  # two passes over the logits, no scratch
        {"scratch_bytes": 1},  # one (batch, head) pair per launch
    )
    for cfg in configs:
        torch.testing.assert_close(tri.antidiagonal_block_scores(q, k, 16, 4, config=cfg), expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of block_size / stride"):
        tri.antidiagonal_block_scores(q, k, 64, 2, config={"BLOCK_M": 16, "BLOCK_N": 16})


def test_empty_and_single_query(nan_empty):
    q, k = inputs(1, 2, 1, 1, 77, 16, torch.float32, seed=5)
    check(q, k, 16, 4)
    q0, k0 = inputs(1, 2, 1, 0, 16, 16, torch.float32)
    assert tri.antidiagonal_block_scores(q0, k0, 16, 4).shape == (1, 2, 0, 1)


def test_unsupported_inputs_fall_back_or_fail_clearly(monkeypatch):
    q, k = inputs(1, 2, 1, 48, 48, 16, torch.float32)
    assert "power of two" in tri.supports(q, 24, 4)  # 6 tiles per block
    with pytest.raises(ValueError, match="power of two"):
        tri.antidiagonal_block_scores(q, k, 24, 4)
    with pytest.raises(ValueError, match="must be a positive divisor"):
        tri.antidiagonal_block_scores(q, k, 16, 5)
    assert "dtype" in tri.supports(q.to(torch.float64), 16, 4)
    monkeypatch.setenv("ATTNKIT_KERNELS", "triton")
    with pytest.raises(ValueError, match="must be a positive divisor"):
        antidiagonal_block_scores(q, k, 16, 5)
    monkeypatch.setenv("ATTNKIT_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="ATTNKIT_KERNELS"):
        antidiagonal_block_scores(q, k, 16, 4)


def test_dispatch(monkeypatch):
    q, k = inputs(1, 2, 1, 40, 40, 16, torch.float32, seed=6)
    expect = reference.antidiagonal_block_scores(q, k, 16, 4)
    calls = []
    real_tri, real_ref = tri.antidiagonal_block_scores, reference.antidiagonal_block_scores
    monkeypatch.setattr(tri, "antidiagonal_block_scores", lambda *a: calls.append("triton") or real_tri(*a))
    monkeypatch.setattr(reference, "antidiagonal_block_scores", lambda *a: calls.append("reference") or real_ref(*a))
    for name in ("reference", "triton", "auto", "flex"):
        monkeypatch.setenv("ATTNKIT_KERNELS", name)
        torch.testing.assert_close(antidiagonal_block_scores(q, k, 16, 4), expect, rtol=1e-4, atol=1e-5)
    # auto and flex: Triton for CUDA inputs, the reference for CPU tensors (the interpreter is for tests only).
    auto = "triton" if CUDA else "reference"
    assert calls == ["reference", "triton", auto, auto]
    # The name stays importable from the method's module (the method calls the dispatcher).
    from attnkit.sparsify import xattention

    assert xattention.antidiagonal_block_scores is antidiagonal_block_scores


# --------------------------------------------------------------------------------- GPU: the full matrix
GPU_SHAPES = [
    # (B, Hq, Hkv, Sq, Sk, left padding)
    (1, 4, 4, 63, 63, None),  # GQA 1, shorter than a block
    (2, 8, 2, 1000, 1000, (0, 333)),  # GQA 4, padding
    (2, 6, 2, 1025, 4097, (100, 0)),  # chunked prefill, GQA 3
    (1, 8, 2, 4096, 4096, None),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}".format(*s) + ("-pad" if s[5] else ""))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("stride", [4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_matrix(shape, d, block, stride, dtype, nan_empty):
    b, hq, hkv, sq, sk, pads = shape
    q, k = inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq + d + block + stride)
    check(q, k, block, stride, None if pads is None else left_padding(b, sk, pads))


@gpu
@pytest.mark.gpu
def test_gpu_no_copies():
    """The kernel allocates its output and its scratch, nothing of q/k size (no fp32 copies, no repeat_kv, no
    contiguous()). One (batch, head) pair per launch keeps the scratch at ~0.5 MB here, below any copy."""
    q, k = inputs(1, 32, 8, 8192, 8192, 128, torch.bfloat16)
    cfg = {"scratch_bytes": 2**20}
    tri.antidiagonal_block_scores(q, k, 128, 8, config=cfg)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tri.antidiagonal_block_scores(q, k, 128, 8, config=cfg)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * out.element_size() + 2 * 2**20, extra
    torch.testing.assert_close(out, tri.antidiagonal_block_scores(q, k, 128, 8), rtol=1e-5, atol=1e-6)
