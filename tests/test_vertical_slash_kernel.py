"""Vertical-slash attention: the reference against a brute-force token mask, the Triton kernel against the reference.

The brute force builds the whole ``[B, H, Sq, Sk]`` token mask (listed blocks expanded to tokens, or'ed with the
columns, causal, padding) and runs a float64 softmax, so it only runs on tiny shapes; it is the independent check
of the reference's chunked, blockwise code and of ``VerticalSlashMask.density``.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set in conftest before Triton is imported) at small shapes in
fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong, not the kernel's). On a CUDA machine the ``gpu`` tests run
the full matrix: bf16 and fp16, head_dim 64/128, blocks 64/128, lengths to 4K, GQA 1/4, padding, Sq < Sk.

Tolerance is flash-attention's rule: the kernel's error against an fp32 reference may be at most twice the error of
the same computation done by PyTorch in the input dtype (plus a tiny absolute floor for fp32 inputs).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from attnkit.kernels.block_mask import BlockMask, causal_block_matrix, num_blocks
from attnkit.kernels.block_sparse import reference as block_sparse_reference
from attnkit.kernels.vertical_slash import VerticalSlashMask, reference, vertical_slash_attention
from attnkit.kernels.vertical_slash import triton as tri

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------- helpers
def token_mask(mask: VerticalSlashMask, batch: int, heads: int, pad=None, causal: bool = True) -> torch.Tensor:
    """Brute force: bool ``[B, H, Sq, Sk]``, True = the pair is attended."""
    sq, sk = mask.q_len, mask.kv_len
    bq, bk = mask.block_size
    rows, cols = torch.arange(sq, device=mask.device), torch.arange(sk, device=mask.device)
    blocks = mask.block_mask.to_dense().expand(batch, heads, -1, -1)
    allowed = blocks[:, :, rows // bq][..., cols // bk]
    columns = torch.zeros(batch, heads, sk, dtype=torch.bool, device=mask.device)
    for b in range(batch):
        for h in range(heads):
            cb, ch = min(b, mask.columns.shape[0] - 1), min(h, mask.columns.shape[1] - 1)
            columns[b, h, mask.columns[cb, ch, : int(mask.column_counts[cb, ch])].long()] = True
    allowed = allowed | columns[:, :, None, :]
    if causal:
        allowed = allowed & (cols[None, :] <= rows[:, None] + sk - sq)
    if pad is not None:
        allowed = allowed & pad[:, None, None, :]
    return allowed


def brute_attention(q, k, v, mask, pad=None, scale=None, dtype=torch.float64):
    """Softmax over the brute-force token mask; matmuls in ``dtype`` (float64: the oracle; q.dtype: PyTorch's error)."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    allowed = token_mask(mask, b, hq, pad)
    kx, vx = k.repeat_interleave(g, 1).to(dtype), v.repeat_interleave(g, 1).to(dtype)
    scores = (q.to(dtype) @ kx.transpose(-1, -2)).double() * (scale if scale is not None else d**-0.5)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (probs.to(dtype) @ vx).to(q.dtype if dtype != torch.float64 else dtype)


def random_mask(b, h, sq, sk, block_size, block_density, column_density, seed, device=DEVICE) -> VerticalSlashMask:
    """Random block lists (one query block forced empty, one forced to every causal block) and random columns.

    Blocks above the causal diagonal are listed too (masks are not trimmed to the triangle); columns are spread
    over all keys, so some lie inside listed blocks and some after the queries that would see them.
    """
    g = torch.Generator().manual_seed(seed)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    qb, kb = num_blocks(sq, bq), num_blocks(sk, bk)
    blocks = torch.rand(b, h, qb, kb, generator=g) < block_density
    if qb > 1:
        rows = torch.randperm(qb, generator=g)[:2]
        blocks[..., rows[0], :] = False
        blocks[..., rows[1], :] = causal_block_matrix(sq, sk, (bq, bk))[rows[1]]
    columns = torch.rand(b, h, sk, generator=g) < column_density
    return VerticalSlashMask.from_dense_columns(blocks, columns, sq, sk, (bq, bk)).to(device)


def inputs(b, hq, hkv, sq, sk, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def left_padding(b, sk, lengths, device=DEVICE):
    pad = torch.ones(b, sk, dtype=torch.bool, device=device)
    for row, n in enumerate(lengths):
        pad[row, :n] = False
    return pad


def check(q, k, v, mask, pad=None, scale=None, config=None):
    """The Triton kernel against the fp32 reference, by flash-attention's tolerance rule."""
    out = tri.vertical_slash_attention(q, k, v, mask, scale=scale, key_padding_mask=pad, config=config)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    ref = reference.vertical_slash_attention(q.float(), k.float(), v.float(), mask, scale, pad)
    err = (out.float() - ref).abs().max().item()
    if q.dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        err_torch = (brute_attention(q, k, v, mask, pad, scale, dtype=q.dtype).float() - ref).abs().max().item()
        assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    return out


# (B, Hq, Hkv, Sq, Sk, D, block, pad lengths or None)
CASES = [
    (1, 1, 1, 63, 63, 16, 16, None),  # MHA, odd length
    (2, 3, 1, 97, 97, 16, 32, [0, 20]),  # GQA 3, batch 2, left padding
    (2, 2, 2, 63, 130, 24, 16, [7, 0]),  # chunked prefill (Sq < Sk), head_dim 24 padded to 32
    (1, 6, 2, 130, 130, 16, (64, 32), None),  # GQA 3, 64-row query blocks over 32-key blocks
]


def case_id(c) -> str:
    return f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-Sq{c[3]}-Sk{c[4]}-D{c[5]}-blk{c[6]}" + ("-pad" if c[7] else "")


# ------------------------------------------------------------------------------ mask and reference (spec)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_brute_force(case, nan_empty):
    b, hq, hkv, sq, sk, d, bs, pad_lengths = case
    q, k, v = inputs(b, hq, hkv, sq, sk, d, torch.float32, seed=sq)
    mask = random_mask(b, hq, sq, sk, bs, 0.3, 0.15, seed=sk)
    pad = left_padding(b, sk, pad_lengths) if pad_lengths else None
    out = reference.vertical_slash_attention(q, k, v, mask, key_padding_mask=pad)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), brute_attention(q, k, v, mask, pad), atol=2e-6, rtol=0)


