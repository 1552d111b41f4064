"""FSDP2 sharding of a frozen model whose few trainable parameters stay replicated.

attnkit's distillation jobs train small modules (SeerAttention gates, feature maps) inside a large frozen model.
Sharding is what lets the frozen model outgrow one GPU: each decoder layer becomes an FSDP2 unit
(``torch.distributed.fsdp.fully_shard``), its weights split over the processes and all-gathered for its forward
only. The trainable parameters are passed as ``ignored_params``: they stay whole on every process, their gradients
are averaged by the training loop (a few MB), and the optimizer and checkpoint see ordinary tensors. That is why
attnkit shards the model itself instead of handing it to ``accelerator.prepare``: the frozen model's forward runs
under ``no_grad`` (the teacher), where FSDP's backward hooks never fire for sharded trainable weights.

When sharding happens:

- under ``accelerate launch`` with an FSDP config (``distributed_type: FSDP``, ``fsdp_version: 2``, e.g.
  ``configs/accelerate/fsdp2.yaml``): its ``fsdp_reshard_after_forward`` is honoured; an FSDP1 config is an error;
- or when asked explicitly (``attnkit distill --fsdp``) in any multi-process run accelerate set up, including
  CPU processes over gloo (how the test suite checks it: accelerate enables its FSDP mode only on GPUs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

logger = logging.getLogger(__name__)


def fsdp2_settings(accelerator, requested: bool = False) -> dict | None:
    """The FSDP2 settings for this run, or None when the model stays whole.

    ``requested``: shard even without an accelerate FSDP config (``--fsdp``). Raises ``ValueError`` for an accelerate
    FSDP1 config (attnkit shards with FSDP2 only)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "attnkit shards frozen models with FSDP2: set `fsdp_version: 2` in the accelerate config "
                "(see configs/accelerate/fsdp2.yaml)"
            )
        reshard = getattr(plugin, "reshard_after_forward", True)
        return {"reshard_after_forward": bool(reshard) if isinstance(reshard, bool) else True}
    if requested:
        if accelerator.num_processes == 1:
            logger.warning("--fsdp with one process: nothing to shard, the model stays whole")
            return None
        return {"reshard_after_forward": True}
    return None


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 units: the model's decoder layers (its ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer class (_no_split_modules): attnkit cannot shard it"
        )
    return units


def shard_frozen(
    model: nn.Module, replicated: Iterable[nn.Parameter], *, reshard_after_forward: bool = True
) -> int:
    """Shard ``model`` in place with FSDP2 over all processes, keeping ``replicated`` parameters whole.

    Every decoder layer becomes one unit, then the root (embeddings, final norm, LM head). Needs an initialized
    process group (accelerate's). Returns the number of units. The model's parameters other than ``replicated``
    become ``DTensor`` shards: :func:`full_state_dict` gathers them for a checkpoint."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("FSDP2 sharding needs a process group: run under `accelerate launch` or torchrun")
    keep = set(replicated)
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = sharded_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=keep)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=keep)
    return len(units) + 1


def full_state_dict(model: nn.Module) -> dict:
    """The whole state dict of a sharded ``model``, gathered onto the CPU of the main process (other processes
    get an empty dict). A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
