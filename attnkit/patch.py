"""``attnkit.apply`` / ``attnkit.unpatch``: attach a recipe's per-layer modules and switch the attention backend.

Applying never touches ``forward``: it attaches an :class:`~attnkit.attention.AttnkitAttention` module to each
patched attention module (``self_attn.attnkit``), then selects the ``"attnkit"`` attention implementation with
``model.set_attn_implementation``. Everything is validated and built before the model is modified, so a failing
recipe leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel

from attnkit.attention import ATTN_IMPLEMENTATION, AttnkitAttention, attention_modules, attnkit_layers
from attnkit.convert.conversion import ConversionMethod, run_conversions
from attnkit.recipe import Recipe, RecipeError


@dataclass
class PatchState:
    """What attnkit remembers on a patched model (``model.attnkit_state``)."""

    recipe: Recipe
    dense_implementation: str
    layer_methods: dict[int, dict[str, str]] = field(default_factory=dict)  # layer → {"prefill": name, "decode": name}


class AttnkitStats:
    """``model.attnkit_stats``: per-layer record of the last forward (density, fallbacks), read live."""

    def __init__(self, model: PreTrainedModel):
        self._model = model

    def per_layer(self) -> dict[int, dict[str, Any]]:
        """Layer → ``{density, dense_fallback, q_len, kv_len}`` of its last prefill (layers with a prefill run)."""
        out = {}
        for layer in attnkit_layers(self._model):
            if not layer.stats:
                continue
            stats = {k: v for k, v in layer.stats.items() if k != "block_mask"}
            block_mask = layer.stats.get("block_mask")
            stats["density"] = block_mask.density() if block_mask is not None else 1.0
            out[layer.layer_idx] = stats
        return out

    def per_head(self) -> dict[int, list[float]]:
        """Layer → per-query-head density of its last prefill (block-sparse layers only; vertical-slash masks
        report token-level density, blocks + columns).

        A mask shared by all heads (``H == 1``, e.g. a fixed pattern) reports its one density for every head.
        """
        heads = self._model.config.num_attention_heads
        out = {}
        for layer in attnkit_layers(self._model):
            block_mask = layer.stats.get("block_mask")
            if block_mask is not None:
                density = block_mask.head_density()
                out[layer.layer_idx] = (density.expand(heads) if density.numel() == 1 else density).tolist()
        return out

    def block_masks(self) -> dict[int, Any]:
        """Layer → the :class:`~attnkit.kernels.BlockMask` of its last prefill (block-sparse layers only)."""
        out = {}
        for layer in attnkit_layers(self._model):
            mask = layer.stats.get("block_mask")
            if mask is not None:  # a vertical-slash mask shows its block part (columns are token-level)
                out[layer.layer_idx] = getattr(mask, "block_mask", mask)
        return out

    def mean_density(self) -> float | None:
        """Mean over patched layers of the last prefill's block density (None before any prefill)."""
        values = [s["density"] for s in self.per_layer().values()]
        return sum(values) / len(values) if values else None

    def __repr__(self) -> str:
        return f"AttnkitStats(mean_density={self.mean_density()}, layers={self.per_layer()})"


def is_patched(model: PreTrainedModel) -> bool:
    return getattr(model, "attnkit_state", None) is not None


