"""Greedy decoding with every decode step replayed from one CUDA graph (Quest models).

Eager decoding of a transformers model is host-bound at batch 1 (Python and ~15 kernel launches per layer: about
1 ms of host time per layer on an H100, against 0.2-0.4 ms of GPU work at 128K tokens), so a decode method that
saves GPU time shows nothing in ``model.generate``. Serving engines capture the decode step as a CUDA graph and
replay it. :func:`generate_graphed` does the same for a model patched with Quest: a fixed-capacity cache
(:func:`attnkit.make_cache` with ``max_cache_len``) keeps its length on the device, the step's inputs (token,
positions, cache position) live in static buffers that the step itself advances, so one captured step is valid for
every token until the capacity is reached.

Only greedy decoding, no stopping criteria (every row gets ``max_new_tokens``); the prefill runs eagerly with any
prefill method of the recipe.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from attnkit.cache import PageBoundsLayer, make_cache


@torch.no_grad()
def generate_graphed(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    prefill_chunk: int | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Greedy continuation of ``input_ids [B, S]`` (left-padded when ``attention_mask [B, S]`` has zeros): returns
    the new tokens ``[B, max_new_tokens]``, the tokens ``model.generate(..., do_sample=False)`` picks with attnkit's
    cache (up to float summation order).

    ``cuda_graph``: replay the decode step from a CUDA graph (default: on CUDA). False runs the same fixed-capacity
    steps eagerly (CPU, tests). The model must decode with Quest in every layer (``dense_layers`` for dense ones).
    ``prefill_chunk``: prefill in forwards of this many tokens (long prompts of large models: a 128K-token forward
    of an 8B model needs ~80 GB of activations). ``stats``: filled with ``prefill_ms``, ``decode_ms_per_token`` (the
    replayed steps, CUDA events; eager steps without a graph) and ``timed_steps``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cuda_graph = input_ids.is_cuda if cuda_graph is None else cuda_graph
    if cuda_graph and not input_ids.is_cuda:
        raise ValueError("cuda_graph=True needs the inputs on a CUDA device")
    batch, prompt = input_ids.shape
    cache = make_cache(model, max_cache_len=prompt + max_new_tokens)
    if cache is None:
        raise ValueError(
            "generate_graphed needs a model whose layers decode with Quest (attnkit.apply a recipe with a quest step)"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Positions count real tokens only (left padding), as model.generate computes them.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    timer = _Timer(input_ids.device)
    chunk = prefill_chunk or prompt
    for start in range(0, prompt, chunk):
        end = min(start + chunk, prompt)
        logits = model(
            input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end], position_ids=positions[:, start:end],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits
    if stats is not None:
        stats["prefill_ms"] = timer.lap()
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=input_ids.device)
    token = logits[:, -1:].argmax(-1)
    out[:, :1] = token
    # The step's state, advanced by the step itself (so a replayed graph needs no host input).
    position = positions[:, -1:] + 1  # [B, 1]
    cache_position = torch.full((1,), prompt, dtype=torch.long, device=input_ids.device)
    column = torch.ones(1, dtype=torch.long, device=input_ids.device)  # where the next token goes in ``out``

    def step() -> None:
        logits = model(
            input_ids=token, position_ids=position, cache_position=cache_position, past_key_values=cache,
            use_cache=True,
        ).logits
        nxt = logits[:, -1:].argmax(-1)
        out.index_copy_(1, column, nxt)
        token.copy_(nxt)
        position.add_(1)
        cache_position.add_(1)
        column.add_(1)

    steps = max_new_tokens - 1
    if not cuda_graph:
        timer.lap()
        for _ in range(steps):
            step()
        if stats is not None and steps:
            stats.update(decode_ms_per_token=timer.lap() / steps, timed_steps=steps)
        return out
    # Two eager steps first, on a side stream as capture requires (Triton compiles, cuBLAS picks its kernels); they
    # are real steps of the generation.
    warm = min(steps, 2)
    stream = torch.cuda.Stream(device=input_ids.device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    if steps > warm:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the host-side lengths advance once, the device's not
            step()
        timer.lap()
        for _ in range(steps - warm):
            graph.replay()
        if stats is not None:
            stats.update(decode_ms_per_token=timer.lap() / (steps - warm), timed_steps=steps - warm)
        for layer in cache.layers:
            if isinstance(layer, PageBoundsLayer):
                layer.sync_length()
    return out


class _Timer:
    """Milliseconds between calls of :meth:`lap` (CUDA events on a GPU, wall clock elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start = self._mark()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self) -> float:
        end = self._mark()
        if self.cuda:
            end.synchronize()
            ms = self._start.elapsed_time(end)
        else:
            ms = (end - self._start) * 1e3
        self._start = end
        return ms


__all__ = ["generate_graphed"]
