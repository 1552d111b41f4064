"""XAttention's antidiagonal block scoring in Triton, reading q/k in place (no fp32 copies, no repeat_kv).

Same signature and semantics as :func:`attnkit.kernels.antidiagonal.reference.antidiagonal_block_scores`.

Reduced row ``n`` of a query head is the concatenation of its tile's ``s`` query vectors in reverse order, reduced
key tile ``m`` the concatenation of its ``s`` key vectors in order; their dot product is the antidiagonal sum
``Σ_t q[n·s + s-1-t] · k[m·s + t]``. The kernel never builds the concatenations: a ``[BLOCK_M, BLOCK_N]`` tile of
reduced logits is ``s`` tensor-core dots of ``[BLOCK_M, D]`` row sets (rows ``n·s + s-1-t``) by ``[D, BLOCK_N]`` key
sets (keys ``m·s + t``), accumulated in fp32. Padding keys, padding query rows and rows/keys past the sequence are
loaded as zeros, which is what the reference's zeroed, padded copies contribute.

One program owns ``BLOCK_M`` reduced rows (whole query blocks) of one query head and computes each logit tile
once, only for the key tiles left of its causal edge (nothing right of it is computed). Per key step of
``BLOCK_N`` tiles it updates the online row max ``m`` and row sum ``l`` of ``exp2`` (log2 e folded into the scale)
and writes to fp32 scratch, per row, the step's running max and the row's ``exp2(x - m)`` summed per key block.
After the last step the program reads its scratch back, rescales each entry by ``exp2(m_step - m_final) / l`` and
sums the rows of each query block: the softmax-normalized block sums, written for every key block of the
program's query blocks (zeros where nothing is visible, so no memset is needed). The scratch holds
``rows × key blocks`` floats per (batch, head), ``1/stride`` of the reduced logits; (batch, head) pairs are
launched in groups whose scratch fits :data:`SCRATCH_BYTES`. ``ONE_PASS=False`` (tuning only) instead computes the
logits twice, once for the row statistics and once for the normalized sums, without scratch.

Cost, relative to dense causal attention of the same shape: ``L²·D/s`` multiply-adds against ``2·L²·D`` for dense
attention's two matmuls, i.e. ``1/(2s)`` of its tensor-core work, plus ``1/s²`` of its exponentials; measured on
an H100 (Llama-3-8B heads, bf16, 32K-128K) 11-14 % of dense SDPA at stride 8 and 7-8 % at stride 16. The loop over
``s`` row/key sets is flattened into the key loop (``tl.range(flatten=True)``) so the copy pipeline never drains
between key steps. GQA is native: query head ``h`` reads KV head ``h // group``; programs of one group run side by
side, so the group's key tiles are served from L2.

Limits (:func:`supports`; the dispatcher runs the reference for the rest): ``block_size / stride`` a power of two
up to 64, ``head_dim`` up to 256 (padded to a power of two ≥ 16 inside the kernel), fp16/bf16/fp32 inputs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnkit.kernels.antidiagonal.reference import check_inputs
from attnkit.kernels.block_mask import num_blocks

_LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCRATCH_BYTES = 256 * 2**20  # one-pass scratch per launch; more (batch, head) pairs take several launches


@triton.jit
def _reduced_logits(
    q_base, k_base, qpad_base, kpad_base, rows, cols, offs_d,
    stride_qm, stride_kn, stride_pn, sq, sk,
    HAS_PAD: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_REAL: tl.constexpr, D_PADDED: tl.constexpr, LARGE_INDEX: tl.constexpr, IEEE: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` unscaled reduced logits of reduced rows ``rows`` and key tiles ``cols``, and per key
    tile whether it holds a real key (inside the sequence and not padding)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    key_real = tl.zeros([BLOCK_N], dtype=tl.int32)
    d_ok = offs_d < D_REAL
    # A loop, not unrolled: the pipeliner then stages one [BLOCK_M, D] + [BLOCK_N, D] pair, not STRIDE of them.
    for t in tl.range(0, STRIDE):
        q_rows = rows * STRIDE + (STRIDE - 1 - t)  # the tile's rows in reverse order
        k_cols = cols * STRIDE + t
        q_ok = q_rows < sq
        k_ok = k_cols < sk
        if HAS_PAD:
            q_ok = q_ok & (tl.load(qpad_base + q_rows * stride_pn, mask=q_ok, other=0) != 0)
            k_ok = k_ok & (tl.load(kpad_base + k_cols * stride_pn, mask=k_ok, other=0) != 0)
        if LARGE_INDEX:
            q_ptrs = q_base + q_rows.to(tl.int64)[:, None] * stride_qm + offs_d[None, :]
            k_ptrs = k_base + k_cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
        else:
            q_ptrs = q_base + q_rows[:, None] * stride_qm + offs_d[None, :]
            k_ptrs = k_base + k_cols[:, None] * stride_kn + offs_d[None, :]
        if D_PADDED:
            q = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.load(k_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        k = k.to(q.dtype)
        if IEEE:
            acc = tl.dot(q, tl.trans(k), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, tl.trans(k), acc)
        key_real = key_real | k_ok.to(tl.int32)
    return acc, key_real != 0


@triton.jit
def _antidiagonal_fwd(
    Q, K, PAD, OUT, PART, ROWMAX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_oq,
    stride_pb, stride_pn,
    num_heads, group, sq, sk, offset, num_blocks_q, num_blocks_k, num_m_programs, first_bh, part_cols, num_steps,
    qk_scale,
    ONE_PASS: tl.constexpr, HAS_PAD: tl.constexpr, STRIDE: tl.constexpr, PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ZERO_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_REAL: tl.constexpr,
    LARGE_INDEX: tl.constexpr, IEEE: tl.constexpr,
):
    # Late query tiles see the most key tiles: launch them first so the tail of the grid is short.
    pid_m = num_m_programs - 1 - tl.program_id(0)
    pid_bh = first_bh + tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group
    D_PADDED: tl.constexpr = HEAD_DIM != D_REAL
    QBS: tl.constexpr = BLOCK_M // PER_BLOCK  # query blocks of this program
    KBS: tl.constexpr = BLOCK_N // PER_BLOCK  # key blocks of one key step

    n0 = pid_m * BLOCK_M
    rows = n0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    kpad_base = PAD + b.to(tl.int64) * stride_pb
    qpad_base = kpad_base + offset * stride_pn  # query row r is position r + Sk - Sq

    # A reduced row with no real query row gets no score (the reference's row_tile_real).
    row_real = tl.zeros([BLOCK_M], dtype=tl.int32)
    for t in tl.static_range(STRIDE):
        q_rows = rows * STRIDE + t
        ok = q_rows < sq
        if HAS_PAD:
            ok = ok & (tl.load(qpad_base + q_rows * stride_pn, mask=ok, other=0) != 0)
        row_real = row_real | ok.to(tl.int32)
    row_real = row_real != 0

    # Key tile m is visible to reduced row n iff m·s <= n·s + s-1 + offset, i.e. m <= n + diag.
    diag = (STRIDE - 1 + offset) // STRIDE
    last_row = tl.minimum(n0 + BLOCK_M, (sq + STRIDE - 1) // STRIDE) - 1
    m_end = tl.minimum((sk + STRIDE - 1) // STRIDE, last_row + diag + 1)  # key tiles any row here may see

    qblocks = n0 // PER_BLOCK + tl.arange(0, QBS)
    q_in = qblocks < num_blocks_q
    out_rows = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + qblocks.to(tl.int64)[:, None] * stride_oq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ONE_PASS:
        # One pass: per key step, the running row max and the row's exp2 sums per key block (relative to that
        # max) go to scratch; once the final max and sum are known, the scratch is rescaled and summed per block.
        part_rows = PART + tl.program_id(1).to(tl.int64) * (num_m_programs * BLOCK_M * part_cols) + rows[:, None] * part_cols
        max_rows = ROWMAX + tl.program_id(1).to(tl.int64) * (num_m_programs * BLOCK_M * num_steps) + rows * num_steps
        for m0 in tl.range(0, m_end, BLOCK_N, flatten=True):
            cols = m0 + tl.arange(0, BLOCK_N)
            acc, key_real = _reduced_logits(
                q_base, k_base, qpad_base, kpad_base, rows, cols, offs_d, stride_qm, stride_kn, stride_pn, sq, sk,
                HAS_PAD, STRIDE, BLOCK_M, BLOCK_N, D_REAL, D_PADDED, LARGE_INDEX, IEEE,
            )
            visible = (cols[None, :] <= rows[:, None] + diag) & key_real[None, :]
            x = tl.where(visible, acc * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            # A row with nothing visible so far keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(x - m_sub[:, None])
            l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(p, 1)
            m_i = m_new
            part = tl.sum(tl.reshape(p, [BLOCK_M, KBS, PER_BLOCK]), 2)
            tl.store(part_rows + (m0 // PER_BLOCK + tl.arange(0, KBS))[None, :], part)
            tl.store(max_rows + m0 // BLOCK_N, m_new)
        tl.debug_barrier()  # the scratch is read back in other threads' layout
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(row_real & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        for m0 in range(0, m_end, BLOCK_N):
            kblocks = m0 // PER_BLOCK + tl.arange(0, KBS)
            part = tl.load(part_rows + kblocks[None, :])
            factor = tl.math.exp2(tl.load(max_rows + m0 // BLOCK_N) - m_fin) * inv_l  # 0 where the max was -inf
            sums = tl.sum(tl.reshape(part * factor[:, None], [QBS, PER_BLOCK, KBS]), 1)
            tl.store(out_rows + kblocks[None, :], sums, mask=q_in[:, None] & (kblocks[None, :] < num_blocks_k))
    else:
        # Pass 1: row max and row sum of exp2 over the visible key tiles (log2 domain).
        for m0 in tl.range(0, m_end, BLOCK_N, flatten=True):
            cols = m0 + tl.arange(0, BLOCK_N)
            acc, key_real = _reduced_logits(
                q_base, k_base, qpad_base, kpad_base, rows, cols, offs_d, stride_qm, stride_kn, stride_pn, sq, sk,
                HAS_PAD, STRIDE, BLOCK_M, BLOCK_N, D_REAL, D_PADDED, LARGE_INDEX, IEEE,
            )
            visible = (cols[None, :] <= rows[:, None] + diag) & key_real[None, :]
            x = tl.where(visible, acc * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(x - m_sub[:, None]), 1)
            m_i = m_new
        m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(row_real & (l_i > 0.0), 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        # Pass 2: the same logits, normalized and summed per (query block, key block).
        for m0 in tl.range(0, m_end, BLOCK_N, flatten=True):
            cols = m0 + tl.arange(0, BLOCK_N)
            acc, key_real = _reduced_logits(
                q_base, k_base, qpad_base, kpad_base, rows, cols, offs_d, stride_qm, stride_kn, stride_pn, sq, sk,
                HAS_PAD, STRIDE, BLOCK_M, BLOCK_N, D_REAL, D_PADDED, LARGE_INDEX, IEEE,
            )
            visible = (cols[None, :] <= rows[:, None] + diag) & key_real[None, :]
            p = tl.where(visible, tl.math.exp2(acc * qk_scale - m_sub[:, None]), 0.0) * inv_l[:, None]
            sums = tl.sum(tl.sum(tl.reshape(p, [QBS, PER_BLOCK, KBS, PER_BLOCK]), 3), 1)
            kblocks = m0 // PER_BLOCK + tl.arange(0, KBS)
            tl.store(out_rows + kblocks[None, :], sums, mask=q_in[:, None] & (kblocks[None, :] < num_blocks_k))
    # Key blocks right of the last step: nothing visible.
    zeros = tl.zeros([QBS, ZERO_N], dtype=tl.float32)
    for j0 in range(tl.cdiv(m_end, BLOCK_N) * KBS, num_blocks_k, ZERO_N):
        kblocks = j0 + tl.arange(0, ZERO_N)
        tl.store(out_rows + kblocks[None, :], zeros, mask=q_in[:, None] & (kblocks[None, :] < num_blocks_k))


# ------------------------------------------------------------------------------------------------ launcher
def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a row offset inside one (batch, head) slice can pass int32 (the kernel then uses int64 offsets)."""
    return any(t.shape[2] * t.stride(2) >= 2**31 for t in tensors)