def apply(model: PreTrainedModel, recipe: Recipe | str | dict, data: Any = None, fit: bool = True) -> PreTrainedModel:
    """Patch ``model`` in place with ``recipe`` and return it.

    Args:
        model: a transformers causal LM using the attention interface (Llama/Qwen2-style).
        recipe: a :class:`Recipe`, a built-in recipe name, a YAML path or a dict.
        data: calibration / training data for methods that need it (passed to ``Method.fit``).
        fit: run the methods' calibration/training (``attnkit.load`` restores without refitting). Conversion steps
            (:mod:`attnkit.convert`) run first: with ``fit`` they rewrite the weights (and recover, if asked),
            without it they only rebuild the converted structure for the saved weights.
    """
    from attnkit.models import check_supported

    recipe = Recipe.load(recipe)
    check_supported(model)
    if is_patched(model):
        raise RuntimeError("model is already patched by attnkit; call attnkit.unpatch(model) first")
    conversions = [step for step in recipe.steps if isinstance(step, ConversionMethod)]
    if conversions:
        # Conversions rewrite the model (or, from a checkpoint, rebuild its converted structure) before anything is
        # attached; they record what they chose (e.g. MLA ranks) in their step, so work on a copy of the recipe.
        recipe = recipe.model_copy(deep=True)
        conversions = [step for step in recipe.steps if isinstance(step, ConversionMethod)]
        run_conversions(model, conversions, data, fit)
    attentions = attention_modules(model)
    num_layers = len(attentions)

    # Build everything first: nothing is attached unless the whole recipe fits this model.
    built: dict[int, AttnkitAttention] = {}
    layer_methods: dict[int, dict[str, str]] = {}
    for step in recipe.steps:
        try:
            indices = step.layer_indices(num_layers)
        except ValueError as err:
            raise RecipeError(f"recipe {recipe.name!r}: {err}") from None
        for idx in indices:
            layer = built.setdefault(idx, AttnkitAttention(idx))
            names = layer_methods.setdefault(idx, {})
            slots = (
                ("prefill", step.make_prefill_layer),
                ("decode", step.make_decode_layer),
                ("replacement", step.make_replacement_layer),
            )
            for slot, make in slots:
                module = make(idx, attentions[idx])
                if module is None:
                    continue
                if getattr(layer, slot) is not None:
                    raise RecipeError(
                        f"recipe {recipe.name!r}: layer {idx} gets two {slot} methods "
                        f"({names[slot]} and {step.method_name})"
                    )
                setattr(layer, slot, module)
                names[slot] = step.method_name
            if layer.replacement is not None and (layer.prefill is not None or layer.decode is not None):
                others = [f"{names[s]} ({s})" for s in ("prefill", "decode") if s in names]
                raise RecipeError(
                    f"recipe {recipe.name!r}: layer {idx}: {names['replacement']} replaces the attention of this "
                    f"layer, so {' and '.join(others)} cannot also run there; give them disjoint `layers:` lists"
                )

    reference = next(model.parameters())
    for idx, layer in built.items():
        existing = getattr(attentions[idx], "attnkit", None)
        if getattr(existing, "converted", False):  # a converted layer (MLA) keeps its module; methods join it
            existing.prefill = None if layer.prefill is None else layer.prefill.to(device=reference.device)
            existing.decode = None if layer.decode is None else layer.decode.to(device=reference.device)
        else:
            attentions[idx].attnkit = layer.to(device=reference.device)
    model.attnkit_state = PatchState(recipe, model.config._attn_implementation, layer_methods)
    model.attnkit_stats = AttnkitStats(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if fit:
        for step in recipe.steps:
            if not isinstance(step, ConversionMethod):
                step.fit(model, data)
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Remove every attnkit module and restore the attention implementation the model had before ``apply``."""
    state: PatchState | None = getattr(model, "attnkit_state", None)
    if state is None:
        return model
    for attention in attention_modules(model):
        if getattr(getattr(attention, "attnkit", None), "converted", False):
            attention.attnkit.prefill = attention.attnkit.decode = None  # converted weights stay (no way back)
        elif hasattr(attention, "attnkit"):
            del attention.attnkit
    model.set_attn_implementation(state.dense_implementation)
    model.attnkit_state = None
    model.attnkit_stats = None
    return model


@contextlib.contextmanager
def dense(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Run a patched model as the dense model inside the block (modules stay attached, backend switched)."""
    state: PatchState | None = getattr(model, "attnkit_state", None)
    if state is None:
        yield model
        return
    model.set_attn_implementation(state.dense_implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
