"""Does Quest's decode path find the needle? Page selection and attention recall, bound vs oracle, per layer.

    python -m benchmarks.quest_needle --model llama --task passkey --length 4096 --budget 1024 --samples 3 \\
        --out benchmarks/results/quest-smol-cpu/needle-4k.json

Per sample (the bundled task's own prompt builder, seed 0, depths 0.1/0.5/0.9 as ``run_tasks`` uses them): the
prompt is prefilled once with Quest's cache (prefill is dense), then the expected answer is teacher-forced one token
at a time from a copy of that cache, three ways: dense (a budget above the context: Quest's exact dense path),
Quest's bound and the oracle page scorer (each page's true largest logit). Every sparse decode step of every Quest
layer records, per query head, whether its selection holds the pages of the needle's answer tokens, the share
of the dense attention mass on the tokens it attends (recall), and whether it holds the page with the most dense
mass (``heavy_chosen``; the pages it misses are counted in ``heavy_missed_pages``). Each step's greedy token is compared with the
expected one. ``--check-generate`` also runs :meth:`generate` dense and with Quest at a budget above the context
(bound and oracle) on the same prompt and compares the tokens; ``--check-bounds`` compares the cache's page
bounds with their definition after the decode steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

import attnkit
from attnkit.cache import page_bounds_layer_of
from attnkit.eval.tasks import TASKS
from attnkit.kernels.paged_decode.reference import attended_tokens
from attnkit.sparsify.quest import QuestDecode

_RECORD: list[dict] | None = None
_NEEDLE_PAGES: set[int] = set()


def _recording_attend(original):
    def attend(self, query, key, value, key_padding_mask, scale):
        out = original(self, query, key, value, key_padding_mask, scale)
        if out is None or _RECORD is None:
            return out
        cache = page_bounds_layer_of(key)
        b, hq, _, d = query.shape
        hkv, s = key.shape[1], key.shape[2]
        scale = d**-0.5 if scale is None else scale
        logits = torch.einsum("bhgd,bhsd->bhgs", query[:, :, 0].float().view(b, hkv, hq // hkv, d), key.float())
        probs = (logits * scale).softmax(-1).reshape(b, hq, s)
        pages = self.last_pages
        mask = attended_tokens(pages, self.method.page_size, cache.pad, s)
        if mask.shape[1] != hq:  # shared by the GQA group
            mask = mask.repeat_interleave(hq // mask.shape[1], 1)
            pages = pages.repeat_interleave(hq // pages.shape[1], 1)
        recall = (probs * mask).sum(-1)[0]  # [Hq]
        chosen = [set(pages[0, h].tolist()) for h in range(hq)]
        last = int(cache.last_page[0])
        # The page holding the most dense attention mass, per head (unpadded batch of one: pages from slot 0).
        n = last + 1
        mass = torch.nn.functional.pad(probs[0], (0, n * self.method.page_size - s)).view(hq, n, -1).sum(-1)
        heavy = mass.argmax(-1).tolist()
        needle = {p for p in _NEEDLE_PAGES if p < last}  # the last page is always attended
        _RECORD.append(
            {
                "layer": self.layer_idx,
                "recall": recall.tolist(),
                "needle_any": [bool(needle & c) if needle else True for c in chosen],
                "needle_all": [needle <= c for c in chosen],
                "heavy_page": heavy,
                "heavy_mass": mass.amax(-1).tolist(),
                "heavy_chosen": [p == last or p in c for p, c in zip(heavy, chosen, strict=True)],
            }
        )
        return out

    return attend


def _answer_positions(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token positions of every occurrence of ``answer`` in ``prompt`` (tokens overlapping its characters)."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans, start = [], 0
    while (i := prompt.find(answer, start)) >= 0:
        spans.append((i, i + len(answer)))
        start = i + 1
    return [t for t, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


def _teacher_forced(model, cache, first_logits, answer_ids) -> tuple[list[int], list[dict]]:
    """Feed ``answer_ids`` one by one after the prefill; greedy predictions of each answer token and the records."""
    global _RECORD
    _RECORD = []
    preds = [int(first_logits.argmax())]
    with torch.no_grad():
        for t in answer_ids[:-1]:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            preds.append(int(out.logits[0, -1].argmax()))
    records, _RECORD = _RECORD, None
    return preds, records


def _summary(records: list[dict]) -> dict:
    if not records:
        return {}
    flat = lambda key: [x for r in records for x in r[key]]  # noqa: E731
    recall = flat("recall")
    per_layer = {}
    for r in records:
        per_layer.setdefault(r["layer"], []).append(sum(r["recall"]) / len(r["recall"]))
    missed = [(p, m) for r in records for p, m, ok in zip(r["heavy_page"], r["heavy_mass"], r["heavy_chosen"],
                                                        strict=True) if not ok]
    return {
        "steps_x_layers": len(records),
        "heavy_chosen": sum(flat("heavy_chosen")) / len(recall),
        "heavy_missed_pages": dict(Counter(p for p, _ in missed).most_common(5)),
        "heavy_missed_mass_mean": sum(m for _, m in missed) / len(missed) if missed else 0.0,
        "recall_mean": sum(recall) / len(recall),
        "recall_min": min(recall),
        "needle_any": sum(flat("needle_any")) / len(recall),
        "needle_all": sum(flat("needle_all")) / len(recall),
        "recall_per_layer": {k: sum(v) / len(v) for k, v in sorted(per_layer.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--skip", type=int, default=0, help="build but skip the first N samples (same prompts)")
    parser.add_argument("--share-gqa-group", action="store_true")
    parser.add_argument("--check-generate", action="store_true")
    parser.add_argument("--check-bounds", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # A diagnostic wrapper around Quest's decode step, installed for this run only (the library is never patched).
    original = QuestDecode.attend
    QuestDecode.attend = _recording_attend(original)
    try:
        return _run(args)
    finally:
        QuestDecode.attend = original


def _run(args: argparse.Namespace) -> dict:
    global _NEEDLE_PAGES
    model, tokenizer = attnkit.load_model(args.model)
    recipe = {"attnkit": 1, "name": "quest-needle", "steps": [
        {"method": "quest", "token_budget": args.budget, "share_gqa_group": args.share_gqa_group}]}
    attnkit.apply(model, recipe)
    layers = [m for m in model.modules() if isinstance(m, QuestDecode)]
    method = layers[0].method
    assert all(m.method is method for m in layers)
    depths = [float(x) for x in args.depths.split(",")]
    rng = random.Random(0)
    result = {"model": args.model, "task": args.task, "length": args.length, "budget": args.budget, "skip": args.skip,
              "share_gqa_group": args.share_gqa_group, "samples": []}
    for i in range(args.samples):
        t0 = time.perf_counter()
        sample = TASKS[args.task].build(tokenizer, args.length, depths[i % len(depths)], rng)
        if i < args.skip:
            continue
        ids = tokenizer(sample.prompt, add_special_tokens=False, return_tensors="pt").input_ids
        answer_ids = tokenizer(" " + sample.answer + ".", add_special_tokens=False).input_ids
        positions = _answer_positions(tokenizer, sample.prompt, sample.answer)
        _NEEDLE_PAGES = {p // method.page_size for p in positions}
        row = {"depth": sample.depth, "tokens": ids.shape[1], "answer": sample.answer,
               "answer_tokens": tokenizer.convert_ids_to_tokens(answer_ids), "needle_positions": positions,
               "needle_pages": sorted(_NEEDLE_PAGES)}
        if args.check_generate:
            row["generate"] = _check_generate(model, tokenizer, method, ids)
        method.token_budget, method.scoring = args.budget, "bound"
        cache = attnkit.make_cache(model)
        with torch.no_grad():
            first = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        for name, budget, scoring in [("dense", 1 << 20, "bound"), ("bound", args.budget, "bound"),
                                      ("oracle", args.budget, "oracle")]:
            method.token_budget, method.scoring = budget, scoring
            run_cache = copy.deepcopy(cache)
            preds, records = _teacher_forced(model, run_cache, first, answer_ids)
            row[name] = {"predicted": tokenizer.convert_ids_to_tokens(preds),
                         "correct": [p == a for p, a in zip(preds, answer_ids, strict=True)], **_summary(records)}
            if args.check_bounds and name == "bound":
                row["bounds_max_error"] = _bounds_error(run_cache, method.page_size)
        method.token_budget, method.scoring = args.budget, "bound"
        row["seconds"] = time.perf_counter() - t0
        result["samples"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("needle_positions",)}, default=str)
              .replace('"recall_per_layer"', '\n  "recall_per_layer"'), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _check_generate(model, tokenizer, method, ids) -> dict:
    """Greedy ``generate`` dense vs Quest at a budget above the context (bound and oracle), 16 new tokens."""
    out = {}
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 16, "do_sample": False}
    with torch.no_grad():
        with attnkit.dense(model):
            dense = model.generate(**kwargs)[0, ids.shape[1]:]
        out["dense"] = tokenizer.decode(dense)
        for scoring in ("bound", "oracle"):
            method.token_budget, method.scoring = -(-(ids.shape[1] + 16) // 16) * 16, scoring
            got = model.generate(**kwargs, past_key_values=attnkit.make_cache(model))[0, ids.shape[1]:]
            out[f"full_budget_{scoring}_equal"] = bool(torch.equal(got, dense))
            method.token_budget = 64 * method.page_size  # 1024 tokens with page 16: the sparse path
            got = model.generate(**kwargs, past_key_values=attnkit.make_cache(model))[0, ids.shape[1]:]
            out[f"budget_{method.token_budget}_{scoring}"] = tokenizer.decode(got)
    return out


def _bounds_error(cache, page: int) -> float:
    """Largest |bound - definition| over the cache's Quest layers (pages from each row's first real token)."""
    worst = 0.0
    for layer in cache.layers:
        if not getattr(layer, "track_bounds", False) or layer.page_min is None:
            continue
        keys = layer.keys[0]  # [H, S, D], unpadded batch of one
        s = keys.shape[1]
        pages = -(-s // page)
        fill = pages * page - s
        k = torch.cat([keys, keys[:, -1:].expand(-1, fill, -1)], 1).view(keys.shape[0], pages, page, -1)
        worst = max(worst, float((layer.page_min[0, :, :pages] - k.amin(2)).abs().max()),
                    float((layer.page_max[0, :, :pages] - k.amax(2)).abs().max()))
    return worst


if __name__ == "__main__":
    main()
