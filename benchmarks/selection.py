"""Selection cost on the GPU: how long each method takes to choose its blocks, against dense causal attention.

    python -m benchmarks.selection                         # Llama-3-8B shape, 32K/64K/128K, strides 8 and 16
    python -m benchmarks.selection --lengths 8k,16k --strides 8 --methods xattention-s8-scores
    python -m benchmarks.selection --tune --lengths 32k    # the antidiagonal kernel's tile configs, fastest first

A sparse prefill pays for its selection before it saves anything, so the number that matters is the selection's
time as a fraction of dense attention at the same shape: a method whose selection costs ``r`` of dense attention
can only win where its density is below ``1 - r`` (the break-even density printed beside it).

Every entry of :func:`selectors` is checked first, on a short input (``--check-length``), against its reference;
a failing entry stops the run before anything is timed. Then, per length, dense ``scaled_dot_product_attention``
(causal, GQA, the same q/k/v) and each entry are timed in the same process as the median of CUDA-event timings
(``triton.testing.do_bench``). Inputs are ``[B, H, S, D]`` views of ``[B, S, H, D]`` tensors, as transformers
passes them.

Outputs: a markdown table on stdout and ``selection-<timestamp>.json`` (every number, the device, versions,
commit) in ``--out`` (default ``benchmarks/results``).

Adding a method: add an entry to :func:`selectors`, a :class:`Selector` whose ``run(q, k)`` builds the selection
the way the method does at prefill (its ``select_blocks``, or the kernel that dominates it) and whose
``reference(q, k)`` / ``error`` say what correct is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.attention import bench_ms, environment, parse_length

SHAPE = ("llama3-8b", 32, 8, 128)  # name, query heads, KV heads, head_dim
LENGTHS = [32768, 65536, 131072]
STRIDES = [8, 16]
BLOCK = 128
THRESHOLD = 0.9  # XAttention's default τ, for the full-selection entries


# --------------------------------------------------------------------------------------------------- entries
@dataclass
class Selector:
    """One way of building a selection from post-RoPE ``q [B, Hq, S, D]`` and ``k [B, Hkv, S, D]``.

    ``run`` is what is timed. ``reference`` computes what ``run`` must agree with (on the check length);
    ``error(out, ref)`` measures the disagreement and must stay below ``max_err``.
    """

    run: Callable[[torch.Tensor, torch.Tensor], Any]
    reference: Callable[[torch.Tensor, torch.Tensor], Any]
    error: Callable[[Any, Any], float]
    max_err: float
    params: dict


def _mismatch(out, ref) -> float:
    """Fraction of blocks on which two selections (BlockMasks) disagree."""
    return float((out.to_dense() != ref.to_dense()).float().mean())


def selectors(block: int, strides: list[int], heads: int = SHAPE[1]) -> dict[str, Selector]:
    """Every timed entry, by name."""
    from attnkit.kernels.antidiagonal import reference
    from attnkit.kernels.antidiagonal import triton as tri
    from attnkit.registry import get_method

    out: dict[str, Selector] = {}
    for s in strides:
        # The Triton scoring kernel alone (what dominates XAttention's selection).
        out[f"xattention-s{s}-scores"] = Selector(
            run=lambda q, k, s=s: tri.antidiagonal_block_scores(q, k, block, s),
            reference=lambda q, k, s=s: reference.antidiagonal_block_scores(q, k, block, s),
            error=lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)),
            max_err=1e-3,
            params={"block": block, "stride": s, "kernel": "triton"},
        )
        # The whole prefill selection as the method runs it: scores, threshold selection, BlockMask.
        method = get_method("xattention")(block_size=block, stride=s, threshold=THRESHOLD)
        layer = method.make_prefill_layer(0, _AttentionStub(heads)).to("cuda")
        out[f"xattention-s{s}"] = Selector(
            run=lambda q, k, layer=layer: _with_kernels("auto", layer.select_blocks, q, k, None),
            reference=lambda q, k, layer=layer: _with_kernels("reference", layer.select_blocks, q, k, None),
            error=_mismatch,
            max_err=1e-3,  # near-ties at the threshold may flip a block between fp32 summation orders
            params={"block": block, "stride": s, "threshold": THRESHOLD, "kernel": "auto"},
        )
    # MInference (vertical-slash heads, the paper's budgets 1000 / 6096) and FlexPrefill (paper defaults): their
    # selection is PyTorch (estimates from the last queries, pooled blocks, top-k); "reference" is the same code
    # with the reference kernels, so the check only guards against a crash, not a numerical difference.
    mi = get_method("minference")(block_size=block).make_prefill_layer(0, _AttentionStub(heads)).to("cuda")
    out["minference-vs"] = Selector(
        run=lambda q, k: mi.select_blocks(q, k, None),
        reference=lambda q, k: mi.select_blocks(q, k, None),
        error=lambda a, b: _mismatch(a.block_mask, b.block_mask) + float((a.columns != b.columns).float().mean()),
        max_err=1e-3,
        params={"block": block, "vertical": 1000, "slash": 6096, "kernel": "pytorch"},
    )
    fp = get_method("flexprefill")(block_size=block).make_prefill_layer(0, _AttentionStub(heads)).to("cuda")
    out["flexprefill"] = Selector(
        run=lambda q, k: fp.select_blocks(q, k, None),
        reference=lambda q, k: fp.select_blocks(q, k, None),
        error=_mismatch,
        max_err=1e-3,
        params={"block": block, "gamma": 0.9, "tau": 0.1, "min_budget": 1024, "kernel": "pytorch"},
    )
    return out


class _AttentionStub:
    """What ``make_prefill_layer`` reads from a transformers attention module."""

    def __init__(self, heads: int):
        self.config = SimpleNamespace(num_attention_heads=heads)
        self.scaling = None


def _with_kernels(backend: str, fn, *args):
    """``fn(*args)`` with ``ATTNKIT_KERNELS=backend`` (the dispatchers read it on every call)."""
    previous = os.environ.get("ATTNKIT_KERNELS")
    os.environ["ATTNKIT_KERNELS"] = backend
    try:
        return fn(*args)
    finally:
        if previous is None:
            os.environ.pop("ATTNKIT_KERNELS", None)
        else:
            os.environ["ATTNKIT_KERNELS"] = previous


# ----------------------------------------------------------------------------------------------------- inputs
def make_qkv(length: int, batch: int, dtype: torch.dtype, seed: int):
    """Random q/k/v as ``[B, H, S, D]`` views of ``[B, S, H, D]`` tensors (transformers' layout)."""
    _, hq, hkv, dim = SHAPE
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, length, hq, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(batch, length, hkv, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(batch, length, hkv, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    return q, k, v


def check(entries: dict[str, Selector], length: int, batch: int, dtype: torch.dtype) -> dict[str, float]:
    """Each entry against its reference on a short input; exits before any timing if one is wrong."""
    q, k, _ = make_qkv(length, batch, dtype, seed=1234)
    errors = {}
    for name, entry in entries.items():
        err = entry.error(entry.run(q, k), entry.reference(q, k))
        errors[name] = err
        print(f"check {name} at {length}: error {err:.2e} (max {entry.max_err:.0e})", flush=True)
        if not err <= entry.max_err:
            raise SystemExit(f"WRONG RESULT: {name} at length {length}: error {err:.2e} > {entry.max_err:.0e}; not timing")
    return errors


# ----------------------------------------------------------------------------------------------------- timing
@dataclass
class Row:
    method: str
    params: dict
    shape: str
    batch: int
    length: int
    dense_ms: float
    selection_ms: float
    ratio: float  # selection / dense
    break_even_density: float  # the density below which selection + sparse attention can beat dense
    check_err: float


def run_length(entries: dict[str, Selector], length: int, batch: int, dtype, errors: dict[str, float]) -> list[Row]:
    q, k, v = make_qkv(length, batch, dtype, seed=length)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    dense_ms = bench_ms(dense)
    print(f"{SHAPE[0]} L={length}: dense SDPA {dense_ms:.3f} ms", flush=True)
    rows = []
    for name, entry in entries.items():
        ms = bench_ms(lambda entry=entry: entry.run(q, k))
        rows.append(Row(
            method=name, params=entry.params, shape=SHAPE[0], batch=batch, length=length, dense_ms=dense_ms,
            selection_ms=ms, ratio=ms / dense_ms, break_even_density=max(0.0, 1 - ms / dense_ms),
            check_err=errors[name],
        ))
        print(f"  {name}: {ms:.3f} ms = {ms / dense_ms:.1%} of dense", flush=True)
        torch.cuda.empty_cache()
    return rows


def markdown(env: dict, rows: list[Row]) -> str:
    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}, commit {env['commit']}: "
        f"`{env['command']}`",
        "",
        "| method | shape | batch | length | dense SDPA ms | selection ms | selection / dense | break-even density "
        "| check err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.shape} | {r.batch} | {r.length // 1024}K | {r.dense_ms:.3f} | {r.selection_ms:.3f} "
            f"| {r.ratio:.1%} | {r.break_even_density:.2f} | {r.check_err:.1e} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ tuning
TUNE_CONFIGS = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "ONE_PASS": one}
    for one in (True, False)
    for bm, bn, w, st in (
        (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (64, 128, 8, 4), (128, 64, 8, 3), (128, 128, 8, 2),
        (128, 128, 8, 3),
    )
]


def tune(args) -> None:
    """Time every tile config of the antidiagonal kernel per (length, stride); print the fastest few."""
    from attnkit.kernels.antidiagonal import triton as tri

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for length in args.lengths:
        q, k, v = make_qkv(length, args.batch, dtype, seed=length)
        dense_ms = bench_ms(
            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
        )
        print(f"\n{SHAPE[0]} L {length}: dense SDPA {dense_ms:.3f} ms", flush=True)
        for stride in args.strides:
            expect = tri.antidiagonal_block_scores(q, k, args.block, stride)
            results = []
            for cfg in args.configs or TUNE_CONFIGS:
                try:
                    out = tri.antidiagonal_block_scores(q, k, args.block, stride, config=cfg)
                    if not torch.allclose(out, expect, rtol=1e-3, atol=1e-4):
                        results.append((math.inf, cfg, "WRONG"))
                        continue
                    ms = bench_ms(
                        lambda q=q, k=k, s=stride, cfg=cfg: tri.antidiagonal_block_scores(q, k, args.block, s, config=cfg)
                    )
                    results.append((ms, cfg, ""))
                except Exception as exc:  # out of shared memory / registers: not a candidate
                    results.append((math.inf, cfg, type(exc).__name__))
            default = tri.default_config(SHAPE[3], args.block // stride, dtype)
            t_default = bench_ms(lambda q=q, k=k, s=stride: tri.antidiagonal_block_scores(q, k, args.block, s))
            print(f"stride {stride}: default {default} {t_default:.3f} ms ({t_default / dense_ms:.1%} of dense)")
            for ms, cfg, note in sorted(results, key=lambda r: r[0])[:8]:
                print(f"  {ms:8.3f} ms {ms / dense_ms:6.1%}  {cfg} {note}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default=",".join(f"{n // 1024}k" for n in LENGTHS))
    ap.add_argument("--strides", default=",".join(map(str, STRIDES)), help="XAttention strides (comma list)")
    ap.add_argument("--block", type=int, default=BLOCK)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--methods", default="", help="comma list of entries to run (default: all)")
    ap.add_argument("--check-length", type=parse_length, default=4096, help="length of the correctness check")
    ap.add_argument("--tune", action="store_true", help="sweep the antidiagonal kernel's tile configs instead")
    ap.add_argument("--configs", type=json.loads, default=None, help="--tune: a JSON list of configs to try")
    ap.add_argument("--out", default="benchmarks/results", help="folder for selection-<timestamp>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.selection times GPU kernels against dense attention: no CUDA device here")
    args.lengths = [parse_length(x) for x in args.lengths.split(",") if x]
    args.strides = [int(x) for x in args.strides.split(",") if x]
    if args.tune:
        tune(args)
        return

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    entries = selectors(args.block, args.strides)
    if args.methods:
        wanted = [m for m in args.methods.split(",") if m]
        unknown = set(wanted) - set(entries)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(entries)}")
        entries = {name: entries[name] for name in wanted}
    env = environment()
    env["command"] = "python -m benchmarks.selection " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(env), flush=True)

    errors = check(entries, args.check_length, args.batch, dtype)
    rows: list[Row] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"selection-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for length in args.lengths:
        rows += run_length(entries, length, args.batch, dtype, errors)
        path.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=1))
    print()
    print(markdown(env, rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
