"""``attnkit.convert`` and ``attnkit.evaluate``: the pipelines the CLI runs.

``convert`` = load → apply (calibrate/train) → save → evaluate dense vs patched on the recipe's tasks, both on the
same model object in the same process (the dense run switches the attention backend back, see
:func:`attnkit.patch.dense`), so the comparison sees the same weights, samples and prompts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnkit.checkpoint import CheckpointError, load, save
from attnkit.patch import apply, dense
from attnkit.recipe import Recipe


@dataclass
class Report:
    """The outcome of a convert/evaluate run."""

    recipe: str
    model: str
    out: Path | None
    layer_methods: dict[int, dict[str, str]]
    mean_density: float | None  # mean over patched layers of the last prefill's block density
    rows: list[Any] = field(default_factory=list)  # attnkit.eval.harness.ComparisonRow
    seconds: dict[str, float] = field(default_factory=dict)

    def methods_summary(self) -> str:
        names = sorted({name for methods in self.layer_methods.values() for name in methods.values()})
        return ", ".join(names) + f" ({len(self.layer_methods)} layers)"


def compare_dense_patched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[list[Any], float | None, dict[str, float]]:
    """Score the patched model and, with the backend switched, the dense one; returns (rows, density, seconds)."""
    from attnkit.eval.harness import compare, run_tasks

    seconds = {}
    start = time.perf_counter()
    with dense(model):
        dense_results = run_tasks(model, tokenizer, tasks, lengths, samples=samples, seed=seed, show_progress=show_progress)
    seconds["eval_dense"] = time.perf_counter() - start
    start = time.perf_counter()
    patched_results = run_tasks(model, tokenizer, tasks, lengths, samples=samples, seed=seed, show_progress=show_progress)
    seconds["eval_patched"] = time.perf_counter() - start
    stats = getattr(model, "attnkit_stats", None)
    density = stats.mean_density() if stats is not None else None
    return compare(dense_results, patched_results), density, seconds


def convert(
    recipe: str | os.PathLike | dict | Recipe,
    model: str = "llama",
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    evaluate: bool = True,
    tasks: list[str] | None = None,
    lengths: list[int] | None = None,
    samples: int | None = None,
    data: Any = None,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> Report:
    """Load ``model``, apply ``recipe``, save to ``out`` and (by default) evaluate dense vs patched.

    ``tasks``/``lengths``/``samples`` override the recipe's ``eval:`` block. Fails before any work when ``out``
    exists and ``overwrite`` is false.
    """
    from attnkit.models import load_model

    recipe = Recipe.load(recipe)
    if out is not None and Path(out).exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass --overwrite to replace it)")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    apply(lm, recipe, data=data)
    seconds["apply"] = time.perf_counter() - start
    if out is not None:
        start = time.perf_counter()
        save(lm, out, tokenizer=tokenizer, overwrite=overwrite)
        seconds["save"] = time.perf_counter() - start
    report = Report(recipe.name, model, Path(out) if out else None, lm.attnkit_state.layer_methods, None)
    if evaluate:
        spec = recipe.eval
        rows, density, eval_seconds = compare_dense_patched(
            lm,
            tokenizer,
            tasks or spec.tasks,
            lengths or spec.lengths,
            samples or spec.samples,
            show_progress=show_progress,
        )
        report.rows, report.mean_density = rows, density
        seconds.update(eval_seconds)
    report.seconds = seconds
    return report


def evaluate(
    checkpoint: str | os.PathLike,
    tasks: list[str] | None = None,
    lengths: list[int] | None = None,
    samples: int = 10,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> Report:
    """Evaluate an attnkit checkpoint dense vs patched (same samples, one process)."""
    model, tokenizer = load(checkpoint, dtype=dtype, device=device)
    state = getattr(model, "attnkit_state", None)
    if state is None:
        raise CheckpointError(f"{checkpoint} is a plain model (no attnkit block): there is nothing to compare")
    spec = state.recipe.eval
    rows, density, seconds = compare_dense_patched(
        model, tokenizer, tasks or spec.tasks, lengths or spec.lengths, samples, show_progress=show_progress
    )
    return Report(state.recipe.name, str(checkpoint), Path(checkpoint), state.layer_methods, density, rows, seconds)