def test_reference_chunks_rows(monkeypatch, nan_empty):
    """A tiny chunk budget forces several query-row chunks: same output as one chunk."""
    q, k, v = inputs(1, 2, 1, 97, 130, 16, torch.float32, seed=1)
    mask = random_mask(1, 2, 97, 130, 16, 0.3, 0.2, seed=2)
    whole = reference.vertical_slash_attention(q, k, v, mask)
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    torch.testing.assert_close(reference.vertical_slash_attention(q, k, v, mask), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 63, 63, 16), (2, 3, 97, 130, 32), (1, 2, 130, 130, (64, 32))])
def test_density_is_exact_at_token_level(shape):
    b, h, sq, sk, bs = shape
    mask = random_mask(b, h, sq, sk, bs, 0.3, 0.2, seed=4, device="cpu")
    causal = token_mask(mask, b, h, causal=True)
    visible = sq * (sk - sq) + sq * (sq + 1) // 2
    assert mask.density() == pytest.approx(causal.sum().item() / (visible * b * h), abs=1e-12)
    # Broadcast parts: one block list for every head, per-head columns.
    blocks = torch.rand(1, 1, num_blocks(sq, mask.block_size[0]), num_blocks(sk, mask.block_size[1])) < 0.4
    cols = torch.rand(b, h, sk) < 0.1
    mixed = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, bs)
    expect = token_mask(mixed, b, h).sum().item() / (visible * b * h)
    assert mixed.density() == pytest.approx(expect, abs=1e-12)


def test_density_full_and_empty():
    sq, sk, bs = 70, 100, 16
    full = causal_block_matrix(sq, sk, (bs, bs))[None, None]
    none = torch.zeros(1, 1, sk, dtype=torch.bool)
    assert VerticalSlashMask.from_dense_columns(full, none, sq, sk, bs).density() == 1.0
    empty = VerticalSlashMask.from_dense_columns(torch.zeros_like(full), none, sq, sk, bs)
    assert empty.density() == 0.0
    every_column = VerticalSlashMask.from_dense_columns(torch.zeros_like(full), ~none, sq, sk, bs)
    assert every_column.density() == 1.0


def test_from_dense_columns_lists_sorted_columns():
    cols = torch.zeros(2, 1, 40, dtype=torch.bool)
    cols[0, 0, [3, 17, 39]] = True
    cols[1, 0, [0]] = True
    mask = VerticalSlashMask.from_dense_columns(torch.ones(2, 1, 3, 3, dtype=torch.bool), cols, 40, 40, 16)
    assert mask.columns.dtype == torch.int32 and mask.columns.shape == (2, 1, 3)
    assert mask.column_counts.tolist() == [[3], [1]]
    assert mask.columns[0, 0].tolist() == [3, 17, 39] and mask.columns[1, 0, 0].item() == 0
    assert torch.equal(mask.column_dense(), cols)
    mask.check_columns()
    moved = mask.to("cpu")
    assert moved.q_len == 40 and moved.block_size == (16, 16) and torch.equal(moved.columns, mask.columns)


