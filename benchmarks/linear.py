"""Linear attention speed on a GPU: prefill throughput and decode time/memory vs context, against dense SDPA and fla.

    python -m benchmarks.linear --lengths 4096,16384,32768,65536,131072 --out runs/linear.json

Attention-level, one layer of a Llama-3-8B shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1), Hedgehog
features (``2 × 64 = 128`` per head, fp32 feature maps as attnkit runs them):

1. **prefill** at each length: dense causal SDPA (GQA, flash backend) vs attnkit's linear attention through its
   dispatcher (fla's chunked kernel on CUDA), fla's ``chunk_linear_attn`` called directly on pre-expanded heads (no
   layout changes: the kernel alone), the chunked PyTorch reference, and the LoLCATs 64-token window hybrid (PyTorch
   chunked form); plus the Hedgehog feature maps alone. Tokens/s and the ratio to dense. fla is checked against the
   reference first (relative RMSE ≤ 5e-3 at 4K); it is not timed if the check fails.
2. **decode**, one new token over a context of each length: dense SDPA over a KV cache of that length vs the linear
   recurrent step from a ``[B, Hkv, F, D]`` state (the eager path: both feature maps, then
   ``linear_attention_recurrent``), the fused Hedgehog step (``hedgehog_decode_step``: one Triton launch on CUDA,
   the same raw q/k/v and state; checked against the eager step's output and new state first, relative RMSE ≤ 1e-5,
   and not timed if the check fails), and the window hybrid's step (state + 63 cached tokens). Time per token and the
   bytes each keeps per layer: the linear ones must not grow with the context.

Medians of CUDA-event timings after warm-up, all in one process. For the model-level numbers (TTFT, TPOT, peak
memory through ``generate``-style steps) run ``attnkit bench --shape llama3-8b --recipe
benchmarks/recipes/linear-untrained.yaml`` (gpu_session.sh stage ``linear``). On a CPU this runs at tiny lengths to
show it works; its timings are not speed claims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from attnkit.convert.linearize import HedgehogFeatureMap
from attnkit.kernels.block_sparse import backend_name
from attnkit.kernels.linear_attention import (
    causal_linear_attention,
    hedgehog_decode_step,
    linear_attention_chunked,
    linear_attention_recurrent,
    window_linear_attention_chunked,
    window_linear_attention_quadratic,
)
from attnkit.kernels.linear_attention import fla as fla_backend


def timed(fn, repeat: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="4096,16384,32768,65536,131072")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=64, help="Hedgehog projection size (features: 2×)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument(
        "--reference-max", type=int, default=65536, help="longest length for the PyTorch references"
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    qmap = HedgehogFeatureMap(hq, d, args.feature_dim).to(device)
    kmap = HedgehogFeatureMap(hkv, d, args.feature_dim).to(device)
    # random (non-identity) projections, so the features are not trivially peaked
    with torch.no_grad():
        qmap.weight.normal_(0, d**-0.5)
        kmap.weight.normal_(0, d**-0.5)
    fla_reason = fla_backend.supports(torch.empty(1, device=device))
    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": {"Hq": hq, "Hkv": hkv, "D": d, "F": 2 * args.feature_dim, "dtype": str(dtype), "batch": 1},
        "fla": fla_reason or "available",
        "prefill": [],
        "decode": [],
    }
    print(
        f"{result['device']}: Hq {hq}, Hkv {hkv}, D {d}, F {2 * args.feature_dim}, {dtype}; fla: {result['fla']}",
        flush=True,
    )
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.full((hq,), 0.1, device=device)
    state_box: dict = {}
    for length in lengths:
        row = prefill_row(length, args, qmap, kmap, w, dtype, device, g, fla_reason, state_box, result)
        result["prefill"].append(row)
        print(
            "prefill "
            + json.dumps(
                {
                    k: round(v, 3) if isinstance(v, float) else v
                    for k, v in row.items()
                    if k.endswith("ms") or k == "length"
                }
            ),
            flush=True,
        )
        if cuda:
            torch.cuda.empty_cache()
    for length in lengths:
        row = decode_row(length, args, qmap, kmap, w, dtype, device, g)
        result["decode"].append(row)
        print(
            "decode "
            + json.dumps(
                {
                    k: round(v, 4) if isinstance(v, float) and not k.endswith("rmse") else v
                    for k, v in row.items()
                }
            ),
            flush=True,
        )
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def prefill_row(
    length, args, qmap, kmap, w, dtype, device, g, fla_reason, checked: dict, result: dict
) -> dict:
    """One prefill length: every backend timed on the same inputs (fla only once its check passed)."""
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, hq, length, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
    row: dict = {"length": length}
    row["dense_sdpa_ms"] = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        args.repeat,
    )
    qf, kf = qmap(q), kmap(k)
    row["feature_maps_ms"] = timed(lambda: (qmap(q), kmap(k)), args.repeat)
    if fla_reason is None:
        if "fla_ok" not in checked:  # correctness before any fla timing
            ref, _ = linear_attention_chunked(qf, kf, v)
            out, _ = fla_backend.linear_attention_chunked(qf, kf, v)
            err = rel_rmse(out, ref)
            checked["fla_ok"] = err <= 5e-3
            result["fla_check"] = {"length": length, "relative_rmse": err, "passed": checked["fla_ok"]}
            print(
                f"fla vs reference at {length}: relative RMSE {err:.2e} ({'ok' if checked['fla_ok'] else 'FAILED'})"
            )
        if checked["fla_ok"]:
            from fla.ops.linear_attn import chunk_linear_attn

            row["attnkit_linear_ms"] = timed(lambda: causal_linear_attention(qf, kf, v), args.repeat)
            groups = hq // hkv
            qq = qf.to(dtype).transpose(1, 2).contiguous()
            kk = kf.to(dtype).repeat_interleave(groups, 1).transpose(1, 2).contiguous()
            vv = v.repeat_interleave(groups, 1).transpose(1, 2).contiguous()
            row["fla_kernel_ms"] = timed(
                lambda: chunk_linear_attn(qq, kk, vv, scale=1.0, normalize=True), args.repeat
            )
    if length <= args.reference_max:
        slow = max(3, args.repeat // 3)
        row["reference_chunked_ms"] = timed(lambda: linear_attention_chunked(qf, kf, v), slow)
        row["window_hybrid_ms"] = timed(
            lambda: window_linear_attention_chunked(q, k, v, qf, kf, args.window, w), slow
        )
    for key in [name for name in row if name.endswith("_ms")]:
        row[key.replace("_ms", "_tokens_per_s")] = length / (row[key] / 1e3)
        if key != "dense_sdpa_ms":
            row[key.replace("_ms", "_vs_dense")] = row["dense_sdpa_ms"] / row[key]
    return row


@torch.no_grad()
def decode_row(length, args, qmap, kmap, w, dtype, device, g) -> dict:
    """One new token over ``length`` tokens of context: dense over a KV cache vs the linear and hybrid steps."""
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    feat = 2 * args.feature_dim
    row: dict = {"length": length}
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype, generator=g)
    kc = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn(1, hkv, length, d, device=device, dtype=dtype, generator=g)
    row["dense_ms"] = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True), args.repeat
    )
    row["dense_cache_bytes"] = 2 * kc.numel() * kc.element_size()
    state = (torch.rand(1, hkv, feat, d, device=device), torch.rand(1, hkv, feat, device=device) + 1)
    k1 = torch.randn(1, hkv, 1, d, device=device, dtype=dtype, generator=g)
    v1 = torch.randn(1, hkv, 1, d, device=device, dtype=dtype, generator=g)
    row["linear_ms"] = timed(lambda: linear_attention_recurrent(qmap(q), kmap(k1), v1, state), args.repeat)
    row["linear_state_bytes"] = sum(t.numel() * t.element_size() for t in state)
    # The fused step updates its state in place: it gets a copy, checked against one eager step before any timing.
    want, (want_kv, want_z) = linear_attention_recurrent(qmap(q), kmap(k1), v1, state)
    fused_kv, fused_z = state[0].clone(), state[1].clone()
    got = hedgehog_decode_step(q, k1, v1, qmap.weight, kmap.weight, fused_kv, fused_z)
    err = max(rel_rmse(got, want), rel_rmse(fused_kv, want_kv), rel_rmse(fused_z, want_z))
    row["fused_backend"] = fused_backend(q, qmap.weight, state)
    row["fused_check_relative_rmse"] = err
    if err <= 1e-5:
        row["fused_ms"] = timed(
            lambda: hedgehog_decode_step(q, k1, v1, qmap.weight, kmap.weight, fused_kv, fused_z), args.repeat
        )
        row["fused_vs_dense"] = row["dense_ms"] / row["fused_ms"]
        row["fused_vs_linear"] = row["linear_ms"] / row["fused_ms"]
    else:
        print(f"fused decode step vs the eager step at {length}: relative RMSE {err:.2e} (FAILED, not timed)")
    kw = torch.randn(1, hkv, args.window, d, device=device, dtype=dtype, generator=g)
    vw = torch.randn(1, hkv, args.window, d, device=device, dtype=dtype, generator=g)
    row["window_hybrid_ms"] = timed(
        lambda: window_linear_attention_quadratic(
            q, kw, vw, qmap(q), kmap(kw), args.window, w, 1.0, None, state
        ),
        args.repeat,
    )
    row["window_hybrid_bytes"] = (
        row["linear_state_bytes"] + 2 * (args.window - 1) * hkv * d * kw.element_size()
    )
    return row


def fused_backend(q, q_weight, state) -> str:
    """Which backend ``hedgehog_decode_step`` dispatches these inputs to (the same rule as its dispatcher)."""
    name = backend_name()
    if name == "reference":
        return "reference"
    try:
        from attnkit.kernels.linear_attention import triton as fused_triton
    except ImportError:
        return "reference"
    if name == "triton" or (q.is_cuda and fused_triton.supports(q, q_weight, *state) is None):
        return "triton"
    return "reference"


def markdown(result: dict) -> str:
    def f(row, key, digits=2):
        return "–" if key not in row else f"{row[key]:.{digits}f}"

    lines = [
        f"{result['device']}, {result['shape']}; fla: {result['fla']}",
        "",
        "| length | dense SDPA ms | attnkit linear ms (×dense) | fla kernel ms | PyTorch chunked ms | window-64 hybrid ms | feature maps ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["prefill"]:
        lin = (
            "–"
            if "attnkit_linear_ms" not in r
            else f"{r['attnkit_linear_ms']:.2f} ({r['attnkit_linear_vs_dense']:.2f}×)"
        )
        lines.append(
            f"| {r['length']} | {f(r, 'dense_sdpa_ms')} | {lin} | {f(r, 'fla_kernel_ms')} | {f(r, 'reference_chunked_ms')} | "
            f"{f(r, 'window_hybrid_ms')} | {f(r, 'feature_maps_ms')} |"
        )
    lines += [
        "",
        "| context | dense decode ms | dense KV MiB | linear step ms | fused Hedgehog step ms (× dense) | state MiB "
        "| window hybrid step ms | MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
        fused = "failed check" if "fused_ms" not in r else f"{r['fused_ms']:.3f} ({r['fused_vs_dense']:.2f}×)"
        lines.append(
            f"| {r['length']} | {r['dense_ms']:.3f} | {r['dense_cache_bytes'] / 2**20:.1f} | {r['linear_ms']:.3f} | "
            f"{fused} | {r['linear_state_bytes'] / 2**20:.2f} | {r['window_hybrid_ms']:.3f} | "
            f"{r['window_hybrid_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
