"""The optimisation loop shared by attnkit's trainers: SeerAttention gate distillation
(:mod:`attnkit.train.distill`), the linearization stages (:mod:`attnkit.train.linearize`) and conversion
recovery (:mod:`attnkit.train.recover`).

Why one loop: the trainers differ in what they train and in the loss of a batch, not in how a step is taken,
and three copies of the step drift apart (a fix to the gradient averaging or to resumption reaching one
trainer but not the others). What is kept here once: AdamW with linear warm-up then cosine decay to 0; process
0's trainable parameters broadcast at the start; each process reading its own shard of the data stream,
skipping the batches of resumed steps; gradient accumulation; gradients averaged over processes with
``accelerator.reduce`` before each step (no DDP wrapper: the frozen models run under ``no_grad``, where DDP's
reducer never prepares for a backward); clipping; a row logged every ``log_every`` steps (values averaged over
processes) and appended to ``loss.jsonl``; the progress bar; periodic checkpoints.

What stays with each trainer: the loss of a batch (``step_loss``), the layout of a logged row (``row``), which
tensors train and how they are saved and restored (``checkpoint`` / ``load``, the state-file formats differ),
and the result built from the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.train.data import batches, token_sequences

STATE_FILE = "state.pt"
LOSS_FILE = "loss.jsonl"

# step_loss(ids) -> (the batch's loss, the parts of it to log: layer index or name -> scalar tensor)
StepLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[Any, torch.Tensor]]]


class TrainingLoop:
    """One training run of ``params`` under the settings ``cfg``: optimizer, schedule, the steps done so far.

    ``cfg`` is a trainer's settings block (SeerAttention's ``train:``, linearize's ``transfer:`` /
    ``finetune:``, a conversion's ``recover:``). Read from it: ``lr``, ``weight_decay``, ``warmup_steps``,
    ``steps``, ``grad_accum``, ``max_grad_norm``, ``log_every``, ``checkpoint_every`` (only when :meth:`run`
    gets a ``checkpoint``) and the data settings (``seq_len``, ``batch_size``, ``seed``, ``data_config``,
    ``data_split``, ``text_field``).

    Use: construct it (broadcasts ``params`` from process 0, builds ``optimizer`` / ``scheduler``), then
    :meth:`start`, :meth:`batches` and :meth:`run`; afterwards ``step``, ``tokens``, ``history``, ``loss`` and
    ``seconds`` describe the run. :meth:`start` and :meth:`batches` are separate calls because the trainers
    order them differently (a data source is checked when its stream is made, before or after the log is
    opened).
    """

    def __init__(self, params: list[nn.Parameter], cfg: Any, accelerator: Any, device: torch.device) -> None:
        self.params, self.cfg, self.accelerator, self.device = params, cfg, accelerator, device
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            with torch.no_grad():
                for p in params:
                    p.copy_(broadcast(p.detach().clone(), from_process=0))
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(cfg.warmup_steps, cfg.steps)
        )
        self.step = 0  # optimizer steps done, resumed ones included
        self.tokens = 0  # tokens seen by all processes, resumed steps included
        self.history: list[dict[str, Any]] = []  # logged rows, resumed ones included
        self.seconds = 0.0  # time spent in run()

    @property
    def loss(self) -> float | None:
        """The last logged loss (None before any row)."""
        return self.history[-1]["loss"] if self.history else None

    def start(self, out: Path | None, load: Callable[[Path], tuple[int, int]] | None = None) -> None:
        """Resume from ``out/state.pt`` when ``load`` is given and the file exists, then write ``loss.jsonl``.

        ``load(path)`` restores the trained tensors, ``optimizer`` and ``scheduler`` and returns
        ``(step, tokens)``. The logged rows up to that step are kept: later ones were logged after the state
        was saved and will be logged again. The main process writes the log; ``out=None`` writes nothing.
        """
        if load is not None and out is not None and (out / STATE_FILE).is_file():
            self.step, self.tokens = load(out / STATE_FILE)
            self.history = read_history(out / LOSS_FILE, self.step)
        if out is not None and self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            write_history(out / LOSS_FILE, self.history)

    def batches(self, source: Any, tokenizer: Any, skip_steps: int = 0) -> Iterator[torch.Tensor]:
        """This process's shard of ``source`` in batches of ``cfg.batch_size``, past the batches that the
        first ``skip_steps`` steps used, so that a resumed run sees the data an uninterrupted one would."""
        cfg, accelerator = self.cfg, self.accelerator
        stream = token_sequences(
            source,
            tokenizer,
            cfg.seq_len,
            seed=cfg.seed,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            data_config=cfg.data_config,
            split=cfg.data_split,
            text_field=cfg.text_field,
        )
        stream = batches(stream, cfg.batch_size)
        for _ in range(skip_steps * cfg.grad_accum):
            next(stream)
        return stream

    def run(
        self,
        step_loss: StepLoss,
        stream: Iterator[torch.Tensor],
        row: Callable[..., dict[str, Any]],
        *,
        label: str,
        show_progress: bool = True,
        out: Path | None = None,
        checkpoint: Callable[[int, int], None] | None = None,
        log_first: bool = False,
    ) -> None:
        """Take the optimizer steps from ``step`` to ``cfg.steps``.

        Args:
            step_loss: ``ids -> (loss, parts)``: the loss of one batch and the parts of it to log (layer index
                or name → scalar; ``{}`` for none). The loop back-propagates ``loss / grad_accum`` when the
                loss still requires grad; a ``step_loss`` that back-propagated itself (linearization's
                attention transfer, layer by layer) returns it detached.
            row: ``row(step=, loss=, parts=, lr=, tokens=, seconds=) -> dict``: a logged row from the step's
                values (``loss`` and ``parts`` as floats, averaged over the accumulated batches and over
                processes), so that each trainer keeps its own ``loss.jsonl`` keys.
            label: the progress bar's label (the bar is shown by the main process with ``show_progress``).
            out: the folder whose ``loss.jsonl`` the main process appends each row to (None: not written).
            checkpoint: ``checkpoint(step, tokens)``, called every ``cfg.checkpoint_every`` steps before the
                last one; the final save is the caller's.
            log_first: also log the first step (recovery: the loss of the model as converted).
        """
        cfg, accelerator, device = self.cfg, self.accelerator, self.device
        world, main = accelerator.num_processes, accelerator.is_main_process
        started = time.perf_counter()
        with _progress(show_progress and main, cfg.steps, self.step, label) as advance:
            for step in range(self.step, cfg.steps):
                total, parts = torch.zeros((), device=device), {}
                for _ in range(cfg.grad_accum):
                    ids = next(stream).to(device)
                    loss, batch_parts = step_loss(ids)
                    if loss.requires_grad:
                        (loss / cfg.grad_accum).backward()
                    total += loss.detach() / cfg.grad_accum
                    for key, value in batch_parts.items():
                        parts[key] = parts.get(key, 0.0) + value.detach() / cfg.grad_accum
                    self.tokens += ids.numel() * world
                if world > 1:
                    for p in self.params:
                        if p.grad is not None:
                            p.grad = accelerator.reduce(p.grad, reduction="mean")
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps or (log_first and done == 1):
                    keys = sorted(parts)
                    logged = torch.stack([total, *(parts[k] for k in keys)])
                    if world > 1:
                        logged = accelerator.reduce(logged, reduction="mean")
                    logged = logged.tolist()
                    entry = row(
                        step=done,
                        loss=logged[0],
                        parts=dict(zip(keys, logged[1:], strict=True)),
                        lr=lr,
                        tokens=self.tokens,
                        seconds=round(time.perf_counter() - started, 3),
                    )
                    self.history.append(entry)
                    if out is not None and main:
                        with (out / LOSS_FILE).open("a") as f:
                            f.write(json.dumps(entry) + "\n")
                advance(done, self.loss)
                if (
                    checkpoint is not None
                    and cfg.checkpoint_every
                    and done % cfg.checkpoint_every == 0
                    and done < cfg.steps
                ):
                    checkpoint(done, self.tokens)
        self.seconds = time.perf_counter() - started
        self.step = max(cfg.steps, self.step)


@contextlib.contextmanager
def training_only(model: nn.Module, params: list[nn.Parameter], train: bool) -> Iterator[None]:
    """Within the block only ``params`` of ``model`` require grad and ``model`` is in ``train`` mode.

    Afterwards the ``requires_grad`` flags and the mode are back as they were and ``params`` hold no gradient,
    also when training fails: the trainers train parts of a model in place (gates, feature maps) that the
    caller goes on using, patched, calibrated and saved.
    """
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.train(train)
        yield
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
        model.train(was_training)


def read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    """The rows of a ``loss.jsonl`` up to step ``upto`` (``[]`` without the file)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["step"] <= upto]


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as a ``loss.jsonl``, one JSON object a line (the rows a resumed run keeps)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Save a training state to ``path`` through a temporary file and a rename, so that a run killed while
    saving still leaves the previous state to resume from."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _warmup_cosine(warmup: int, total: int):
    """``LambdaLR``'s learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


@contextlib.contextmanager
def _progress(enabled: bool, total: int, start: int, label: str):
    """A rich progress bar with the running loss; yields ``advance(step, loss)``."""
    if not enabled:
        yield lambda step, loss: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("distill", total=total, completed=start, loss="-")

        def advance(step: int, loss: float | None) -> None:
            progress.update(task, completed=step, loss="-" if loss is None else f"{loss:.4f}")

        yield advance


# ------------------------------------------------------------------------------------ an `attnkit distill` run
def open_run(out: str | os.PathLike, *, overwrite: bool, resume: bool) -> tuple[Path, Path, Any]:
    """Check an ``attnkit distill`` run's folders before any work; returns ``(out, staging, accelerator)``.

    The checkpoint goes to ``out`` (refused when it exists and ``overwrite`` is false); training files go to the
    staging folder ``<out>.train/`` while the run is under way. An unfinished run's staging folder needs ``resume``
    (continue it) or ``overwrite`` (deleted here, by the main process, before training starts)."""
    from accelerate import Accelerator

    from attnkit.checkpoint import CheckpointError

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass --overwrite to replace it)")
    staging = out.with_name(f"{out.name}.train")
    if staging.exists() and not (resume or overwrite):
        raise CheckpointError(
            f"{staging} holds an unfinished training run: pass --resume (resume=True) to continue it, or "
            "--overwrite (overwrite=True) to start over"
        )
    accelerator = Accelerator()
    if staging.exists() and not resume:
        if accelerator.is_main_process:
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
    return out, staging, accelerator


def close_run(
    lm: nn.Module, results: list, *, accelerator: Any, sharded: bool, model: str, recipe: Any, out: Path,
    staging: Path, tokenizer: Any, overwrite: bool, dtype: Any, seconds: dict[str, float],
) -> None:
    """Save the trained model to ``out`` and move the staging folder to ``<out>/train/``; ``results``' folders are
    rewritten to where they now are. With FSDP2 (``sharded``) every process joins the full-state gather and the main
    process saves from a whole copy on the CPU (the sharded weights are DTensor pieces)."""
    from attnkit.checkpoint import save
    from attnkit.models import load_model
    from attnkit.patch import apply
    from attnkit.train.sharding import full_state_dict

    full_state = full_state_dict(lm) if sharded else None  # collective: every process joins
    if accelerator.is_main_process:
        start = time.perf_counter()
        if full_state is not None:
            whole, _ = load_model(model, dtype=dtype, device="cpu")
            apply(whole, recipe, fit=False)
            whole.load_state_dict(full_state)
            save(whole, out, tokenizer=tokenizer, overwrite=overwrite)
        else:
            save(lm, out, tokenizer=tokenizer, overwrite=overwrite)
        if staging.exists():
            shutil.move(str(staging), str(out / "train"))
        seconds["save"] = time.perf_counter() - start
    accelerator.wait_for_everyone()
    for r in results:
        if r.out_dir is not None:
            r.out_dir = out / "train" / r.out_dir.relative_to(staging)
