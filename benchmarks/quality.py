"""Quality of prefill sparsity methods vs dense, in one process: task scores, density, recall vs the oracle.

    python -m benchmarks.quality --model llama --recipes xattention,minference,flexprefill \\
        --lengths 4096,8192 --tasks passkey,niah_single --samples 10 --out runs/quality.json

The model is loaded once. The dense task scores are measured once per (task, length); then each recipe is applied
(its calibration runs on the built-in corpus: ``--calibration-length`` overrides the recipe's), scored on the same
samples, measured by :func:`attnkit.eval.fidelity.fidelity_at_lengths` (KL / top-1 vs dense, NLL, attention recall
beside the oracle's at equal density, and the density the oracle needs for 95% of the mass), and removed. Writes
JSON and prints a markdown table with the issue's goal checked: patched ≥ 98% of the dense score at a density at
most 1.3× the oracle's 95%-mass density.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import attnkit
from attnkit.eval.fidelity import fidelity_at_lengths
from attnkit.eval.harness import run_tasks
from attnkit.recipe import Recipe


def _recipe(spec: str, calibration_length: int | None) -> Recipe:
    """``NAME[:field=value...]``: a recipe name or file, with fields set on every step that has them
    (e.g. ``minference:dense_last_blocks=1``); ``calibration_length`` likewise when given."""
    name, *settings = spec.split(":")
    updates = {}
    for setting in settings:
        field, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"recipe {spec!r}: settings are field=value, got {setting!r}")
        updates[field] = yaml.safe_load(value)
    if calibration_length is not None:
        updates["calibration_length"] = calibration_length
    recipe = Recipe.load(name)
    fields = {k for step in recipe.steps for k in type(step).model_fields}
    unused = set(updates) - {"calibration_length"} - fields
    if unused:
        raise SystemExit(f"recipe {spec!r}: no step has the field(s) {sorted(unused)}")
    steps = []
    for step in recipe.steps:
        steps.append({**step.to_step(), **{k: v for k, v in updates.items() if k in type(step).model_fields}})
    return Recipe.load({**recipe.to_dict(), "steps": steps})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--recipes", default="xattention,minference,flexprefill")
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--tasks", default="passkey,niah_single")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--calibration-length", type=int, default=None)
    parser.add_argument("--fidelity-lengths", default=None, help="default: --lengths")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    fidelity_lengths = [int(x) for x in (args.fidelity_lengths or args.lengths).split(",")]
    tasks = args.tasks.split(",")

    model, tokenizer = attnkit.load_model(args.model, dtype=args.dtype)
    device = str(next(model.parameters()).device)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {"model": args.model, "device": name, "tasks": tasks, "lengths": lengths, "samples": args.samples}
    start = time.perf_counter()
    dense = run_tasks(model, tokenizer, tasks, lengths, samples=args.samples)
    result["dense"] = [vars(r) for r in dense]
    result["seconds_dense"] = time.perf_counter() - start
    print(f"dense on {name} ({device}): " + ", ".join(f"{r.task}@{r.length}={r.score:.2f}" for r in dense), flush=True)
    result["methods"] = {}
    for recipe_name in args.recipes.split(","):
        recipe = _recipe(recipe_name, args.calibration_length)
        t0 = time.perf_counter()
        attnkit.apply(model, recipe)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        patched = run_tasks(model, tokenizer, tasks, lengths, samples=args.samples)
        eval_s = time.perf_counter() - t0
        fidelity = fidelity_at_lengths(model, tokenizer, fidelity_lengths)
        decode_fidelity = _decode_fidelity(model, tokenizer, fidelity_lengths)
        calibration = getattr(model, "attnkit_calibration", None)
        attnkit.unpatch(model)
        if hasattr(model, "attnkit_calibration"):
            del model.attnkit_calibration
        result["methods"][recipe_name] = {
            "recipe": recipe.to_dict(),
            "tasks": [vars(r) for r in patched],
            "fidelity": fidelity,
            "decode_fidelity": decode_fidelity,
            "calibration": calibration,
            "seconds": {"fit": fit_s, "eval": eval_s},
        }
        print(f"{recipe_name}: fit {fit_s:.0f}s, " + ", ".join(f"{r.task}@{r.length}={r.score:.2f}" for r in patched), flush=True)
        for f in fidelity:
            print(f"  fidelity @{f['length']}: " + ", ".join(f"{k} {v:.4f}" for k, v in f.items() if isinstance(v, float)), flush=True)
        for f in decode_fidelity:
            print(f"  decode fidelity @{f['length']}: " + ", ".join(f"{k} {v:.4f}" for k, v in f.items() if isinstance(v, float)), flush=True)
        _write(args.out, result)  # after every recipe: a run cut short keeps what it measured
    print(markdown(result))
    _write(args.out, result)
    return result


def _decode_fidelity(model, tokenizer, lengths: list[int], decode_tokens: int = 64) -> list[dict]:
    """For recipes with a decode method (Quest): KL / top-1 of ``decode_tokens`` teacher-forced decode steps vs dense
    after a prefill of the rest of ``length`` corpus tokens (:func:`attnkit.eval.fidelity.compare_decode`)."""
    from attnkit.attention import attnkit_layers
    from attnkit.eval.fidelity import compare_decode, corpus_ids

    if not any(layer.decode is not None for layer in attnkit_layers(model)):
        return []
    return [{"length": n, **compare_decode(model, corpus_ids(tokenizer, n), decode_tokens)} for n in lengths]


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str))


def markdown(result: dict) -> str:
    """Method × length rows: density, recall vs oracle, oracle's 95%-mass density, mean task score vs dense."""
    dense = {}
    for r in result["dense"]:
        dense.setdefault(r["length"], []).append(r["score"])
    lines = [
        f"model `{result['model']}` on {result['device']}, tasks {', '.join(result['tasks'])}, {result['samples']} samples",
        "",
        "| method | length | density | recall | oracle recall (same density) | oracle density for 95% | "
        "score | dense | ratio | goal (≥0.98, ≤1.3× oracle) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        fid = {f["length"]: f for f in m["fidelity"]}
        scores = {}
        for r in m["tasks"]:
            scores.setdefault(r["length"], []).append(r["score"])
        for length in sorted(scores):
            s = sum(scores[length]) / len(scores[length])
            d = sum(dense[length]) / len(dense[length])
            f = fid.get(length, {})
            ratio = s / d if d else float("nan")
            density, needed = f.get("density"), f.get("oracle_density_95")
            goal = "–"
            if density is not None and needed:
                goal = "✓" if ratio >= 0.98 and density <= 1.3 * needed else "✗"

            def fmt(x):
                return "–" if x is None else f"{x:.3f}"

            lines.append(
                f"| {name} | {length} | {fmt(density)} | {fmt(f.get('recall'))} | {fmt(f.get('oracle_recall'))} | "
                f"{fmt(needed)} | {s:.2f} | {d:.2f} | {ratio:.2f} | {goal} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