def supports(query: torch.Tensor, block_size: int | None = None, stride: int | None = None) -> str | None:
    """``None`` if this kernel can run the inputs, else the reason it cannot (the dispatcher then uses the reference)."""
    if block_size is not None and stride is not None and stride > 0 and block_size % stride == 0:
        per_block = block_size // stride
        if not _is_pow2(per_block) or per_block > 64:
            return f"block_size / stride = {per_block} must be a power of two <= 64"
    if query.shape[-1] > 256:
        return f"head_dim {query.shape[-1]} > 256"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype} (float16, bfloat16, float32 are supported)"
    if query.stride(-1) != 1:
        return "head_dim must have unit stride"
    if not (query.is_cuda or INTERPRET):
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors, tests only)"
    return None


def default_config(head_dim: int, per_block: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings, measured on an H100 (``python -m benchmarks.selection --tune``).

    ``BLOCK_M`` reduced rows per program, ``BLOCK_N`` key tiles per step (both multiples of the tiles per block,
    ``block_size / stride``); ``ONE_PASS`` computes the logits once and normalizes from scratch (False: twice, no
    scratch; 1.6-2x slower on the H100 at 32K-128K).
    """
    if INTERPRET:  # small tiles: the interpreter's cost grows with the tile, not the work
        return {"BLOCK_M": max(16, per_block), "BLOCK_N": max(16, per_block), "ONE_PASS": True}
    if dtype == torch.float32 or head_dim > 128:  # fp32 / wide tiles take twice the registers and shared memory
        block_m, block_n, warps, stages = 32, 64, 4, 2
    else:
        block_m, block_n, warps, stages = 64, 128, 8, 3
    block_m, block_n = max(block_m, per_block), max(block_n, per_block)
    # Each stage holds one [BLOCK_M, D] query and one [BLOCK_N, D] key set in shared memory (228 KB on Hopper).
    while stages > 1 and stages * (block_m + block_n) * _next_pow2(head_dim) * dtype.itemsize > 160 * 2**10:
        stages -= 1
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "ONE_PASS": True}


def antidiagonal_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Antidiagonal block scores on the GPU; arguments, shapes and semantics as in ``reference.py``.

    ``query [B, Hq, Sq, D]``, ``key [B, Hkv, Sk, D]`` in any strides with a unit stride on ``D`` (transposed views of
    a ``[B, S, H, D]`` projection are read in place, in their own dtype; the dots accumulate in fp32).
    ``chunk_bytes`` is accepted for signature compatibility and ignored: the kernel holds no logits in memory (its
    scratch is bounded by ``config["scratch_bytes"]``, default :data:`SCRATCH_BYTES`).
    ``config`` overrides :func:`default_config` (tuning). Returns a new float32 ``[B, Hq, QB, KB]`` tensor.
    """
    check_inputs(query, key, block_size, stride, key_padding_mask)
    reason = supports(query, block_size, stride)
    if reason is not None:
        raise ValueError(f"the Triton antidiagonal kernel cannot run these inputs: {reason}")
    batch, hq, sq, dim = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if key.stride(-1) != 1:
        key = key.contiguous()
    per_block = block_size // stride
    qb, kb = num_blocks(sq, block_size), num_blocks(sk, block_size)
    out = torch.empty(batch, hq, qb, kb, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out

    cfg = dict(default_config(dim, per_block, query.dtype))
    cfg.update(config or {})
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if block_m % per_block or block_n % per_block or block_m < 16 or block_n < 16:
        raise ValueError(f"BLOCK_M {block_m} / BLOCK_N {block_n} must be multiples of block_size / stride = {per_block}, >= 16")

    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=query.device, dtype=torch.uint8)
        pad_strides = pad.stride()
    else:
        pad, pad_strides = out, (0, 0)  # never read (HAS_PAD is False)
    num_m = -(-qb * per_block // block_m)
    key_tiles = -(-sk // stride)
    num_steps = -(-key_tiles // block_n)  # key steps of BLOCK_N tiles
    part_cols = num_steps * (block_n // per_block)
    one_pass = bool(cfg.get("ONE_PASS", True))
    # One pass keeps, per (b, h), every row's per-key-block partial sums and per-step maxima in fp32 scratch; the
    # (b, h) pairs are launched in groups whose scratch fits scratch_bytes.
    per_pair = num_m * block_m * (part_cols + num_steps) * 4 if one_pass else 0
    pairs = batch * hq
    group_size = pairs if not one_pass else max(1, min(pairs, int(cfg.get("scratch_bytes", SCRATCH_BYTES)) // per_pair))
    if one_pass:
        part = torch.empty(group_size * num_m * block_m * part_cols, dtype=torch.float32, device=query.device)
        rowmax = torch.empty(group_size * num_m * block_m * num_steps, dtype=torch.float32, device=query.device)
    else:
        part = rowmax = out  # never read
    scale = dim**-0.5 if scale is None else scale
    for first in range(0, pairs, group_size):
        _antidiagonal_fwd[(num_m, min(group_size, pairs - first))](
            query, key, pad, out, part, rowmax,
            *query.stride()[:3], *key.stride()[:3], *out.stride()[:3], *pad_strides,
            hq, hq // hkv, sq, sk, sk - sq, qb, kb, num_m, first, part_cols, num_steps, scale / stride * _LOG2E,
            ONE_PASS=one_pass, HAS_PAD=key_padding_mask is not None, STRIDE=stride, PER_BLOCK=per_block,
            BLOCK_M=block_m, BLOCK_N=block_n, ZERO_N=min(64, _next_pow2(kb)), HEAD_DIM=max(16, _next_pow2(dim)),
            D_REAL=dim, LARGE_INDEX=bool(cfg.get("LARGE_INDEX", False)) or _needs_int64(query, key),
            IEEE=query.dtype == torch.float32,
            **{name: val for name, val in cfg.items() if name in ("num_warps", "num_stages")},
        )
    return out
