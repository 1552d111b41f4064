"""KV-head (GQA/MQA) and latent (MLA) conversion: quality before / after conversion / after recovery, KV bytes, and
decode speed and memory at long context.

Quality (one model, several conversion recipes, one process)::

    python -m benchmarks.conversion quality --model llama --recipes gqa,mla --recover-steps 20 --seq-len 256 \\
        --eval-tokens 2048 --tasks passkey --task-lengths 1024 --samples 5 --out runs/conversion-llama.json

The built-in corpus is split once: its last ``--eval-tokens`` tokens are held out (NLL is measured there, in
``--eval-len`` windows); calibration and recovery read only the text before them (consecutive ``--seq-len`` windows).
Per recipe: the original model's NLL and task scores (measured once), the converted model's *before* recovery (the
recipe's ``recover:`` block removed), then after ``--recover-steps`` of recovery distillation from the original
(logit KL, the recipe's other recovery settings), with tokens and seconds spent and KV-cache bytes per token
before/after (model dtype and bf16). Always printed too: the analytic KV bytes of the Llama-3-8B shape (GQA 8 KV
heads) against this recipe's shapes, said against GQA (the model's real baseline) and against MHA.

Decode (random weights; speed does not depend on them)::

    python -m benchmarks.conversion decode --shape llama3-8b --layers 4 --lengths 8k,32k,64k,128k --batch 1 \\
        --out runs/conversion-decode.json

times prefill and per-token decode (median of CUDA events after warm-up, :mod:`attnkit.eval.speed`), peak memory and
the KV cache actually held, for the original model and its GQA/MLA conversions (``--mla-rank``, ``--rope-dim``,
``--gqa-heads``) in the same process. Correctness first: each converted model's absorbed and unabsorbed MLA paths
and its cached decode must match before it is timed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import attnkit
from attnkit.convert.conversion import ConversionMethod, RecoverySpec, kv_bytes_per_token
from attnkit.recipe import Recipe
from benchmarks.quality import _recipe

LLAMA3_8B = {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128}


def _lengths(text: str) -> list[int]:
    return [int(p[:-1]) * 1024 if p.lower().endswith("k") else int(p) for p in text.split(",") if p]


# ------------------------------------------------------------------------------------------------ analytic
def analytic_kv(shape: dict[str, int], recipe: Recipe | None = None) -> list[dict[str, Any]]:
    """Values cached per token and layer for a model shape: MHA, its GQA, and what each conversion step gives."""
    d, hq, hkv = shape["head_dim"], shape["q_heads"], shape["kv_heads"]
    mha, gqa = 2 * hq * d, 2 * hkv * d
    rows = [{"what": "MHA (all heads cache K and V)", "values": mha},
            {"what": f"GQA as shipped ({hkv} KV heads)", "values": gqa},
            {"what": "DeepSeek-V3 MLA layout (latent 512 + rope key 64)", "values": 576}]
    for step in (recipe.steps if recipe else []):
        if step.method_name == "gqa":
            g = step.target_heads(hkv)
            rows.append({"what": f"{recipe.name}: gqa → {g} KV heads", "values": 2 * g * d})
        elif step.method_name == "mla":
            rank = step.kv_rank if step.kv_rank is not None else None
            if rank is not None:
                rows.append({"what": f"{recipe.name}: mla latent {rank} + rope key {step.rope_dim}",
                             "values": rank + step.rope_dim})
    for row in rows:
        row["vs_gqa"] = row["values"] / gqa - 1
        row["vs_mha"] = row["values"] / mha - 1
    return rows


# ------------------------------------------------------------------------------------------------ quality
def _split_corpus(tokenizer, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from attnkit.eval.corpus import sentences

    ids = tokenizer(" ".join(sentences()), return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < 4 * eval_tokens:
        raise SystemExit(f"the corpus has {ids.numel()} tokens: too few to hold out {eval_tokens}")
    return ids[: -eval_tokens], ids[-eval_tokens:]


def _windows(ids: torch.Tensor, length: int, count: int, offset: int = 0) -> torch.Tensor:
    """``[count, length]`` consecutive windows of ``ids`` from ``offset`` (wrapping around)."""
    need = offset + count * length
    ring = ids.repeat(need // ids.numel() + 1)
    return ring[offset : offset + count * length].view(count, length)


@torch.no_grad()
def held_out_nll(model, held_out: torch.Tensor, window: int) -> float:
    """Mean next-token NLL (nats) over consecutive ``window``-token chunks of the held-out ids."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, held_out.numel() - 1, window):
        ids = held_out[start : start + window][None].to(device)
        if ids.shape[1] < 2:
            break
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def _measure(model, tokenizer, held_out, args) -> dict[str, Any]:
    from attnkit.eval.harness import run_tasks

    start = time.perf_counter()
    row: dict[str, Any] = {"nll": round(held_out_nll(model, held_out, args.eval_len), 4)}
    row["ppl"] = round(math.exp(row["nll"]), 3)
    if args.tasks:
        results = run_tasks(model, tokenizer, args.tasks.split(","), _lengths(args.task_lengths),
                            samples=args.samples, show_progress=False)
        row["tasks"] = {f"{r.task}@{r.length}": r.score for r in results}
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    return row


