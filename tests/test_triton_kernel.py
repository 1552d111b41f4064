"""The Triton block-sparse kernel against the PyTorch reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest before Triton is imported) at small shapes in
fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong, not the kernel's). On a CUDA machine the ``gpu`` tests
run the full matrix: bf16 and fp16, head_dim 64/128, blocks 64/128, lengths to 4K, GQA 1/4/7, padding, Sq < Sk.

Tolerance is flash-attention's rule: the kernel's error against an fp32 reference may be at most twice the error of
the same computation done by PyTorch in the input dtype (plus a tiny absolute floor for fp32 inputs).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from attnkit.kernels import BlockMask, block_sparse_attention
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.kernels.block_sparse import reference
from attnkit.kernels.block_sparse import triton as tri

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def lowp_attention(q, k, v, block_mask, key_padding_mask=None, scale=None):
    """Attention computed in the inputs' dtype (matmuls in that dtype, softmax in fp32): PyTorch's own error."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bq, bk = block_mask.block_size
    g = hq // hkv
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    blocks = block_mask.to_dense().expand(b, hq, -1, -1)
    rows, cols = torch.arange(sq, device=q.device), torch.arange(sk, device=q.device)
    allowed = blocks[:, :, rows // bq][..., cols // bk] & (cols[None, :] <= rows[:, None] + sk - sq)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q @ kx.transpose(-1, -2)).float() * (scale if scale is not None else d**-0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs.to(q.dtype) @ vx).to(q.dtype)


def random_block_mask(b, h, sq, sk, block_size, density, seed, device=DEVICE):
    """Random lists with some rows forced empty and some forced full (every causal block)."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = num_blocks(sq, block_size[0]), num_blocks(sk, block_size[1])
    blocks = torch.rand(b, h, qb, kb, generator=g) < density
    visible = causal_block_matrix(sq, sk, block_size)
    rows = torch.randint(0, qb, (2,), generator=g)
    blocks[..., rows[0], :] = False
    blocks[..., rows[1], :] = visible[rows[1]]
    return BlockMask.from_dense(blocks & visible, sq, sk, block_size).to(device)


def check(q, k, v, mask, pad=None, scale=None):
    out = tri.block_sparse_attention(q, k, v, mask, scale=scale, key_padding_mask=pad)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), mask, scale, pad)
    err = (out.float() - ref).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        err_torch = (lowp_attention(q, k, v, mask, pad, scale).float() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    return out


def inputs(b, hq, hkv, sq, sk, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


# ------------------------------------------------------------------------------- CPU, under the interpreter
INTERP_CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, block, dtype)
    (1, 1, 1, 63, 63, 16, (16, 16), torch.float32),  # MHA, odd length
    (2, 4, 1, 97, 97, 32, (32, 32), torch.float16),  # GQA 4
    (1, 7, 1, 97, 130, 16, (32, 16), torch.float32),  # GQA 7, Sq < Sk, different q/k blocks
    (1, 2, 2, 40, 100, 24, (16, 32), torch.float16),  # head_dim 24 padded to 32, BLOCK_N < key block
    (1, 1, 1, 1, 77, 16, (16, 16), torch.float32),  # one query (decode shape)
]


@pytest.mark.parametrize("case", INTERP_CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-{c[6]}-{str(c[7])[6:]}")
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_kernel_matches_reference(case, density, nan_empty):
    b, hq, hkv, sq, sk, d, bs, dtype = case
    q, k, v = inputs(b, hq, hkv, sq, sk, d, dtype, seed=int(density * 10))
    mask = random_block_mask(b, hq, sq, sk, bs, density, seed=3)
    check(q, k, v, mask)


def test_kernel_padding_scale_and_broadcast_mask(nan_empty):
    b, hq, hkv, sq, sk, d, bs = 3, 4, 2, 50, 70, 16, (16, 16)
    q, k, v = inputs(b, hq, hkv, sq, sk, d, torch.float32, seed=5)
    pad = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    pad[1, :13] = False
    pad[2, :60] = False  # row 2: early queries see only padding
    mask = random_block_mask(1, 1, sq, sk, bs, 0.6, seed=6)  # one list for every batch row and head
    check(q, k, v, mask, pad=pad, scale=0.3)


def test_kernel_reads_strided_views_in_place(nan_empty):
    """transformers hands q/k/v as [B, H, S, D] views of [B, S, H, D] projections: no copies needed."""
    b, hq, hkv, s, d = 2, 4, 2, 48, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, s, hq, d, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, generator=g).to(DEVICE).transpose(1, 2)
    check(q, k, v, random_block_mask(b, hq, s, s, (16, 16), 0.7, seed=8))


@pytest.mark.parametrize("density", [0.6, 1.0])
def test_blocks_listed_above_the_diagonal(density, nan_empty):
    """Lists may name blocks no query can see (masks not trimmed to the causal triangle): they must be masked."""
    b, hq, s, d, bs = 1, 2, 100, 16, (16, 16)
    q, k, v = inputs(b, hq, 1, s, s, d, torch.float32, seed=12)
    g = torch.Generator().manual_seed(13)
    blocks = torch.rand(b, hq, num_blocks(s, 16), num_blocks(s, 16), generator=g) < density
    check(q, k, v, BlockMask.from_dense(blocks, s, s, bs).to(DEVICE))


def test_very_long_block_list_is_scanned_in_chunks(nan_empty):
    """More than 2048 key blocks (here 2063 blocks of 16): the kernel counts the unmasked prefix chunk by chunk."""
    sq, sk = 40, 33_000
    q, k, v = inputs(1, 2, 1, sq, sk, 16, torch.float32, seed=14)
    check(q, k, v, random_block_mask(1, 2, sq, sk, (16, 16), 0.01, seed=15))


def test_kernel_long_odd_length(nan_empty):
    """1025 tokens: 17 query blocks of 64, the last one a single row."""
    q, k, v = inputs(1, 7, 1, 1025, 1025, 64, torch.float16, seed=9)
    check(q, k, v, random_block_mask(1, 7, 1025, 1025, (64, 64), 0.3, seed=10))


def test_tile_config_must_divide_blocks():
    q, k, v = inputs(1, 1, 1, 32, 32, 16, torch.float32)
    mask = random_block_mask(1, 1, 32, 32, (32, 32), 1.0, seed=0)
    with pytest.raises(ValueError, match="must divide"):
        tri.block_sparse_attention(q, k, v, mask, config={"BLOCK_M": 64, "BLOCK_N": 32})
    # A smaller tile than the mask's block is fine: two programs share one query block's list.
    out = tri.block_sparse_attention(q, k, v, mask, config={"BLOCK_M": 16, "BLOCK_N": 16})
    torch.testing.assert_close(out, reference.block_sparse_attention(q, k, v, mask), atol=2e-5, rtol=0)


def test_int64_offsets_variant(nan_empty):
    """The int64-offset kernel (chosen automatically past ~512K tokens) computes the same thing."""
    q, k, v = inputs(2, 4, 2, 97, 130, 16, torch.float16, seed=16)
    mask = random_block_mask(2, 4, 97, 130, (16, 16), 0.5, seed=17)
    out = tri.block_sparse_attention(q, k, v, mask, config={"LARGE_INDEX": True})
    torch.testing.assert_close(out, tri.block_sparse_attention(q, k, v, mask), atol=0, rtol=0)
    huge = torch.empty(1, 2**20, 32, 128, device="meta").transpose(1, 2)  # 1M tokens of [B, S, H, D]
    assert not tri._needs_int64(q, k, v) and tri._needs_int64(huge)


def test_unsupported_inputs_fall_back_or_fail_clearly(monkeypatch):
    q, k, v = inputs(1, 2, 1, 48, 48, 16, torch.float32)
    odd = BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 48, 48, 24).to(DEVICE)
    assert "powers of two" in tri.supports(q, odd)
    with pytest.raises(ValueError, match="powers of two"):
        tri.block_sparse_attention(q, k, v, odd)
    # The dispatcher runs the reference for what the kernel cannot take.
    monkeypatch.delenv("ATTNKIT_KERNELS", raising=False)
    torch.testing.assert_close(block_sparse_attention(q, k, v, odd), reference.block_sparse_attention(q, k, v, odd))
    monkeypatch.setenv("ATTNKIT_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="ATTNKIT_KERNELS"):
        block_sparse_attention(q, k, v, odd)


def test_dispatch_forced_backends(monkeypatch):
    # Blocks of 64: compiled FlexAttention (the flex backend on CUDA) rejects blocks smaller than its tiles.
    q, k, v = inputs(1, 2, 1, 130, 130, 16, torch.float32)
    mask = random_block_mask(1, 2, 130, 130, (64, 64), 0.7, seed=11)
    ref = reference.block_sparse_attention(q, k, v, mask)
    for name in ("reference", "triton", "flex", "auto"):
        monkeypatch.setenv("ATTNKIT_KERNELS", name)
        torch.testing.assert_close(block_sparse_attention(q, k, v, mask), ref, atol=2e-5, rtol=0)


# --------------------------------------------------------------------------------- GPU: the full matrix
GPU_SHAPES = [
    # (B, Hq, Hkv, Sq, Sk)
    (1, 4, 4, 63, 63),  # GQA 1
    (2, 8, 2, 97, 97),  # GQA 4
    (1, 7, 1, 1025, 1025),  # GQA 7
    (2, 4, 1, 1000, 4097),  # chunked prefill, GQA 4
    (1, 8, 2, 4096, 4096),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}".format(*s))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("density", [0.0, 0.2, 1.0])
def test_gpu_matrix(shape, d, block, dtype, density, nan_empty):
    b, hq, hkv, sq, sk = shape
    q, k, v = inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq + d + block)
    mask = random_block_mask(b, hq, sq, sk, (block, block), density, seed=block)
    pad = None
    if b > 1:
        pad = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
        pad[1, : sk // 3] = False
    check(q, k, v, mask, pad=pad)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_full_mask_equals_sdpa(dtype):
    q, k, v = inputs(2, 32, 8, 2048, 2048, 128, dtype, seed=1)
    mask = BlockMask.from_dense(causal_block_matrix(2048, 2048, (128, 128), DEVICE)[None, None], 2048, 2048, 128)
    out = tri.block_sparse_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out.float() - ref).abs().max() <= 2 * (sdpa.float() - ref).abs().max() + 1e-5


@gpu
@pytest.mark.gpu
def test_gpu_no_extra_memory():
    """The kernel allocates its output and nothing of K/V size (no repeat_kv, no copies)."""
    q, k, v = inputs(1, 32, 8, 8192, 8192, 128, torch.bfloat16)
    mask = random_block_mask(1, 32, 8192, 8192, (128, 128), 0.1, seed=0)
    tri.block_sparse_attention(q, k, v, mask)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tri.block_sparse_attention(q, k, v, mask)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * out.element_size() + 2**20, extra
