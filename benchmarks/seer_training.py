"""Time SeerAttention gate distillation and its target kernel (GPU; runs on CPU too, slowly).

    python -m benchmarks.seer_training --shape smollm2-135m --layers 30 --seq-len 2048 --steps 20

1. the pooled-attention target: Triton kernel vs the PyTorch reference (checked equal first), one layer's shape;
2. distillation steps of the given recipe on a random-weight model of the given shape (``attnkit.models.random_model``:
   real attention shapes, random weights, random token ids; the speed of a step does not depend on the weights);
3. prefill time with the gates selecting blocks vs dense, at ``--prefill-len``.

Prints one JSON object (device, shapes, seconds per step, tokens/s, kernel timings).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnkit
from attnkit.kernels.pooled_attention import reference
from attnkit.models import MODEL_SHAPES, random_model
from attnkit.train.distill import distill_gates


def cuda_time(fn, repeat: int = 10) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock elsewhere), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--recipe", default="seer_attention")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill-len", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args)}

    # 1. the target kernel, one layer
    config = MODEL_SHAPES[args.shape][1]
    hq, hkv = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // hq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, args.seq_len, dim, generator=g).to(device, dtype)
    k = torch.randn(1, hkv, args.seq_len, dim, generator=g).to(device, dtype)
    from attnkit.kernels.pooled_attention import pooled_attention

    ref = reference.pooled_attention(q, k, 64)
    fast = pooled_attention(q, k, 64)
    result["target_max_abs_err"] = float((fast - ref).abs().max())
    result["target_reference_s"] = cuda_time(lambda: reference.pooled_attention(q, k, 64))
    result["target_dispatch_s"] = cuda_time(lambda: pooled_attention(q, k, 64))
    result["sdpa_same_shape_s"] = cuda_time(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(hq // hkv, 1), k.repeat_interleave(hq // hkv, 1), is_causal=True
        )
    )

    # 2. distillation steps
    model, _ = random_model(args.shape, args.layers, dtype=dtype, device=device)
    spec = attnkit.Recipe.load(args.recipe).to_dict()
    spec["steps"][0]["train"] = {**spec["steps"][0].get("train", {}), "steps": args.steps, "seq_len": args.seq_len}
    attnkit.apply(model, spec, fit=False)
    method = model.attnkit_state.recipe.steps[0]
    ids = torch.randint(0, model.config.vocab_size, (64, args.seq_len), generator=g)
    run = distill_gates(model, method, data=ids, show_progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    result["distill"] = {
        "steps": run.steps,
        "seconds": run.seconds,
        "seconds_per_step": run.seconds / max(1, run.steps),
        "tokens_per_second": run.tokens_per_second,
        "first_loss": run.history[0]["loss"],
        "last_loss": run.history[-1]["loss"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }

    # 3. prefill with the gates vs dense
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_len), generator=g).to(device)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    result["prefill_len"] = args.prefill_len
    result["prefill_seer_s"] = cuda_time(prefill, repeat=3)
    result["prefill_density"] = model.attnkit_stats.mean_density()
    with attnkit.dense(model):
        result["prefill_dense_s"] = cuda_time(prefill, repeat=3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