def test_mask_validation_messages():
    bm = BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool), 32, 32, 16)
    cols, counts = torch.zeros(1, 2, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    VerticalSlashMask(bm, cols, counts)
    with pytest.raises(ValueError, match="int32"):
        VerticalSlashMask(bm, cols.long(), counts)
    with pytest.raises(ValueError, match=r"\[B, H, C\]"):
        VerticalSlashMask(bm, cols[0], counts)
    with pytest.raises(ValueError, match="column_counts must be"):
        VerticalSlashMask(bm, cols, counts[:, :1])
    with pytest.raises(ValueError, match="disagree on heads"):
        VerticalSlashMask(bm, torch.zeros(1, 3, 4, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot be longer"):
        VerticalSlashMask(bm, torch.zeros(1, 2, 33, dtype=torch.int32), counts)
    bad = VerticalSlashMask(bm, torch.tensor([[[5, 3, 0, 0]] * 2], dtype=torch.int32), counts + 2)
    with pytest.raises(ValueError, match="ascending"):
        bad.check_columns()
    out_of_range = VerticalSlashMask(bm, torch.tensor([[[5, 32, 0, 0]] * 2], dtype=torch.int32), counts + 2)
    with pytest.raises(ValueError, match="kv_len"):
        out_of_range.check_columns()
    q, k, v = inputs(1, 2, 1, 32, 48, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"mask is for \(Sq, Sk\) = \(32, 32\)"):
        reference.vertical_slash_attention(q, k, v, VerticalSlashMask(bm, cols, counts))


# ------------------------------------------------------------------------------- CPU, under the interpreter
INTERP_CASES = [
    # (case, dtype)
    (CASES[0], torch.float32),
    (CASES[1], torch.float16),
    (CASES[2], torch.float32),
    (CASES[3], torch.float16),
]


@pytest.mark.parametrize("case,dtype", INTERP_CASES, ids=lambda x: case_id(x) if isinstance(x, tuple) else str(x)[6:])
def test_kernel_matches_reference(case, dtype, nan_empty):
    b, hq, hkv, sq, sk, d, bs, pad_lengths = case
    q, k, v = inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq + d)
    mask = random_mask(b, hq, sq, sk, bs, 0.3, 0.15, seed=sk)
    pad = left_padding(b, sk, pad_lengths) if pad_lengths else None
    check(q, k, v, mask, pad=pad)


def test_kernel_empty_rows_are_zero(nan_empty):
    """Query blocks with no listed block and only columns after their positions see nothing: zeros, not NaN."""
    sq = sk = 64
    q, k, v = inputs(1, 2, 1, sq, sk, 16, torch.float32, seed=3)
    blocks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    blocks[..., 2:, 0] = True  # query blocks 0 and 1 list nothing
    cols = torch.zeros(1, 2, sk, dtype=torch.bool)
    cols[..., [40, 41, 63]] = True  # after every row of query blocks 0-1 (and 2's first rows)
    mask = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, 16).to(DEVICE)
    out = check(q, k, v, mask)
    assert out[:, :, :32].abs().max() == 0
    assert out[:, :, 32:].abs().amax(-1).min() > 0  # later rows see block 0


@pytest.mark.parametrize("batch_heads", [(1, 1), (2, 1), (1, 4)], ids=["B1H1", "B2H1", "B1H4"])
def test_columns_inside_listed_blocks_count_once(batch_heads, nan_empty):
    """Columns that all lie inside listed blocks add nothing: the output is the block-sparse output."""
    b, h = batch_heads
    sq, sk, bs = 50, 80, 16
    q, k, v = inputs(2, 4, 2, sq, sk, 16, torch.float32, seed=6)
    g = torch.Generator().manual_seed(7)
    blocks = torch.rand(b, h, num_blocks(sq, bs), num_blocks(sk, bs), generator=g) < 0.5
    blocks[..., :, 1] = True  # key block 1 is listed for every query block
    cols = torch.zeros(b, h, sk, dtype=torch.bool)
    cols[..., [16, 20, 31]] = True  # all inside key block 1
    mask = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, bs).to(DEVICE)
    out = check(q, k, v, mask)
    block_only = block_sparse_reference.block_sparse_attention(q, k, v, mask.block_mask)
    torch.testing.assert_close(out, block_only, atol=2e-5, rtol=0)


