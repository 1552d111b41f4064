"""The base of methods that *convert* attention (change weights and shapes) instead of attaching prefill/decode modules.

A :class:`ConversionMethod` is a registered :class:`~attnkit.method.Method` with two extra hooks that
:func:`attnkit.apply` calls before it builds any prefill/decode module:

- :meth:`ConversionMethod.convert` (``attnkit.apply`` / ``attnkit convert``): calibrate on data, rewrite the weights,
  then, when the step has a ``recover:`` block, distil the converted model from a copy of the model as it was before
  the step (:mod:`attnkit.train.recover`);
- :meth:`ConversionMethod.restore` (``attnkit.load``): give a freshly loaded model the converted *structure* so that
  the saved weights load into it exactly (no calibration, no weight change).

How each conversion saves:

- ``gqa`` leaves a native model: fewer ``num_key_value_heads`` in ``config.json`` and the merged ``k_proj``/``v_proj``
  in the base weights, so plain ``AutoModelForCausalLM.from_pretrained`` loads the converted model; ``restore`` only
  checks the head count.
- ``mla`` replaces ``self_attn`` by an attnkit module whose weights live under ``self_attn.attnkit.*`` and are saved
  in ``attnkit.safetensors``; ``restore`` rebuilds empty modules of the saved shapes. A native DeepSeek-V3 export is
  separate (:func:`attnkit.convert.mla.export_deepseek_v3`).

Order (checked when the recipe loads, :func:`check_conversion_order`): conversion steps come before attention
methods (those patch the converted attention), each conversion kind at most once, and ``gqa`` before ``mla``
(MLA's latent replaces the KV heads that GQA would merge).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attnkit.method import Method

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LoraSpec(BaseModel):
    """LoRA adapters for recovery (peft), merged into the weights when training ends."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | None = Field(
        None,
        description="module names to adapt (default: the attention projections: q/k/v/o_proj, kv_a_proj, kv_b_proj)",
    )


class RecoverySpec(BaseModel):
    """Recovery distillation after a conversion step (:mod:`attnkit.train.recover`); ``steps: 0`` trains nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(100, ge=0, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps, then cosine decay to 0")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (None: no clipping)")
    seq_len: int = Field(1024, gt=1, description="tokens per training sequence")
    batch_size: int = Field(1, gt=0, description="sequences per forward, per process")
    grad_accum: int = Field(1, gt=0, description="forwards per optimizer step")
    data: str = Field("builtin:corpus", min_length=1, description='"builtin:corpus", a HF dataset name or a local file')
    data_config: str | None = Field(None, description="dataset configuration name")
    data_split: str = Field("train", description="dataset split")
    text_field: str = Field("text", description="dataset column holding the text")
    seed: int = Field(1, description="seed of the data order (different from calibration's 0: other windows)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the logit KL")
    hidden_mse: float = Field(
        0.0, ge=0, description="weight of the hidden-state MSE (every layer's output, normalised by the teacher's "
        "mean square) added to the logit KL (0: logit KL only)"
    )
    trainable: Literal["attention", "all"] = Field(
        "attention", description="full fine-tuning of the attention weights only, or of every weight (ignored with lora)"
    )
    lora: LoraSpec | None = Field(None, description="train LoRA adapters (peft) instead, merged at the end")
    log_every: int = Field(1, gt=0, description="log the loss every N steps")


class ConversionMethod(Method):
    """Base of conversion methods (GQA, MLA): they rewrite the model at :func:`attnkit.apply` time."""

    conversion_stage: ClassVar[int] = 0  # conversions run in increasing stage order (gqa 0, mla 1)

    calibration_tokens: int = Field(
        8192, gt=0, description="tokens of calibration text (built-in corpus unless data is given)"
    )
    calibration_seq_len: int = Field(512, gt=1, description="tokens per calibration sequence")
    recover: RecoverySpec | None = Field(None, description="recovery distillation from the model before this step")

    def check(self, model: PreTrainedModel) -> None:
        """Raise ``ValueError`` (with what was expected) unless this step can convert ``model``."""

    def convert(self, model: PreTrainedModel, data: Any = None) -> dict[str, Any]:
        """Rewrite ``model``'s weights in place; returns what was done (per layer) for ``model.attnkit_conversion``."""
        raise NotImplementedError

    def restore(self, model: PreTrainedModel) -> None:
        """Give a model loaded from a checkpoint of this conversion its converted structure (weights load after)."""

    def kv_bytes_per_token(self, model: PreTrainedModel, element_bytes: int = 2) -> int:
        """KV-cache bytes one token costs in the converted model, all layers."""
        return kv_bytes_per_token(model, element_bytes)


