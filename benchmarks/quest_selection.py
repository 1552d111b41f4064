"""How much of the true attention Quest's page choice keeps, per page scorer (a diagnostic, CPU or GPU).

A real model reads a long-context task prompt (``attnkit.eval.tasks``) and decodes its first answer tokens densely
(greedy). At every decode step, every layer past ``dense_layers`` and every query head, the page scorers below
choose ``token_budget / page_size - 1`` complete pages (plus the current page, always attended), and the step is
scored by the *attention-mass recall*: the share of the query's true softmax weight (over all keys) that falls on
the attended keys. 1.0 means sparse decode would attend exactly like dense at that step and head.

Scorers (all from the same per-page key summaries; ``c = (M + m) / 2`` and ``r = (M - m) / 2`` are the centre and
half-width of each page's per-channel key range):

- ``oracle``: the page's largest true logit (reads every key: the best a page scorer can do at this budget);
- ``bound``: Quest's upper bound ``Σ_i max(q_i M_i, q_i m_i) = q·c + |q|·r``;
- ``alpha=A``: ``q·c + A·|q|·r``, the bound with its per-channel slack scaled by ``A`` (``A = 1`` is the bound,
  ``A = 0`` the page's range centre); computed by the same two dot products as the bound, with scaled queries.

Example::

    python -m benchmarks.quest_selection --model llama --length 8192 --token-budget 1024 --task niah_single \\
        --samples 3 --steps 4 --scorers oracle,bound,alpha=0.5,alpha=0.25 --page-sizes 16,8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface

from attnkit.kernels.page_scores.reference import oracle_page_scores, page_scores

RECORDER = "attnkit_selection_recorder"


def score_pages(scorer: str, query: torch.Tensor, key: torch.Tensor, page_size: int, pages: int) -> torch.Tensor:
    """``query [Hq, D]``, ``key [Hkv, S, D]`` → ``[Hq, pages]`` scores of the first ``pages`` complete pages, by
    Quest's own references: :func:`~attnkit.kernels.page_scores.reference.oracle_page_scores`, or
    :func:`~attnkit.kernels.page_scores.reference.page_scores` with ``slack`` (the bound: 1) over the pages' min/max."""
    valid = torch.tensor([pages], device=query.device)
    pad = torch.zeros(1, dtype=torch.int32, device=query.device)
    if scorer == "oracle":
        return oracle_page_scores(query[None], key[None], pad, page_size, pages, valid)[0]
    slack = 1.0 if scorer == "bound" else float(scorer.split("=", 1)[1])
    k = key[:, : pages * page_size].float().view(key.shape[0], pages, page_size, key.shape[-1])
    return page_scores(query[None].float(), k.amin(2)[None], k.amax(2)[None], valid, slack=slack)[0]


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense decode attention weights: ``query [Hq, D]``, ``key [Hkv, S, D]`` → ``[Hq, S]`` (GQA: query head h reads
    KV head h // (Hq / Hkv))."""
    hq, hkv = query.shape[0], key.shape[0]
    logits = torch.einsum("hgd,hsd->hgs", query.float().view(hkv, hq // hkv, -1), key.float())
    return torch.softmax(logits.reshape(hq, -1) * scale, dim=-1)


def mass_recall(probs: torch.Tensor, query: torch.Tensor, key: torch.Tensor, scorer: str, page_size: int,
                budget: int) -> torch.Tensor | None:
    """Attention-mass recall per query head (``[Hq]``) of one decode step, or None when every page fits the budget.
    ``probs [Hq, S]`` (:func:`attention_probs`), ``query [Hq, D]`` (post-RoPE), ``key [Hkv, S, D]`` (the whole cache,
    the current token last)."""
    hq, s = probs.shape
    last = (s - 1) // page_size  # the current page: attended whatever the scores
    k = budget // page_size - 1
    if last <= k:
        return None
    chosen = score_pages(scorer, query, key, page_size, last).topk(k, dim=-1).indices  # [Hq, k]
    page_mass = probs[:, : last * page_size].view(hq, last, page_size).sum(-1)
    return page_mass.gather(-1, chosen).sum(-1) + probs[:, last * page_size :].sum(-1)


class Recorder:
    """An ``AttentionInterface`` entry: dense SDPA (transformers' own), plus the recall of every scorer at every
    decode call of the layers that Quest would make sparse."""

    def __init__(self, scorers: list[str], page_sizes: list[int], budget: int, dense_layers: set[int]):
        self.scorers, self.page_sizes, self.budget, self.dense_layers = scorers, page_sizes, budget, dense_layers
        self.recall: dict[str, list[float]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[-2] == 1 and module.layer_idx not in self.dense_layers:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            for row in range(query.shape[0]):
                probs = attention_probs(query[row, :, 0], key[row], scale)  # once per step, for every scorer
                for p in self.page_sizes:
                    for scorer in self.scorers:
                        r = mass_recall(probs, query[row, :, 0], key[row], scorer, p, self.budget)
                        if r is not None:
                            self.recall.setdefault(f"{scorer}@page{p}", []).extend(r.tolist())
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)


def summarize(values: list[float]) -> dict:
    v = sorted(values)
    return {
        "mean": statistics.fmean(v),
        "p01": v[int(0.01 * (len(v) - 1))],
        "p10": v[int(0.10 * (len(v) - 1))],
        "below_0.9": sum(x < 0.9 for x in v) / len(v),
        "n": len(v),
    }


@torch.no_grad()
def run(model_name: str, task: str, length: int, budget: int, samples: int, steps: int, scorers: list[str],
        page_sizes: list[int], dense_layers: set[int], seed: int = 0) -> dict:
    import attnkit
    from attnkit.eval.tasks import TASKS

    model, tokenizer = attnkit.load_model(model_name, dtype=torch.float32)
    model.eval()
    recorder = Recorder(scorers, page_sizes, budget, dense_layers)
    AttentionInterface.register(RECORDER, recorder)
    model.set_attn_implementation(RECORDER)
    rng = random.Random(seed)
    depths = (0.1, 0.5, 0.9)
    t0 = time.perf_counter()
    for i in range(samples):
        sample = TASKS[task].build(tokenizer, length, depths[i % len(depths)], rng)
        ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(ids, max_new_tokens=steps + 1, do_sample=False)  # the first step is the prefill's
        text = tokenizer.decode(out[0, ids.shape[1] :])
        print(f"sample {i} (depth {sample.depth}, {ids.shape[1]} tokens): {text!r} (answer {sample.answer})",
              flush=True)
    return {
        "model": model_name, "task": task, "length": length, "token_budget": budget, "samples": samples,
        "decode_steps": steps, "dense_layers": sorted(dense_layers), "seconds": time.perf_counter() - t0,
        "recall": {name: summarize(v) for name, v in recorder.recall.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="decode steps scored per sample")
    ap.add_argument("--scorers", default="oracle,bound,alpha=0.5,alpha=0.25,alpha=0")
    ap.add_argument("--page-sizes", default="16")
    ap.add_argument("--dense-layers", default="0,1")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    scorers = [s for s in args.scorers.split(",") if s]
    for s in scorers:
        if s not in ("oracle", "bound") and not s.startswith("alpha="):
            raise SystemExit(f"unknown scorer {s!r}: oracle, bound or alpha=A")
    result = run(args.model, args.task, args.length, args.token_budget, args.samples, args.steps, scorers,
                 [int(p) for p in args.page_sizes.split(",")], {int(x) for x in args.dense_layers.split(",") if x})
    print(f"\n{args.model}, {args.task} at {args.length}, budget {args.token_budget}, {args.samples} samples x "
          f"{args.steps} decode steps: attention-mass recall over (layer, head, step)")
    print("| scorer | mean | 1st pct | 10th pct | share < 0.9 | n |\n|---|---|---|---|---|---|")
    for name, r in result["recall"].items():
        print(f"| {name} | {r['mean']:.3f} | {r['p01']:.3f} | {r['p10']:.3f} | {r['below_0.9']:.3f} | {r['n']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
