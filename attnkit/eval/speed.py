"""Model-level speed, dense vs patched in one process: time to first token, time per output token, memory.

:func:`bench_model` runs a prefill of ``length`` random tokens and ``new_tokens`` greedy decode steps, twice per
length: once with the dense attention (inside :func:`attnkit.patch.dense`, with a plain ``DynamicCache``) and once
patched (with :func:`attnkit.make_cache`, so decode methods keep their own caches). Timings are medians over
``repeats`` runs after ``warmup`` runs, with CUDA events on a GPU (host clocks on a CPU, where the numbers only say
that the code runs: they are not speed claims).

Reported per (mode, length): prefill time (the first token included: TTFT), per-token decode time (TPOT), peak GPU
memory above what was allocated before the run, and the KV cache actually held after decoding (bytes and bytes per
token of context), which shows evicting caches (StreamingLLM) and, later, compressed ones (MLA).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from attnkit.cache import make_cache
from attnkit.patch import dense

__all__ = ["SpeedComparison", "SpeedRow", "bench_model", "compare_speed", "kv_cache_bytes"]


@dataclass(frozen=True)
class SpeedRow:
    """One (mode, length) measurement.

    Attributes:
        mode: ``"dense"`` or ``"patched"``.
        length: prompt tokens per sequence.
        batch: sequences per forward.
        prefill_ms: median time of the prefill forward and the first token's argmax (time to first token).
        decode_ms_per_token: median time of one greedy decode step (one token for every sequence); None when
            ``new_tokens`` is 0.
        peak_memory_mb: peak CUDA memory above the allocation before the run (None on CPU).
        kv_cache_mb: KV cache held after the last decode step, all layers.
        kv_bytes_per_token: ``kv_cache_mb`` in bytes per sequence per token of context (prompt + generated).
        density: the patched prefill's mean block density over layers (None for dense or non-block methods).
        device: where it ran (``cuda``: a speed claim; ``cpu``: only a functional check).
    """

    mode: str
    length: int
    batch: int
    prefill_ms: float
    decode_ms_per_token: float | None
    peak_memory_mb: float | None
    kv_cache_mb: float
    kv_bytes_per_token: float
    density: float | None
    device: str


@dataclass(frozen=True)
class SpeedComparison:
    """Dense vs patched at one length: speedups are dense time / patched time (> 1 = patched is faster)."""

    length: int
    density: float | None
    ideal_prefill_speedup: float | None  # 1 / density: what attention alone could give; the MLP is not sped up
    prefill_speedup: float
    decode_speedup: float | None
    kv_ratio: float  # patched KV bytes / dense KV bytes


def kv_cache_bytes(cache) -> int:
    """Bytes of keys and values held by a transformers cache (every layer; uninitialized layers count 0), plus the
    recurrent state of layers that keep one (linear attention: ``state_bytes()``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        state_bytes = getattr(layer, "state_bytes", None)
        if callable(state_bytes):
            total += state_bytes()
    return total


class _Timer:
    """CUDA events on a GPU, ``perf_counter`` elsewhere; ``elapsed_ms`` after ``stop`` (synchronizes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        return (time.perf_counter() - self._t0) * 1e3


@torch.no_grad()
def _generate_once(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], object]:
    """Prefill + ``new_tokens`` greedy steps with a fresh cache; returns (prefill ms, step ms list, cache)."""
    timer = _Timer(ids.device)
    cache = make_cache(model)
    if cache is None:  # dense mode, or no decode method: transformers' own cache
        cache = DynamicCache(config=model.config)
    timer.start()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill_ms = timer.stop()
    steps = []
    for _ in range(new_tokens):
        timer.start()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(timer.stop())
    return prefill_ms, steps, cache


def _measure(model, ids, new_tokens, warmup, repeats, mode, device) -> SpeedRow:
    for _ in range(warmup):  # compiles kernels, fills allocator pools
        _generate_once(model, ids, min(new_tokens, 2))
    cuda = device.type == "cuda"
    prefill, steps, peak = [], [], None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        p, s, cache = _generate_once(model, ids, new_tokens)
        if cuda:
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated() - base) / 2**20)
        prefill.append(p)
        steps.extend(s)
    kv = kv_cache_bytes(cache)
    stats = getattr(model, "attnkit_stats", None)
    density = stats.mean_density() if mode == "patched" and stats is not None else None
    batch, length = ids.shape
    return SpeedRow(
        mode=mode,
        length=length,
        batch=batch,
        prefill_ms=statistics.median(prefill),
        decode_ms_per_token=statistics.median(steps) if steps else None,
        peak_memory_mb=peak,
        kv_cache_mb=kv / 2**20,
        kv_bytes_per_token=kv / (batch * (length + new_tokens)),
        density=density,
        device=device.type,
    )


def bench_model(
    model: PreTrainedModel,
    lengths: Sequence[int],
    *,
    batch: int = 1,
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    show_progress: bool = True,
    text: torch.Tensor | None = None,
) -> list[SpeedRow]:
    """Time ``model`` dense and (if patched) patched at each prompt length; rows are dense then patched per length.

    Args:
        model: a causal LM, patched with :func:`attnkit.apply` or not (then only dense rows are returned).
        lengths: prompt lengths in tokens (random token ids, seeded: speed does not depend on the text, except
            through data-dependent sparsity, for which use the quality evaluation).
        batch: sequences per forward (all of one length, no padding).
        new_tokens: greedy decode steps after the prefill (0: prefill only).
        warmup, repeats: untimed runs first, then the median of ``repeats`` timed runs.
        text: optional 1-D token ids ``[N]``; prompts are then windows of it (repeated to reach the length) instead
            of random ids. Methods whose selection depends on the input (XAttention, MInference, FlexPrefill,
            SeerAttention) pick very different densities on random ids than on text: time them on text.
    """
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    if batch < 1 or new_tokens < 0 or repeats < 1 or warmup < 0:
        raise ValueError("need batch >= 1, new_tokens >= 0, repeats >= 1, warmup >= 0")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = next(model.parameters()).device
    patched = getattr(model, "attnkit_state", None) is not None
    modes = ["dense", "patched"] if patched else ["dense"]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not show_progress
    )
    with progress:
        bar = progress.add_task("bench", total=len(lengths) * len(modes))
        for length in lengths:
            if text is None:
                ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
            else:
                ring = text.repeat(length // text.numel() + 2)
                starts = torch.randint(0, text.numel(), (batch,), generator=gen).tolist()
                ids = torch.stack([ring[s : s + length] for s in starts])
            ids = ids.to(device)
            for mode in modes:
                progress.update(bar, description=f"bench {mode} {length}")
                with dense(model) if mode == "dense" and patched else nullcontext():
                    rows.append(_measure(model, ids, new_tokens, warmup, repeats, mode, device))
                progress.advance(bar)
    return rows


def compare_speed(rows: Sequence[SpeedRow]) -> list[SpeedComparison]:
    """Pair dense and patched rows by length (lengths with only a dense row are skipped)."""
    by_key = {(r.mode, r.length): r for r in rows}
    out = []
    for length in sorted({r.length for r in rows}):
        d, p = by_key.get(("dense", length)), by_key.get(("patched", length))
        if d is None or p is None:
            continue
        decode = None
        if d.decode_ms_per_token and p.decode_ms_per_token:
            decode = d.decode_ms_per_token / p.decode_ms_per_token
        out.append(
            SpeedComparison(
                length=length,
                density=p.density,
                ideal_prefill_speedup=1 / p.density if p.density else None,
                prefill_speedup=d.prefill_ms / p.prefill_ms,
                decode_speedup=decode,
                kv_ratio=p.kv_cache_mb / d.kv_cache_mb if d.kv_cache_mb else float("nan"),
            )
        )
    return out
