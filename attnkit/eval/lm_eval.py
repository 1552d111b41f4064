"""lm-eval integration: the ``attnkit`` model type for lm-evaluation-harness.

``AttnkitLM`` is lm-eval's ``HFLM`` with two changes:

* a string ``pretrained`` is an attnkit checkpoint (or a plain HF folder), loaded with ``attnkit.load`` so the
  saved attention patches are active, then handed to HFLM as an in-memory model;
* generation passes the model's attnkit decode cache (``attnkit.cache.make_cache``) to ``model.generate`` when
  the model has one, so patched methods decode with their own KV cache.

Importing this module registers the model name ``"attnkit"`` with lm-eval. From the command line::

    python -m attnkit.eval.lm_eval --model attnkit --model_args pretrained=DIR --tasks TASKS [lm-eval options]

Everything after the module name is lm-eval's own CLI (``lm-eval run ...``).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["AttnkitLM", "main"]

# HFLM warns on every in-memory model that device/dtype/parallelize arguments are ignored. AttnkitLM always hands
# HFLM an in-memory model by design (and applies device/dtype itself for checkpoints), so the warnings are noise.
_IN_MEMORY_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropInMemoryWarnings(logging.Filter):
    """Drops HFLM's two "already-initialized model" warnings (see ``_IN_MEMORY_WARNINGS``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_IN_MEMORY_WARNINGS)


def _resolve_device(device: str | None) -> torch.device:
    """The device a checkpoint loaded from disk should run on; like HFLM, fall back to CPU without CUDA."""
    if device and (not device.startswith("cuda") or torch.cuda.is_available()):
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@register_model("attnkit")
class AttnkitLM(HFLM):
    """lm-eval ``HFLM`` for attnkit models (in memory or from an attnkit checkpoint folder).

    Args:
        pretrained: an in-memory ``PreTrainedModel`` (patched or not), or the path of an attnkit checkpoint
            folder (a plain HF folder works too), loaded with ``attnkit.load``.
        tokenizer: the tokenizer; required with an in-memory model, taken from the checkpoint otherwise
            (a tokenizer passed here wins). An in-memory tokenizer is copied, because HFLM sets a pad token
            on the tokenizer it is given and the caller's should not change.
        progress: called with the batch size after every generation batch; when set, lm-eval's own tqdm bar
            for ``generate_until`` is turned off (the harness shows a rich bar instead).
        **kwargs: everything else HFLM accepts (``batch_size``, ``max_length``, ...). For a checkpoint path,
            ``device`` and ``dtype`` are applied to the loaded model, since HFLM ignores them for in-memory
            models.
    """

    def __init__(
        self,
        pretrained: str | os.PathLike[str] | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._checkpoint: str | None = None
        if isinstance(pretrained, str | os.PathLike):
            import attnkit  # lazy: attnkit.load pulls in every method and is not needed for in-memory models

            self._checkpoint = os.fspath(pretrained)
            pretrained, loaded_tokenizer = attnkit.load(self._checkpoint)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            pretrained.to(_resolve_device(kwargs.get("device")))
            dtype = kwargs.get("dtype")
            if dtype is not None and dtype != "auto":
                pretrained.to(get_dtype(dtype))
        elif isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = copy.deepcopy(tokenizer)
        if tokenizer is None:
            raise ValueError("AttnkitLM needs a tokenizer when given an in-memory model")
        self._progress = progress
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        in_memory_filter = _DropInMemoryWarnings()
        hf_logger.addFilter(in_memory_filter)
        try:
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        finally:
            hf_logger.removeFilter(in_memory_filter)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """HFLM's ``generate_until``; its tqdm bar is off when a ``progress`` callback reports instead."""
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self._progress is not None)

    def _model_generate(
        self,
        context: torch.Tensor,
        max_length: int,
        stop: list[str],
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """HFLM's greedy/sampled generation, with the model's attnkit decode cache when it has one.

        ``context``: ``[B, S]`` left-padded token ids (``attention_mask`` arrives in ``generation_kwargs``).
        A fresh cache is made per call: a cache holds one batch's keys and values.
        """
        from attnkit.cache import make_cache  # lazy: importing attnkit pulls in every method

        cache = make_cache(self.model)
        if cache is not None:
            generation_kwargs["past_key_values"] = cache
        output = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if self._progress is not None:
            self._progress(context.shape[0])
        return output

    def get_model_info(self) -> dict[str, Any]:
        """Model facts for lm-eval's results; unlike HFLM's, it never asks the Hub for a commit sha (offline)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "model_checkpoint": self._checkpoint or "",
        }


def main() -> None:
    """Run lm-eval's CLI with the ``attnkit`` model registered (it is, since this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, a second copy of the module. Point the canonical name at it so a
    # later `import attnkit.eval.lm_eval` reuses this copy instead of registering a second "attnkit" class, which
    # lm-eval's registry rejects.
    sys.modules.setdefault("attnkit.eval.lm_eval", sys.modules[__name__])
    main()
