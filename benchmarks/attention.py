"""Block-sparse prefill attention on the GPU: attnkit's Triton kernel vs dense SDPA vs FlexAttention, one process.

    python -m benchmarks.attention                       # the full sweep (Llama-3-8B and SmolLM2 shapes, 4K-128K)
    python -m benchmarks.attention --quick               # two lengths, three densities
    python -m benchmarks.attention --tune --lengths 32k  # sweep the kernel's tile configs, print the best
    python -m benchmarks.attention --plot OUT/attention.json   # the plot, from a saved run (needs matplotlib)

For every point: the mask is built once (outside the timings), the kernel's output is checked first (against the
fp32 reference up to 16K, against FlexAttention on the same mask beyond, and against dense SDPA at 100 %), then
dense ``scaled_dot_product_attention`` (causal, GQA), compiled FlexAttention (full/partial block lists) and the
kernel are each timed as the median of CUDA-event timings (``triton.testing.do_bench``), and their peak memory
above the inputs is recorded. Density is the fraction of causally visible blocks computed; the ideal speedup is
1/density. Useful TFLOP/s counts density × the causal dense FLOPs (4·D per visible query-key pair).

Outputs: a table on stdout, ``attention.json`` (every number, the device, versions, commit) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnkit.kernels import BlockMask
from attnkit.kernels.block_mask import causal_block_matrix, num_blocks
from attnkit.kernels.block_sparse import flex, reference

SHAPES = {
    # name: (query heads, KV heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
}
LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]
DENSITIES = [0.05, 0.1, 0.2, 0.5, 1.0]
PATTERNS = ["random", "structured"]
WINDOW_BLOCKS = 8  # the structured pattern's local window, in blocks (plus one sink block)


# ------------------------------------------------------------------------------------------------------ masks
def make_mask(pattern: str, length: int, heads: int, block: int, density: float, seed: int, device) -> BlockMask:
    """A causal ``[1, heads, QB, KB]`` mask whose density (over visible blocks) is close to ``density``.

    ``random``: the diagonal block plus each other visible block with one probability, per head.
    ``structured``: the first (sink) block, a window of ``WINDOW_BLOCKS`` blocks before and including the diagonal,
    and random blocks on top up to the target (the shape MInference's A-shape / XAttention masks take).
    At short lengths the structured floor (sink + window) can exceed the target; the measured density is reported.
    """
    qb = num_blocks(length, block)
    visible = causal_block_matrix(length, length, (block, block), device)
    g = torch.Generator(device=device).manual_seed(seed)
    rows = torch.arange(qb, device=device)[:, None]
    cols = torch.arange(qb, device=device)[None, :]
    if pattern == "random":
        base = (rows == cols).expand(heads, qb, qb)
    elif pattern == "structured":
        base = ((cols == 0) | ((rows - cols >= 0) & (rows - cols < WINDOW_BLOCKS))).expand(heads, qb, qb)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    n_visible = int(visible.sum())
    n_base = int((base[0] & visible).sum())
    p = 1.0 if density >= 1.0 else max(0.0, (density * n_visible - n_base) / max(1, n_visible - n_base))
    blocks = (base | (torch.rand(heads, qb, qb, generator=g, device=device) < p)) & visible
    return BlockMask.from_dense(blocks[None], length, length, block)


# ----------------------------------------------------------------------------------------------------- timing
def bench_ms(fn, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_extra_bytes(fn) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (its output included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return int(extra)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@dataclass
class Point:
    shape: str
    batch: int
    length: int
    block: int
    pattern: str
    target_density: float
    density: float
    ideal_speedup: float
    dense_ms: float
    flex_ms: float | None
    attnkit_ms: float
    speedup_vs_dense: float
    fraction_of_ideal: float
    speedup_vs_flex: float | None
    attnkit_tflops: float
    dense_tflops: float
    dense_peak_mb: float
    flex_peak_mb: float | None
    attnkit_peak_mb: float
    check: str
    check_err: float


def run_point(shape: str, batch: int, length: int, block: int, pattern: str, density: float, args, seed: int) -> Point:
    from attnkit.kernels.block_sparse import triton as tri

    hq, hkv, dim = SHAPES[shape]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, hq, length, dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(batch, hkv, length, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(batch, hkv, length, dim, device="cuda", dtype=dtype, generator=g)
    mask = make_mask(pattern, length, hq, block, density, seed, "cuda")
    measured = mask.density()

    def ours():
        return tri.block_sparse_attention(q, k, v, mask)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)

    # Correctness first: a wrong kernel's timing means nothing.
    out = ours()
    if measured >= 1.0:
        check, err = "sdpa", rel_err(out, dense())
    elif length <= 16384:
        check, err = "reference", rel_err(out, reference.block_sparse_attention(q, k, v, mask))
    else:
        check, err = "flex", None
    flex_ms = flex_peak = None
    if not args.no_flex:
        flex_mask = mask.expand(batch, hq).to_flex()

        def peer():
            return flex.block_sparse_attention(q, k, v, mask, flex_mask=flex_mask)

        try:
            flex_out = peer()
        except Exception as exc:  # a peer that cannot run this point is reported, not fatal
            print(f"FlexAttention failed at {shape} L={length} block {block}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            if err is None:
                err = rel_err(out, flex_out)
            del flex_out
            flex_ms = bench_ms(peer)
            flex_peak = peak_extra_bytes(peer) / 2**20
    if err is None:  # no flex and too long for the reference: check a few query heads against the reference
        heads = slice(0, hq // hkv)
        sub = BlockMask(mask.kv_num_blocks[:, heads], mask.kv_indices[:, heads], length, length, mask.block_size)
        check, err = "reference[group 0]", rel_err(
            out[:, heads], reference.block_sparse_attention(q[:, heads], k[:, :1], v[:, :1], sub)
        )
    del out
    if not err < args.max_err:
        raise SystemExit(f"WRONG RESULT: {shape} L={length} {pattern} d={density}: rel err {err:.2e} vs {check}")

    dense_ms = bench_ms(dense)
    ours_ms = bench_ms(ours)
    causal_flops = 4 * batch * hq * dim * length * (length + 1) / 2
    return Point(
        shape=shape, batch=batch, length=length, block=block, pattern=pattern, target_density=density,
        density=measured, ideal_speedup=1 / measured, dense_ms=dense_ms, flex_ms=flex_ms, attnkit_ms=ours_ms,
        speedup_vs_dense=dense_ms / ours_ms, fraction_of_ideal=dense_ms / ours_ms * measured,
        speedup_vs_flex=None if flex_ms is None else flex_ms / ours_ms,
        attnkit_tflops=causal_flops * measured / ours_ms / 1e9, dense_tflops=causal_flops / dense_ms / 1e9,
        dense_peak_mb=peak_extra_bytes(dense) / 2**20, flex_peak_mb=flex_peak,
        attnkit_peak_mb=peak_extra_bytes(ours) / 2**20, check=check, check_err=err,
    )


# ------------------------------------------------------------------------------------------------------ tuning
TUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "USE_TMA": tma}
    for bm, bn in ((64, 64), (128, 64), (128, 128))
    for w in (4, 8)
    for s in (2, 3, 4)
    for tma in (False, True)
]


def tune_point(q, k, v, mask: BlockMask, configs: list[dict]) -> list[tuple[float, dict, str]]:
    """Every applicable tile config on one input: ``(median ms, config, note)``, fastest first."""
    from attnkit.kernels.block_sparse import triton as tri

    block = mask.block_size[0]
    expect = tri.block_sparse_attention(q, k, v, mask)
    rows = []
    for cfg in configs:
        if block % cfg["BLOCK_M"] or block % cfg["BLOCK_N"]:
            continue
        try:
            out = tri.block_sparse_attention(q, k, v, mask, config=cfg)
            if rel_err(out, expect) > 1e-2:
                rows.append((math.inf, cfg, "WRONG"))
                continue
            rows.append((bench_ms(lambda cfg=cfg: tri.block_sparse_attention(q, k, v, mask, config=cfg)), cfg, ""))
        except Exception as exc:  # out of shared memory / registers: not a candidate
            rows.append((math.inf, cfg, type(exc).__name__))
    return sorted(rows, key=lambda r: r[0])


def tune(args) -> None:
    """Time every tile config of the kernel on each (shape, block, length, density); print the best few."""
    from attnkit.kernels.block_sparse import triton as tri

    for shape in args.shapes:
        hq, hkv, dim = SHAPES[shape]
        for block in args.blocks:
            for length in args.lengths:
                q = torch.randn(1, hq, length, dim, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(1, hkv, length, dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(1, hkv, length, dim, device="cuda", dtype=torch.bfloat16)
                dense_ms = bench_ms(
                    lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True
                    )
                )
                print(f"\n{shape} L {length}: dense SDPA {dense_ms:.3f} ms", flush=True)
                for density in args.densities:
                    mask = make_mask("structured", length, hq, block, density, 0, "cuda")
                    rows = tune_point(q, k, v, mask, args.configs or TUNE_CONFIGS)
                    default = tri.default_config(dim, (block, block), torch.bfloat16)
                    t_default = bench_ms(lambda mask=mask: tri.block_sparse_attention(q, k, v, mask))  # noqa: B023
                    print(f"\n{shape} block {block} L {length} density {mask.density():.3f}: "
                          f"default {default} {t_default:.3f} ms", flush=True)
                    for t, cfg, note in rows[:8]:
                        print(f"  {t:8.3f} ms  {cfg} {note}", flush=True)


# ------------------------------------------------------------------------------------------------------ report
def table(points: list[Point]) -> str:
    head = (
        f"{'shape':<13}{'len':>7}{'blk':>5} {'pattern':<11}{'density':>8}{'ideal':>7}{'dense ms':>10}{'flex ms':>9}"
        f"{'ours ms':>9}{'vs dense':>9}{'of ideal':>9}{'vs flex':>8}{'TFLOP/s':>8}{'mem MB d/f/o':>18}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        flex_ms = f"{p.flex_ms:9.3f}" if p.flex_ms is not None else f"{'-':>9}"
        vs_flex = f"{p.speedup_vs_flex:7.2f}x" if p.speedup_vs_flex is not None else f"{'-':>8}"
        fpk = f"{p.flex_peak_mb:.0f}" if p.flex_peak_mb is not None else "-"
        lines.append(
            f"{p.shape:<13}{p.length // 1024:>6}K{p.block:>5} {p.pattern:<11}{p.density:8.3f}{p.ideal_speedup:6.1f}x"
            f"{p.dense_ms:10.3f}{flex_ms}{p.attnkit_ms:9.3f}{p.speedup_vs_dense:8.2f}x{p.fraction_of_ideal:8.0%} {vs_flex}"
            f"{p.attnkit_tflops:8.0f}{p.dense_peak_mb:>8.0f}/{fpk}/{p.attnkit_peak_mb:.0f}"
        )
    return "\n".join(lines)


def markdown(json_path: Path) -> str:
    """A saved run as a markdown table (for benchmarks/RESULTS.md)."""
    data = json.loads(json_path.read_text())
    env = data["env"]
    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}, commit {env['commit']}: "
        f"`{env['command']}`",
        "",
        "| shape | length | block | pattern | density | ideal | dense SDPA ms | flex ms | attnkit ms | vs dense "
        "| of ideal | vs flex | TFLOP/s | peak MB dense/flex/attnkit | check (rel err) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (Point(**x) for x in data["points"]):
        flex_ms = f"{p.flex_ms:.3f}" if p.flex_ms is not None else "-"
        vs_flex = f"{p.speedup_vs_flex:.2f}x" if p.speedup_vs_flex is not None else "-"
        fpk = f"{p.flex_peak_mb:.0f}" if p.flex_peak_mb is not None else "-"
        lines.append(
            f"| {p.shape} | {p.length // 1024}K | {p.block} | {p.pattern} | {p.density:.3f} | {p.ideal_speedup:.1f}x "
            f"| {p.dense_ms:.3f} | {flex_ms} | {p.attnkit_ms:.3f} | {p.speedup_vs_dense:.2f}x | {p.fraction_of_ideal:.0%} "
            f"| {vs_flex} | {p.attnkit_tflops:.0f} | {p.dense_peak_mb:.0f}/{fpk}/{p.attnkit_peak_mb:.0f} "
            f"| {p.check} {p.check_err:.1e} |"
        )
    return "\n".join(lines)


def targets(points: list[Point]) -> str:
    """The issue's targets, checked on the measured points (Llama-3-8B shape)."""
    out = []
    for p in points:
        if p.shape != "llama3-8b":
            continue
        misses = []
        if 0.03 <= p.density <= 0.2 and p.length >= 32768:
            need = 0.90 if p.length >= 65536 else 0.85
            if p.fraction_of_ideal < need:
                misses.append(f"{p.fraction_of_ideal:.0%} of ideal < {need:.0%}")
        if p.speedup_vs_flex is not None and p.speedup_vs_flex <= 1.0:
            misses.append(f"slower than flex ({p.speedup_vs_flex:.2f}x)")
        if p.density >= 1.0 and p.attnkit_ms > 1.1 * p.dense_ms:
            misses.append(f"full mask {p.attnkit_ms / p.dense_ms:.2f}x dense time > 1.1x")
        if p.attnkit_peak_mb > p.dense_peak_mb + 1:
            misses.append(f"peak memory {p.attnkit_peak_mb:.0f} MB > dense {p.dense_peak_mb:.0f} MB")
        if misses:
            out.append(f"MISS {p.length // 1024}K {p.pattern} d={p.density:.3f}: " + "; ".join(misses))
    return "\n".join(out) if out else "all targets met on the measured points"


def environment() -> dict:
    import transformers
    import triton

    # The device tool ships a copy of the work tree whose .git may lag: the caller can name the commit.
    commit = os.environ.get("ATTNKIT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "unknown"
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.attention " + " ".join(sys.argv[1:]),
    }


def plot(json_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    points = [Point(**p) for p in data["points"]]
    shapes = sorted({p.shape for p in points})
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for pattern, marker in (("random", "o"), ("structured", "s")):
            for length in sorted({p.length for p in points}):
                sel = [p for p in points if p.shape == shape and p.pattern == pattern and p.length == length]
                if sel:
                    ax.plot([p.density for p in sel], [p.speedup_vs_dense for p in sel], marker=marker,
                            label=f"{length // 1024}K {pattern}")
        xs = [0.03, 1.0]
        ax.plot(xs, [1 / x for x in xs], "k--", label="ideal (1/density)")
        ax.set(xscale="log", yscale="log", xlabel="density", ylabel="speedup vs dense SDPA", title=shape)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['env']['device']}, {data['env']['date']}, commit {data['env']['commit']}")
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


# --------------------------------------------------------------------------------------------------------- main
def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--lengths", default=",".join(f"{n // 1024}k" for n in LENGTHS))
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--blocks", default="128", help="mask block sizes (comma list; 64 and 128 are the kernel's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles once per shape)")
    ap.add_argument("--max-err", type=float, default=2e-2, help="relative L2 error that fails the check")
    ap.add_argument("--quick", action="store_true", help="32k and 64k, densities 0.05/0.2/1.0, llama3-8b only")
    ap.add_argument("--tune", action="store_true", help="sweep the kernel's tile configs instead")
    ap.add_argument("--configs", type=json.loads, default=None, help="--tune: a JSON list of configs to try")
    ap.add_argument("--out", default="runs/bench", help="folder for attention.json")
    ap.add_argument("--plot", metavar="JSON", help="only draw the plot of a saved run")
    ap.add_argument("--markdown", metavar="JSON", help="only print a saved run as a markdown table")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot(Path(args.plot)))
        return
    if args.markdown:
        print(markdown(Path(args.markdown)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention times GPU kernels: no CUDA device here")
    if args.quick:
        args.shapes, args.lengths, args.densities = "llama3-8b", "32k,64k", "0.05,0.2,1.0"
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}; choose from {list(SHAPES)}")
    args.lengths = [parse_length(x) for x in args.lengths.split(",")]
    args.densities = [float(x) for x in args.densities.split(",")]
    args.blocks = [int(x) for x in args.blocks.split(",")]
    if args.tune:
        tune(args)
        return

    env = environment()
    print(json.dumps(env))
    points: list[Point] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        for block in args.blocks:
            for length in args.lengths:
                for pattern in args.patterns.split(","):
                    for density in args.densities:
                        if density >= 1.0 and pattern != args.patterns.split(",")[0]:
                            continue  # 100 % is the same mask for every pattern
                        t0 = time.time()
                        p = run_point(shape, args.batch, length, block, pattern, density, args, seed=len(points))
                        points.append(p)
                        print(f"{shape} {length} {block} {pattern} {p.density:.3f}: dense {p.dense_ms:.3f} "
                              f"flex {p.flex_ms} ours {p.attnkit_ms:.3f} ms ({time.time() - t0:.0f}s)", flush=True)
                        torch.cuda.empty_cache()
                        (out_dir / "attention.json").write_text(
                            json.dumps({"env": env, "points": [asdict(x) for x in points]}, indent=1)
                        )
    print()
    print(table(points))
    print()
    print(targets(points))


if __name__ == "__main__":
    main()
