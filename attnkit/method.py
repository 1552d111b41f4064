"""The Method base classes: one small validated config per method, plus the per-layer modules it attaches.

A method is a pydantic model holding its recipe parameters (``extra="forbid"``: a typo'd key fails at load).
It knows which layers it touches (``layers``) and what it puts there:

- :meth:`Method.make_prefill_layer` returns a :class:`PrefillLayer`, whose :meth:`PrefillLayer.select_blocks`
  turns ``(query, key)`` into a :class:`~attnkit.kernels.BlockMask` that the block-sparse kernel runs;
- :meth:`Method.make_decode_layer` returns a :class:`DecodeLayer`, and :meth:`Method.make_cache_layer` the
  transformers Cache layer that holds its decode-time state (see :mod:`attnkit.cache`).

A layer holds at most one prefill and one decode module; one method may provide both (StreamingLLM).

Both layer kinds are ordinary ``nn.Module``s living under the attention module (``self_attn.attnkit``), so any
parameters they own (learned gates, feature maps) train, shard and save like the rest of the model.

Adding a method = one module with a registered subclass, one recipe in ``recipes/``, tests (CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.cache_utils import CacheLayerMixin

    from attnkit.kernels import BlockMask
    from attnkit.kernels.vertical_slash import VerticalSlashMask


class Method(BaseModel):
    """Base of every registered method. Subclasses add their parameters as pydantic fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method_name: ClassVar[str] = ""  # set by @attnkit.registry.register
    replaces_attention: ClassVar[bool] = False  # computes its layers' attention itself (linearize): no prefill there

    layers: Literal["all"] | list[int] = Field(
        "all", description='layers this method patches: "all" or a list of indices (negative counts from the end)'
    )

    def layer_indices(self, num_layers: int) -> list[int]:
        """Resolve ``layers`` against a model with ``num_layers`` layers (sorted, unique)."""
        if self.layers == "all":
            return list(range(num_layers))
        out = set()
        for i in self.layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"{self.method_name}: layer {i} out of range for a model with {num_layers} layers")
            out.add(j)
        return sorted(out)

    def to_step(self) -> dict[str, Any]:
        """The recipe step that recreates this method: ``{"method": name, **parameters}``."""
        return {"method": self.method_name, **self.model_dump(mode="json")}

    # ------------------------------------------------------------- what the method attaches (see attnkit.apply)
    def make_prefill_layer(self, layer_idx: int, attention: nn.Module) -> PrefillLayer | None:
        """The module that picks this layer's prefill blocks, or None if the method leaves prefill alone."""
        return None

    def make_decode_layer(self, layer_idx: int, attention: nn.Module) -> DecodeLayer | None:
        """The module that shapes this layer's decode steps, or None if the method leaves decode alone."""
        return None

    def make_replacement_layer(self, layer_idx: int, attention: nn.Module) -> ReplacementLayer | None:
        """The module that computes this layer's attention itself (linear attention), or None. A layer with a
        replacement has no prefill or decode method (``attnkit.apply`` refuses the combination)."""
        return None

    def make_cache_layer(self, layer_idx: int) -> CacheLayerMixin:
        """A fresh transformers Cache layer for one model layer (methods with a decode or replacement layer provide
        one)."""
        raise NotImplementedError(f"{self.method_name} has a decode layer but no cache layer")

    def fit(self, model: PreTrainedModel, data: Any = None) -> None:
        """Calibrate or train once the layers are attached (pattern search, gate training). Default: nothing."""

    def calibration_settings(
        self, length: int | None = None, target_recall: float | None = None, target_density: float | None = None
    ) -> Method:
        """A copy of this method set to calibrate in :meth:`fit` (``attnkit calibrate``): on ``length`` tokens, to
        reach ``target_recall`` of the true attention mass or to stay within ``target_density``. Methods without a
        calibration step raise ``ValueError``."""
        raise ValueError(f"{self.method_name} has no calibration step")


class PrefillMethod(Method):
    """A method that decides, per input, which key blocks each query block computes."""

    block_size: int = Field(64, gt=0, description="query and key block size in tokens")
    min_seq_len: int = Field(
        0, ge=0, description="inputs with fewer query tokens run dense attention (sparsity never slows short prompts)"
    )
    dense_last_blocks: int = Field(
        0,
        ge=0,
        description="compute the last N query blocks of each prefill dense: the question at the end of a prompt "
        "then sees every key block (SeerAttention's last_block_dense); costs at most N/QB of dense attention",
    )


class PrefillLayer(nn.Module):
    """Per-layer prefill module: picks blocks; the dispatcher runs the kernel."""

    def __init__(self, method: PrefillMethod, layer_idx: int):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx

    def select_blocks(
        self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> BlockMask | VerticalSlashMask:
        """Blocks to compute for ``query [B, Hq, Sq, D]`` against ``key [B, Hkv, Sk, D]`` (post-RoPE).

        A :class:`~attnkit.kernels.BlockMask` runs the block-sparse kernel; a
        :class:`~attnkit.kernels.vertical_slash.VerticalSlashMask` (blocks + token-level key columns, MInference)
        runs the vertical-slash kernel."""
        raise NotImplementedError


class DecodeLayer(nn.Module):
    """Per-layer decode module: maps the attention inputs of a decode step to what it attends to."""

    def __init__(self, method: Method, layer_idx: int):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx

    def key_padding(self, key_padding_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
        """Map a mask over all seen keys (last dim ``seen + Sq``: a 2D padding mask or a 4D mask) onto the
        ``kv_len`` keys this layer's cache returned."""
        return key_padding_mask

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scale: float | None,
    ) -> torch.Tensor | None:
        """Called on every forward of the layer (prefill and decode), after :meth:`key_padding`.

        ``query [B, Hq, Sq, D]``, ``key/value [B, Hkv, Sk, D]`` as the cache returned them. Returns the attention
        output ``[B, Hq, Sq, D]``, or ``None`` to let the layer run its prefill method or dense attention (the
        default). A decode method that keeps metadata in its cache layer (Quest's page bounds) updates it here.
        """
        return None


class ReplacementLayer(nn.Module):
    """Per-layer module that replaces the layer's attention computation (linear attention, conversion methods).

    ``forward(query [B, Hq, Sq, D], key, value [B, Hkv, Sk, D], key_padding_mask [B, Sk] | None, scale)`` returns
    ``[B, Hq, Sq, D]``; it owns the whole computation at prefill and decode, and its method's
    :meth:`Method.make_cache_layer` provides the cache layer it keeps its state in.
    """

    def __init__(self, method: Method, layer_idx: int):
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
