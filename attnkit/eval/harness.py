"""Run locally generated tasks through lm-eval on an in-memory model, and compare dense with patched.

Typical use::

    dense = run_tasks(model, tok, lengths=(1024, 2048))
    attnkit.apply(model, recipe)              # or load a patched checkpoint
    patched = run_tasks(model, tok, lengths=(1024, 2048))
    for row in compare(dense, patched): ...

Tasks are written with :func:`attnkit.eval.tasks.generate_task` and evaluated with ``lm_eval.simple_evaluate``
through :class:`attnkit.eval.lm_eval.AttnkitLM`, offline, with the prompt never truncated.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnkit.eval.tasks import METRIC, TASKS, LocalTask, generate_task

__all__ = ["UNINFORMATIVE_BELOW", "ComparisonRow", "TaskResult", "compare", "read_external_results", "run_tasks"]

# A dense score below this makes a dense-vs-patched comparison meaningless: the task is too hard for the model
# at that length, so a patched score near it says nothing about the patch.
UNINFORMATIVE_BELOW = 0.8


@dataclass(frozen=True)
class TaskResult:
    """One (task, length) score.

    Attributes:
        task: the registered task name (``"passkey"``).
        length: prompt length in tokens.
        score: mean of the per-sample metric (for passkey: fraction of samples whose answer held the key).
        stderr: lm-eval's standard error of the mean (NaN when lm-eval reports none, e.g. one sample).
        n_samples: samples evaluated.
    """

    task: str
    length: int
    score: float
    stderr: float
    n_samples: int


@dataclass(frozen=True)
class ComparisonRow:
    """Dense vs patched for one (task, length).

    Attributes:
        ratio: patched / dense, or None when the dense score is 0.
        uninformative: the dense score is below :data:`UNINFORMATIVE_BELOW`, so the ratio says little.
    """

    task: str
    length: int
    dense: float
    patched: float
    ratio: float | None
    uninformative: bool


@contextmanager
def _offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the duration unless the caller already chose a value."""
    added = [key for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if key not in os.environ]
    for key in added:
        os.environ[key] = "1"
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval and ``datasets`` at WARNING, without ``datasets``' progress bars, for the duration.

    Their INFO lines and the "Generating test split" bar repeat for every (task, length); the rich bar says more.
    """
    from datasets.utils import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    bars_were_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars_were_enabled:
            enable_progress_bar()


def _read_result(results: dict, local: LocalTask) -> TaskResult:
    """Pull one task's score out of ``simple_evaluate``'s result dict (keys are ``"<metric>,<filter>"``)."""
    metrics = results["results"][local.name]
    stderr = metrics.get(f"{METRIC}_stderr,none")
    return TaskResult(
        task=local.task,
        length=local.length,
        score=float(metrics[f"{METRIC},none"]),
        # lm-eval writes the string "N/A" when it cannot compute a standard error.
        stderr=float(stderr) if isinstance(stderr, int | float) else float("nan"),
        n_samples=int(results["n-samples"][local.name]["effective"]),
    )


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str] = ("passkey",),
    lengths: Sequence[int] = (2048,),
    *,
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 1,
    work_dir: str | Path | None = None,
    show_progress: bool = True,
) -> list[TaskResult]:
    """Generate each (task, length) locally and score ``model`` on it with lm-eval.

    Args:
        model: an in-memory causal LM, dense or patched; evaluated as is (lm-eval puts it in eval mode).
        tokenizer: its tokenizer; lengths are measured in its tokens, plain prompts (no chat template).
        tasks: bundled task names (:data:`attnkit.eval.tasks.TASKS`), or lm-eval's own task names (RULER,
            LongBench, BABILong, ...), run unchanged where their extras and data are available (a clear error
            says what to install or download when they are not).
        lengths: prompt lengths in tokens.
        samples: prompts per (task, length), spread evenly over the task's default depths.
        seed: seeds the generated answers; the same seed gives the same prompts.
        batch_size: prompts per ``generate`` call (left-padded when > 1).
        work_dir: where the task files go; a temporary folder (deleted afterwards) when None.
        show_progress: show a rich progress bar per (task, length), counting samples.

    Returns:
        One :class:`TaskResult` per (task, length), tasks outer, lengths inner.
    """
    if not tasks or not lengths:
        raise ValueError("run_tasks needs at least one task and one length")
    external = [t for t in tasks if t not in TASKS]  # lm-eval's own tasks (RULER, LongBench, BABILong, ...)
    tasks = [t for t in tasks if t in TASKS]

    with ExitStack() as stack:
        # Offline before lm-eval (and through it `datasets`) is imported: those read the variables at import.
        # huggingface_hub was imported with transformers and keeps the mode it read then; bundled tasks need no
        # network (data are local files, AttnkitLM skips HFLM's Hub lookup of the model sha). lm-eval's own tasks
        # may need their data: then the caller's setting stands.
        if not external:
            stack.enter_context(_offline())
        import lm_eval  # lazy: lm-eval is the optional `eval` extra and slow to import
        from lm_eval.tasks import TaskManager
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from attnkit.eval.lm_eval import AttnkitLM

        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="attnkit-eval-"))
        work_dir = Path(work_dir)
        local_tasks = [
            generate_task(name, tokenizer, length, samples=samples, seed=seed, out_dir=work_dir)
            for name in tasks
            for length in lengths
        ]
        # lm-eval reserves max_gen_toks of max_length for the answer and left-truncates the prompt to the rest:
        # size it so the longest prompt always fits whole.
        max_length = max(lengths) + max([TASKS[name].max_gen_toks for name in tasks] + [_EXTERNAL_GEN_BUDGET])

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not show_progress,
        )
        stack.enter_context(progress)
        stack.enter_context(_quiet_lm_eval())
        bars = {local.name: progress.add_task(local.name, total=local.n_samples) for local in local_tasks}
        current: list[str] = []  # the task being evaluated, for the progress callback

        lm = AttnkitLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            progress=lambda n: progress.advance(bars[current[-1]], n),
        )
        # Only our folder: indexing lm-eval's ~15k built-in task configs costs 8-17 s on a 2-core CPU.
        task_manager = TaskManager(include_path=str(work_dir), include_defaults=False)

        results = []
        for local in local_tasks:
            current.append(local.name)
            output = _simple_evaluate(lm_eval, lm, [local.name], task_manager)
            results.append(_read_result(output, local))
        if external:
            bars["lm-eval"] = progress.add_task("lm-eval: " + ", ".join(external), total=None)
            current.append("lm-eval")
            results.extend(_run_external(lm_eval, lm, external, tokenizer, lengths, samples, work_dir))
        return results


def _simple_evaluate(lm_eval, lm, tasks: list[str], task_manager, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` as attnkit calls it: no sample logs, the caller's RNG state left alone."""
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        log_samples=False,
        # None: leave the caller's Python/NumPy/torch RNG state alone (decoding is greedy anyway).
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        fewshot_random_seed=None,
        **kwargs,
    )


