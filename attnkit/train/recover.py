"""Recovery distillation after a conversion: the converted model (student) learns the original's (teacher's) outputs.

Loss per batch: ``KL(teacher ‖ student)`` of the next-token distributions at temperature ``T`` (times ``T²``), mean
over tokens, plus, with ``hidden_mse > 0``, that weight times the mean over layers of
``‖h_student − h_teacher‖² / mean(h_teacher²)`` (every decoder layer's output). The teacher runs under
``no_grad``. What trains (``RecoverySpec``): the attention weights (``trainable: attention``, the default: the
conversion changed only those), every weight (``all``), or LoRA adapters on the attention projections (``lora:``,
injected with peft and merged back into the weights at the end, so the model keeps its plain modules and saves as
before). AdamW, linear warm-up then cosine decay.

Processes: as :mod:`attnkit.train.distill`, accelerate supplies device and process group; each process reads its own
shard of the data stream (:mod:`attnkit.train.data`) and the trainable gradients are averaged with
``accelerator.reduce`` before each step, so N processes with batch b train like one with batch N·b.

Outputs: :class:`RecoveryResult` (``history``: one row per logged step: step, loss, kl, mse, lr, tokens, seconds),
which :func:`attnkit.convert` writes to ``<out>/train/loss.jsonl`` + ``loss.png``; ``out_dir`` writes them directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.convert.conversion import RecoverySpec
from attnkit.train.distill import LOSS_FILE, PLOT_FILE, plot_loss
from attnkit.train.loop import TrainingLoop

# The attention projections of Llama/Qwen2 attention and of attnkit's MLA module.
RECOVERY_PLOT_TITLE = "recovery distillation from the original model"
RECOVERY_PLOT_YLABEL = "loss (KL(teacher ‖ student) + hidden MSE), nats/token"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "kv_a_proj", "kv_b_proj")


@dataclass
class RecoveryResult:
    """What :func:`recover` did."""

    steps: int
    loss: float | None  # the last logged loss
    first_loss: float | None  # the first logged loss (before any update's effect: the converted model)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0  # tokens trained on, all processes
    trainable_parameters: int = 0
    out_dir: Path | None = None  # where loss.jsonl / loss.png were written (set by the caller that wrote them)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    @property
    def plot_labels(self) -> dict[str, str]:
        """Title and y label of the loss plot (:func:`attnkit.train.distill.plot_loss`)."""
        return {"title": RECOVERY_PLOT_TITLE, "ylabel": RECOVERY_PLOT_YLABEL}


def distillation_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    student_hidden: tuple[torch.Tensor, ...] | None = None,
    teacher_hidden: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kl, mse)``: ``T² · KL(teacher ‖ student)`` of ``[B, S, V]`` logits, mean over the ``B·S`` positions, and the
    normalised hidden-state MSE averaged over the given layers (None without hidden states)."""
    t = temperature
    log_p = torch.log_softmax(teacher_logits.float() / t, -1)
    log_q = torch.log_softmax(student_logits.float() / t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
    mse = None
    if student_hidden is not None and teacher_hidden is not None:
        terms = [((s.float() - h.float()) ** 2).mean() / (h.float() ** 2).mean().clamp_min(1e-12)
                 for s, h in zip(student_hidden, teacher_hidden, strict=True)]
        mse = torch.stack(terms).mean()
    return kl, mse


def _attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    from attnkit.attention import attention_modules

    return [p for attention in attention_modules(model) for p in attention.parameters()]


def _inject_lora(model: nn.Module, spec) -> list[nn.Parameter]:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("recovery with lora: needs peft (pip install 'attnkit[train]')") from err
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = spec.target_modules or [n for n in ATTENTION_PROJECTIONS if n in names]
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"recover.lora.target_modules {missing} name no linear layer of this model")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:  # fp32 adapters train well on a bf16 base (peft casts the input to the adapter's dtype)
        p.data = p.data.float()
    return params


def _merge_lora(model: nn.Module) -> None:
    """Merge every LoRA adapter into its base layer and put the plain layer back (no peft modules left)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())


def recover(
    student: nn.Module,
    teacher: nn.Module,
    spec: RecoverySpec,
    data: Any = None,
    *,
    tokenizer: Any = None,
    out_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    accelerator: Any = None,
) -> RecoveryResult:
    """Distil ``student`` (converted, trained in place) from ``teacher`` (the model before conversion) by ``spec``.

    Args:
        data: None (``spec.data``), a data source string, or token ids ``[N, S]`` / ``[S]``.
        tokenizer: tokenizes text sources (default: ``student.attnkit_tokenizer``).
        out_dir: where to write ``loss.jsonl`` and ``loss.png`` (main process), or None.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    main = accelerator.is_main_process
    device = next(student.parameters()).device
    teacher.to(device).eval()
    teacher.requires_grad_(False)  # the teacher is frozen (its weights are never trained)
    out = Path(out_dir) if out_dir is not None else None

    saved_flags = {p: p.requires_grad for p in student.parameters()}
    was_training = student.training
    student.requires_grad_(False)
    lora = spec.lora is not None
    if lora:
        params = _inject_lora(student, spec.lora)
    else:
        params = list(student.parameters()) if spec.trainable == "all" else _attention_parameters(student)
    for p in params:
        p.requires_grad_(True)
    result = RecoveryResult(0, None, None, trainable_parameters=sum(p.numel() for p in params))
    try:
        student.train()  # no dropout in these models; train() only for modules that check it
        loop = TrainingLoop(params, spec, accelerator, device)
        tok = tokenizer if tokenizer is not None else getattr(student, "attnkit_tokenizer", None)
        stream = loop.batches(data if data is not None else spec.data, tok)
        loop.start(out)  # an empty loss.jsonl (nothing to resume)
        hidden = spec.hidden_mse > 0

        def step_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            s_out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            kl, mse = distillation_losses(
                s_out.logits, t_out.logits, spec.temperature,
                s_out.hidden_states[1:] if hidden else None, t_out.hidden_states[1:] if hidden else None,
            )
            loss = kl + (spec.hidden_mse * mse if mse is not None else 0.0)
            return loss, {"kl": kl, "mse": mse if mse is not None else torch.zeros((), device=device)}

        def row(*, step, loss, parts, lr, tokens, seconds) -> dict[str, Any]:
            entry = {
                "step": step, "loss": loss, "kl": parts["kl"], "lr": lr, "tokens": tokens, "seconds": seconds,
            }
            if hidden:
                entry["hidden_mse"] = parts["mse"]
            return entry

        loop.run(
            step_loss, stream, row, label="recovery distillation", show_progress=show_progress, out=out,
            log_first=True,
        )
        result.steps, result.loss, result.history = loop.step, loop.loss, loop.history
        result.first_loss = loop.history[0]["loss"] if loop.history else None
        result.seconds, result.tokens = loop.seconds, loop.tokens
        if out is not None and main:
            plot_loss(out / LOSS_FILE, out / PLOT_FILE, **result.plot_labels)
    finally:
        if lora:
            _merge_lora(student)
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        for p in student.parameters():
            p.grad = None
        student.train(was_training)
    return result