def quality(args) -> dict[str, Any]:
    from attnkit.train.recover import recover

    original, tokenizer = attnkit.load_model(args.model, dtype=args.dtype, device=args.device)
    original.eval()
    element = next(original.parameters()).element_size()
    train_ids, held_out = _split_corpus(tokenizer, args.eval_tokens)
    results: dict[str, Any] = {"model": args.model, "dtype": str(next(original.parameters()).dtype),
                               "device": str(next(original.parameters()).device), "args": vars(args),
                               "held_out_tokens": held_out.numel(), "recipes": {}}
    print(f"== {args.model}: original", flush=True)
    results["original"] = _measure(original, tokenizer, held_out, args)
    results["original"]["kv_bytes_per_token"] = kv_bytes_per_token(original, element)
    print(json.dumps(results["original"]), flush=True)
    for name in args.recipes.split(","):
        recipe = _recipe(name, None)  # NAME[:field=value...], e.g. mla:kv_rank=24:rope_dim=8
        steps = [s for s in recipe.steps if isinstance(s, ConversionMethod)]
        spec = next((s.recover for s in steps if s.recover is not None), None) or RecoverySpec()
        spec = spec.model_copy(update={k: v for k, v in (("steps", args.recover_steps), ("seq_len", args.seq_len),
                                                         ("lr", args.lr)) if v is not None})
        bare = Recipe.load({**recipe.to_dict(), "steps": [{**s.to_step(), "recover": None} for s in recipe.steps]})
        calibration = _windows(train_ids, args.calibration_len, max(1, args.calibration_tokens // args.calibration_len))
        entry: dict[str, Any] = {"recipe": recipe.to_dict()}
        student = copy.deepcopy(original)
        print(f"== {name}: convert", flush=True)
        start = time.perf_counter()
        attnkit.apply(student, bare, data=calibration)
        entry["convert_seconds"] = round(time.perf_counter() - start, 1)
        entry["calibration_tokens"] = calibration.numel()
        entry["conversion"] = getattr(student, "attnkit_conversion", None)
        entry["kv_bytes_per_token"] = {"before": kv_bytes_per_token(original, element),
                                       "after": kv_bytes_per_token(student, element), "element_bytes": element,
                                       "before_bf16": kv_bytes_per_token(original, 2),
                                       "after_bf16": kv_bytes_per_token(student, 2)}
        entry["converted"] = _measure(student, tokenizer, held_out, args)
        print(json.dumps(entry["converted"]), flush=True)
        if spec.steps > 0:
            print(f"== {name}: recover {spec.steps} steps × {spec.batch_size}×{spec.seq_len} tokens", flush=True)
            train = _windows(train_ids, spec.seq_len, spec.steps * spec.batch_size * spec.grad_accum,
                             offset=calibration.numel())
            result = recover(student, original, spec, data=train, show_progress=True)
            entry["recovery"] = {"spec": spec.model_dump(mode="json"), "steps": result.steps, "tokens": result.tokens,
                                 "seconds": round(result.seconds, 1), "first_loss": result.first_loss,
                                 "last_loss": result.loss, "trainable_parameters": result.trainable_parameters,
                                 "history": result.history}
            entry["recovered"] = _measure(student, tokenizer, held_out, args)
            print(json.dumps(entry["recovered"]), flush=True)
        entry["analytic_llama3_8b"] = analytic_kv(LLAMA3_8B, recipe)
        results["recipes"][name] = entry
        del student
        if args.out:
            _write(results, args.out)
    print(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"### {results['model']} ({results['dtype']}, {results['device']}), NLL on {results['held_out_tokens']} "
             "held-out corpus tokens", "",
             "| model | NLL | PPL | tasks | KV bytes/token | tokens trained | seconds (convert / recover) |",
             "|---|---|---|---|---|---|---|"]

    def tasks(row):
        return ", ".join(f"{k} {v:.2f}" for k, v in row.get("tasks", {}).items()) or "-"

    o = results["original"]
    lines.append(f"| original | {o['nll']:.4f} | {o['ppl']:.2f} | {tasks(o)} | {o['kv_bytes_per_token']} | - | - |")
    for name, e in results["recipes"].items():
        kv = e["kv_bytes_per_token"]
        change = f"{kv['after']} ({kv['after'] / kv['before'] - 1:+.0%})"
        c = e["converted"]
        lines.append(f"| {name}, no training | {c['nll']:.4f} | {c['ppl']:.2f} | {tasks(c)} | {change} | 0 | "
                     f"{e['convert_seconds']} / - |")
        if "recovered" in e:
            r, rec = e["recovered"], e["recovery"]
            lines.append(f"| {name}, recovered | {r['nll']:.4f} | {r['ppl']:.2f} | {tasks(r)} | {change} | "
                         f"{rec['tokens']:,} | {e['convert_seconds']} / {rec['seconds']} |")
    lines += ["", "Llama-3-8B shape, KV values per token and layer (analytic):", "",
              "| cache | values | vs GQA (8 KV heads) | vs MHA |", "|---|---|---|---|"]
    seen = set()
    for e in results["recipes"].values():
        for row in e["analytic_llama3_8b"]:
            if row["what"] not in seen:
                seen.add(row["what"])
                lines.append(f"| {row['what']} | {row['values']} | {row['vs_gqa']:+.0%} | {row['vs_mha']:+.0%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ decode
def decode(args) -> dict[str, Any]:
    from attnkit.attention import attention_modules
    from attnkit.convert.mla import MLAAttention
    from attnkit.eval.speed import _measure as measure_speed
    from attnkit.models import random_model

    model, _ = random_model(args.shape, args.layers, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    calibration = torch.randint(0, model.config.vocab_size, (4, 1024), generator=torch.Generator().manual_seed(0))
    variants = {"original": model}
    heads = model.config.num_key_value_heads
    if args.gqa_heads:
        gqa = copy.deepcopy(model)
        attnkit.apply(gqa, {"attnkit": 1, "name": "gqa", "steps": [
            {"method": "gqa", "num_kv_heads": args.gqa_heads, "grouping": "contiguous", "align": False}]})
        variants[f"gqa {heads}→{args.gqa_heads}"] = gqa
    mla = copy.deepcopy(model)
    attnkit.apply(mla, {"attnkit": 1, "name": "mla", "steps": [
        {"method": "mla", "kv_rank": args.mla_rank, "rope_dim": args.rope_dim, "latent_norm": True}]},
        data=calibration)
    variants[f"mla {args.mla_rank}+{args.rope_dim}"] = mla
    # correctness before timing: absorbed == unabsorbed, and cached decode == full forward
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
    with torch.no_grad():
        full = mla(input_ids=ids).logits.float()
        for attention in attention_modules(mla):
            if isinstance(attention, MLAAttention):
                attention.absorb = "always"
        absorbed = mla(input_ids=ids).logits.float()
        for attention in attention_modules(mla):
            if isinstance(attention, MLAAttention):
                attention.absorb = "decode"
    tolerance = 5e-2 * float(full.abs().max())
    error = float((full - absorbed).abs().max())
    if error > tolerance:
        raise SystemExit(f"MLA absorbed path differs from the unabsorbed one by {error} (> {tolerance}): not timing")
    rows = []
    gen = torch.Generator().manual_seed(1)
    for length in _lengths(args.lengths):
        prompt = torch.randint(0, model.config.vocab_size, (args.batch, length), generator=gen).to(device)
        for name, variant in variants.items():
            try:
                row = measure_speed(variant, prompt, args.new_tokens, 1, args.repeats, name, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"variant": name, "length": length, "batch": args.batch, "error": "out of memory"})
                print(rows[-1], flush=True)
                continue
            rows.append({"variant": name, "length": length, "batch": args.batch, "prefill_ms": row.prefill_ms,
                         "decode_ms_per_token": row.decode_ms_per_token, "peak_memory_mb": row.peak_memory_mb,
                         "kv_cache_mb": row.kv_cache_mb, "kv_bytes_per_token": row.kv_bytes_per_token})
            print(json.dumps(rows[-1]), flush=True)
    results = {"shape": args.shape, "layers": args.layers, "dtype": str(next(model.parameters()).dtype),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
               "absorbed_vs_unabsorbed_max_error": error, "rows": rows}
    lines = ["| variant | length | batch | prefill ms | decode ms/token | peak MB | KV MB | KV B/token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['length']} | {r['batch']} | {r['error']} | | | | |")
            continue
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['variant']} | {r['length']} | {r['batch']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_token']:.3f} | {peak} | {r['kv_cache_mb']:.1f} | {r['kv_bytes_per_token']:.0f} |")
    print("\n".join(lines))
    if device.type != "cuda":
        print("CPU run: these timings show the code runs; they are not speed claims.")
    if args.out:
        _write(results, args.out)
    return results


def _write(results: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="NLL and task scores before / after conversion / after recovery")
    q.add_argument("--model", default="llama")
    q.add_argument("--recipes", default="gqa,mla", help="recipe names/files, each NAME[:field=value...]")
    q.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens at the end of the corpus")
    q.add_argument("--eval-len", type=int, default=1024, help="NLL window length")
    q.add_argument("--tasks", default="passkey", help="bundled tasks (empty: none)")
    q.add_argument("--task-lengths", default="1024")
    q.add_argument("--samples", type=int, default=5)
    q.add_argument("--calibration-tokens", type=int, default=8192)
    q.add_argument("--calibration-len", type=int, default=512)
    q.add_argument("--recover-steps", type=int, default=None, help="override the recipe's recover.steps")
    q.add_argument("--seq-len", type=int, default=None, help="override the recipe's recover.seq_len")
    q.add_argument("--lr", type=float, default=None, help="override the recipe's recover.lr")
    q.add_argument("--dtype", default=None)
    q.add_argument("--device", default=None)
    q.add_argument("--out", default=None)
    d = sub.add_parser("decode", help="decode speed and memory at long context (random weights)")
    d.add_argument("--shape", default="llama3-8b")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--lengths", default="8k,32k,64k,128k")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--mla-rank", type=int, default=512)
    d.add_argument("--rope-dim", type=int, default=64)
    d.add_argument("--gqa-heads", type=int, default=2)
    d.add_argument("--dtype", default=None)
    d.add_argument("--device", default=None)
    d.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return quality(args) if args.command == "quality" else decode(args)


if __name__ == "__main__":
    main()