def test_columns_only_and_beyond_causal_range(nan_empty):
    """No blocks at all: each row sees exactly the columns at or before its position."""
    sq, sk = 40, 70
    q, k, v = inputs(2, 2, 1, sq, sk, 16, torch.float32, seed=8)
    blocks = torch.zeros(1, 1, num_blocks(sq, 16), num_blocks(sk, 16), dtype=torch.bool)
    cols = torch.zeros(2, 1, sk, dtype=torch.bool)
    cols[0, 0, [0, 5, 31, 45, 60, 69]] = True  # 45..69: visible to some rows only (row r sits at r + 30)
    cols[1, 0, [50, 68]] = True
    mask = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, 16).to(DEVICE)
    pad = left_padding(2, sk, [3, 0])  # column 0 of batch row 0 is padding
    out = check(q, k, v, mask, pad=pad)
    torch.testing.assert_close(out.double(), brute_attention(q, k, v, mask, pad), atol=2e-5, rtol=0)
    assert out[1, :, : 50 - 30].abs().max() == 0  # batch row 1: rows before position 50 see nothing


def test_kernel_broadcast_masks_scale_and_many_columns(nan_empty):
    """One block list for all heads, per-head columns (more than a column tile), a custom scale, padding."""
    b, hq, hkv, sq, sk, bs = 2, 3, 3, 48, 90, 16
    q, k, v = inputs(b, hq, hkv, sq, sk, 16, torch.float16, seed=9)
    g = torch.Generator().manual_seed(10)
    blocks = torch.rand(1, 1, num_blocks(sq, bs), num_blocks(sk, bs), generator=g) < 0.3
    cols = torch.rand(b, hq, sk, generator=g) < 0.5  # ~45 columns: three chunks of 16
    mask = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, bs).to(DEVICE)
    check(q, k, v, mask, pad=left_padding(b, sk, [0, 33]), scale=0.3, config={"BLOCK_C": 16})


def test_kernel_reads_strided_views_in_place(nan_empty):
    """transformers hands q/k/v as [B, H, S, D] views of [B, S, H, D] projections."""
    b, hq, hkv, s, d = 2, 4, 2, 48, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, s, hq, d, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, generator=g).to(DEVICE).transpose(1, 2)
    check(q, k, v, random_mask(b, hq, s, s, 16, 0.4, 0.2, seed=12))


def test_very_long_block_list(nan_empty):
    """More than 2048 key blocks (2063 blocks of 16): the unmasked prefix is counted in chunks, and the column
    phase's binary search runs over a long list."""
    sq, sk = 20, 33_000
    q, k, v = inputs(1, 2, 1, sq, sk, 16, torch.float32, seed=16)
    g = torch.Generator().manual_seed(17)
    blocks = torch.rand(1, 2, num_blocks(sq, 16), num_blocks(sk, 16), generator=g) < 0.01
    cols = torch.zeros(1, 2, sk, dtype=torch.bool)
    cols[..., torch.randperm(sk, generator=g)[:20]] = True
    cols[..., 16 * blocks[0, 0, 0].nonzero()[:3, 0]] = True  # some columns inside listed blocks
    check(q, k, v, VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, 16).to(DEVICE))


def test_int64_offsets_variant(nan_empty):
    q, k, v = inputs(1, 2, 1, 40, 60, 16, torch.float16, seed=13)
    mask = random_mask(1, 2, 40, 60, 16, 0.4, 0.3, seed=14)
    out = tri.vertical_slash_attention(q, k, v, mask, config={"LARGE_INDEX": True})
    torch.testing.assert_close(out, tri.vertical_slash_attention(q, k, v, mask), atol=0, rtol=0)


