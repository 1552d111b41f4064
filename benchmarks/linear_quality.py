"""Quality of linearized attention vs the dense model, in one process: held-out NLL, task scores, training cost.

    python -m benchmarks.linear_quality --model llama \\
        --recipes hedgehog,lolcats,benchmarks/recipes/lolcats-layer-hybrid.yaml \\
        --tasks passkey,niah_single --lengths 1024 --samples 5 --out runs/linear-quality.json

The built-in corpus (Python's documentation prose) is tokenized once and split: the first 90 % of its tokens are the
training text (windows of the recipe's ``seq_len`` at seeded random offsets, passed to both training stages), the
last 10 % are held out for the NLL (windows of ``--nll-length`` tokens), so the NLL is measured on text the feature
maps and adapters never saw. The model is loaded once; its weights are restored after each recipe (stage 2 merges
LoRA into them). Per recipe: training seconds and tokens per stage, held-out NLL, mean MSE between the linear and
softmax attention outputs over the converted layers (on one held-out window, dense inputs), and the bundled task
scores on the same samples as the dense model's. ``--untrained`` adds the first recipe with both stages at 0 steps
(the feature maps as initialised), to show what the training bought. Writes JSON after every recipe and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnkit
from attnkit.eval.corpus import sentences
from attnkit.eval.fidelity import nll
from attnkit.eval.harness import run_tasks
from attnkit.recipe import Recipe


def _untrained(recipe: Recipe) -> Recipe:
    spec = recipe.to_dict()
    spec["name"] = f"{recipe.name} (untrained)"
    for step in spec["steps"]:
        if step["method"] == "linearize":
            step["transfer"]["steps"] = 0
            step["finetune"]["steps"] = 0
    return Recipe.load(spec)


def _training_windows(tokens: torch.Tensor, seq_len: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (rows,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--recipes", default="hedgehog,lolcats")
    parser.add_argument("--tasks", default="passkey")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--nll-length", type=int, default=1024)
    parser.add_argument("--nll-windows", type=int, default=4)
    parser.add_argument("--untrained", action="store_true", help="also the first recipe with no training")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]

    model, tokenizer = attnkit.load_model(args.model, dtype=args.dtype)
    device = next(model.parameters()).device
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tokens = tokenizer(" ".join(sentences()), return_tensors="pt", verbose=False)["input_ids"][0]
    split = int(tokens.numel() * 0.9)
    train_tokens, held = tokens[:split], tokens[split:]
    windows = min(args.nll_windows, held.numel() // args.nll_length)
    if windows < 1:
        raise SystemExit(f"the held-out text has {held.numel()} tokens: use a shorter --nll-length")
    held_ids = held[: windows * args.nll_length].view(windows, args.nll_length).to(device)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {
        "model": args.model, "device": name, "tasks": tasks, "lengths": lengths, "samples": args.samples,
        "train_tokens_available": int(split), "held_out_tokens": int(held_ids.numel()),
    }
    start = time.perf_counter()
    result["dense"] = {"nll": nll(model, held_ids)}
    dense_tasks = run_tasks(model, tokenizer, tasks, lengths, samples=args.samples, show_progress=False) if tasks else []
    result["dense"]["tasks"] = [vars(r) for r in dense_tasks]
    result["dense"]["seconds_eval"] = time.perf_counter() - start
    print(f"dense: NLL {result['dense']['nll']:.4f}, " + ", ".join(f"{r.task}@{r.length}={r.score:.2f}" for r in dense_tasks), flush=True)

    recipes = [Recipe.load(r) for r in args.recipes.split(",")]
    if args.untrained:
        recipes.insert(0, _untrained(recipes[0]))
    result["methods"] = {}
    for recipe in recipes:
        step = next(s for s in recipe.steps if s.method_name == "linearize")
        rows = max(1, step.transfer.steps * step.transfer.batch_size * step.transfer.grad_accum)
        data = _training_windows(train_tokens, step.transfer.seq_len, rows)
        t0 = time.perf_counter()
        attnkit.apply(model, recipe, data=data)
        fit_s = time.perf_counter() - t0
        training = [
            {"stage": r.label, "steps": r.steps, "tokens": r.tokens, "seconds": r.seconds, "final_loss": r.loss,
             "first_loss": r.history[0]["loss"] if r.history else None}
            for r in getattr(model, "attnkit_training", None) or []
        ]
        from attnkit.train.linearize import attention_output_error

        mse = attention_output_error(model, held_ids[:1])
        t0 = time.perf_counter()
        held_nll = nll(model, held_ids)
        patched = run_tasks(model, tokenizer, tasks, lengths, samples=args.samples, show_progress=False) if tasks else []
        eval_s = time.perf_counter() - t0
        converted = len(mse)
        attnkit.unpatch(model)
        model.load_state_dict(base)
        if hasattr(model, "attnkit_training"):
            del model.attnkit_training
        result["methods"][recipe.name] = {
            "recipe": recipe.to_dict(),
            "converted_layers": converted,
            "nll": held_nll,
            "attention_mse": sum(mse.values()) / max(1, len(mse)),
            "tasks": [vars(r) for r in patched],
            "training": training,
            "seconds": {"fit": fit_s, "eval": eval_s},
        }
        print(
            f"{recipe.name}: fit {fit_s:.0f}s ({sum(t['tokens'] for t in training)} tokens), NLL {held_nll:.4f}, "
            + ", ".join(f"{r.task}@{r.length}={r.score:.2f}" for r in patched),
            flush=True,
        )
        _write(args.out, result)
    print(markdown(result))
    _write(args.out, result)
    return result


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1, default=str))


def markdown(result: dict) -> str:
    """One row per model: converted layers, held-out NLL, attention MSE, task scores, training tokens and time."""
    def scores(rows):
        return ", ".join(f"{r['task']}@{r['length']} {r['score']:.2f}" for r in rows) or "–"

    d = result["dense"]
    lines = [
        f"model `{result['model']}` on {result['device']}; NLL on {result['held_out_tokens']} held-out corpus tokens; "
        f"tasks {', '.join(result['tasks']) or 'none'}, {result['samples']} samples",
        "",
        "| model | linear layers | NLL | ΔNLL | attention MSE | tasks | training tokens | training s |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | 0 | {d['nll']:.4f} | – | – | {scores(d['tasks'])} | – | – |",
    ]
    for name, m in result["methods"].items():
        tokens = sum(t["tokens"] for t in m["training"])
        secs = sum(t["seconds"] for t in m["training"])
        lines.append(
            f"| {name} | {m['converted_layers']} | {m['nll']:.4f} | {m['nll'] - d['nll']:+.4f} | {m['attention_mse']:.2e} | "
            f"{scores(m['tasks'])} | {tokens:,} | {secs:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