def check_conversion_order(steps: list[Method]) -> None:
    """Raise ``ValueError`` for impossible step orders (see the module docstring)."""
    seen_attention = None
    last: ConversionMethod | None = None
    kinds: set[str] = set()
    for i, step in enumerate(steps):
        if not isinstance(step, ConversionMethod):
            seen_attention = seen_attention or step.method_name
            continue
        if seen_attention is not None:
            raise ValueError(
                f"steps[{i}] ({step.method_name}): conversion steps must come before attention methods "
                f"({seen_attention} is listed first; it would patch the attention this step replaces)"
            )
        if step.method_name in kinds:
            raise ValueError(f"steps[{i}]: {step.method_name} appears twice; convert once (choose the final size)")
        if last is not None and step.conversion_stage < last.conversion_stage:
            raise ValueError(
                f"steps[{i}]: {step.method_name} after {last.method_name} is impossible ({last.method_name} replaces "
                f"the KV heads {step.method_name} works on); put {step.method_name} first"
            )
        kinds.add(step.method_name)
        last = step


# ---------------------------------------------------------------------------------------------- calibration
def calibration_batches(model: PreTrainedModel, method: ConversionMethod, data: Any = None) -> list[torch.Tensor]:
    """Calibration inputs, a list of ``[1, S]`` token-id tensors.

    ``data``: token ids (``[N, S]``, ``[S]`` or a list of 1D tensors: used as they are), a data source string (see
    :mod:`attnkit.train.data`), or None: ``method.calibration_tokens`` tokens of the built-in corpus in
    ``method.calibration_seq_len``-token windows.
    """
    from attnkit.train.data import BUILTIN_CORPUS, token_sequences

    if torch.is_tensor(data) or isinstance(data, list | tuple):
        rows = list(data[None] if torch.is_tensor(data) and data.dim() == 1 else data)
        return [torch.as_tensor(r, dtype=torch.long)[None] for r in rows]
    tokenizer = getattr(model, "attnkit_tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "calibration needs token ids (data=) or a tokenizer: load the model with attnkit.load_model, or set "
            "model.attnkit_tokenizer"
        )
    stream = token_sequences(data or BUILTIN_CORPUS, tokenizer, method.calibration_seq_len, seed=0)
    count = max(1, -(-method.calibration_tokens // method.calibration_seq_len))
    return [next(stream)[None] for _ in range(count)]


@torch.no_grad()
def kv_second_moments(
    model: PreTrainedModel, batches: list[torch.Tensor], layers: list[int], with_query: bool = False
) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, float64 second moments of the pre-RoPE projections over the calibration tokens.

    Returns ``{layer: {"kv": [2·Hkv·D, 2·Hkv·D] = Σ y yᵀ with y = [k; v], "q": [Hq, D, D] (with_query), "n": tokens}}``
    where ``k``/``v`` are the ``k_proj``/``v_proj`` outputs (biases included) of every calibration token.
    """
    from attnkit.attention import attention_modules

    attentions = attention_modules(model)
    stats: dict[int, dict[str, Any]] = {}
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def capture(idx: int, name: str):
        def hook(module, args, output):
            captured.setdefault(idx, {})[name] = output.detach()

        return hook

    for idx in layers:
        for name in ("k_proj", "v_proj") + (("q_proj",) if with_query else ()):
            handles.append(getattr(attentions[idx], name).register_forward_hook(capture(idx, name)))
    device = next(model.parameters()).device
    try:
        for ids in batches:
            captured.clear()
            model(input_ids=ids.to(device), use_cache=False)
            for idx in layers:
                got = captured[idx]
                y = torch.cat([got["k_proj"], got["v_proj"]], -1).reshape(-1, got["k_proj"].shape[-1] * 2).double()
                entry = stats.setdefault(idx, {"kv": torch.zeros(y.shape[-1], y.shape[-1], dtype=torch.float64,
                                                                 device=y.device), "n": 0})
                entry["kv"] += y.T @ y
                entry["n"] += y.shape[0]
                if with_query:
                    head_dim = attentions[idx].head_dim
                    q = got["q_proj"].reshape(-1, got["q_proj"].shape[-1] // head_dim, head_dim).double()
                    qq = torch.einsum("nhd,nhe->hde", q, q)
                    entry["q"] = entry["q"] + qq if "q" in entry else qq
    finally:
        for handle in handles:
            handle.remove()
    return stats


def kv_bytes_per_token(model: PreTrainedModel, element_bytes: int = 2) -> int:
    """KV-cache bytes per token of ``model`` (all layers): ``2·Hkv·D`` values per plain layer, ``rank + rope_dim``
    per MLA layer (the latent and the shared rope key)."""
    from attnkit.attention import attention_modules

    total = 0
    for attention in attention_modules(model):
        per_layer = getattr(attention, "kv_values_per_token", None)
        if callable(per_layer):
            total += per_layer()
        else:
            kv_heads = attention.k_proj.out_features // attention.head_dim
            total += 2 * kv_heads * attention.head_dim
    return total * element_bytes


def replace_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``weight [out, in]`` (and ``bias``) in ``old``'s dtype and device."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=old.weight.device,
                    dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(old.weight.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(old.weight.dtype))
    new.requires_grad_(old.weight.requires_grad)
    return new


def run_conversions(model: PreTrainedModel, steps: list[ConversionMethod], data: Any = None, fit: bool = True) -> None:
    """Run a recipe's conversion steps on ``model`` in order (what :func:`attnkit.apply` does first).

    With ``fit`` each step calibrates and rewrites the weights, then recovers by distillation when it has a
    ``recover:`` block (the teacher: a copy of the model as it was before the step, dropped afterwards). ``data``,
    when given, is the calibration text *and* the recovery text (instead of ``recover.data``); what each
    did is appended to ``model.attnkit_conversion`` and training curves to ``model.attnkit_training``. Without
    ``fit`` (``attnkit.load``) each step only restores the converted structure.
    """
    import copy

    for step in steps:
        if not fit:
            step.restore(model)
            continue
        step.check(model)
        teacher = None
        if step.recover is not None and step.recover.steps > 0:
            teacher = copy.deepcopy(model).eval()
            teacher.requires_grad_(False)
        before = kv_bytes_per_token(model, 2)
        report = step.convert(model, data)
        report["kv_bytes_per_token"] = {"before": before, "after": kv_bytes_per_token(model, 2), "dtype": "bfloat16"}
        if teacher is not None:
            from attnkit.train.recover import recover

            result = recover(model, teacher, step.recover, data=data)
            report["recovery"] = {"steps": result.steps, "loss": result.loss, "tokens": result.tokens,
                                  "seconds": round(result.seconds, 3), "first_loss": result.first_loss}
            model.attnkit_training = [*(getattr(model, "attnkit_training", None) or []), result]
            del teacher
        model.attnkit_conversion = [*(getattr(model, "attnkit_conversion", None) or []), report]
