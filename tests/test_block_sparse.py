"""BlockMask and the reference block-sparse attention against an independent dense oracle."""

from __future__ import annotations

import pytest
import torch

from attnkit.kernels import BlockMask, block_sparse_attention, causal_block_matrix
from attnkit.kernels.block_mask import num_blocks
from attnkit.kernels.block_sparse import flex, reference

# fp32 reference vs an fp64 oracle: both exact softmax attention, differences are rounding only.
ATOL = 2e-5


def oracle(q, k, v, blocks, block_size, key_padding=None, scale=None):
    """Dense fp64 attention with an explicit token mask; K/V expanded the slow, obvious way."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bq, bk = block_size
    kx = k.double().repeat_interleave(hq // hkv, dim=1)
    vx = v.double().repeat_interleave(hq // hkv, dim=1)
    allowed = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    blocks = blocks.expand(b, hq, -1, -1)
    for r in range(sq):
        for j in range(sk):
            allowed[:, :, r, j] = blocks[:, :, r // bq, j // bk] & (j <= r + sk - sq)
    if key_padding is not None:
        allowed &= key_padding[:, None, None, :]
    scores = q.double() @ kx.transpose(-1, -2) * (scale if scale is not None else d**-0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ vx


def random_blocks(b, h, sq, sk, bs, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, num_blocks(sq, bs[0]), num_blocks(sk, bs[1]), generator=g) < density


CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, block)
    (1, 4, 4, 63, 63, 16, (16, 16)),  # MHA, odd length
    (2, 6, 2, 97, 97, 32, (32, 32)),  # GQA 3
    (2, 7, 1, 97, 130, 16, (16, 16)),  # GQA 7 (MQA), Sq < Sk (chunked prefill)
    (1, 3, 1, 1, 77, 16, (16, 16)),  # decode: one query
    (3, 4, 2, 40, 100, 8, (16, 32)),  # different q/k block sizes
]


def case_id(c):
    b, hq, hkv, sq, sk, d, bs = c
    return f"B{b}-Hq{hq}-Hkv{hkv}-Sq{sq}-Sk{sk}-D{d}-bs{bs[0]}x{bs[1]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_reference_matches_oracle(case, density, nan_empty):
    b, hq, hkv, sq, sk, d, bs = case
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    blocks = random_blocks(b, hq, sq, sk, bs, density, seed=2)
    mask = BlockMask.from_dense(blocks, sq, sk, bs)
    out = reference.block_sparse_attention(q, k, v, mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), oracle(q, k, v, blocks, bs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2), (7, 1)], ids=["gqa1", "gqa3", "gqa7"])
def test_left_padding_and_scale(hq, hkv, nan_empty):
    b, sq, sk, d, bs = 3, 50, 70, 16, (16, 16)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g), torch.randn(b, hkv, sk, d, generator=g)
    pad = torch.ones(b, sk, dtype=torch.bool)
    pad[1, :13] = False
    pad[2, :40] = False
    blocks = random_blocks(1, 1, sq, sk, bs, 0.6, seed=4)
    mask = BlockMask.from_dense(blocks, sq, sk, bs)
    out = block_sparse_attention(q, k, v, mask, scale=0.3, key_padding_mask=pad)
    torch.testing.assert_close(out.double(), oracle(q, k, v, blocks, bs, pad, scale=0.3), atol=ATOL, rtol=0)


def test_empty_rows_are_zero_not_nan(nan_empty):
    q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    blocks = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    blocks[0, 0, 1, 0] = True  # one block in one row of one head; everything else empty
    out = block_sparse_attention(q, k, v, BlockMask.from_dense(blocks, 32, 32, 16))
    assert not out.isnan().any()
    assert out[0, 1].abs().max() == 0 and out[0, 0, :16].abs().max() == 0
    assert out[0, 0, 16:].abs().max() > 0


def test_full_mask_equals_sdpa():
    q, k, v = torch.randn(2, 6, 97, 16), torch.randn(2, 2, 97, 16), torch.randn(2, 2, 97, 16)
    blocks = torch.ones(1, 1, num_blocks(97, 32), num_blocks(97, 32), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, BlockMask.from_dense(blocks, 97, 97, 32))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_blockmask_round_trips():
    blocks = random_blocks(2, 3, 97, 130, (32, 32), 0.5, seed=5)
    mask = BlockMask.from_dense(blocks, 97, 130, 32)
    assert mask.kv_num_blocks.dtype == torch.int32 and mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.to_dense(), blocks)
    # Indices are ascending in the valid slots.
    for bi in range(2):
        for h in range(3):
            for i in range(mask.shape[2]):
                n = int(mask.kv_num_blocks[bi, h, i])
                idx = mask.kv_indices[bi, h, i, :n]
                assert torch.equal(idx, torch.nonzero(blocks[bi, h, i]).flatten().int())
    flex = mask.to_flex()
    assert torch.equal(BlockMask.from_flex(flex).to_dense(), blocks)


def test_causal_block_matrix_and_density():
    vis = causal_block_matrix(64, 64, (16, 16))
    assert torch.equal(vis, torch.ones(4, 4, dtype=torch.bool).tril())
    # Sq < Sk: the queries are the last 16 of 64 keys, so their single block sees every key block.
    assert causal_block_matrix(16, 64, (16, 16)).all()
    # Offset not a multiple of the block: query block 0 holds positions 30..45, so key blocks 0-2 but not 3.
    assert causal_block_matrix(20, 50, (16, 16))[0].tolist() == [True, True, True, False]
    full = BlockMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16)
    assert full.density() == 1.0
    diag = BlockMask.from_dense(torch.eye(4, dtype=torch.bool)[None, None], 64, 64, 16)
    assert diag.density() == pytest.approx(4 / 10)


def test_bad_shapes_are_rejected():
    q, k = torch.randn(1, 5, 16, 8), torch.randn(1, 2, 16, 8)
    mask = BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, 16, 16)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        block_sparse_attention(q, k, k, mask)
    with pytest.raises(ValueError, match="block_mask is for"):
        block_sparse_attention(torch.randn(1, 4, 8, 8), k, k, mask)
    with pytest.raises(ValueError, match="q_len"):
        BlockMask.from_dense(torch.ones(1, 1, 2, 1, dtype=torch.bool), 32, 16, 16)


def test_flex_backend_matches_reference():
    b, hq, hkv, sq, sk, d, bs = 2, 4, 2, 64, 96, 16, (32, 32)
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    blocks = random_blocks(b, hq, sq, sk, bs, 0.5, seed=6)
    blocks[..., 0] = True  # FlexAttention and the reference agree on empty rows too, but keep this about values
    pad = torch.ones(b, sk, dtype=torch.bool)
    pad[1, :20] = False
    mask = BlockMask.from_dense(blocks, sq, sk, bs)
    try:
        out = flex.block_sparse_attention(q, k, v, mask, key_padding_mask=pad)
    except Exception as err:  # FlexAttention's CPU path depends on the torch build
        pytest.skip(f"FlexAttention does not run here: {err}")
    ref = reference.block_sparse_attention(q, k, v, mask, key_padding_mask=pad)
    rows_seen = (ref.abs().sum(-1) > 0)
    torch.testing.assert_close(out[rows_seen], ref[rows_seen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq, sk, bs, rows", [(150, 150, 16, 1), (150, 150, 16, 3), (37, 200, 16, 2), (70, 70, 64, 5)])
def test_dense_last_rows_equal_their_definition(sq, sk, bs, rows):
    blocks = random_blocks(2, 3, sq, sk, (bs, bs), 0.3, seed=rows)
    base = BlockMask.from_dense(blocks, sq, sk, bs)
    got = base.with_dense_last_rows(rows)
    qb = num_blocks(sq, bs)
    want = blocks.clone()
    last = torch.arange(qb) >= qb - rows
    want[:, :, last] = causal_block_matrix(sq, sk, (bs, bs))[last]
    assert torch.equal(got.to_dense(), want)
    # the lists stay well formed: zero padding after each count; the input is untouched
    slot = torch.arange(got.shape[-1])
    assert torch.all(torch.where(slot >= got.kv_num_blocks[..., None], got.kv_indices, 0) == 0)
    assert torch.equal(base.to_dense(), blocks)


def test_dense_last_rows_of_a_broadcast_mask_do_not_write_through():
    causal = causal_block_matrix(100, 100, (16, 16))
    eye = torch.eye(causal.shape[0], dtype=torch.bool)
    shared = BlockMask.from_dense(eye[None, None], 100, 100, 16)
    wide = shared.expand(2, 4).with_dense_last_rows(2)
    assert wide.shape[:2] == (2, 4)
    assert torch.equal(shared.to_dense()[0, 0], eye)
    assert torch.equal(wide.to_dense()[1, 3, -2:], causal[-2:])
    assert shared.with_dense_last_rows(0) is shared