# Generation budget assumed for lm-eval's own tasks when sizing max_length (RULER asks for at most 128 tokens).
_EXTERNAL_GEN_BUDGET = 128

_EXTERNAL_HELP = """lm-eval's long-context suites need their extras and data:
  - RULER (niah_single_1, ..., ruler): pip install 'lm_eval[ruler]'; its repeated-noise NIAH tasks then run offline,
    the essay and QA ones download their text from the Hub the first time;
  - LongBench (longbench*): downloads THUDM/LongBench; BABILong (babilong*): downloads RMT-team/babilong.
Run once with network access (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset) to fill the Hugging Face cache, then
offline runs reuse it. attnkit's bundled tasks need none of this: {bundled}."""


def _run_external(lm_eval, lm, names, tokenizer, lengths, samples, work_dir: Path) -> list[TaskResult]:
    """Run lm-eval's own tasks unchanged on ``lm``; RULER-style tasks get the lengths and a tokenizer path."""
    from lm_eval.tasks import TaskManager

    # RULER builds its prompts with the model's tokenizer, loaded from a path: save ours next to the task files.
    # Task metadata reaches the tasks through the TaskManager (simple_evaluate ignores its own `metadata` argument
    # when it is given a manager).
    tok_dir = work_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    metadata = {"max_seq_lengths": list(lengths), "tokenizer": str(tok_dir), "pretrained": str(tok_dir)}
    task_manager = TaskManager(metadata=metadata)  # lm-eval's full task index (8-17 s on 2 cores): only if asked
    unknown = [n for n in names if n not in task_manager.all_tasks]
    if unknown:
        raise KeyError(
            f"unknown tasks {unknown}: neither bundled with attnkit ({sorted(TASKS)}) nor lm-eval tasks "
            "(list those with `lm-eval ls tasks`)"
        )
    try:
        output = _simple_evaluate(lm_eval, lm, list(names), task_manager, limit=samples)
    except Exception as err:  # missing extras, unreachable data: say what to install or download
        raise RuntimeError(
            f"lm-eval task(s) {list(names)} could not run: {type(err).__name__}: {err}\n"
            + _EXTERNAL_HELP.format(bundled=", ".join(sorted(TASKS)))
        ) from err
    return read_external_results(output)


def read_external_results(output: dict) -> list[TaskResult]:
    """Every numeric metric of an lm-eval result dict as a :class:`TaskResult`.

    RULER reports one metric per sequence length (key ``"4096,none"``): those become ``(task, 4096)``. Other
    metrics become ``("<task>:<metric>", 0)`` (length 0: the task's own lengths).
    """
    rows = []
    for task, metrics in output.get("results", {}).items():
        n = int(output.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "stderr" in metric or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, int | float) else float("nan")
            if metric.isdigit():
                if value < 0:  # RULER reports -1 for its default lengths that were not asked for
                    continue
                rows.append(TaskResult(task=task, length=int(metric), score=float(value), stderr=stderr, n_samples=n))
            else:
                rows.append(TaskResult(task=f"{task}:{metric}", length=0, score=float(value), stderr=stderr, n_samples=n))
    return rows


def compare(
    dense_results: Sequence[TaskResult], patched_results: Sequence[TaskResult]
) -> list[ComparisonRow]:
    """Pair dense and patched results by (task, length), in the dense results' order.

    Raises ``ValueError`` when the two runs do not cover the same (task, length) pairs.
    """
    patched = {(r.task, r.length): r for r in patched_results}
    dense_keys = [(r.task, r.length) for r in dense_results]
    if set(dense_keys) != set(patched):
        raise ValueError(f"dense and patched runs differ: {sorted(dense_keys)} vs {sorted(patched)}")
    rows = []
    for d in dense_results:
        p = patched[(d.task, d.length)]
        rows.append(
            ComparisonRow(
                task=d.task,
                length=d.length,
                dense=d.score,
                patched=p.score,
                ratio=p.score / d.score if d.score > 0 else None,
                uninformative=d.score < UNINFORMATIVE_BELOW,
            )
        )
    return rows
