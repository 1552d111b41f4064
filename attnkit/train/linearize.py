"""Training of linearized attention (:mod:`attnkit.convert.linearize`), under `accelerate`.

**Stage 1, attention transfer** (:func:`transfer_attention`). Per batch, one forward of the frozen model under
``torch.no_grad()`` with *softmax* attention (every linear-attention module is taken out of the dispatcher for the
run, so each layer's inputs are the original model's, as in LoLCATs' attention transfer). A forward hook on each
converted layer's ``AttnkitAttention`` module receives the layer's post-RoPE ``query``/``key``/``value`` and the
softmax output (the teacher), runs the layer's linear attention on the same inputs with gradient (the student),
computes ``mse_weight · MSE(student, teacher)`` over the real query rows, plus, with ``xent_weight``, the
cross-entropy between the softmax and linear attention weights (``S × S`` per head: keep ``seq_len`` short), and
back-propagates it at once. The layers are trained all at once and layer by layer at the same time: their losses are
independent (every layer sees the frozen model's inputs), so one forward serves all of them, and only one layer's
autograd graph (its feature maps and linear-attention intermediates) is alive at a time. The logged loss is the
mean over layers. Only the feature maps and the window factors have ``requires_grad``.

**Stage 2, LoRA recovery** (:func:`finetune_lora`, optional). peft LoRA adapters on the attention projections
(``q_proj``/``k_proj``/``v_proj``/``o_proj``), trained through the linearized model with the LM loss or by
distilling the original model's logits (teacher: the same weights with the adapters disabled and softmax attention,
in the same process), then merged into the weights (``merge_and_unload``): the checkpoint stores the merged weights,
so ``attnkit.load`` and a plain ``from_pretrained`` both see them. The feature maps stay frozen in this stage.

Both stages: AdamW, linear warm-up then cosine decay; several processes (``accelerate launch``) each read their own
data shard, trainable parameters are broadcast from process 0 at the start and their gradients averaged before each
step (no DDP wrapper: stage 1 runs the frozen model under ``no_grad``). Outputs (``out_dir``, main process):
``loss.jsonl`` (step, loss, per-layer losses for stage 1, lr, tokens, seconds), ``loss.png`` with matplotlib, and
``state.pt`` (trainable tensors, optimizer, scheduler, step) every ``checkpoint_every`` steps and at the end; a run
given the same ``out_dir`` resumes from it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.attention import attention_modules
from attnkit.convert.linearize import LinearAttention, Linearize, linear_layers
from attnkit.train.distill import DistillReport, DistillResult, plot_loss
from attnkit.train.loop import LOSS_FILE, STATE_FILE, StepLoss, TrainingLoop, training_only, write_state

PLOT_FILE = "loss.png"
STATE_VERSION = 1
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")


# ------------------------------------------------------------------------------------------- stage 1 losses
@contextlib.contextmanager
def teacher_mode(model: nn.Module, layers: dict[int, LinearAttention]) -> Iterator[None]:
    """The converted layers run softmax attention inside the block (their modules stay attached to nothing)."""
    attentions = attention_modules(model)
    try:
        for idx in layers:
            attentions[idx].attnkit.replacement = None
        yield
    finally:
        for idx, layer in layers.items():
            attentions[idx].attnkit.replacement = layer


def softmax_weights(
    query: torch.Tensor, key: torch.Tensor, scale: float | None, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal softmax attention weights ``[B, Hq, S, S]`` (float32) for ``query [B, Hq, S, D]``, ``key [B, Hkv, S, D]``."""
    batch, hq, seq, dim = query.shape
    hkv = key.shape[1]
    scale = dim**-0.5 if scale is None else scale
    scores = torch.einsum("bhgsd,bhtd->bhgst", query.float().view(batch, hkv, hq // hkv, seq, dim), key.float()) * scale
    visible = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, None, :].bool()
    scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
    return torch.softmax(scores, -1).reshape(batch, hq, seq, seq)


def transfer_loss(
    layer: LinearAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    teacher: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    mse_weight: float = 1.0,
    xent_weight: float = 0.0,
) -> torch.Tensor:
    """One layer's attention-transfer loss: ``mse_weight · MSE(linear, softmax output)`` over real query rows
    (``teacher [B, Hq, S, D]``) + ``xent_weight · CE(softmax weights, linear weights)`` (mean over real rows)."""
    rows = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(torch.float32)  # [B, 1, S, 1]
    loss = torch.zeros((), device=query.device)
    if mse_weight:
        student = layer(query, key, value, key_padding_mask, scale).float()
        err = (student - teacher.float()).pow(2)
        if rows is None:
            loss = loss + mse_weight * err.mean()
        else:
            count = rows.sum() * err.shape[1] * err.shape[-1]
            loss = loss + mse_weight * (err * rows).sum() / count.clamp_min(1)
    if xent_weight:
        target = softmax_weights(query, key, scale, key_padding_mask)
        predicted = layer.attention_weights(query, key, scale, key_padding_mask)
        xent = -(target * predicted.clamp_min(1e-12).log()).sum(-1)  # [B, Hq, S]
        if rows is None:
            loss = loss + xent_weight * xent.mean()
        else:
            r = rows[..., 0].expand_as(xent)
            loss = loss + xent_weight * (xent * r).sum() / r.sum().clamp_min(1)
    return loss


def transfer_losses(
    model: nn.Module,
    layers: dict[int, LinearAttention],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mse_weight: float = 1.0,
    xent_weight: float = 0.0,
    backward_scale: float | None = None,
) -> dict[int, torch.Tensor]:
    """One softmax no-grad forward of ``model``; per converted layer the transfer loss (a scalar with gradient).

    With ``backward_scale``, each layer's ``loss · backward_scale`` is back-propagated inside its hook, as soon as
    it is computed, and the returned losses are detached: only one layer's autograd graph is alive at a time (the
    layers' losses are independent, each layer seeing the frozen model's inputs, so the gradients are the same as
    one backward of the sum)."""
    attentions = attention_modules(model)
    losses: dict[int, torch.Tensor] = {}

    def hook(idx: int, layer: LinearAttention):
        def run(module, args, kwargs, output):
            query, key, value = args[0], args[1], args[2]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            scale = args[4] if len(args) > 4 else kwargs.get("scale")
            with torch.enable_grad():
                loss = transfer_loss(layer, query, key, value, output, kpm, scale, mse_weight, xent_weight)
                if backward_scale is not None:
                    (loss * backward_scale).backward()
                    loss = loss.detach()
                losses[idx] = loss

        return run

    handles = []
    with teacher_mode(model, layers):
        try:
            for idx, layer in layers.items():
                handles.append(attentions[idx].attnkit.register_forward_hook(hook(idx, layer), with_kwargs=True))
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    missing = sorted(set(layers) - set(losses))
    if missing:
        raise RuntimeError(f"no transfer loss for layers {missing}: the forward never reached their attention")
    return losses


@torch.no_grad()
def attention_output_error(model: nn.Module, input_ids: torch.Tensor, method: Linearize | None = None) -> dict[int, float]:
    """Layer → MSE between its linear and softmax attention outputs on ``input_ids`` (no training; a diagnostic)."""
    layers = linear_layers(model, method)
    losses = transfer_losses(model, layers, input_ids)
    return {i: float(v) for i, v in losses.items()}


# ---------------------------------------------------------------------------------------------------- stages
def transfer_attention(
    model: nn.Module,
    method: Linearize,
    data: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    show_progress: bool = True,
    tokenizer: Any = None,
    accelerator: Any = None,
) -> DistillResult:
    """Stage 1: train ``method``'s feature maps (and window factors) on ``model`` (patched with it); see the module
    docstring. ``data``: None (``method.transfer.data``), a source string, or token ids ``[N, S]`` / ``[S]``."""
    layers = linear_layers(model, method)
    if not layers:
        raise ValueError("the model has no linear-attention layers of this method: attnkit.apply(model, recipe) first")
    cfg = method.transfer
    params = {f"{i}.{n}": p for i, layer in layers.items() for n, p in layer.named_parameters()}
    if not params:
        raise ValueError(
            f"feature map {method.feature_map!r} has nothing to train (and no window factors): set transfer.steps: 0"
        )

    def step_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        # layer by layer: each layer's graph is freed right after its backward (see transfer_losses)
        scale = 1.0 / (len(layers) * cfg.grad_accum)
        losses = transfer_losses(model, layers, ids, None, cfg.mse_weight, cfg.xent_weight, backward_scale=scale)
        return sum(losses.values()) / len(losses), losses

    return _train(
        model, params, step_loss, cfg, method, "transfer", "attention transfer", data, out_dir,
        resume=resume, show_progress=show_progress, tokenizer=tokenizer, accelerator=accelerator, frozen_forward=True,
    )


def finetune_lora(
    model: nn.Module,
    method: Linearize,
    data: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    show_progress: bool = True,
    tokenizer: Any = None,
    accelerator: Any = None,
) -> DistillResult:
    """Stage 2: LoRA on the attention projections of the linearized ``model``, merged into its weights at the end."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA recovery needs peft (pip install 'attnkit[train]')") from err
    from attnkit.patch import dense

    cfg = method.finetune
    if not linear_layers(model, method):
        raise ValueError("the model has no linear-attention layers of this method: attnkit.apply(model, recipe) first")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in cfg.target_modules if t not in names]
    if unknown:
        raise ValueError(f"finetune.target_modules {unknown} name no module of this model")
    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none"
    )
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    peft_model = get_peft_model(model, config)
    # peft seeds the adapters from the global RNG; make them a function of the recipe's seed.
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=g).to(p) / math.sqrt(p.shape[1]))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}

    def step_loss(ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if cfg.loss == "lm":
            return model(input_ids=ids, labels=ids, use_cache=False).loss, {}
        with torch.no_grad(), peft_model.disable_adapter(), dense(model):
            teacher = model(input_ids=ids, use_cache=False).logits.float()
        student = model(input_ids=ids, use_cache=False).logits.float()
        t = cfg.temperature
        p_teacher = torch.log_softmax(teacher / t, -1)
        p_student = torch.log_softmax(student / t, -1)
        kl = (p_teacher.exp() * (p_teacher - p_student)).sum(-1).mean() * t * t
        return kl, {}

    try:
        result = _train(
            model, params, step_loss, cfg, method, "finetune", "LoRA recovery", data, out_dir,
            resume=resume, show_progress=show_progress, tokenizer=tokenizer, accelerator=accelerator,
            frozen_forward=False,
        )
    finally:
        merged = peft_model.merge_and_unload()
        if merged is not model:  # merge_and_unload returns the model it wrapped, adapters folded in
            raise RuntimeError("peft returned another model object from merge_and_unload")
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
        for p in model.parameters():
            p.requires_grad_(saved_flags.get(p, False))
    return result


# ------------------------------------------------------------------------------------------------------ loop
def _train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    step_loss: StepLoss,
    cfg: Any,
    method: Linearize,
    stage: str,
    label: str,
    data: Any,
    out_dir: str | os.PathLike | None,
    *,
    resume: bool,
    show_progress: bool,
    tokenizer: Any,
    accelerator: Any,
    frozen_forward: bool,
) -> DistillResult:
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    main = accelerator.is_main_process
    device = next(model.parameters()).device
    out = Path(out_dir) if out_dir is not None else None
    trainable = list(params.values())
    # No dropout in the frozen forward (attnkit attention refuses attention dropout); LoRA's needs train().
    with training_only(model, trainable, train=not frozen_forward and getattr(cfg, "dropout", 0.0) > 0):
        loop = TrainingLoop(trainable, cfg, accelerator, device)

        def load(path: Path) -> tuple[int, int]:
            return _load_state(path, method, stage, params, loop.optimizer, loop.scheduler, device)

        def checkpoint(step: int, tokens: int) -> None:
            _checkpoint(accelerator, out, step, tokens, method, stage, params, loop.optimizer, loop.scheduler)

        def row(*, step, loss, parts, lr, tokens, seconds) -> dict[str, Any]:
            layers = {str(i): round(v, 8) for i, v in parts.items()}
            return {
                "step": step, "stage": stage, "loss": loss, "layers": layers, "lr": lr, "tokens": tokens,
                "seconds": seconds,
            }

        loop.start(out, load if resume else None)
        start_step, start_tokens = loop.step, loop.tokens
        source = data if data is not None else cfg.data
        tok = tokenizer if tokenizer is not None else getattr(model, "attnkit_tokenizer", None)
        stream = loop.batches(source, tok, skip_steps=start_step)

        loop.run(
            step_loss, stream, row, label=label, show_progress=show_progress, out=out,
            checkpoint=checkpoint if out is not None else None,
        )
        result = DistillResult(
            loop.step, loop.loss, loop.history, loop.seconds, loop.tokens, start_step, out,
            tokens_this_run=loop.tokens - start_tokens, label=label,
        )
        if out is not None:
            checkpoint(result.steps, result.tokens)
            if main:
                ylabel = "MSE(linear, softmax attention output)" if frozen_forward else f"{cfg.loss} loss"
                plot_loss(out / LOSS_FILE, out / PLOT_FILE, ylabel=ylabel, title=f"linearize: {label}")
        return result


def _comparable(method: Linearize | dict, stage: str) -> dict:
    step = method.to_step() if isinstance(method, Linearize) else dict(method)
    block = {k: v for k, v in step.get(stage, {}).items() if k not in _RESUMABLE_CHANGES}
    other = "finetune" if stage == "transfer" else "transfer"
    return {**{k: v for k, v in step.items() if k not in (stage, other)}, stage: block}


def _checkpoint(accelerator, out: Path, step, tokens, method, stage, params, optimizer, scheduler) -> None:
    if accelerator.is_main_process:
        state = {
            "version": STATE_VERSION,
            "stage": stage,
            "step": step,
            "tokens": tokens,
            "method": method.to_step(),
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        write_state(out / STATE_FILE, state)
    accelerator.wait_for_everyone()


def _load_state(path: Path, method, stage, params, optimizer, scheduler, device) -> tuple[int, int]:
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("version") != STATE_VERSION or state.get("stage") != stage:
        raise ValueError(f"{path}: not a {stage} training state of this attnkit version")
    if _comparable(state["method"], stage) != _comparable(method, stage):
        raise ValueError(
            f"{path} was written by a run with other settings ({state['method']}); resume with the same recipe, or "
            f"use another output folder (only {stage}.{', {stage}.'.join(_RESUMABLE_CHANGES)} may change)"
        )
    if set(state["params"]) != set(params):
        raise ValueError(f"{path}: its tensors do not match this model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["tokens"])


# ----------------------------------------------------------------------------------------------- pipeline
def distill(
    recipe: Any = "hedgehog",
    model: str = "llama",
    out: str | os.PathLike = "runs/hedgehog",
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
    """Load ``model``, apply ``recipe``, run both training stages of its ``linearize`` steps, save to ``out``.

    What ``attnkit distill --recipe hedgehog`` runs (also under ``accelerate launch -m attnkit distill ...``).
    ``data`` / ``steps`` / ``seq_len`` / ``batch_size`` override the ``transfer:`` block (stage 1); all but ``steps``
    also the ``finetune:`` block. Training files go to ``<out>.train/<stage>/`` while running and to ``<out>/train/<stage>/``
    once saved; ``resume=True`` continues an interrupted run from its last ``state.pt``, ``overwrite=True`` starts
    over (with neither, an unfinished run makes this fail before any work).

    Sharding (:mod:`attnkit.train.sharding`): under an accelerate FSDP2 config, or with ``fsdp=True`` in a
    multi-process run, the frozen model is sharded with FSDP2 and the feature maps / mixing factors stay replicated;
    this covers stage 1 (attention transfer) only: LoRA adapters (stage 2) would be injected into already sharded
    layers, so a sharded run needs ``finetune.steps: 0``.
    """
    from attnkit.attention import attention_modules
    from attnkit.models import load_model
    from attnkit.patch import apply
    from attnkit.recipe import Recipe
    from attnkit.train.loop import close_run, open_run
    from attnkit.train.sharding import fsdp2_settings, shard_frozen

    recipe = Recipe.load(recipe)
    if data is not None or steps is not None or seq_len is not None or batch_size is not None:
        spec = recipe.to_dict()
        for step in spec["steps"]:
            if step["method"] != Linearize.method_name:
                continue
            for block, keys in (
                ("transfer", ("data", "steps", "seq_len", "batch_size")), ("finetune", ("data", "seq_len", "batch_size"))
            ):
                for key, value in (("data", data), ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
                    if key in keys and value is not None:
                        step.setdefault(block, {})[key] = value
        recipe = Recipe._validate(spec, f"recipe {recipe.name!r} with command-line overrides")
    linear_steps = [s for s in recipe.steps if isinstance(s, Linearize)]
    if not linear_steps:
        raise ValueError(f"recipe {recipe.name!r} has no linearize step: nothing to distill")
    out, staging, accelerator = open_run(out, overwrite=overwrite, resume=resume)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, device=device or str(accelerator.device))
    seconds["load"] = time.perf_counter() - start
    apply(lm, recipe, fit=False)
    sharding, sharded = fsdp2_settings(accelerator, requested=fsdp), None
    if sharding is not None:
        if any(s.finetune.steps > 0 for s in linear_steps):
            raise ValueError(
                "FSDP2 sharding covers linearization's attention transfer (stage 1) only: set finetune.steps: 0 in "
                "the recipe, or run stage 2 (LoRA) without FSDP"
            )
        replicated = [p for a in attention_modules(lm) if getattr(a, "attnkit", None) is not None
                      for p in a.attnkit.parameters()]
        sharded = (shard_frozen(lm, replicated, **sharding), accelerator.num_processes)
    results = []
    start = time.perf_counter()
    for step in recipe.steps:
        if not isinstance(step, Linearize):
            step.fit(lm, None)
            continue
        folder = staging if len(linear_steps) == 1 else staging / f"step{linear_steps.index(step)}"
        kwargs = {"resume": resume, "show_progress": show_progress, "tokenizer": tokenizer, "accelerator": accelerator}
        if step.transfer.steps > 0:
            results.append(transfer_attention(lm, step, out_dir=folder / "transfer", **kwargs))
        if step.finetune.steps > 0:
            # LoRA is merged at the end of the stage; a resumed stage 2 restarts from stage 1's finished feature maps.
            results.append(finetune_lora(lm, step, out_dir=folder / "finetune", **kwargs))
    seconds["train"] = time.perf_counter() - start
    close_run(
        lm, results, accelerator=accelerator, sharded=sharded is not None, model=model, recipe=recipe, out=out,
        staging=staging, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype, seconds=seconds,
    )
    return DistillReport(recipe.name, model, out, results, seconds, sharded=sharded)
