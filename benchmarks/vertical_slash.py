"""Vertical-slash attention on the GPU: the Triton kernel vs dense SDPA vs block-sparse on whole blocks, one process.

    python -m benchmarks.vertical_slash                          # Llama-3-8B shape, 32K / 64K / 128K
    python -m benchmarks.vertical_slash --lengths 32k --block 128

The mask is MInference's vertical-slash pattern at the Llama-3-8B shape (B=1, Hq=32, Hkv=8, D=128, bf16), per head:
``--columns`` vertical key columns (the 4 sink tokens plus random positions) and ``--slashes`` diagonal offsets (the
``--local`` nearest offsets, the local window, plus random offsets log-uniform over the length) turned into the key
blocks they cross (an offset that is not a multiple of the block crosses two block diagonals).

Three timings per length, each the median of CUDA-event timings after warmup (``triton.testing.do_bench``):
dense causal ``scaled_dot_product_attention`` (GQA), the vertical-slash kernel, and the block-sparse kernel on the
same pattern with each column rounded up to its whole key block (``BlockMask`` of the union) — what a block-only
kernel has to compute for the same mask. Random columns are the hard case for rounding: with ~1000 columns most
key blocks hold one.

Correctness first: at ``--check-length`` (4K) both kernels are compared with their fp32 references on every head;
at each timed length the vertical-slash kernel is compared with the reference on one GQA group. Densities are
token-level (fraction of causally visible query-key pairs computed); the ideal speedup is 1/density.

Outputs: a table on stdout and ``vertical-slash-llama3-8b-<device>.json`` (every number, the device, versions,
commit) in the folder ``--out`` (``benchmarks/results``), or at ``--out`` itself when it names a ``.json`` file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnkit.kernels.block_mask import BlockMask, causal_block_matrix, num_blocks
from attnkit.kernels.vertical_slash import VerticalSlashMask

SHAPE = {"name": "llama3-8b", "heads": 32, "kv_heads": 8, "head_dim": 128}
LENGTHS = [32768, 65536, 131072]


# ------------------------------------------------------------------------------------------------------ masks
def minference_mask(
    length: int, heads: int, block: int, n_columns: int, n_slashes: int, n_local: int, seed: int, device
) -> VerticalSlashMask:
    """A ``[1, heads]`` vertical-slash mask (``Sq == Sk == length``) shaped like MInference's searched patterns."""
    g = torch.Generator().manual_seed(seed)
    n_columns = min(n_columns, length)
    column_dense = torch.zeros(1, heads, length, dtype=torch.bool)
    sinks = min(4, n_columns)
    column_dense[..., :sinks] = True
    for h in range(heads):
        rest = torch.randperm(length - sinks, generator=g)[: n_columns - sinks] + sinks
        column_dense[0, h, rest] = True

    # Slash offsets → block diagonals: offset o = a * block + r reaches key blocks i - a and, if r > 0, i - a - 1.
    qb = num_blocks(length, block)
    diag = torch.zeros(heads, qb + 1, dtype=torch.bool)
    for h in range(heads):
        far = torch.exp(torch.empty(n_slashes - n_local).uniform_(math.log(n_local + 1), math.log(length), generator=g))
        offsets = torch.cat([torch.arange(n_local), far.long().clamp(max=length - 1)])
        diag[h, offsets // block] = True
        diag[h, (offsets // block + 1)[offsets % block > 0]] = True
    diag = diag.to(device)
    rows = torch.arange(qb, device=device)[:, None]
    cols = torch.arange(qb, device=device)[None, :]
    dist = (rows - cols).clamp(min=0)
    blocks = diag[:, dist] & (rows >= cols)  # [H, QB, KB]
    return VerticalSlashMask.from_dense_columns(blocks[None], column_dense.to(device), length, length, block)


def columns_as_blocks(mask: VerticalSlashMask) -> BlockMask:
    """The union of the listed blocks and every key block holding a column (what a block-only kernel computes)."""
    bq, bk = mask.block_size
    kb = num_blocks(mask.kv_len, bk)
    dense = torch.nn.functional.pad(mask.column_dense(), (0, kb * bk - mask.kv_len))
    column_blocks = dense.view(*dense.shape[:2], kb, bk).any(-1)  # [B, H, KB]
    visible = causal_block_matrix(mask.q_len, mask.kv_len, (bq, bk), mask.device)
    union = (mask.block_mask.to_dense() | column_blocks[:, :, None, :]) & visible
    return BlockMask.from_dense(union, mask.q_len, mask.kv_len, (bq, bk))


def block_token_density(block_mask: BlockMask) -> float:
    """Token-level density of a block mask (the causal pairs inside its listed blocks)."""
    b, h = block_mask.shape[:2]
    empty = torch.zeros(b, h, 1, dtype=torch.int32, device=block_mask.device)
    return VerticalSlashMask(block_mask, empty, empty[..., 0]).density()


# ----------------------------------------------------------------------------------------------------- timing
def bench_ms(fn, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median of CUDA-event timings after ``warmup_ms`` of warmup (L2 flushed between runs by do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def peak_extra_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return extra / 2**20


@dataclass
class Point:
    length: int
    block: int
    columns: int
    slashes: int
    density: float  # token level, vertical-slash mask
    ideal_speedup: float
    block_union_density: float  # token level, columns rounded up to whole blocks
    block_union_ideal_speedup: float
    dense_ms: float
    vertical_slash_ms: float
    block_sparse_ms: float
    speedup_vs_dense: float
    fraction_of_ideal: float
    speedup_vs_block_sparse: float
    vertical_slash_peak_mb: float
    check: str
    check_err: float


def inputs(length: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hq, hkv, dim = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    q = torch.randn(1, hq, length, dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, hkv, length, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, hkv, length, dim, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def check_short(args, dtype) -> dict:
    """Both kernels against their fp32 references on every head at a short length; exits on a wrong result."""
    from attnkit.kernels.block_sparse import reference as bs_reference
    from attnkit.kernels.block_sparse import triton as bs_triton
    from attnkit.kernels.vertical_slash import reference as vs_reference
    from attnkit.kernels.vertical_slash import triton as vs_triton

    n = args.check_length
    q, k, v = inputs(n, dtype, seed=1)
    mask = minference_mask(n, SHAPE["heads"], args.block, args.columns, args.slashes, args.local, 1, "cuda")
    union = columns_as_blocks(mask)
    errs = {
        "vertical_slash": rel_err(vs_triton.vertical_slash_attention(q, k, v, mask),
                                  vs_reference.vertical_slash_attention(q, k, v, mask)),
        "block_sparse": rel_err(bs_triton.block_sparse_attention(q, k, v, union),
                                bs_reference.block_sparse_attention(q, k, v, union)),
    }
    print(f"check at {n} tokens (all heads, vs fp32 reference): " + ", ".join(f"{k} rel err {e:.2e}" for k, e in errs.items()))
    bad = {k: e for k, e in errs.items() if not e < args.max_err}
    if bad:
        raise SystemExit(f"WRONG RESULT at {n} tokens: {bad} (max {args.max_err}); no timings reported")
    return errs


def run_point(length: int, args, dtype, seed: int) -> Point:
    from attnkit.kernels.block_sparse import triton as bs_triton
    from attnkit.kernels.vertical_slash import reference as vs_reference
    from attnkit.kernels.vertical_slash import triton as vs_triton

    hq, hkv = SHAPE["heads"], SHAPE["kv_heads"]
    q, k, v = inputs(length, dtype, seed)
    mask = minference_mask(length, hq, args.block, args.columns, args.slashes, args.local, seed, "cuda")
    union = columns_as_blocks(mask)
    density, union_density = mask.density(), block_token_density(union)

    def vertical_slash():
        return vs_triton.vertical_slash_attention(q, k, v, mask)

    def block_sparse():
        return bs_triton.block_sparse_attention(q, k, v, union)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    # Correctness at this length on one GQA group (the reference on all 32 heads would take minutes).
    out = vertical_slash()
    check, err = "reference[group 0]", math.nan
    if not args.no_long_check:
        heads = slice(0, hq // hkv)
        sub = VerticalSlashMask(
            BlockMask(mask.block_mask.kv_num_blocks[:, heads], mask.block_mask.kv_indices[:, heads], length, length,
                      mask.block_size),
            mask.columns[:, heads], mask.column_counts[:, heads],
        )
        err = rel_err(out[:, heads], vs_reference.vertical_slash_attention(q[:, heads], k[:, :1], v[:, :1], sub))
        if not err < args.max_err:
            raise SystemExit(f"WRONG RESULT at {length}: rel err {err:.2e} vs {check}")
    else:
        check = "skipped"
    del out
    torch.cuda.empty_cache()

    dense_ms = bench_ms(dense)
    vs_ms = bench_ms(vertical_slash)
    bs_ms = bench_ms(block_sparse)
    return Point(
        length=length, block=args.block, columns=args.columns, slashes=args.slashes,
        density=density, ideal_speedup=1 / density,
        block_union_density=union_density, block_union_ideal_speedup=1 / union_density,
        dense_ms=dense_ms, vertical_slash_ms=vs_ms, block_sparse_ms=bs_ms,
        speedup_vs_dense=dense_ms / vs_ms, fraction_of_ideal=dense_ms / vs_ms * density,
        speedup_vs_block_sparse=bs_ms / vs_ms, vertical_slash_peak_mb=peak_extra_mb(vertical_slash),
        check=check, check_err=err,
    )


def table(points: list[Point]) -> str:
    head = (
        f"{'len':>6}{'blk':>5}{'density':>9}{'ideal':>8}{'blk-union':>10}{'ideal':>8}{'dense ms':>10}"
        f"{'v-s ms':>9}{'blk ms':>9}{'vs dense':>10}{'of ideal':>9}{'vs blk':>8}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p.length // 1024:>5}K{p.block:>5}{p.density:9.4f}{p.ideal_speedup:7.1f}x{p.block_union_density:10.4f}"
            f"{p.block_union_ideal_speedup:7.1f}x{p.dense_ms:10.3f}{p.vertical_slash_ms:9.3f}{p.block_sparse_ms:9.3f}"
            f"{p.speedup_vs_dense:9.2f}x{p.fraction_of_ideal:9.0%}{p.speedup_vs_block_sparse:7.2f}x"
        )
    return "\n".join(lines)


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=",".join(f"{n // 1024}k" for n in LENGTHS))
    ap.add_argument("--block", type=int, default=64, choices=[64, 128], help="mask block size (query and key)")
    ap.add_argument("--columns", type=int, default=1000, help="vertical columns per head")
    ap.add_argument("--slashes", type=int, default=64, help="slash (diagonal) offsets per head")
    ap.add_argument("--local", type=int, default=16, help="of the slashes: the nearest offsets 0..local-1")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--check-length", type=int, default=4096, help="the short length of the all-heads check")
    ap.add_argument("--no-long-check", action="store_true", help="skip the one-group check at timed lengths")
    ap.add_argument("--max-err", type=float, default=2e-2, help="relative L2 error that fails a check")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON, or the JSON file's path")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.vertical_slash times GPU kernels: no CUDA device here (nothing was measured)")
    if not 0 < args.local <= args.slashes:
        raise SystemExit("--local must be in [1, --slashes]")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lengths = [parse_length(x) for x in args.lengths.split(",") if x]

    from benchmarks.attention import environment

    env = environment()
    env["command"] = "python -m benchmarks.vertical_slash " + " ".join(sys.argv[1:] if argv is None else argv)
    env["shape"] = SHAPE
    print(json.dumps(env), flush=True)
    env["check"] = check_short(args, dtype)

    path = Path(args.out)
    if path.suffix != ".json":
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
        path = path / f"vertical-slash-{SHAPE['name']}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    points: list[Point] = []
    for i, length in enumerate(lengths):
        t0 = time.time()
        p = run_point(length, args, dtype, seed=i + 2)
        points.append(p)
        print(f"{length}: density {p.density:.4f} (block union {p.block_union_density:.4f}) dense {p.dense_ms:.3f} "
              f"vertical-slash {p.vertical_slash_ms:.3f} block-sparse {p.block_sparse_ms:.3f} ms "
              f"(check {p.check_err:.1e}, {time.time() - t0:.0f}s)", flush=True)
        torch.cuda.empty_cache()
        path.write_text(json.dumps({"env": env, "points": [asdict(x) for x in points]}, indent=1))
    print()
    print(table(points))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
