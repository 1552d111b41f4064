"""``attnkit.convert`` and ``attnkit.evaluate``: the pipelines the CLI runs.

``convert`` = load → apply (calibrate/train) → save → evaluate dense vs patched on the recipe's tasks, both on the
same model object in the same process (the dense run switches the attention backend back, see
:func:`attnkit.patch.dense`), so the comparison sees the same weights, samples and prompts.
"""

from __future__ import annotations

import json
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
    report_dir: Path | None = None  # the run folder (results.json, summary.md, plots), when one was written
    fidelity: list[dict[str, Any]] = field(default_factory=list)  # attnkit.eval.fidelity.fidelity_at_lengths rows
    conversion: list[dict[str, Any]] = field(default_factory=list)  # what each conversion step did (gqa, mla)

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
    fidelity: bool = False,
) -> Report:
    """Load ``model``, apply ``recipe``, save to ``out`` and (by default) evaluate dense vs patched.

    ``tasks``/``lengths``/``samples`` override the recipe's ``eval:`` block. ``fidelity`` adds the task-free
    metrics (KL / top-1 vs dense, NLL, attention recall vs oracle) at the same lengths. Fails before any work when
    ``out`` exists and ``overwrite`` is false.
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
        _write_training_curves(lm, Path(out))
    report = Report(recipe.name, model, Path(out) if out else None, lm.attnkit_state.layer_methods, None)
    report.conversion = list(getattr(lm, "attnkit_conversion", None) or [])
    if evaluate and report.conversion:
        # A converted model's baseline is the original model (its "dense" mode is the converted one): load it again.
        spec = recipe.eval
        original, _ = load_model(model, dtype=dtype, device=device)
        rows, eval_seconds = compare_original_converted(
            original, lm, tokenizer, tasks or spec.tasks, lengths or spec.lengths, samples or spec.samples,
            show_progress=show_progress,
        )
        report.rows = rows
        seconds.update(eval_seconds)
        del original
        if out is not None:
            report.report_dir = _write_eval_run(Path(out) / "eval", report, lm)
        evaluate = False
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
        if fidelity:
            report.fidelity = _fidelity(lm, tokenizer, lengths or spec.lengths, seconds)
        if out is not None:
            report.report_dir = _write_eval_run(Path(out) / "eval", report, lm)
    report.seconds = seconds
    return report


def compare_original_converted(
    original: PreTrainedModel,
    converted: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[list[Any], dict[str, float]]:
    """Score the original model and the converted one on the same samples; rows read "dense" = original."""
    from attnkit.eval.harness import compare, run_tasks

    seconds = {}
    start = time.perf_counter()
    base = run_tasks(original, tokenizer, tasks, lengths, samples=samples, seed=seed, show_progress=show_progress)
    seconds["eval_original"] = time.perf_counter() - start
    start = time.perf_counter()
    new = run_tasks(converted, tokenizer, tasks, lengths, samples=samples, seed=seed, show_progress=show_progress)
    seconds["eval_converted"] = time.perf_counter() - start
    return compare(base, new), seconds


def _write_training_curves(model: PreTrainedModel, out: Path) -> None:
    """Write the loss history of every training the recipe ran (``model.attnkit_training``, e.g. SeerAttention's
    gate distillation) to ``out/train/loss.jsonl`` and ``loss.png`` (``out/train/stepN/`` when several trained)."""
    from attnkit.train.distill import plot_loss

    results = [r for r in getattr(model, "attnkit_training", None) or [] if getattr(r, "history", None)]
    for i, result in enumerate(results):
        folder = out / "train" / (f"step{i}" if len(results) > 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        jsonl = folder / "loss.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in result.history))
        labels = getattr(result, "plot_labels", None)  # recovery distillation
        if labels is None and getattr(result, "label", "gates") != "gates":  # linearization stages
            labels = {"ylabel": "loss", "title": f"linearize: {result.label}"}
        plot_loss(jsonl, folder / "loss.png", **(labels or {}))


@dataclass
class CalibrationReport:
    """The outcome of ``attnkit calibrate``: what each calibrated method chose, per layer and head."""

    recipe: Recipe  # the recipe as calibrated (calibration settings included)
    model: str
    out: Path | None
    choices: dict[str, dict[int, Any]]  # method → layer → per-head thresholds or patterns
    seconds: dict[str, float] = field(default_factory=dict)


def calibrate(
    recipe: str | os.PathLike | dict | Recipe,
    model: str = "llama",
    out: str | os.PathLike | None = None,
    *,
    length: int | None = None,
    target_recall: float | None = None,
    target_density: float | None = None,
    data: Any = None,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
) -> CalibrationReport:
    """Load ``model``, calibrate every step of ``recipe`` that can be calibrated, and save the checkpoint.

    Each calibratable step (:meth:`attnkit.method.Method.calibration_settings`: XAttention thresholds, MInference
    pattern search) is set to calibrate on ``length`` tokens (built-in corpus unless ``data`` gives token ids)
    towards ``target_recall`` or ``target_density`` (each method's own default when neither is given); steps
    without a calibration step are applied unchanged. The calibration lands in the checkpoint's
    ``attnkit.safetensors``; ``attnkit.load(out)`` restores it without recalibrating.
    """
    from attnkit.models import load_model

    if target_recall is not None and target_density is not None:
        raise ValueError("give one calibration target: target_recall or target_density, not both")
    recipe = Recipe.load(recipe)
    if out is not None and Path(out).exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass --overwrite to replace it)")
    steps, calibrated = [], []
    for step in recipe.steps:
        try:
            steps.append(step.calibration_settings(length, target_recall, target_density))
            calibrated.append(step.method_name)
        except ValueError as err:
            if "has no calibration step" not in str(err):
                raise
            steps.append(step)
    if not calibrated:
        raise ValueError(f"recipe {recipe.name!r} has no step that calibrates (xattention, minference do)")
    recipe = Recipe.load({**recipe.to_dict(), "steps": [s.to_step() for s in steps]})
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    apply(lm, recipe, data=data)
    seconds["calibrate"] = time.perf_counter() - start
    if out is not None:
        save(lm, out, tokenizer=tokenizer, overwrite=overwrite)
    choices = dict(getattr(lm, "attnkit_calibration", {}) or {})
    return CalibrationReport(recipe, model, Path(out) if out else None, choices, seconds)


def evaluate(
    checkpoint: str | os.PathLike | None = None,
    tasks: list[str] | None = None,
    lengths: list[int] | None = None,
    samples: int = 10,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    show_progress: bool = True,
    *,
    model: str | None = None,
    recipe: str | os.PathLike | dict | Recipe | None = None,
    out: str | os.PathLike | None = None,
    fidelity: bool = False,
) -> Report:
    """Evaluate dense vs patched on the same samples in one process.

    Either ``checkpoint`` (an attnkit checkpoint folder) or ``model`` + ``recipe`` (applied in memory, calibration
    included, nothing saved). ``tasks``/``lengths`` default to the recipe's ``eval:`` block. With ``out``, a run
    folder is written there (results.json, summary.md, plots; see :mod:`attnkit.eval.report`).
    """
    from attnkit.models import load_model

    if (checkpoint is None) == (model is None):
        raise ValueError("evaluate needs either a checkpoint folder or model= (with recipe=), not both")
    if checkpoint is not None:
        lm, tokenizer = load(checkpoint, dtype=dtype, device=device)
        state = getattr(lm, "attnkit_state", None)
        if state is None:
            raise CheckpointError(f"{checkpoint} is a plain model (no attnkit block): there is nothing to compare")
        name = str(checkpoint)
    else:
        if recipe is None:
            raise ValueError("evaluate(model=...) needs recipe= (the patch to compare with the dense model)")
        lm, tokenizer = load_model(model, dtype=dtype, device=device)
        apply(lm, recipe)
        state = lm.attnkit_state
        name = model
    spec = state.recipe.eval
    from attnkit.convert.conversion import ConversionMethod

    if any(isinstance(step, ConversionMethod) for step in state.recipe.steps):
        # A converted model's "dense" mode is still converted: the baseline is the original model.
        if checkpoint is not None:
            raise CheckpointError(
                f"{checkpoint} holds a converted model ({', '.join(s.method_name for s in state.recipe.steps)}), "
                "whose baseline is the original model: evaluate with --model ORIGINAL --recipe RECIPE (or "
                "attnkit convert), which score the original and the converted model on the same samples"
            )
        original, _ = load_model(model, dtype=dtype, device=device)
        rows, seconds = compare_original_converted(
            original, lm, tokenizer, tasks or spec.tasks, lengths or spec.lengths, samples, show_progress=show_progress
        )
        density = None
        del original
    else:
        rows, density, seconds = compare_dense_patched(
            lm, tokenizer, tasks or spec.tasks, lengths or spec.lengths, samples, show_progress=show_progress
        )
    report = Report(state.recipe.name, name, Path(checkpoint) if checkpoint else None, state.layer_methods, density,
                    rows, seconds)
    if fidelity:
        report.fidelity = _fidelity(lm, tokenizer, lengths or spec.lengths, seconds)
    if out is not None:
        report.report_dir = _write_eval_run(Path(out), report, lm)
    return report


def _fidelity(model: PreTrainedModel, tokenizer, lengths: list[int], seconds: dict[str, float]) -> list[dict]:
    from attnkit.eval.fidelity import fidelity_at_lengths

    start = time.perf_counter()
    rows = fidelity_at_lengths(model, tokenizer, lengths)
    seconds["fidelity"] = time.perf_counter() - start
    return rows


def _write_eval_run(out: Path, report: Report, model: PreTrainedModel) -> Path:
    from attnkit.eval.report import environment, new_run_dir, write_eval_report

    out = new_run_dir(out, "eval")
    stats = model.attnkit_stats
    write_eval_report(
        out,
        title=f"{report.recipe} on {report.model}",
        rows=report.rows,
        env=environment(next(model.parameters()).device),
        mean_density=report.mean_density,
        per_layer=stats.per_layer(),
        per_head=stats.per_head(),
        block_masks=stats.block_masks(),
        fidelity=report.fidelity,
        extra={"seconds": report.seconds, "layer_methods": report.layer_methods},
    )
    return out


@dataclass
class BenchReport:
    """The outcome of :func:`bench`: speed rows (dense and patched), their pairing, and the run folder."""

    title: str
    rows: list[Any]  # attnkit.eval.speed.SpeedRow
    comparisons: list[Any]  # attnkit.eval.speed.SpeedComparison
    device: str
    report_dir: Path | None = None


def bench(
    model: str = "llama",
    recipe: str | os.PathLike | dict | Recipe | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    shape: str | None = None,
    layers: int = 2,
    lengths: list[int] | None = None,
    batch: int = 1,
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    show_progress: bool = True,
    text: str = "random",
) -> BenchReport:
    """Time a model dense and patched (TTFT, TPOT, peak memory, KV bytes/token) in one process.

    The model is a checkpoint folder, ``model`` (alias / id / folder) with an optional ``recipe``, or, with
    ``shape`` (e.g. ``"llama3-8b"``), a random-weight model of that architecture with ``layers`` layers, for
    lengths the embedded models cannot reach. Without a recipe or checkpoint only the dense model is timed.
    ``text``: ``"random"`` token ids, or ``"corpus"`` (the built-in prose, for input-dependent methods; needs the
    model's tokenizer, so not with ``shape``).
    """
    from attnkit.eval.report import environment, new_run_dir, write_bench_report
    from attnkit.eval.speed import bench_model, compare_speed
    from attnkit.models import load_model, random_model

    if checkpoint is not None and (recipe is not None or shape is not None):
        raise ValueError("bench takes a checkpoint, or a model/shape with an optional recipe, not both")
    if text not in ("random", "corpus"):
        raise ValueError(f"text must be 'random' or 'corpus', got {text!r}")
    if text == "corpus" and shape is not None:
        raise ValueError("text='corpus' needs a real model's tokenizer; a --shape model has random weights")
    if checkpoint is not None:
        lm, tokenizer = load(checkpoint, dtype=dtype, device=device)
        name = str(checkpoint)
    else:
        if shape is not None:
            lm, tokenizer = random_model(shape, layers, dtype=dtype, device=device)
            name = f"random {shape} ({layers} layers)"
        else:
            lm, tokenizer = load_model(model, dtype=dtype, device=device)
            name = model
        if recipe is not None:
            apply(lm, recipe)
    state = getattr(lm, "attnkit_state", None)
    title = f"{state.recipe.name if state else 'dense'} on {name}"
    ids = None
    if text == "corpus":
        from attnkit.eval.corpus import sentences

        ids = tokenizer(" ".join(sentences()), return_tensors="pt", verbose=False)["input_ids"][0]
        title += ", built-in corpus text"
    rows = bench_model(
        lm, lengths or [4096], batch=batch, new_tokens=new_tokens, warmup=warmup, repeats=repeats,
        show_progress=show_progress, text=ids,
    )
    dev = next(lm.parameters()).device
    report = BenchReport(title, rows, compare_speed(rows), dev.type)
    if out is not None:
        report.report_dir = new_run_dir(out, "bench")
        write_bench_report(report.report_dir, title=title, rows=rows, comparisons=report.comparisons,
                           env=environment(dev))
    return report
