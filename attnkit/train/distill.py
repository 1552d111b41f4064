"""Self-distillation of SeerAttention gates, under `accelerate` (one process on a CPU, or ``accelerate launch``).

Per batch, one forward of the frozen model, under ``torch.no_grad()`` and with *dense* attention (each gate is taken
out of the attention dispatcher for the run, so the teacher is the unmodified model; SeerAttention's training also
runs dense attention). A forward hook on each patched layer's ``AttnkitAttention`` module receives the layer's
post-RoPE ``query``/``key`` and computes

- the target: the block-max-pooled attention map (:func:`attnkit.kernels.pooled_attention.pooled_attention`,
  blockwise, Triton on a GPU), without gradient;
- the prediction: the gate's log-softmax over key blocks from the layer's pre-RoPE q/k (captured by the gate's own
  hooks, see :mod:`attnkit.sparsify.seer`), the only computation with gradient;
- the layer loss: KL(target ‖ gate) per query-block row, averaged over the rows that hold a real token, leaving out
  the first ``loss_skip_fraction`` of the query blocks (SeerAttention drops the first quarter: those rows see few
  key blocks).

The loss of a batch is the sum over layers. Activations of the frozen model are never kept for backprop: the autograd
graph holds only each layer's pooled q/k and gate scores (``[B, H, S / block, ...]``). AdamW updates the gate
parameters alone; everything else has ``requires_grad`` False for the run (restored afterwards). Learning rate:
linear warm-up, then cosine decay to 0 (the reference's schedule).

Processes. accelerate supplies the device, the process group and the main-process logic. The frozen model is not
wrapped in DDP (its forward runs under ``no_grad``, where DDP's reducer never prepares for a backward); instead the
gate gradients, a few MB, are averaged over processes with ``accelerator.reduce`` before each step, and the gate
parameters are broadcast from process 0 at the start. Each process reads its own shard of the data stream
(:mod:`attnkit.train.data`).

Outputs (``out_dir``, main process): ``loss.jsonl`` (one line per logged step: step, loss, per-layer losses, lr,
tokens, seconds), ``loss.png`` (the curve, if matplotlib is installed) and ``state.pt`` (gate weights, optimizer,
scheduler, step), written atomically every ``checkpoint_every`` steps and at the end; a run given the same
``out_dir`` resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.attention import attention_modules
from attnkit.kernels.block_mass import query_block_rows
from attnkit.kernels.pooled_attention import pooled_attention
from attnkit.sparsify.seer import AttnGate, SeerAttention, distilling
from attnkit.train.loop import LOSS_FILE, STATE_FILE, TrainingLoop, training_only, write_state

logger = logging.getLogger(__name__)

PLOT_FILE = "loss.png"
STATE_VERSION = 1
# Settings that may change between a run and its resumption (everything else must match the saved state): these
# train keys, and the step's inference-time settings, which the loss does not depend on.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")
_INFERENCE_SETTINGS = (
    "sparsity", "dense_last_blocks", "min_seq_len", "calibrate_recall", "calibrate_density", "calibration_length",
)


@dataclass
class DistillResult:
    """What :func:`distill_gates` did."""

    steps: int  # optimizer steps done in total (resumed ones included)
    loss: float | None  # the last logged loss (sum over layers, mean over processes)
    history: list[dict[str, Any]] = field(default_factory=list)  # logged rows of this run (and resumed ones)
    seconds: float = 0.0  # training time of this call
    tokens: int = 0  # tokens seen by all processes, resumed steps included
    resumed_from: int = 0  # the step a saved state was resumed from (0: fresh)
    out_dir: Path | None = None
    tokens_this_run: int = 0  # tokens trained on by this call (all processes)
    peak_memory_mb: float | None = None  # peak CUDA memory allocated by this process during the call (None on CPU)
    label: str = "gates"  # what was trained, for summaries (linearization: "attention transfer", "LoRA recovery")

    @property
    def tokens_per_second(self) -> float | None:
        """Training throughput of this call, all processes together."""
        return self.tokens_this_run / self.seconds if self.seconds > 0 and self.tokens_this_run else None


# ---------------------------------------------------------------------------------------------------- loss
def distillation_loss(
    target: torch.Tensor, log_probs: torch.Tensor, rows: torch.Tensor | None = None, skip_fraction: float = 0.0
) -> torch.Tensor:
    """KL(target ‖ gate) per query-block row, averaged over the counted rows.

    Args:
        target: ``[B, H, QB, KB]`` rows summing to 1 (or all 0 for rows without a real query).
        log_probs: ``[B, H, QB, KB]`` the gate's log-softmax (finite everywhere).
        rows: optional bool ``[B, QB]``: rows holding a real query (default: rows whose target is not all 0).
        skip_fraction: the first ``floor(QB · skip_fraction)`` query blocks are left out.
    """
    qb = target.shape[-2]
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-38)) - log_probs), 0.0).sum(-1)  # [B,H,QB]
    counted = target.sum(-1) > 0 if rows is None else rows[:, None, :].expand_as(kl)
    counted = counted & (torch.arange(qb, device=kl.device) >= math.floor(qb * skip_fraction))
    return (kl * counted).sum() / counted.sum().clamp_min(1)


def seer_gates(model: nn.Module, method: SeerAttention | None = None) -> dict[int, AttnGate]:
    """Layer → the SeerAttention gate attached there (only ``method``'s gates when given)."""
    out = {}
    for idx, attention in enumerate(attention_modules(model)):
        prefill = getattr(getattr(attention, "attnkit", None), "prefill", None)
        if isinstance(prefill, AttnGate) and (method is None or prefill.method is method):
            out[idx] = prefill
    return out


@contextlib.contextmanager
def teacher_mode(model: nn.Module, gates: dict[int, AttnGate]) -> Iterator[None]:
    """The model runs dense attention while the gates still capture their layers' pre-RoPE q/k."""
    attentions = attention_modules(model)
    try:
        for idx, gate in gates.items():
            attentions[idx].attnkit.prefill = None
            distilling(attentions[idx], gate)
        yield
    finally:
        for idx, gate in gates.items():
            distilling(attentions[idx], None)
            attentions[idx].attnkit.prefill = gate


def layer_losses(
    model: nn.Module,
    gates: dict[int, AttnGate],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    skip_fraction: float = 0.25,
) -> dict[int, torch.Tensor]:
    """One dense no-grad forward of ``model``; per gated layer the distillation loss (a scalar with gradient)."""
    attentions = attention_modules(model)
    losses: dict[int, torch.Tensor] = {}

    def hook(idx: int, gate: AttnGate):
        block = gate.method.block_size

        def run(module, args, kwargs, output):
            query, key = args[0], args[1]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            scale = args[4] if len(args) > 4 else kwargs.get("scale")
            if query.shape[-2] < 2:
                return
            target = pooled_attention(query, key, block, scale, kpm)
            with torch.enable_grad():
                logits, _ = gate.block_logits(query, key, kpm)
                log_probs = torch.log_softmax(logits, -1)
                rows = None
                if kpm is not None:
                    rows = query_block_rows(query.shape[-2], key.shape[-2], block, kpm, query.device) > 0
                losses[idx] = distillation_loss(target, log_probs, rows, skip_fraction)

        return run

    handles = []
    with teacher_mode(model, gates):
        try:
            for idx, gate in gates.items():
                handles.append(attentions[idx].attnkit.register_forward_hook(hook(idx, gate), with_kwargs=True))
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    missing = sorted(set(gates) - set(losses))
    if missing:
        raise RuntimeError(f"no distillation loss for layers {missing}: the forward never reached their attention")
    return losses


# ---------------------------------------------------------------------------------------------------- loop
def distill_gates(
    model: nn.Module,
    method: SeerAttention,
    data: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    show_progress: bool = True,
    tokenizer: Any = None,
    accelerator: Any = None,
) -> DistillResult:
    """Train ``method``'s gates on ``model`` (patched with it) by self-distillation; see the module docstring.

    Args:
        model: a model patched by ``attnkit.apply`` with ``method`` among its steps (on its final device).
        method: the :class:`SeerAttention` step whose gates to train; its ``train`` block sets the schedule.
        data: None (``method.train.data``), a data source string, or token ids ``[N, S]`` / ``[S]``.
        out_dir: where ``loss.jsonl``, ``loss.png`` and the resumable ``state.pt`` go (None: nothing is written).
        resume: continue from ``out_dir/state.pt`` when it exists (its settings must match ``method``'s).
        tokenizer: tokenizes text sources (default: the one ``attnkit.load_model`` attached to the model).
        accelerator: an ``accelerate.Accelerator`` (default: a new one; one process unless under
            ``accelerate launch``).
    """
    from accelerate import Accelerator

    cfg = method.train
    gates = seer_gates(model, method)
    if not gates:
        raise ValueError("the model has no SeerAttention gates of this method: attnkit.apply(model, recipe) first")
    accelerator = accelerator or Accelerator()
    main = accelerator.is_main_process
    device = next(model.parameters()).device
    out = Path(out_dir) if out_dir is not None else None

    params = [p for gate in gates.values() for p in gate.parameters()]
    with training_only(model, params, train=False):
        loop = TrainingLoop(params, cfg, accelerator, device)

        def load(path: Path) -> tuple[int, int]:
            return _load_state(path, method, gates, loop.optimizer, loop.scheduler, device)

        def checkpoint(step: int, tokens: int) -> None:
            _checkpoint(accelerator, out, step, tokens, method, gates, loop.optimizer, loop.scheduler)

        def step_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
            losses = layer_losses(model, gates, ids, skip_fraction=cfg.loss_skip_fraction)
            return sum(losses.values()), losses

        def row(*, step, loss, parts, lr, tokens, seconds) -> dict[str, Any]:
            layers = {str(i): round(v, 6) for i, v in parts.items()}
            return {
                "step": step, "loss": loss, "layers": layers, "lr": lr, "tokens": tokens, "seconds": seconds,
            }

        loop.start(out, load if resume else None)
        start_step, start_tokens = loop.step, loop.tokens
        source = data if data is not None else cfg.data
        tok = tokenizer if tokenizer is not None else getattr(model, "attnkit_tokenizer", None)
        stream = loop.batches(source, tok, skip_steps=start_step)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loop.run(
            step_loss, stream, row, label="distilling gates", show_progress=show_progress, out=out,
            checkpoint=checkpoint if out is not None else None,
        )
        result = DistillResult(
            loop.step, loop.loss, loop.history, loop.seconds, loop.tokens, start_step, out,
            tokens_this_run=loop.tokens - start_tokens,
        )
        if device.type == "cuda":
            result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        if out is not None:
            checkpoint(result.steps, result.tokens)
            if main:
                plot_loss(out / LOSS_FILE, out / PLOT_FILE)
        return result


# -------------------------------------------------------------------------------------------- state files
def _comparable(method: SeerAttention | dict) -> dict:
    step = method.to_step() if isinstance(method, SeerAttention) else dict(method)
    train = {k: v for k, v in step.get("train", {}).items() if k not in _RESUMABLE_CHANGES}
    return {**{k: v for k, v in step.items() if k not in _INFERENCE_SETTINGS}, "train": train}


def _checkpoint(accelerator, out: Path, step: int, tokens: int, method, gates, optimizer, scheduler) -> None:
    if accelerator.is_main_process:
        state = {
            "version": STATE_VERSION,
            "step": step,
            "tokens": tokens,
            "method": method.to_step(),
            "gates": {str(idx): {k: v.detach().cpu() for k, v in gate.state_dict().items()} for idx, gate in gates.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        write_state(out / STATE_FILE, state)
    accelerator.wait_for_everyone()


def _load_state(path: Path, method, gates, optimizer, scheduler, device) -> tuple[int, int]:
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')!r} is not supported")
    if _comparable(state["method"]) != _comparable(method):
        raise ValueError(
            f"{path} was written by a run with other settings ({state['method']}); resume with the same recipe, or "
            f"use another output folder (only train.{', train.'.join(_RESUMABLE_CHANGES)} and the selection settings "
            "may change)"
        )
    if set(state["gates"]) != {str(i) for i in gates}:
        raise ValueError(f"{path}: its gates (layers {sorted(state['gates'])}) do not match this model's {sorted(gates)}")
    for idx, gate in gates.items():
        gate.load_state_dict(state["gates"][str(idx)])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["tokens"])


def plot_loss(
    jsonl: str | os.PathLike,
    png: str | os.PathLike,
    title: str = "SeerAttention gate distillation (thin lines: layers)",
    ylabel: str = "KL(target ‖ gate), nats per block row",
) -> Path | None:
    """Plot ``loss.jsonl`` (total and per-layer losses against the step) into ``png``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot (pip install 'attnkit[eval]')")
        return None
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    layers = sorted({k for r in rows for k in r.get("layers", {})}, key=int)
    for layer in layers:
        ax.plot(steps, [r["layers"].get(layer, float("nan")) for r in rows], lw=0.6, alpha=0.35)
    ax.plot(steps, [r["loss"] / max(1, len(layers)) for r in rows], color="black", lw=2,
            label="mean over layers" if layers else "loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class DistillReport:
    """What :func:`distill` did: the checkpoint, the training results per Seer step, timings."""

    recipe: str
    model: str
    out: Path
    results: list[DistillResult]
    seconds: dict[str, float] = field(default_factory=dict)
    # per Seer step: layer → calibrated per-head thresholds ({} when the step has no calibration target)
    thresholds: list[dict[int, list[float]]] = field(default_factory=list)
    # FSDP2: (units sharded, processes); None when the model stayed whole on every process
    sharded: tuple[int, int] | None = None

    def summary(self) -> str:
        lines = [f"{self.recipe} on {self.model} → {self.out}"]
        if self.sharded is not None:
            lines.append(f"  FSDP2: frozen model sharded in {self.sharded[0]} units over {self.sharded[1]} processes")
        for i, r in enumerate(self.results):
            speed = f", {r.tokens_per_second:,.0f} tokens/s" if r.tokens_per_second else ""
            if r.peak_memory_mb is not None:
                speed += f", peak {r.peak_memory_mb:,.0f} MB per GPU"
            loss = "n/a" if r.loss is None else f"{r.loss:.4f}"
            what = getattr(r, "label", "recovery")  # DistillResult: gates / linearization stages
            lines.append(f"  {what} {i}: {r.steps} steps, final loss {loss}{speed} ({r.seconds:.0f} s)")
            calibrated = sorted(t for layer in (self.thresholds[i] if i < len(self.thresholds) else {}).values() for t in layer)
            if calibrated:
                median = calibrated[len(calibrated) // 2]
                lines.append(
                    f"  gates {i}: per-head thresholds calibrated: min {calibrated[0]:g}, median {median:g}, "
                    f"max {calibrated[-1]:g} ({len(calibrated)} heads)"
                )
        return "\n".join(lines)


def distill(
    recipe: Any = "seer_attention",
    model: str = "llama",
    out: str | os.PathLike = "runs/seer_attention",
    *,
    data: str | None = None,
    steps: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    show_progress: bool = True,
    fsdp: bool = False,
) -> DistillReport:
    """Load ``model``, apply ``recipe``, train its SeerAttention gates, save the checkpoint to ``out``.

    What ``attnkit distill`` runs, also under ``accelerate launch -m attnkit distill ...`` (every process trains on
    its own data shard on its own device; process 0 writes). ``data`` / ``steps`` / ``seq_len`` / ``batch_size`` override the
    ``train:`` block of every SeerAttention step. Other steps calibrate as in ``attnkit.apply``.

    Training files go to ``<out>.train/`` while the run is under way and into ``<out>/train/`` once the checkpoint
    is saved (``loss.jsonl``, ``loss.png``, ``state.pt``). An interrupted run leaves ``<out>.train/``: call again
    with ``resume=True`` (``--resume``) and the same settings to continue from its last saved state
    (``train.checkpoint_every``), or with ``overwrite=True`` to start over; with neither, the call fails before any
    work rather than discard it. Also fails before any work when ``out`` exists and ``overwrite`` is false.
    Steps with a calibration target (``calibrate_recall`` / ``calibrate_density``) calibrate their thresholds
    after training, as ``attnkit.apply`` does.

    Sharding: under ``accelerate launch`` with an FSDP2 config, or with ``fsdp=True`` in any multi-process run, the
    frozen model is sharded with FSDP2 while the gates stay replicated (:mod:`attnkit.train.sharding`); the
    checkpoint is then written by the main process from an unsharded copy on the CPU that receives the gathered full
    state dict.
    """
    from attnkit.models import load_model
    from attnkit.patch import apply
    from attnkit.recipe import Recipe
    from attnkit.train.loop import close_run, open_run
    from attnkit.train.sharding import fsdp2_settings, shard_frozen

    recipe = Recipe.load(recipe)
    if not any(isinstance(s, SeerAttention) for s in recipe.steps):
        from attnkit.convert.linearize import Linearize

        if any(isinstance(s, Linearize) for s in recipe.steps):  # linearization trains in its own module
            from attnkit.train.linearize import distill as distill_linear

            return distill_linear(
                recipe, model, out, data=data, steps=steps, seq_len=seq_len, batch_size=batch_size,
                overwrite=overwrite, resume=resume, dtype=dtype, device=device, show_progress=show_progress, fsdp=fsdp,
            )
    if data is not None or steps is not None or seq_len is not None or batch_size is not None:
        recipe = _override_training(recipe, data=data, steps=steps, seq_len=seq_len, batch_size=batch_size)
    if not any(isinstance(s, SeerAttention) for s in recipe.steps):
        if any(getattr(s, "recover", None) is not None for s in recipe.steps):
            return _distill_conversion(recipe, model, out, overwrite=overwrite, dtype=dtype, device=device)
        raise ValueError(
            f"recipe {recipe.name!r} has no seer_attention step and no conversion step with a recover: block: "
            "nothing to distill"
        )
    out, staging, accelerator = open_run(out, overwrite=overwrite, resume=resume)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, device=device or str(accelerator.device))
    seconds["load"] = time.perf_counter() - start
    apply(lm, recipe, fit=False)
    seer_steps = [s for s in recipe.steps if isinstance(s, SeerAttention)]
    sharding, sharded = fsdp2_settings(accelerator, requested=fsdp), None
    if sharding is not None:
        gate_params = [p for s in seer_steps for gate in seer_gates(lm, s).values() for p in gate.parameters()]
        sharded = (shard_frozen(lm, gate_params, **sharding), accelerator.num_processes)
    results, thresholds = [], []
    start = time.perf_counter()
    for step in recipe.steps:
        if isinstance(step, SeerAttention):
            folder = staging if len(seer_steps) == 1 else staging / f"step{seer_steps.index(step)}"
            results.append(
                distill_gates(
                    lm, step, out_dir=folder, resume=resume, show_progress=show_progress, tokenizer=tokenizer,
                    accelerator=accelerator,
                )
            )
            thresholds.append(step.calibrate(lm))
        else:
            step.fit(lm, None)
    seconds["train"] = time.perf_counter() - start
    close_run(
        lm, results, accelerator=accelerator, sharded=sharding is not None, model=model, recipe=recipe, out=out,
        staging=staging, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype, seconds=seconds,
    )
    return DistillReport(recipe.name, model, out, results, seconds, thresholds, sharded)


def _distill_conversion(recipe, model: str, out, *, overwrite: bool, dtype, device) -> DistillReport:
    """``attnkit distill`` of a conversion recipe: convert, recover by distillation from the original (under
    accelerate), save; the loss curves go to ``<out>/train/``."""
    from accelerate import Accelerator

    from attnkit.checkpoint import CheckpointError, save
    from attnkit.models import load_model
    from attnkit.patch import apply
    from attnkit.pipeline import _write_training_curves

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass --overwrite to replace it)")
    accelerator = Accelerator()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, device=device or str(accelerator.device))
    seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    apply(lm, recipe)
    seconds["convert+recover"] = time.perf_counter() - start
    if accelerator.is_main_process:
        save(lm, out, tokenizer=tokenizer, overwrite=overwrite)
        _write_training_curves(lm, out)
    accelerator.wait_for_everyone()
    results = list(getattr(lm, "attnkit_training", None) or [])
    folder = out / "train"
    for i, r in enumerate(results):
        r.out_dir = folder / (f"step{i}" if len(results) > 1 else "")
    return DistillReport(recipe.name, model, out, results, seconds)


def _override_training(
    recipe, *, data: str | None, steps: int | None, seq_len: int | None, batch_size: int | None = None
):
    from attnkit.recipe import Recipe

    spec = recipe.to_dict()
    for step in spec["steps"]:
        if step.get("recover") is not None:  # conversion steps: the flags set their recovery distillation
            for key, value in (("data", data), ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
                if value is not None:
                    step["recover"][key] = value
            continue
        if step["method"] != SeerAttention.method_name:
            continue
        train = step.setdefault("train", {})
        for key, value in (("data", data), ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
            if value is not None:
                train[key] = value
    return Recipe._validate(spec, f"recipe {recipe.name!r} with command-line overrides")
