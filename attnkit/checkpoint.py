"""``attnkit.save`` / ``attnkit.load``: checkpoints that reload with one call and stay plain HF checkpoints.

A checkpoint folder holds:

- the normal ``save_pretrained`` files (config, base weights, generation config) and the tokenizer;
- an ``"attnkit"`` block in ``config.json``: schema version, the recipe, per-layer methods, library versions;
- ``attnkit.safetensors``: attnkit's own tensors (gates, feature maps, calibrated patterns), which are *not* in the
  base weights, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads the dense model cleanly;
- ``recipe.yaml``: the recipe, human-readable.

Writes go to a temporary sibling folder that is renamed into place at the end: a failed save leaves nothing
half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnkit.patch import PatchState, apply, dense
from attnkit.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
EXTRA_TENSORS = "attnkit.safetensors"
ATTNKIT_KEY = ".attnkit."  # state-dict keys of attnkit's modules: `...self_attn.attnkit.<...>`


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message says which file and why."""


def save(
    model: PreTrainedModel,
    out: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a patched ``model`` (and its tokenizer) to the folder ``out``; returns the folder.

    ``tokenizer`` defaults to the one the model was loaded with when attnkit loaded it (``attnkit.load_model`` /
    ``attnkit.load`` remember it on ``model.attnkit_tokenizer``).
    """
    state: PatchState | None = getattr(model, "attnkit_state", None)
    if state is None:
        raise CheckpointError("model is not patched by attnkit; use model.save_pretrained for a plain model")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists (pass overwrite=True / --overwrite to replace it)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "attnkit_tokenizer", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        full = model.state_dict()
        base = {k: v for k, v in full.items() if ATTNKIT_KEY not in k}
        extra = {k: v.detach().contiguous().cpu() for k, v in full.items() if ATTNKIT_KEY in k}
        # save_pretrained records the attention implementation only as a runtime choice; the dense one is what a
        # plain from_pretrained must get, so save with it selected.
        with dense(model):
            model.save_pretrained(tmp, state_dict=base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            logger.warning("no tokenizer given: the checkpoint at %s holds none (pass tokenizer=)", out)
        save_file(extra, str(tmp / EXTRA_TENSORS), metadata={"format": "pt", "attnkit": str(CHECKPOINT_VERSION)})
        (tmp / "recipe.yaml").write_text(state.recipe.to_yaml())
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["attnkit"] = _config_block(state)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a checkpoint written by :func:`save` with its patches active (same logits, same blocks).

    A plain HF folder (no ``"attnkit"`` block) loads as the dense model.
    """
    from attnkit.models import load_model

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder (no config.json)")
    block = json.loads(config_path.read_text()).get("attnkit")
    replaced = any(step.get("method") == "mla" for step in ((block or {}).get("recipe") or {}).get("steps", []))
    if replaced:
        # An MLA checkpoint has no k/v/q/o_proj for its converted layers (their weights are in attnkit.safetensors
        # and load below): transformers' report of those "missing" weights is expected, not a problem.
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, tokenizer = load_model(str(path), dtype=dtype, device=device)
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        model, tokenizer = load_model(str(path), dtype=dtype, device=device)
    if hasattr(model.config, "attnkit"):
        # The block describes this folder; it must not follow the model into a later plain save_pretrained.
        del model.config.attnkit
    if block is None:
        return model, tokenizer
    if block.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{config_path}: attnkit checkpoint version {block.get('version')!r} is not supported")
    recipe = Recipe._validate(block["recipe"], f"{config_path} (attnkit.recipe)")
    apply(model, recipe, fit=False)
    extra_path = path / EXTRA_TENSORS
    extra = load_file(str(extra_path), device=str(next(model.parameters()).device)) if extra_path.is_file() else {}
    expected = {k for k in model.state_dict() if ATTNKIT_KEY in k}
    if set(extra) != expected:
        missing, unexpected = sorted(expected - set(extra)), sorted(set(extra) - expected)
        raise CheckpointError(f"{extra_path}: tensors do not match the recipe (missing {missing}, unexpected {unexpected})")
    if extra:
        model.load_state_dict(extra, strict=False)
    model.attnkit_tokenizer = tokenizer
    return model, tokenizer


def _config_block(state: PatchState) -> dict[str, Any]:
    import transformers

    import attnkit

    return {
        "version": CHECKPOINT_VERSION,
        "recipe": state.recipe.to_dict(),
        "layers": {str(i): methods for i, methods in sorted(state.layer_methods.items())},
        "versions": {"attnkit": attnkit.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed only after the rename."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