def test_unsupported_inputs_and_dispatch(monkeypatch):
    q, k, v = inputs(1, 2, 1, 48, 48, 16, torch.float32)
    cols = torch.zeros(1, 1, 48, dtype=torch.bool)
    cols[..., [3, 30]] = True
    odd = VerticalSlashMask.from_dense_columns(torch.ones(1, 1, 2, 2, dtype=torch.bool), cols, 48, 48, 24).to(DEVICE)
    assert "powers of two" in tri.supports(q, odd)
    with pytest.raises(ValueError, match="powers of two"):
        tri.vertical_slash_attention(q, k, v, odd)
    monkeypatch.delenv("ATTNKIT_KERNELS", raising=False)  # auto: the reference for what the kernel cannot take
    torch.testing.assert_close(vertical_slash_attention(q, k, v, odd), reference.vertical_slash_attention(q, k, v, odd))

    mask = random_mask(1, 2, 48, 48, 16, 0.5, 0.2, seed=15)
    ref = reference.vertical_slash_attention(q, k, v, mask)
    for name in ("reference", "triton", "flex", "auto"):
        monkeypatch.setenv("ATTNKIT_KERNELS", name)
        torch.testing.assert_close(vertical_slash_attention(q, k, v, mask), ref, atol=2e-5, rtol=0)
    monkeypatch.setenv("ATTNKIT_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="ATTNKIT_KERNELS"):
        vertical_slash_attention(q, k, v, mask)


# --------------------------------------------------------------------------------- GPU: the full matrix
def minference_like_mask(b, h, sq, sk, block, n_columns, n_slash_blocks, seed, device=DEVICE) -> VerticalSlashMask:
    """Sink + local window + random diagonal (slash) bands as blocks, random vertical columns as tokens."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = num_blocks(sq, block), num_blocks(sk, block)
    off_blocks = (sk - sq) // block
    rows = torch.arange(qb)[:, None] + off_blocks
    cols = torch.arange(kb)[None, :]
    blocks = torch.zeros(b, h, qb, kb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            dist = torch.randint(2, max(3, kb), (n_slash_blocks,), generator=g)
            slash = torch.isin(rows - cols, dist)
            blocks[bi, hi] = (cols == 0) | ((rows - cols >= 0) & (rows - cols < 2)) | slash
    blocks &= causal_block_matrix(sq, sk, (block, block))
    column_dense = torch.zeros(b, h, sk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            column_dense[bi, hi, torch.randperm(sk, generator=g)[:n_columns]] = True
    return VerticalSlashMask.from_dense_columns(blocks, column_dense, sq, sk, block).to(device)


GPU_SHAPES = [
    # (B, Hq, Hkv, Sq, Sk)
    (1, 4, 4, 63, 63),  # GQA 1
    (2, 8, 2, 97, 130),  # GQA 4, Sq < Sk
    (1, 6, 2, 1025, 1025),  # GQA 3
    (2, 4, 1, 1000, 4097),  # chunked prefill, GQA 4
    (1, 8, 2, 4096, 4096),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}".format(*s))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_matrix(shape, d, block, dtype, nan_empty):
    b, hq, hkv, sq, sk = shape
    q, k, v = inputs(b, hq, hkv, sq, sk, d, dtype, seed=sq + d + block)
    mask = minference_like_mask(b, hq, sq, sk, block, n_columns=min(sk // 4, 300), n_slash_blocks=4, seed=block)
    pad = left_padding(b, sk, [0, sk // 3]) if b > 1 else None
    check(q, k, v, mask, pad=pad)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_random_masks(dtype, nan_empty):
    """Random lists (blocks above the diagonal, columns in listed blocks, empty query blocks), fp32 reference."""
    q, k, v = inputs(2, 8, 2, 1500, 2100, 128, dtype, seed=3)
    mask = random_mask(2, 8, 1500, 2100, 64, 0.2, 0.05, seed=4)
    check(q, k, v, mask, pad=left_padding(2, 2100, [0, 700]))


@gpu
@pytest.mark.gpu
def test_gpu_columns_equal_to_full_blocks_match_block_sparse(nan_empty):
    """Columns covering whole blocks give the block-sparse kernel's output on the union of blocks."""
    from attnkit.kernels.block_sparse import triton as block_sparse_triton

    sq = sk = 2048
    block = 128
    q, k, v = inputs(1, 8, 2, sq, sk, 128, torch.bfloat16, seed=5)
    g = torch.Generator().manual_seed(6)
    qb = num_blocks(sq, block)
    blocks = (torch.rand(1, 8, qb, qb, generator=g) < 0.2) & causal_block_matrix(sq, sk, (block, block))
    column_blocks = torch.rand(1, 8, qb, generator=g) < 0.2
    cols = column_blocks.repeat_interleave(block, -1)
    mask = VerticalSlashMask.from_dense_columns(blocks, cols, sq, sk, block).to(DEVICE)
    union = BlockMask.from_dense(blocks | column_blocks[:, :, None, :], sq, sk, block).to(DEVICE)
    out = check(q, k, v, mask)
    dense_ref = block_sparse_triton.block_sparse_attention(q, k, v, union)
    assert (out.float() - dense_ref.float()).abs().max() < 2e-2
