"""Quest's kernels against their PyTorch references: page scoring and sparse paged decode attention.

Triton runs under ``TRITON_INTERPRET=1`` on CPU (set by conftest), at tiny odd shapes, fp32/fp16/bf16 (the interpreter's
bf16 dot is wrong), with NaN-poisoned allocations so an unwritten row or split fails.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.kernels.page_bounds import reference as bounds_ref
from attnkit.kernels.page_scores import reference as score_ref
from attnkit.kernels.paged_decode import reference as attn_ref

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on a GPU machine the same tests run the compiled kernels
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
score_tri = pytest.importorskip("attnkit.kernels.page_scores.triton")
attn_tri = pytest.importorskip("attnkit.kernels.paged_decode.triton")
bounds_tri = pytest.importorskip("attnkit.kernels.page_bounds.triton")


def _bounds(keys: torch.Tensor, pad: list[int], page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force page min/max ``[B, H, pages, D]`` of keys ``[B, H, S, D]`` paged from each row's first real slot."""
    b, h, s, d = keys.shape
    pages = -(-(s - min(pad)) // page)
    lo = torch.full((b, h, pages, d), float("inf"), dtype=keys.dtype)
    hi = torch.full((b, h, pages, d), float("-inf"), dtype=keys.dtype)
    for r in range(b):
        for j in range(pages):
            chunk = keys[r, :, pad[r] + j * page : min(pad[r] + (j + 1) * page, s)]
            if chunk.shape[1]:
                lo[r, :, j], hi[r, :, j] = chunk.amin(1), chunk.amax(1)
    return lo, hi


SCORE_CASES = [  # (B, Hq, Hkv, pages, D)
    (1, 4, 4, 5, 16),
    (2, 6, 2, 37, 32),
    (3, 7, 1, 70, 64),
    (2, 9, 3, 129, 16),
]


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-P{}-D{}".format(*c))
def test_page_scores_triton_matches_reference(case, dtype, share, nan_empty):
    b, hq, hkv, pages, d = case
    g = torch.Generator().manual_seed(sum(case))
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    lo = torch.randn(b, hkv, pages, d, generator=g)
    hi = lo + torch.rand(b, hkv, pages, d, generator=g)
    lo, hi = lo.to(dtype), hi.to(dtype)
    valid = torch.randint(1, pages + 1, (b,), generator=g)
    q, lo, hi, valid = (t.to(DEVICE) for t in (q, lo, hi, valid))
    want = score_ref.page_scores(q, lo, hi, valid, share)
    got = score_tri.page_scores(q, lo, hi, valid, share)
    assert got.shape == want.shape == (b, hkv if share else hq, pages)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)
    # The index computation: the same top pages (random scores have no ties).
    k = max(1, int(valid.min()) // 2)
    assert torch.equal(got.topk(k).indices.sort().values, want.topk(k).indices.sort().values)


def test_page_scores_definition():
    """The reference is Σ_i max(q_i·M_i, q_i·m_i), the largest logit any key inside the bounds can reach."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, generator=g)
    keys = torch.randn(1, 2, 48, 8, generator=g)
    lo, hi = _bounds(keys, [0], 16)
    scores = score_ref.page_scores(q, lo, hi, torch.tensor([3]))
    logits = torch.einsum("bhd,bhsd->bhs", q, keys).view(1, 2, 3, 16)
    assert (scores + 1e-5 >= logits.amax(-1)).all()  # an upper bound of every key's logit
    brute = torch.stack([(q[0, h, None] * torch.where(q[0, h] >= 0, hi[0, h], lo[0, h])).sum(-1) for h in range(2)])
    torch.testing.assert_close(scores[0], brute)
    assert torch.isinf(score_ref.page_scores(q, lo, hi, torch.tensor([2]))[..., 2]).all()


ATTN_CASES = [  # (B, Hq, Hkv, S, D, page, K, pads)
    (1, 2, 2, 33, 16, 16, 2, [0]),
    (2, 6, 2, 97, 32, 16, 3, [0, 21]),
    (3, 7, 1, 130, 16, 8, 5, [5, 0, 64]),
    (2, 4, 4, 63, 64, 4, 6, [0, 3]),
    (1, 3, 3, 257, 16, 32, 0, [0]),
]


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize(
    ("dtype", "splits"),
    [(torch.float32, None), (torch.float32, 1), (torch.float32, 3), (torch.float16, None), (torch.bfloat16, 3)],
    ids=["fp32-auto", "fp32-1split", "fp32-3splits", "fp16-auto", "bf16-3splits"],
)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-S{}-D{}-P{}-K{}".format(*c[:7]))
def test_sparse_decode_triton_matches_reference(case, dtype, share, splits, nan_empty):
    b, hq, hkv, s, d, page, k, pads = case
    g = torch.Generator().manual_seed(s + k)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    # Keys/values as a view of a longer buffer (what the Quest cache returns).
    key = torch.randn(b, hkv, s + 5, d, generator=g).to(dtype)[:, :, :s]
    value = torch.randn(b, hkv, s + 5, d, generator=g).to(dtype)[:, :, :s]
    pad = torch.tensor(pads)
    heads = hkv if share else hq
    last = -(-(s - pad) // page) - 1
    pages = torch.full((b, heads, k), -1, dtype=torch.long)
    for r in range(b):
        for h in range(heads):
            n = min(k, int(last[r]))
            pages[r, h, :n] = torch.randperm(int(last[r]), generator=g)[:n]
    if k:
        pages[0, 0, -1] = int(last[0])  # a repeat of the last page is ignored
    q, key, value, pages, pad = (t.to(DEVICE) for t in (q, key, value, pages, pad))
    want = attn_ref.sparse_decode_attention(q, key, value, pages, page, pad, scale=0.3)
    got = attn_tri.sparse_decode_attention(q, key, value, pages, page, pad, scale=0.3, num_splits=splits)
    assert not got.isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_sparse_decode_with_device_seq_len_reads_only_filled_slots(share, nan_empty):
    """A fixed-capacity cache (CUDA-graph decode): keys/values span the whole capacity, NaN past the filled slots,
    and ``seq_len`` (a device tensor) says how many are filled: the same output as the filled slots alone, where the
    last page is partial and listed pages past it (fillers a top-k over the capacity returns) are ignored."""
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, d, page, cap, filled = 2, 6, 2, 32, 4, 40, 27
    pad = torch.tensor([0, 5])
    q = torch.randn(b, hq, d, generator=g)
    key = torch.full((b, hkv, cap, d), float("nan"))
    value = torch.full((b, hkv, cap, d), float("nan"))
    key[:, :, :filled] = torch.randn(b, hkv, filled, d, generator=g)
    value[:, :, :filled] = torch.randn(b, hkv, filled, d, generator=g)
    heads = hkv if share else hq
    pages = torch.stack([torch.randperm(cap // page, generator=g)[:4] for _ in range(b * heads)]).view(b, heads, 4)
    q, key, value, pages, pad = (t.to(DEVICE) for t in (q, key, value, pages, pad))
    n = torch.tensor([filled], dtype=torch.int32, device=DEVICE)
    want = attn_ref.sparse_decode_attention(q, key[:, :, :filled], value[:, :, :filled], pages, page, pad, 0.3)
    for mod in (attn_ref, attn_tri):
        got = mod.sparse_decode_attention(q, key, value, pages, page, pad, 0.3, seq_len=n)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_decode_reference_is_softmax_over_chosen_tokens():
    """Row with padding 3, pages of 4: the attended slots are exactly pad + page·4 + t of the listed and last pages."""
    g = torch.Generator().manual_seed(1)
    q, key, value = torch.randn(1, 1, 8, generator=g), torch.randn(1, 1, 17, 8, generator=g), torch.randn(1, 1, 17, 8, generator=g)
    pages = torch.tensor([[[1, -1, 7]]])  # 7 ≥ last (3): ignored; -1 ignored
    mask = attn_ref.attended_tokens(pages, 4, torch.tensor([3]), 17)
    assert mask[0, 0].nonzero().flatten().tolist() == [7, 8, 9, 10, 15, 16]
    out = attn_ref.sparse_decode_attention(q, key, value, pages, 4, torch.tensor([3]))
    idx = torch.tensor([7, 8, 9, 10, 15, 16])
    probs = torch.softmax(q[0, 0] @ key[0, 0, idx].T * 8**-0.5, -1)
    torch.testing.assert_close(out[0, 0], probs @ value[0, 0, idx])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("batch,length", [(1, 32769), (4, 8191)], ids=["B1-S32769", "B4-S8191"])
def test_gpu_llama3_shape(batch, length, share, nan_empty):
    """bf16 at the Llama-3-8B shape (32 q / 8 kv heads, d 128), page 16, budget 2048, left padding."""
    g = torch.Generator(device="cuda").manual_seed(length)
    hq, hkv, d, page, k = 32, 8, 128, 16, 127
    q = torch.randn(batch, hq, d, generator=g, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(batch, length, hkv, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    value = torch.randn(batch, length, hkv, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    pad = torch.arange(batch, device="cuda", dtype=torch.int32) * 37
    pages_n = -(-(length - int(pad.max())) // page)
    lo = torch.randn(batch, hkv, pages_n, d, generator=g, device="cuda").to(torch.bfloat16)
    hi = (lo.float() + torch.rand(batch, hkv, pages_n, d, generator=g, device="cuda")).to(torch.bfloat16)
    valid = (length - pad + page - 1) // page - 1
    want = score_ref.page_scores(q, lo, hi, valid, share)
    got = score_tri.page_scores(q, lo, hi, valid, share)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-3)
    chosen = want.topk(k, dim=-1).indices
    assert torch.equal(score_tri.top_pages(want, k).long().sort(-1).values, chosen.sort(-1).values)
    ref = attn_ref.sparse_decode_attention(q, key, value, chosen, page, pad)
    out = attn_tri.sparse_decode_attention(q, key, value, chosen, page, pad)
    # bf16 output: within 2x the reference's own bf16 rounding
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 8e-3, err


@pytest.mark.parametrize(("rows", "pages", "k"), [(3, 37, 5), (2, 129, 1), (4, 1000, 127), (1, 70, 69), (2, 16, 0)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("kernel", ["bitwise", "bitpairs", "radix", "bounded"])
def test_top_pages_triton_matches_reference(rows, pages, k, kernel, nan_empty):
    g = torch.Generator().manual_seed(pages + k)
    scores = torch.randn(rows, pages, generator=g)
    scores[0, -3:] = float("-inf")  # pages that do not exist in a row
    scores[-1, :4] = -scores[-1, :4].abs()  # negative scores order correctly too
    scores = scores.to(DEVICE)
    got = score_tri.top_pages(scores, k, kernel)
    want = score_ref.top_pages(scores, k)
    assert got.shape == want.shape == (rows, k)
    assert torch.equal(got.long().sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("kernel", ["bitwise", "bitpairs", "radix", "bounded"])
def test_top_pages_with_ties_takes_exactly_k(kernel):
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, -1.0, 2.0], [float("-inf")] * 6 + [0.5]], device=DEVICE)
    got = score_tri.top_pages(scores, 5, kernel)
    assert got.shape == (2, 5)
    assert got[0].tolist() == [0, 1, 2, 3, 6]  # the four 2.0s and the 1.0
    assert sorted(got[1].tolist())[-1] == 6 and len(set(got[1].tolist())) == 5  # distinct, the only finite one in
    assert score_tri.top_pages(scores[:, :3], 3, kernel).shape == (2, 3)


@pytest.mark.parametrize("kernel", ["bitpairs", "radix", "bounded"])
def test_top_pages_keys_differing_only_in_low_bytes(kernel):
    """Scores whose order is decided in the last byte of their keys: every pass must narrow correctly."""
    base = torch.tensor(1.0).view(torch.int32).item()
    bits = torch.tensor([base + i * 37 % 251 for i in range(300)], dtype=torch.int32)  # 1.0 plus a few ulps
    scores = bits.view(torch.float32)[None].to(DEVICE)
    for k in (1, 7, 150, 299):
        got = score_tri.top_pages(scores, k, kernel).long().sort(-1).values
        assert torch.equal(scores[0, got[0]].sort().values, scores[0].topk(k).values.sort().values)


@pytest.mark.parametrize("kind", ["ties", "wide", "narrow", "padded"])
def test_top_pages_bounded_search_matches_reference(kind, nan_empty):
    """The bounded search starts below the bits its bounds share and stops once exactly k keys remain: rows whose
    k-th key is tied (no early stop), spans many binades (few shared bits), sits in a narrow band (many), or is
    -inf (pages past a row's end) must all select what torch.topk selects."""
    g = torch.Generator().manual_seed(11)
    rows, pages = 6, 301
    if kind == "ties":
        scores = torch.randint(-3, 4, (rows, pages), generator=g).float()
    elif kind == "wide":
        scores = torch.randn(rows, pages, generator=g) * torch.logspace(-6, 6, pages)[torch.randperm(pages, generator=g)]
    elif kind == "narrow":
        scores = 100.0 + 1e-4 * torch.randn(rows, pages, generator=g)
    else:
        scores = torch.randn(rows, pages, generator=g)
        scores[:, 40:] = float("-inf")
    scores = scores.to(DEVICE)
    for k in (1, 17, 64, 100, 300):
        got = score_tri.top_pages(scores, k, "bounded").long()
        assert got.shape == (rows, k) and all(len(set(r)) == k for r in got.tolist())
        # Ties may resolve to other pages than torch.topk's: compare the selected values.
        assert torch.equal(scores.gather(1, got).sort(-1).values, scores.topk(k, dim=-1).values.sort(-1).values)


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize(("hq", "hkv", "page", "cands"), [(6, 2, 4, 5), (3, 3, 16, 37), (8, 1, 8, 17)],
                         ids=["gqa3-p4", "mha-p16", "mqa-p8"])
def test_candidate_page_max_triton_matches_reference(hq, hkv, page, cands, share, nan_empty):
    """Quest's rerank: the true largest logit of shortlisted pages. Keys past the filled slots are NaN (a
    fixed-capacity buffer): only complete pages may be read; -1 and pages at or past the row's last score -inf."""
    g = torch.Generator().manual_seed(hq * page + cands)
    b, d, s, filled = 2, 32, 120, 97
    pad = torch.tensor([0, 7])
    key = torch.full((b, hkv, s, d), float("nan"))
    key[:, :, :filled] = torch.randn(b, hkv, filled, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    valid = (filled - pad + page - 1) // page - 1
    heads = hkv if share else hq
    pages = -(-s // page)
    cand = torch.stack([torch.randperm(pages, generator=g)[:cands] for _ in range(b * heads)]).view(b, heads, -1)
    cand[0, 0, 0] = -1
    q, key, pad, cand, valid = (t.to(DEVICE) for t in (q, key, pad, cand, valid))
    want = score_ref.candidate_page_max(q, key, pad, page, cand, valid, share)
    got = score_tri.candidate_page_max(q, key, pad, page, cand, valid, share)
    assert not got.isnan().any() and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    {"block_p": 16, "warps": 4, "stages": 1, "waves": 0},
    {"block_p": 16, "warps": 4, "stages": 2, "waves": 1},
    {"block_p": 32, "warps": 8, "stages": 3, "waves": 4},
], ids=["one-tile", "loop-1-wave", "default"])
def test_page_scores_launch_settings_agree(config, nan_empty):
    """Every launch setting the benchmark sweeps computes the same scores (programs looping over several tiles,
    a tail tile, pages past the valid ones)."""
    g = torch.Generator().manual_seed(5)
    b, hq, hkv, pages, d = 2, 6, 2, 203, 32
    q = torch.randn(b, hq, d, generator=g).to(DEVICE)
    lo = torch.randn(b, hkv, pages, d, generator=g)
    hi = (lo + torch.rand(b, hkv, pages, d, generator=g)).to(DEVICE)
    lo = lo.to(DEVICE)
    valid = torch.tensor([203, 150], device=DEVICE)
    for share in (False, True):
        want = score_ref.page_scores(q, lo, hi, valid, share)
        got = torch.full_like(want, float("nan"))
        score_tri._launch_scores(q, lo, hi, valid, got, share, **config)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- 8-bit page bounds
def _wide_bounds(g: torch.Generator, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Page bounds with channels of very different magnitudes (as RoPE'd keys have), some all-zero pages and some
    single-token pages (min == max)."""
    lo = torch.randn(*shape, generator=g) * torch.logspace(-3, 1.5, shape[-1])[torch.randperm(shape[-1], generator=g)]
    hi = lo + torch.rand(*shape, generator=g) * lo.abs()
    hi[..., 1, :] = lo[..., 1, :]
    lo[..., 2, :] = hi[..., 2, :] = 0.0
    return lo, hi


def test_quantize_bounds_rounds_outward_by_at_most_one_step():
    g = torch.Generator().manual_seed(0)
    lo, hi = _wide_bounds(g, 3, 4, 9, 64)
    q_min, q_max, scale = bounds_ref.quantize_bounds(lo, hi)
    assert q_min.dtype == q_max.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 4, 9)
    assert q_min.abs().max() <= 127 and q_max.abs().max() <= 127
    s = scale.double()[..., None]
    up, down = q_max.double() * s, q_min.double() * s
    assert (up >= hi.double()).all() and (down <= lo.double()).all()  # exact: still bounds
    assert (up - hi.double() <= s * 1.0001).all() and (lo.double() - down <= s * 1.0001).all()  # one step at most
    assert (q_min[..., 2, :] == 0).all() and (q_max[..., 2, :] == 0).all()  # an all-zero page stays zero
    # bf16 bounds quantize from their exact values too
    q_min16, q_max16, scale16 = bounds_ref.quantize_bounds(lo.bfloat16(), hi.bfloat16())
    assert (q_max16.double() * scale16.double()[..., None] >= hi.bfloat16().double()).all()
    assert (q_min16.double() * scale16.double()[..., None] <= lo.bfloat16().double()).all()


@pytest.mark.parametrize("length_on_device", [False, True], ids=["host-length", "device-length"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fold_last_token_int8_triton_matches_reference(dtype, length_on_device):
    """Decode tokens folded into the bounds and their 8-bit copy (pages opened and tightened, padded rows), NaN /
    −128 poisoned copies: Triton equals the reference (the GPU's division may round a quotient on the other side of
    an integer: then the value may differ by one step, and must still bound)."""
    g = torch.Generator().manual_seed(2)
    b, h, d, page, cap = 3, 2, 48, 4, 40
    pad = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE)
    keys = (torch.randn(b, h, cap, d, generator=g) * 4).to(dtype).to(DEVICE)
    state = {}
    for name, mod in (("ref", bounds_ref), ("tri", bounds_tri)):
        lo = torch.full((b, h, cap // page + 2, d), float("nan"), dtype=dtype, device=DEVICE)
        hi = lo.clone()
        q = (torch.full_like(lo, -128, dtype=torch.int8), torch.full_like(lo, -128, dtype=torch.int8),
             torch.full(lo.shape[:3], float("nan"), device=DEVICE))
        last = torch.full((b,), -1, dtype=torch.int32, device=DEVICE)
        for length in range(7, 30):  # every row's first real token is at slot pad ≤ 6 < 7
            if length == 7:  # the prefill's bounds, per row
                for r in range(b):
                    n = -(-(length - 1 - int(pad[r])) // page)
                    for j in range(n):
                        chunk = keys[r, :, int(pad[r]) + j * page : min(int(pad[r]) + (j + 1) * page, length - 1)]
                        lo[r, :, j], hi[r, :, j] = chunk.amin(1), chunk.amax(1)
                        q[0][r, :, j], q[1][r, :, j], q[2][r, :, j] = bounds_ref.quantize_bounds(lo[r, :, j], hi[r, :, j])
            n = torch.tensor([length], dtype=torch.int32, device=DEVICE) if length_on_device else length
            mod.fold_last_token(keys, lo, hi, last, n, pad, page, q)
        state[name] = (lo, hi, *q, last)
    ref, tri = state["ref"], state["tri"]
    for r in range(b):
        n = -(-(29 - int(pad[r])) // page)
        assert torch.equal(tri[0][r, :, :n], ref[0][r, :, :n]) and torch.equal(tri[1][r, :, :n], ref[1][r, :, :n])
        assert torch.equal(tri[5], ref[5])  # last page
        assert torch.equal(tri[4][r, :, :n], ref[4][r, :, :n])  # scales
        assert (tri[2][r, :, :n].int() - ref[2][r, :, :n].int()).abs().max() <= (0 if not CUDA else 1)
        assert (tri[3][r, :, :n].int() - ref[3][r, :, :n].int()).abs().max() <= (0 if not CUDA else 1)
        s = tri[4][r, :, :n].double()[..., None]
        assert (tri[3][r, :, :n].double() * s >= ref[1][r, :, :n].double()).all()
        assert (tri[2][r, :, :n].double() * s <= ref[0][r, :, :n].double()).all()


@pytest.mark.parametrize("length_on_device", [False, True], ids=["host-length", "device-length"])
@pytest.mark.parametrize("int8", [False, True], ids=["bounds", "int8-bounds"])
@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
def test_page_scores_with_fold_matches_fold_then_scores(share, int8, length_on_device, nan_empty):
    """``page_scores(fold=...)``: the decode token's bounds update runs inside the scoring launch. Over a run of
    decode steps (pages opened, tightened, completed and then scored; padded rows; a score tile count that makes
    several programs per row), the Triton kernel's bounds, 8-bit copy, last pages and scores equal the reference's
    fold followed by its scores."""
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, d, page, cap = 3, 6, 2, 32, 4, 300
    pad = torch.tensor([0, 5, 2], dtype=torch.int32, device=DEVICE)
    keys = torch.randn(b, hkv, cap, d, generator=g).to(DEVICE)
    pages = cap // page + 1
    state = {}
    for name, mod in (("ref", score_ref), ("tri", score_tri)):
        start = 250  # bounds of the pages before the first decode step, from their definition
        lo = torch.full((b, hkv, pages, d), float("nan"), device=DEVICE)
        hi = lo.clone()
        q8 = (torch.full_like(lo, -128, dtype=torch.int8), torch.full_like(lo, -128, dtype=torch.int8),
              torch.full(lo.shape[:3], float("nan"), device=DEVICE)) if int8 else None
        for r in range(b):
            n = -(-(start - int(pad[r])) // page)
            blo, bhi = _bounds(keys[r : r + 1, :, : start], [int(pad[r])], page)
            lo[r, :, :n], hi[r, :, :n] = blo[0, :, :n], bhi[0, :, :n]
            if int8:
                q8[0][r, :, :n], q8[1][r, :, :n], q8[2][r, :, :n] = bounds_ref.quantize_bounds(lo[r, :, :n], hi[r, :, :n])
        last = torch.full((b,), -1, dtype=torch.int32, device=DEVICE)
        scores = []
        for length in range(start + 1, start + 11):
            q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(length)).to(DEVICE)
            n = torch.tensor([length], device=DEVICE) if length_on_device else length
            fold = bounds_ref.PendingFold(keys, lo, hi, last, n, pad, page, q8)
            bounds = (q8[0], q8[1]) if int8 else (lo, hi)
            scores.append(mod.page_scores(q, *bounds, last, share, q8[2] if int8 else None, 1.0, fold))
        state[name] = (lo, hi, last, scores, q8)
    (lo, hi, last, scores, q8), (tlo, thi, tlast, tscores, tq8) = state["ref"], state["tri"]
    assert torch.equal(tlast, last)
    for r in range(b):
        n = int(last[r]) + 1
        assert torch.equal(tlo[r, :, :n], lo[r, :, :n]) and torch.equal(thi[r, :, :n], hi[r, :, :n])
        if int8:
            assert torch.equal(tq8[2][r, :, :n], q8[2][r, :, :n])
            assert (tq8[1][r, :, :n].int() - q8[1][r, :, :n].int()).abs().max() <= (0 if not CUDA else 1)
    for got, want in zip(tscores, scores, strict=True):
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"fold\.last_page"):
        score_ref.page_scores(q, lo, hi, last.clone(), share, None, 1.0, bounds_ref.PendingFold(
            keys, lo, hi, last, 260, pad, page))


@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-P{}-D{}".format(*c))
def test_page_scores_int8_triton_matches_reference(case, dtype, share, nan_empty):
    """Scores from 8-bit bounds: Triton equals the reference (which dequantizes), and both bound the scores of the
    exact bounds from above."""
    b, hq, hkv, pages, d = case
    if dtype == torch.bfloat16 and not CUDA:
        dtype = torch.float32  # the interpreter's bf16 dot is wrong; bf16 runs on a GPU
    g = torch.Generator().manual_seed(pages)
    lo, hi = _wide_bounds(g, b, hkv, pages, d)
    q = torch.randn(b, hq, d, generator=g).to(dtype).to(DEVICE)
    q_min, q_max, scale = (t.to(DEVICE) for t in bounds_ref.quantize_bounds(lo, hi))
    valid = torch.randint(1, pages + 1, (b,), generator=g).to(DEVICE)
    want = score_ref.page_scores(q, q_min, q_max, valid, share, scale)
    got = score_tri.page_scores(q, q_min, q_max, valid, share, scale)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)
    exact = score_ref.page_scores(q, lo.to(DEVICE), hi.to(DEVICE), valid, share)
    assert (want[finite] >= exact[finite] - 1e-4).all()


@pytest.mark.parametrize("slack", [0.0, 0.5])
@pytest.mark.parametrize("int8", [False, True], ids=["bounds", "int8-bounds"])
@pytest.mark.parametrize("share", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SCORE_CASES[1:3], ids=lambda c: "B{}-Hq{}-Hkv{}-P{}-D{}".format(*c))
def test_page_scores_slack_triton_matches_reference(case, dtype, share, int8, slack, nan_empty):
    """``slack`` < 1 (``q·c + slack·|q|·r``): the kernel's mixed query rows give the reference's scores (bf16: the
    mixed rows are rounded once to bf16, so to bf16 precision) and the same top pages."""
    b, hq, hkv, pages, d = case
    if dtype == torch.bfloat16 and not CUDA:
        dtype = torch.float32  # the interpreter's bf16 dot is wrong; bf16 runs on a GPU
    g = torch.Generator().manual_seed(pages + int(10 * slack))
    lo, hi = _wide_bounds(g, b, hkv, pages, d)
    q = torch.randn(b, hq, d, generator=g).to(dtype).to(DEVICE)
    valid = torch.randint(1, pages + 1, (b,), generator=g).to(DEVICE)
    if int8:
        bounds = [t.to(DEVICE) for t in bounds_ref.quantize_bounds(lo, hi)]
    else:
        bounds = [lo.to(dtype).to(DEVICE), hi.to(dtype).to(DEVICE), None]
    want = score_ref.page_scores(q, bounds[0], bounds[1], valid, share, bounds[2], slack=slack)
    got = score_tri.page_scores(q, bounds[0], bounds[1], valid, share, bounds[2], slack=slack)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    finite = torch.isfinite(want)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-1}
    torch.testing.assert_close(got[finite], want[finite], **tol)
    if dtype == torch.float32:
        k = max(1, int(valid.min()) // 2)
        assert torch.equal(got.topk(k).indices.sort().values, want.topk(k).indices.sort().values)


def test_page_scores_slack_definition():
    """slack 1 is the bound itself; slack 0 is the logit of each channel range's centre; in between the score grows
    linearly with slack, by |q|·r; and a slack outside [0, 1] is refused."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 8, generator=g)
    keys = torch.randn(1, 2, 48, 8, generator=g)
    lo, hi = _bounds(keys, [0], 16)
    valid = torch.tensor([3])
    bound = score_ref.page_scores(q, lo, hi, valid)
    torch.testing.assert_close(score_ref.page_scores(q, lo, hi, valid, slack=1.0), bound)
    qk = q.view(1, 2, 2, 1, 8)
    centre = (qk * ((hi + lo) / 2)[:, :, None]).sum(-1).reshape(1, 4, 3)
    spread = (qk.abs() * ((hi - lo) / 2)[:, :, None]).sum(-1).reshape(1, 4, 3)
    torch.testing.assert_close(score_ref.page_scores(q, lo, hi, valid, slack=0.0), centre)
    torch.testing.assert_close(score_ref.page_scores(q, lo, hi, valid, slack=0.3), centre + 0.3 * spread)
    torch.testing.assert_close(bound, centre + spread)  # the bound = centre + the whole slack
    with pytest.raises(ValueError, match="slack must be in"):
        score_ref.page_scores(q, lo, hi, valid, slack=1.2)


def test_page_scores_int8_input_errors():
    q = torch.randn(1, 2, 16)
    lo = torch.zeros(1, 1, 3, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="need their page_scale"):
        score_ref.page_scores(q, lo, lo, torch.tensor([3]))
    with pytest.raises(ValueError, match="page_scale must be float32"):
        score_ref.page_scores(q, lo, lo, torch.tensor([3]), False, torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="must be int8"):
        score_ref.page_scores(q, lo.float(), lo.float(), torch.tensor([3]), False, torch.ones(1, 1, 3))
