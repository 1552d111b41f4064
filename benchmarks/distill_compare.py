"""Compare two `attnkit distill` runs of the same steps (e.g. one GPU vs two GPUs with FSDP2).

    python -m benchmarks.distill_compare RUN_A RUN_B [--out compare.json]

Prints, per logged step, the loss of each run and their relative difference; the largest absolute and relative
difference between the saved attnkit tensors (gates, thresholds, feature maps); and each run's throughput
(tokens of all processes / training seconds, from ``train/**/loss.jsonl``). Exit status 1 when the runs differ by
more than ``--rtol`` in any loss or ``--atol`` in any tensor, so a GPU session can stop on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def rows(run: Path) -> list[dict]:
    """The logged rows of a run's training (``train/loss.jsonl``, or each stage's ``train/*/loss.jsonl`` in order)."""
    files = sorted((run / "train").rglob("loss.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no train/**/loss.jsonl")
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def compare(a: Path, b: Path) -> dict:
    ra, rb = rows(a), rows(b)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        raise SystemExit(f"the runs logged different steps: {[r['step'] for r in ra]} vs {[r['step'] for r in rb]}")
    losses = [
        {"step": x["step"], "loss_a": x["loss"], "loss_b": y["loss"], "rel_diff": abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12),
         "tokens_a": x["tokens"], "tokens_b": y["tokens"]}
        for x, y in zip(ra, rb, strict=True)
    ]
    ta, tb = load_file(a / "attnkit.safetensors"), load_file(b / "attnkit.safetensors")
    if ta.keys() != tb.keys():
        raise SystemExit(f"the checkpoints hold different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    max_abs, max_rel, worst = 0.0, 0.0, None
    for key in ta:
        x, y = ta[key].float(), tb[key].float()
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        rel = diff / max(x.abs().max().item(), 1e-12) if x.numel() else 0.0
        if diff > max_abs:
            max_abs, worst = diff, key
        max_rel = max(max_rel, rel)
    throughput = {name: r[-1]["tokens"] / r[-1]["seconds"] if r[-1]["seconds"] else None for name, r in (("a", ra), ("b", rb))}
    return {"run_a": str(a), "run_b": str(b), "losses": losses, "tensors": len(ta), "max_abs_diff": max_abs,
            "max_rel_diff": max_rel, "worst_tensor": worst, "tokens_per_second": throughput}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rtol", type=float, default=2e-2, help="largest allowed relative loss difference")
    parser.add_argument("--atol", type=float, default=5e-2, help="largest allowed absolute tensor difference")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = compare(args.run_a, args.run_b)
    for row in result["losses"]:
        print(f"step {row['step']:>4}: loss {row['loss_a']:.5f} vs {row['loss_b']:.5f} (rel. diff {row['rel_diff']:.2e}), "
              f"tokens {row['tokens_a']} vs {row['tokens_b']}")
    print(f"{result['tensors']} tensors: max abs diff {result['max_abs_diff']:.3e} ({result['worst_tensor']}), "
          f"max rel diff {result['max_rel_diff']:.3e}")
    tps = result["tokens_per_second"]
    print(f"throughput: {tps['a']:,.0f} vs {tps['b']:,.0f} tokens/s ({tps['b'] / tps['a']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    worst_loss = max(r["rel_diff"] for r in result["losses"])
    ok = worst_loss <= args.rtol and result["max_abs_diff"] <= args.atol
    print("MATCH" if ok else f"MISMATCH (loss rel. diff {worst_loss:.2e} > {args.rtol} or tensor diff > {args.atol})")
    return 0 if ok else 1


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
