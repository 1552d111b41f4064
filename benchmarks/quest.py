"""Quest decode attention on the GPU: scoring + selection + sparse attention, against dense SDPA decode.

    python -m benchmarks.quest                                   # Llama-3-8B shape, 32K/64K/128K, batch 1 and 8
    python -m benchmarks.quest --lengths 32k --batches 1 --no-model
    python -m benchmarks.quest --model-layers 32 --model-length 128k   # + time per output token, random 8B model
    python -m benchmarks.quest --kernel-report                    # compile for sm_90 here: registers, spills
    python -m benchmarks.quest --sweep-top-pages --lengths 128k --no-model   # the top-page searches x warps
    python -m benchmarks.quest --lengths 128k --rerank-pages 256 --no-model   # + Quest with a reranked shortlist
    python -m benchmarks.quest --lengths "" --generate-graphed    # + real generation replayed from a CUDA graph

Part 1, one attention layer (32 query / 8 KV heads, head_dim 128, bf16; page 16, budget 2048 tokens), per context
length and batch, in one process:

- ``dense``: ``scaled_dot_product_attention`` of one query over the whole cache (GQA, no mask: the fused kernels),
  what attnkit's dense decode runs;
- ``naive``: a torch gather of ``budget`` random tokens per (row, KV head) + SDPA over them;
- ``quest`` / ``quest-shared``: the whole Quest decode step as the model runs it (:meth:`QuestDecode.attend`: page
  scores + top-page selection + split-K sparse attention), per query head / per GQA group; with the parts timed
  alone (and ``torch.topk`` beside the Triton selection).

Before timing, each point is checked against the PyTorch references: the Triton scores (finite entries, relative
error), the selected pages (the share of the reference's top pages that the kernel's scores select too), the
attention over the reference's pages, and the whole step's output. A point that fails reports no speedup.
Timings are medians of CUDA-event measurements with the L2 cache flushed between repetitions
(``triton.testing.do_bench``), eager (Python launches included, as ``model.generate`` runs) and replayed from a CUDA
graph (GPU time only, as serving engines run decode; every entry gets the same treatment). ``bytes bound``: dense KV bytes / (page-bound bytes + the budget's KV bytes), the
speedup a purely memory-bound Quest step could reach.

Part 2 (``--model-layers``, default 32: the whole 8B shape), time per output token of a random-weight Llama-3-8B
model at ``--model-length`` (``--model-batch`` rows, default 1) after a prefill: ``dense`` (transformers' SDPA with its ``DynamicCache``, which
re-concatenates the whole cache every step), ``dense-buffered`` (Quest's cache with a budget above the context:
dense attention, but a growing buffer instead of the concatenation), ``quest`` (budget 2048, layers 0-1 dense), each
with SDPA's default backend and with FlashAttention pinned (``-flash``: the default, cuDNN on an H100, rebuilds its
plan at every new key length).
The first two separate what the cache layout gives from what Quest's sparsity gives. ``quest-int8`` and
``quest-shared-int8`` score from 8-bit bounds (the latter once per GQA group). Every variant but ``dense`` is also
timed as a CUDA graph (``-graph``, FlashAttention pinned): one decode step captured at the context and replayed, the
GPU time per token without Python's launch overhead, as a serving engine runs decode (eager decode of this model is
host-bound: the profile in RESULTS.md). ``dense`` (transformers' ``DynamicCache``) is not captured: its step
concatenates the whole cache into new tensors, a second copy of the cache inside the graph; ``dense-buffered-graph``
(a one-slot write, as a static cache does) is the dense baseline of the graph rows. ``--generate-graphed`` also
times real generation with :func:`attnkit.generate_graphed` (every decode step replayed from one CUDA graph while
the context advances; dense-buffered then attends to every page through attnkit's paged kernel).

Writes ``quest-<timestamp>.json`` to ``--out`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.attention import bench_ms, environment, parse_length, rel_err

HQ, HKV, D = 32, 8, 128
LENGTHS = [32768, 65536, 131072]
BATCHES = [1, 8]
DEVICE = "cuda"  # a CPU smoke run of this script (tests) sets "cpu" with the Triton interpreter


def _setup(batch: int, length: int, page: int, budget: int, share: bool, dtype: torch.dtype, int8: bool = False,
           rerank: int = 0):
    from attnkit.sparsify.quest import Quest, QuestDecode

    g = torch.Generator(device=DEVICE).manual_seed(length + batch)
    method = Quest(page_size=page, token_budget=budget, dense_layers=[], share_gqa_group=share,
                   bounds_dtype="int8" if int8 else "model", rerank_pages=rerank)
    cache = method.make_cache_layer(0)
    # [B, S, H, D] storage viewed as [B, H, S, D], as transformers produces them.
    k = torch.randn(batch, length - 1, HKV, D, generator=g, device=DEVICE, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, length - 1, HKV, D, generator=g, device=DEVICE, dtype=dtype).transpose(1, 2)
    cache.update(k, v)
    cache.update_bounds(None)
    k1 = torch.randn(batch, HKV, 1, D, generator=g, device=DEVICE, dtype=dtype)
    key, value = cache.update(k1, k1.clone())
    cache.update_bounds(None)  # the decode step's own token, folded as the model does before attending
    q = torch.randn(batch, 1, HQ, D, generator=g, device=DEVICE, dtype=dtype).transpose(1, 2)  # [B, Hq, 1, D]
    return QuestDecode(method, 1, dense=False), cache, q, key, value


def check_point(decode, cache, q, key, value, scale: float) -> dict:
    """Kernels vs references at this exact shape; returns the errors and whether they pass."""
    from attnkit.kernels.page_scores import reference as score_ref
    from attnkit.kernels.page_scores import triton as score_tri
    from attnkit.kernels.paged_decode import reference as attn_ref
    from attnkit.kernels.paged_decode import triton as attn_tri

    method = decode.method
    query = q[:, :, 0]
    valid = (key.shape[-2] - cache.pad + method.page_size - 1) // method.page_size - 1
    bounds, scale8 = _bounds(cache)
    want = score_ref.page_scores(query, *bounds, valid, method.share_gqa_group, scale8)
    got = score_tri.page_scores(query, *bounds, valid, method.share_gqa_group, scale8)
    finite = torch.isfinite(want)
    score_err = rel_err(got[finite], want[finite])
    k = method.page_budget - 1
    ref_pages = want.topk(k, dim=-1).indices
    tri_pages = score_tri.top_pages(got, k).long()
    hits = (tri_pages.sort(-1).values[..., :, None] == ref_pages[..., None, :]).any(-1).float().mean().item()
    ref_out = attn_ref.sparse_decode_attention(query, key, value, ref_pages, method.page_size, cache.pad, scale)
    attn_err = rel_err(attn_tri.sparse_decode_attention(query, key, value, ref_pages, method.page_size, cache.pad, scale),
                       ref_out)
    step_err = rel_err(decode.attend(q, key, value, None, scale)[:, :, 0], ref_out) if hits == 1.0 else None
    ok = score_err < 1e-3 and hits >= 0.999 and attn_err < 1e-2 and (step_err is None or step_err < 1e-2)
    return {"score_rel_err": score_err, "selection_agreement": hits, "attention_rel_err": attn_err,
            "step_rel_err": step_err, "ok": ok}


def check_rerank(decode, q, key, value, scale: float) -> dict:
    """A rerank step against the same step with every kernel replaced by its PyTorch reference: the same pages and
    the same output."""
    import os

    out = decode.attend(q, key, value, None, scale)[:, :, 0]
    pages = decode.last_pages.long().sort(-1).values
    previous = os.environ.get("ATTNKIT_KERNELS")
    os.environ["ATTNKIT_KERNELS"] = "reference"
    try:
        want = decode.attend(q, key, value, None, scale)[:, :, 0]
        want_pages = decode.last_pages.long().sort(-1).values
    finally:
        if previous is None:
            del os.environ["ATTNKIT_KERNELS"]
        else:
            os.environ["ATTNKIT_KERNELS"] = previous
    hits = (pages[..., :, None] == want_pages[..., None, :]).any(-1).float().mean().item()
    err = rel_err(out, want)
    return {"selection_agreement": hits, "step_rel_err": err, "ok": hits >= 0.999 and err < 1e-2}


def _bounds(cache) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """The bounds Quest scores from: ``((min, max), None)`` or, with ``bounds_dtype: int8``, the 8-bit copy and its
    scales."""
    pages = cache.num_pages()
    if cache.int8_bounds:
        return (cache.page_min_int8[:, :, :pages], cache.page_max_int8[:, :, :pages]), cache.page_scale[:, :, :pages]
    return (cache.page_min[:, :, :pages], cache.page_max[:, :, :pages]), None


def bench_point(
    batch: int, length: int, page: int, budget: int, dtype: torch.dtype, int8: bool = True, rerank: int = 0
) -> dict:
    point: dict = {"batch": batch, "length": length, "page_size": page, "token_budget": budget}
    point.update(_bench_baselines(batch, length, page, budget, dtype))
    for bits in (False, True) if int8 else (False,):
        for share in (False, True):
            name = ("quest-shared" if share else "quest") + ("-int8" if bits else "")
            point[name] = _bench_quest(batch, length, page, budget, share, dtype, point, bits)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if rerank:  # the bound shortlists ``rerank`` pages, their true largest logits choose (shared, int8)
        point[f"quest-shared-int8-rerank{rerank}"] = _bench_quest(
            batch, length, page, budget, True, dtype, point, True, rerank=rerank
        )
    return point


def _bench_baselines(batch: int, length: int, page: int, budget: int, dtype: torch.dtype) -> dict:
    scale = D**-0.5
    _, _, q, key, value = _setup(batch, length, page, budget, False, dtype)
    dense_k, dense_v = key.contiguous(), value.contiguous()
    def dense():
        return F.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale, enable_gqa=True)

    out = {"dense_us": 1e3 * bench_ms(dense), "dense_graph_us": graph_us(dense)}
    idx = torch.randint(0, length, (batch, HKV, budget, 1), device=DEVICE).expand(-1, -1, -1, D)

    def naive():
        ks, vs = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
        return F.scaled_dot_product_attention(q, ks, vs, scale=scale, enable_gqa=True)

    out["naive_us"] = 1e3 * bench_ms(naive)
    out["naive_graph_us"] = graph_us(naive)
    return out


def _bench_quest(
    batch: int, length: int, page: int, budget: int, share: bool, dtype: torch.dtype, point: dict, int8: bool = False,
    rerank: int = 0,
) -> dict:
    from attnkit.kernels.page_scores import page_scores, top_pages
    from attnkit.kernels.paged_decode import sparse_decode_attention

    scale = D**-0.5
    decode, cache, q, key, value = _setup(batch, length, page, budget, share, dtype, int8, rerank)
    check = check_rerank(decode, q, key, value, scale) if rerank else check_point(decode, cache, q, key, value, scale)
    entry: dict = {"check": check}
    if not check["ok"]:
        return entry
    pages = cache.num_pages()
    query = q[:, :, 0]
    valid = (key.shape[-2] - cache.pad + page - 1) // page - 1
    bounds, scale8 = _bounds(cache)
    scores = page_scores(query, *bounds, valid, share, scale8)
    chosen = top_pages(scores, budget // page - 1)
    def step():
        # The whole step as a model runs it: the step's own token is folded into its page's bounds again (inside the
        # score kernel's launch), then scores, top pages, attention. Folding the same token again changes nothing.
        cache.bounded -= 1
        return decode.attend(q, key, value, None, scale)

    entry["total_us"] = 1e3 * bench_ms(step)
    entry["total_graph_us"] = graph_us(step)
    entry["total_includes_fold"] = True
    entry["scores_us"] = 1e3 * bench_ms(lambda: page_scores(query, *bounds, valid, share, scale8))
    entry["topk_us"] = 1e3 * bench_ms(lambda: scores.topk(budget // page - 1, dim=-1, sorted=False))
    entry["top_pages_us"] = 1e3 * bench_ms(lambda: top_pages(scores, budget // page - 1))
    entry["attention_us"] = 1e3 * bench_ms(lambda: sparse_decode_attention(query, key, value, chosen, page, cache.pad, scale))
    entry["bounds_update_us"] = 1e3 * bench_ms(lambda: _refold_last(cache))
    # The same parts replayed from CUDA graphs: GPU time without launch overhead, to see where a step's time goes.
    entry["scores_graph_us"] = graph_us(lambda: page_scores(query, *bounds, valid, share, scale8))
    entry["attention_graph_us"] = graph_us(lambda: sparse_decode_attention(query, key, value, chosen, page, cache.pad, scale))
    try:  # the fold may not be capturable (a host read of the cache's state): then it has no graph time
        entry["bounds_update_graph_us"] = graph_us(lambda: _refold_last(cache))
    except Exception as e:
        entry["bounds_update_graph_us"] = None
        entry["bounds_update_graph_error"] = str(e)[:200]
        torch.cuda.synchronize()
    if DEVICE == "cuda":
        from attnkit.kernels.page_scores import triton as score_tri

        for kernel in ("bitwise", "bitpairs", "radix", "bounded"):
            entry[f"top_pages_{kernel}_graph_us"] = graph_us(partial(score_tri.top_pages, scores, budget // page - 1, kernel))
        entry["topk_graph_us"] = graph_us(lambda: scores.topk(budget // page - 1, dim=-1, sorted=False))
        # The attention kernel's split count and warps (default: about four programs per SM, 4 warps): fewer splits
        # mean longer runs per program and less to combine. Each setting's error against the default's output is
        # recorded beside its time.
        from attnkit.kernels.paged_decode import triton as attn_tri

        want = attn_tri.sparse_decode_attention(query, key, value, chosen, page, cache.pad, scale)
        rows = []
        for splits in (4, 8, 16, 32, 64):
            for warps in (4, 8):
                run = partial(attn_tri.sparse_decode_attention, query, key, value, chosen, page, cache.pad, scale,
                              num_splits=splits, num_warps=warps)
                err = rel_err(run(), want)
                rows.append({"splits": splits, "warps": warps, "rel_err": err, "us": graph_us(run, rep_ms=60)})
        entry["attention_settings_graph"] = rows
    kv_bytes = 2 * batch * HKV * length * D * key.element_size()
    heads = HKV if share else HQ
    # bounds: 2·D values per page and KV head in the keys' dtype, or 2·D int8 + a float32 scale
    bound_bytes = batch * HKV * pages * (2 * D + 4 if int8 else 2 * D * key.element_size())
    quest_bytes = bound_bytes + 2 * batch * heads * budget * D * key.element_size()
    entry["bytes_bound"] = kv_bytes / quest_bytes
    entry["speedup_vs_dense"] = point["dense_us"] / entry["total_us"]
    entry["speedup_vs_naive"] = point["naive_us"] / entry["total_us"]
    entry["graph_speedup_vs_dense"] = point["dense_graph_us"] / entry["total_graph_us"]
    entry["graph_speedup_vs_naive"] = point["naive_graph_us"] / entry["total_graph_us"]
    return entry


def sweep_point(batch: int, length: int, page: int, budget: int, dtype: torch.dtype, scores: bool = True) -> dict:
    """Score-kernel launch settings and the four top-page searches, timed from CUDA graphs at one shape (after a
    check that each setting's scores equal the default's)."""
    from attnkit.kernels.page_scores import triton as score_tri

    _, cache, q, key, _ = _setup(batch, length, page, budget, False, dtype)
    pages = cache.num_pages()
    query = q[:, :, 0]
    valid = (key.shape[-2] - cache.pad + page - 1) // page - 1
    bounds = (cache.page_min[:, :, :pages], cache.page_max[:, :, :pages])
    rows = []
    for share in (False, True):
        want = score_tri.page_scores(query, *bounds, valid, share)
        for block_p in (32, 64) if scores else ():
            for warps in (4, 8):
                for stages in (1, 2, 3, 4):
                    for waves in (0, 2, 4, 8):
                        config = {"block_p": block_p, "warps": warps, "stages": stages, "waves": waves}
                        out = torch.empty_like(want)
                        try:
                            score_tri._launch_scores(query, *bounds, valid, out, share, **config)
                            same = bool(torch.equal(out, want))
                            us = graph_us(partial(score_tri._launch_scores, query, *bounds, valid, out, share, **config),
                                          rep_ms=60)
                        except Exception as e:  # a setting the compiler rejects (shared memory): reported, skipped
                            rows.append({"share": share, **config, "error": str(e)[:200]})
                            continue
                        rows.append({"share": share, **config, "us": us, "same": same})
        k = budget // page - 1
        for kernel in ("bitwise", "bitpairs", "radix", "bounded"):
            for warps in (4, 8, 16, 32):
                got = score_tri.top_pages(want, k, kernel, warps).long().sort(-1).values
                same = bool(torch.equal(got, want.topk(k, dim=-1).indices.sort(-1).values))
                rows.append({"share": share, "top_pages": kernel, "warps": warps, "same": same,
                             "us": graph_us(partial(score_tri.top_pages, want, k, kernel, warps), rep_ms=60)})
    bounds_mb = 2 * bounds[0].numel() * bounds[0].element_size() / 1e6
    for row in rows:
        if "us" in row and "top_pages" not in row:
            row["tb_per_s"] = bounds_mb / row["us"]  # MB / µs
    best = {share: min((r for r in rows if r["share"] == share and "block_p" in r and "us" in r), key=lambda r: r["us"],
                       default=None) for share in (False, True)}
    return {"batch": batch, "length": length, "bounds_mb": bounds_mb, "rows": rows,
            "best_per_head": best[False], "best_shared": best[True]}


def graph_us(fn, rep_ms: float = 300) -> float:
    """Median µs of ``fn`` replayed as a CUDA graph: the GPU time without Python launch overhead (how serving
    engines run decode steps). ``fn`` must not synchronize with the host."""
    if DEVICE != "cuda":
        return bench_ms(fn, rep_ms=rep_ms) * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * bench_ms(graph.replay, warmup_ms=min(50, rep_ms / 4), rep_ms=rep_ms)


def _refold_last(cache) -> None:
    """The per-token bounds update a decode step pays (folding its own key into the last page)."""
    cache.bounded -= 1
    cache.update_bounds()


# ------------------------------------------------------------------------------------------- model TPOT
@torch.no_grad()
def model_tpot(
    layers: int,
    length: int,
    budget: int,
    page: int,
    new_tokens: int,
    warmup: int,
    shape: str = "llama3-8b",
    prefill_chunk: int = 16384,
    profile_steps: int = 0,
    batch: int = 1,
    sdpa_backends: tuple[str, ...] = ("default", "flash"),
    graph: bool = True,
    generate_graphed: bool = False,
    only: tuple[str, ...] = (),
    profile_graph: int = 0,
    only_generate_graphed: bool = False,
) -> dict:
    from transformers import DynamicCache

    import attnkit
    from attnkit.models import random_model

    model, _ = random_model(shape, layers, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32, device=DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=DEVICE)
    big = -(-(length + 2 * (warmup + new_tokens) + profile_steps + 3) // page) * page  # + 2: the graph timing's steps
    variants = {
        "dense": None,
        "dense-buffered": {"method": "quest", "page_size": page, "token_budget": big, "dense_layers": [0, 1]},
        "quest": {"method": "quest", "page_size": page, "token_budget": budget, "dense_layers": [0, 1]},
        "quest-int8": {"method": "quest", "page_size": page, "token_budget": budget, "dense_layers": [0, 1],
                       "bounds_dtype": "int8"},
        "quest-shared-int8": {"method": "quest", "page_size": page, "token_budget": budget, "dense_layers": [0, 1],
                              "bounds_dtype": "int8", "share_gqa_group": True},
    }
    if only:
        unknown = set(only) - set(variants)
        if unknown:
            raise ValueError(f"unknown --variants {sorted(unknown)}; known: {list(variants)}")
        variants = {name: step for name, step in variants.items() if name in only}
    # SDPA's backend matters at decode: on an H100 with torch 2.11, the default picks cuDNN, which rebuilds its
    # execution plan whenever the key length changes, i.e. at every decode step (~5 ms of host time per call, seen
    # in this benchmark's profile); "-flash" variants pin FlashAttention (memory-efficient as fallback), what a
    # serving engine would run. Both are timed on the same cache, one after the other.
    backends = {"": None, "-flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}
    backends = {suffix: b for suffix, b in backends.items() if (suffix or "-default").lstrip("-") in sdpa_backends}
    out: dict = {"layers": layers, "length": length, "batch": batch, "token_budget": budget, "page_size": page}
    for name, step in variants.items():
        if step is not None:
            attnkit.apply(model, {"attnkit": 1, "name": name, "steps": [step]})
        if only_generate_graphed:
            _generate_graphed_tpot(model, ids, name, step, new_tokens, prefill_chunk, out)
            if step is not None:
                attnkit.unpatch(model)
            continue
        cache = attnkit.make_cache(model) or DynamicCache(config=model.config)
        # Chunked prefill: one 128K forward of the 8B shape needs ~80 GB of activations (the MLP's
        # [128K, 14336] intermediates); chunks of 16K keep it to the weights plus the cache.
        for start in range(0, length, prefill_chunk):
            chunk = ids[:, start : start + prefill_chunk]
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        for suffix, backend in backends.items():
            key = name + suffix
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                token, out[f"{key}_ms_per_token"] = _time_decode(model, cache, token, warmup, new_tokens)
                if profile_steps and (suffix or name == "dense"):
                    token = _profile_decode(model, cache, token, profile_steps, key, out)
            print(f"  {key}: {out[f'{key}_ms_per_token']:.2f} ms/token", flush=True)
        # The same step replayed from a CUDA graph, FlashAttention pinned. Not for transformers' DynamicCache
        # ("dense"): its step concatenates the whole cache into new tensors, which a graph would hold as a second
        # copy of the cache; "dense-buffered" is the dense baseline here (the one-slot write a static cache does).
        if graph and step is not None and DEVICE == "cuda":
            key = f"{name}-graph"
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    out[f"{key}_ms_per_token"] = _time_decode_graph(
                        model, cache, token, profile_replays=profile_graph, profile_out=out, key=key
                    )
                print(f"  {key}: {out[f'{key}_ms_per_token']:.2f} ms/token", flush=True)
            except Exception as e:  # a host sync in the step makes capture fail: reported, not fatal
                out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  {key}: capture failed: {out[f'{key}_error']}", flush=True)
                torch.cuda.synchronize()
        del cache, logits
        gc.collect()  # free the finished variant's cache now (a 128K cache is ~16 GiB; 62a4042 went out of memory)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if generate_graphed:
            _generate_graphed_tpot(model, ids, name, step, new_tokens, prefill_chunk, out)
        if step is not None:
            attnkit.unpatch(model)
    def ratio(name, base):
        if name != base and f"{base}_ms_per_token" in out and f"{name}_ms_per_token" in out:
            out[f"speedup_{name}_vs_{base}"] = out[f"{base}_ms_per_token"] / out[f"{name}_ms_per_token"]

    for suffix in backends:
        for name in variants:
            if name != "dense":
                ratio(name + suffix, "dense" + suffix)
                ratio(name + suffix, "dense-buffered" + suffix)
    for name in variants:
        if name not in ("dense", "dense-buffered"):
            ratio(f"{name}-graph", "dense-buffered-graph")
            ratio(f"{name}-generate-graphed", "dense-buffered-generate-graphed")
            ratio(f"{name}-generate-graphed", "dense-buffered-graph")
    return out


def _generate_graphed_tpot(model, ids, name: str, step, new_tokens: int, prefill_chunk: int, out: dict) -> None:
    """Real generation with every decode step replayed from one CUDA graph (``attnkit.generate_graphed``: a
    fixed-capacity cache allocated once, the context advancing token by token): its own prefill, then
    ``new_tokens`` timed steps, into ``out[name + "-generate-graphed_ms_per_token"]``. "dense-buffered" runs dense
    attention there through attnkit's paged kernel (every page listed). Not for transformers' DynamicCache."""
    import attnkit

    if step is None or DEVICE != "cuda":
        return
    key = f"{name}-generate-graphed"
    stats: dict = {}
    try:
        attnkit.generate_graphed(model, ids, new_tokens + 3, prefill_chunk=prefill_chunk, stats=stats)
        out[f"{key}_ms_per_token"] = stats["decode_ms_per_token"]
        out[f"{key}_timed_steps"] = stats["timed_steps"]
        print(f"  {key}: {stats['decode_ms_per_token']:.2f} ms/token", flush=True)
    except Exception as e:  # reported, not fatal: the other variants still run
        out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {key}: failed: {out[f'{key}_error']}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def _time_decode_graph(
    model, cache, token, rep_ms: float = 500, profile_replays: int = 0, profile_out: dict | None = None, key: str = ""
) -> float:
    """Median ms of one decode step replayed from a CUDA graph: the step's GPU time without Python and launch
    overhead, how serving engines run decode. The step is captured once at the current context; every replay redoes
    that step (the same token written to the same cache slot, its page's bounds folded again), so the context stays
    put while timing: the time per output token at this context. ``token``: [B, 1]. ``profile_replays``: also list
    the graph's kernels over that many replays (``profile_out[key + "_graph_kernels"]``)."""
    static = token.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs one run on a side stream first (lazy inits, autotuning)
        model(input_ids=static, past_key_values=cache, use_cache=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids=static, past_key_values=cache, use_cache=True)
    ms = bench_ms(graph.replay, warmup_ms=50, rep_ms=rep_ms)
    if profile_replays:
        try:  # a diagnostic: its failure must not cost the timing
            profile_out[f"{key}_graph_kernels"] = _profile_graph(graph, profile_replays, ms, key)
        except Exception as e:
            profile_out[f"{key}_graph_kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {key}: graph profile failed: {profile_out[f'{key}_graph_kernels_error']}", flush=True)
    del graph
    return ms


def _profile_graph(graph, replays: int, step_ms: float, key: str) -> dict:
    """The kernels of one replayed decode step, from CUPTI (torch.profiler sees the kernels inside a CUDA graph):
    per kernel name its launches and device µs per step, and how much of the step is kernel time at all (the rest:
    the gaps between the graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            entry = kernels.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.device_time_total
    rows = sorted(
        ({"kernel": name[:90], "per_step": n / replays, "us_per_step": us / replays} for name, (n, us) in kernels.items()),
        key=lambda r: -r["us_per_step"],
    )
    total_us = sum(r["us_per_step"] for r in rows)
    launches = sum(r["per_step"] for r in rows)
    print(f"--- {key}: {launches:.0f} kernels per step, {total_us:.0f} µs of kernel time in a {1e3 * step_ms:.0f} µs "
          f"step ({1e3 * step_ms - total_us:.0f} µs between kernels)")
    for r in rows[:30]:
        print(f"  {r['us_per_step']:9.1f} µs  {r['per_step']:6.1f}x  {r['kernel']}")
    return {"kernels_per_step": launches, "kernel_us_per_step": total_us, "step_us": 1e3 * step_ms, "rows": rows}


def _time_decode(model, cache, token, warmup: int, new_tokens: int):
    """Median ms of one greedy decode step (CUDA events around the whole forward) after ``warmup`` steps."""
    times = []
    for i in range(warmup + new_tokens):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if DEVICE == "cuda":
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return token, statistics.median(times)


def _profile_decode(model, cache, token, steps: int, key: str, out: dict):
    """Where a token's time goes: the top GPU kernels and host-side ops of ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    out[f"{key}_profile_device"] = table.table(sort_by=sort, row_limit=40)
    out[f"{key}_profile_host"] = table.table(sort_by="self_cpu_time_total", row_limit=40)
    print(f"--- {key}: {steps} decode steps, by device time\n{out[f'{key}_profile_device']}")
    print(f"--- {key}: by host (self CPU) time\n{out[f'{key}_profile_host']}", flush=True)
    return token


# ----------------------------------------------------------------------------------------- kernel report
def kernel_report(arch: int = 90) -> list[dict]:
    """Compile Quest's kernels for ``sm_<arch>`` at the bench shape (bf16, d 128, group 4, page 16) on any machine,
    with the launch settings the wrappers use, and report registers / spills / shared memory per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnkit.kernels.page_bounds import triton as bounds_tri
    from attnkit.kernels.page_scores import triton as score_tri
    from attnkit.kernels.paged_decode import triton as attn_tri
    from benchmarks.kernel_report import report

    def compile_one(fn, pointers, constexprs, warps, floats=()):
        names = fn.arg_names
        sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32") for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})

    bf = "*bf16"
    fold_pointers = {"fk_ptr": bf, "fmin_ptr": bf, "fmax_ptr": bf, "flast_ptr": "*i32", "fpad_ptr": "*i32",
                     "fqmin_ptr": "*i8", "fqmax_ptr": "*i8", "fscale_ptr": "*fp32", "length_ptr": "*i64"}
    score_constexprs = {"GROUP": 4, "BLOCK_G": 16, "BLOCK_P": 64, "D": 128, "IEEE": False, "STAGES": 1, "MIX": False,
                        "PAGE": 16, "LENGTH_FROM_PTR": True}
    rows = []
    for share in (False, True):
        rows.append(("page_scores" + (" shared" if share else ""), compile_one(
            score_tri._page_scores_kernel,
            {"q_ptr": bf, "min_ptr": bf, "max_ptr": bf, "valid_ptr": "*i32", "out_ptr": "*fp32", "scale_ptr": "*fp32",
             **fold_pointers},
            {**score_constexprs, "SHARE": share, "INT8": False, "FOLD": False, "FOLD_INT8": False}, 4,
            floats=("mix_a", "mix_b"))))
        rows.append(("page_scores int8 + fold" + (" shared" if share else ""), compile_one(
            score_tri._page_scores_kernel,
            {"q_ptr": bf, "min_ptr": "*i8", "max_ptr": "*i8", "valid_ptr": "*i32", "out_ptr": "*fp32",
             "scale_ptr": "*fp32", **fold_pointers},
            {**score_constexprs, "SHARE": share, "INT8": True, "FOLD": True, "FOLD_INT8": True}, 4,
            floats=("mix_a", "mix_b"))))
        rows.append(("paged_decode split" + (" shared" if share else ""), compile_one(
            attn_tri._split_kernel,
            {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pages_ptr": "*i32", "pad_ptr": "*i32", "acc_ptr": "*fp32",
             "m_ptr": "*fp32", "l_ptr": "*fp32", "seq_len_ptr": "*i64"},
            {"GROUP": 4, "SHARE": share, "BLOCK_G": 16, "PAGE": 16, "TILE": 64, "D": 128, "IEEE": False,
             "SEQ_LEN_FROM_PTR": True}, 4,
            floats=("qk_scale",))))
    rows.append(("paged_decode combine", compile_one(
        attn_tri._combine_kernel, {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": bf},
        {"BLOCK_S": 16, "D": 128}, 4)))
    # The bounded search holds a row in registers: a power-of-two block of scores (8192 pages at 128K tokens and
    # page 16; one page more doubles it).
    for block in (8192, 16384):
        for warps in (8, 16):
            rows.append((f"top_pages bounded ({block}-page block, {warps} warps)", compile_one(
                score_tri._top_pages_bounded_kernel, {"scores_ptr": "*fp32", "out_ptr": "*i32"},
                {"BLOCK": block, "GROUPS": 128}, warps)))
    rows.append(("page_bounds fold", compile_one(
        bounds_tri._fold_kernel, {"k_ptr": bf, "min_ptr": bf, "max_ptr": bf, "last_ptr": "*i32", "pad_ptr": "*i32",
                                  "qmin_ptr": "*i8", "qmax_ptr": "*i8", "scale_ptr": "*fp32", "length_ptr": "*i64"},
        {"PAGE": 16, "D": 128, "BLOCK_D": 128, "INT8": True, "LENGTH_FROM_PTR": True}, 1)))
    return [{"kernel": name, **report(kernel)} for name, kernel in rows]


# --------------------------------------------------------------------------------------------- reporting
def markdown(result: dict) -> str:
    lines = [
        f"{result['env']['device']}, Llama-3-8B attention (32 q / 8 kv heads, d 128, bf16), page "
        f"{result['page_size']}, budget {result['token_budget']}; µs, CUDA-event medians",
        "",
        "| batch | context | dense | naive gather | quest (per head) | × dense | × naive | quest (shared) | × dense | "
        "× naive | CUDA graph: dense / naive / quest / shared (× dense) | bytes bound (head/shared) | "
        "scores / top_pages (torch.topk) / attention µs (shared) | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        a, s = p["quest"], p["quest-shared"]

        def f(entry, key, fmt="{:.1f}"):
            return fmt.format(entry[key]) if key in entry else "–"

        check = "ok" if a["check"]["ok"] and s["check"]["ok"] else "FAILED"
        parts = f"{f(s, 'scores_us')} / {f(s, 'top_pages_us')} ({f(s, 'topk_us')}) / {f(s, 'attention_us')}"
        lines.append(
            f"| {p['batch']} | {p['length'] // 1024}K | {p['dense_us']:.1f} | {p['naive_us']:.1f} | "
            f"{f(a, 'total_us')} | {f(a, 'speedup_vs_dense', '{:.2f}')} | {f(a, 'speedup_vs_naive', '{:.2f}')} | "
            f"{f(s, 'total_us')} | {f(s, 'speedup_vs_dense', '{:.2f}')} | {f(s, 'speedup_vs_naive', '{:.2f}')} | "
            f"{p['dense_graph_us']:.1f} / {p['naive_graph_us']:.1f} / {f(a, 'total_graph_us')} / "
            f"{f(s, 'total_graph_us')} (×{f(a, 'graph_speedup_vs_dense', '{:.2f}')}, "
            f"×{f(s, 'graph_speedup_vs_dense', '{:.2f}')}) | "
            f"{f(a, 'bytes_bound', '{:.1f}')} / {f(s, 'bytes_bound', '{:.1f}')} | {parts} | {check} |"
        )
    m = result.get("model")
    if m:
        lines += [
            "",
            f"random-weight Llama-3-8B shape, {m['layers']} layers, batch {m['batch']}, {m['length'] // 1024}K context, "
            "ms per output token (eager: SDPA default backend / FlashAttention pinned; CUDA graph: FlashAttention, the "
            "step replayed at this context); × = dense on the same buffered cache ÷ this row, same column",
            "",
            "| variant | eager, default | eager, flash | × (flash) | CUDA graph | × (graph) | generate_graphed | × |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def ms(key):
            return f"{m[key]:.2f}" if key in m else "–"

        for name in ("dense", "dense-buffered", "quest", "quest-int8", "quest-shared-int8"):
            lines.append(
                f"| {name} | {ms(name + '_ms_per_token')} | {ms(name + '-flash_ms_per_token')} | "
                f"{ms(f'speedup_{name}-flash_vs_dense-buffered-flash')} | {ms(name + '-graph_ms_per_token')} | "
                f"{ms(f'speedup_{name}-graph_vs_dense-buffered-graph')} | {ms(name + '-generate-graphed_ms_per_token')} | "
                f"{ms(f'speedup_{name}-generate-graphed_vs_dense-buffered-generate-graphed')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="32k,64k,128k")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--rerank-pages", type=int, default=0, help="part 1 also times Quest with rerank_pages (shared, "
                    "int8): the bound shortlists this many pages, their true largest logits choose")
    ap.add_argument("--model-layers", type=int, default=32, help="layers of the TPOT model (0: skip part 2)")
    ap.add_argument("--model-length", default="128k")
    ap.add_argument("--model-batch", type=int, default=1, help="rows of the TPOT model's batch")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sdpa-backends", default="default,flash", help="SDPA backends of the eager TPOT timings: "
                    "default (cuDNN on an H100) and/or flash (FlashAttention pinned)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph TPOT timings")
    ap.add_argument("--generate-graphed", action="store_true", help="also time attnkit.generate_graphed per variant "
                    "(real generation, every decode step replayed from one CUDA graph; one more prefill each)")
    ap.add_argument("--only-generate-graphed", action="store_true", help="time only attnkit.generate_graphed (its "
                    "fixed-capacity cache is allocated once: the growing cache of the other timings holds two copies "
                    "while it grows, which does not fit 128K at batch 3 on an 80 GB GPU)")
    ap.add_argument("--prefill-chunk", type=int, default=16384, help="tokens per prefill forward of the TPOT model")
    ap.add_argument("--no-model", action="store_true", help="skip part 2 (time per output token)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--sweep", action="store_true", help="part 1 becomes a sweep of the score kernel's launch "
                    "settings and the top-page kernels (CUDA-graph times) at each --lengths x --batches point")
    ap.add_argument("--sweep-top-pages", action="store_true", help="the sweep's top-page rows only")
    ap.add_argument("--profile-steps", type=int, default=0, help="also profile this many decode steps of each TPOT "
                    "variant (torch.profiler: top device kernels and host ops)")
    ap.add_argument("--variants", default="", help="TPOT variants to run (comma-separated; default all: dense, "
                    "dense-buffered, quest, quest-int8, quest-shared-int8)")
    ap.add_argument("--profile-graph", type=int, default=0, help="also list the kernels of each CUDA-graph step "
                    "over this many replays (torch.profiler: launches and device µs per step, time between kernels)")
    ap.add_argument("--kernel-report", action="store_true", help="only compile the kernels for sm_90 and print their "
                    "registers/spills (any machine, no GPU needed)")
    args = ap.parse_args(argv)
    if args.kernel_report:
        import triton

        print(f"triton {triton.__version__}, sm_90")
        for row in kernel_report():
            print(json.dumps(row))
        return {}
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.quest times CUDA kernels; run it on a GPU (the tests check the kernels on CPU)")
    result: dict = {"env": environment(), "page_size": args.page_size, "token_budget": args.token_budget, "points": []}
    result["env"]["command"] = "python -m benchmarks.quest " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    out = Path(args.out) / f"quest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for batch in (int(b) for b in args.batches.split(",") if args.lengths):  # --lengths "": only part 2
        for length in (parse_length(x) for x in args.lengths.split(",")):
            if args.sweep or args.sweep_top_pages:
                point = sweep_point(batch, length, args.page_size, args.token_budget, torch.bfloat16,
                                    scores=not args.sweep_top_pages)
                result.setdefault("sweep", []).append(point)
                for r in sorted(point["rows"], key=lambda r: (r["share"], "top_pages" in r, r.get("us", 1e9))):
                    print(json.dumps(r), flush=True)
                out.write_text(json.dumps(result, indent=1))
                continue
            point = bench_point(batch, length, args.page_size, args.token_budget, torch.bfloat16,
                                rerank=args.rerank_pages)
            result["points"].append(point)
            print(json.dumps({k: v for k, v in point.items()}, default=str), flush=True)
            out.write_text(json.dumps(result, indent=1))
    if not args.no_model and args.model_layers > 0:
        print(f"model: llama3-8b x{args.model_layers} layers at {args.model_length}", flush=True)
        result["model"] = model_tpot(args.model_layers, parse_length(args.model_length), args.token_budget,
                                     args.page_size, args.new_tokens, warmup=4, prefill_chunk=args.prefill_chunk,
                                     profile_steps=args.profile_steps, batch=args.model_batch,
                                     sdpa_backends=tuple(args.sdpa_backends.split(",")), graph=not args.no_graph,
                                     generate_graphed=args.generate_graphed,
                                     only=tuple(v for v in args.variants.split(",") if v),
                                     profile_graph=args.profile_graph,
                                     only_generate_graphed=args.only_generate_graphed)
        out.write_text(json.dumps(result, indent=1))
    if result["points"] or result.get("model"):
        print(markdown(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
