"""Quest's per-token page-bound update in plain PyTorch: the definition the Triton kernel is tested against.

A decode step appends one key per row at slot ``length - 1``. Rows are paged from their first real token
(``pad[b]`` leading padding slots), so the token is at position ``r = length - 1 - pad[b]`` of its row, in page
``r // page_size``: it starts that page's bounds when ``r % page_size == 0`` and tightens them otherwise.

8-bit bounds (:func:`quantize_bounds`, Quest's ``bounds_dtype: int8``): each page and head keeps its bounds as int8
with one float32 scale, ``scale = max_i(|m_i|, |M_i|) · (1 + 2⁻¹⁶) / 127``, rounded *outward* (the max up, the min
down), so ``scale · M_q ≥ M`` and ``scale · m_q ≤ m`` hold exactly and the page score computed from them is still an
upper bound of the page's logits, looser by at most ``scale`` per channel. Scoring then reads ``2·D + 4`` bytes per
page and head instead of ``4·D`` (bf16).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

INT8_LIMIT = 127
# amax·SCALE_FACTOR leaves every |bound| / scale at most 127 / (1 + 2⁻¹⁶), so the outward rounding below never needs
# clamping; OUTWARD (relative 2⁻²⁰) exceeds the division's rounding error (2⁻²⁴), so ceil/floor of the nudged
# quotient is on the outer side of the exact quotient.
SCALE_FACTOR = (1 + 2**-16) / INT8_LIMIT
OUTWARD = 2**-20
TINY = torch.finfo(torch.float32).tiny


def quantize_bounds(
    page_min: torch.Tensor, page_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit outward-rounded page bounds: ``page_min/page_max [..., D]`` → ``(min int8 [..., D], max int8 [..., D],
    scale float32 [...])`` with ``scale · max_q ≥ max`` and ``scale · min_q ≤ min`` element-wise (see the module
    docstring)."""
    lo, hi = page_min.float(), page_max.float()
    amax = torch.maximum(lo.abs().amax(-1), hi.abs().amax(-1))
    scale = (amax * SCALE_FACTOR).clamp_min(TINY)
    x_lo, x_hi = lo / scale[..., None], hi / scale[..., None]
    q_lo = torch.floor(x_lo - x_lo.abs() * OUTWARD).clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8)
    q_hi = torch.ceil(x_hi + x_hi.abs() * OUTWARD).clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8)
    return q_lo, q_hi, scale


def fold_last_token(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    length: int | torch.Tensor,
    pad: torch.Tensor,
    page_size: int,
    int8_bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Fold the key at slot ``length - 1`` of every row into its page's bounds, in place.

    Args:
        keys: ``[B, H, capacity, D]``, the cache's key buffer (slots ``< length`` hold keys).
        page_min, page_max: ``[B, H, pages, D]`` bounds, updated in place.
        last_page: ``[B]`` int32, set to the index of each row's last page (the token's page).
        length: slots stored, the new token included: an int, or a one-element integer tensor on the keys' device
            (a cache whose decode steps are replayed from a CUDA graph keeps its length there; this reference
            reads it back, the Triton kernel loads it).
        pad: ``[B]`` int32 leading padding slots per row.
        page_size: tokens per page.
        int8_bounds: ``(min int8 [B, H, pages, D], max int8, scale float32 [B, H, pages])`` or None: the 8-bit
            copy of the bounds (:func:`quantize_bounds`), rewritten for the updated page.
    """
    if isinstance(length, torch.Tensor):
        length = int(length.reshape(-1)[0])
    rows = torch.arange(keys.shape[0], device=keys.device)
    real = length - 1 - pad.long()
    page = real // page_size
    opens = (real % page_size == 0)[:, None, None]
    key = keys[:, :, length - 1]  # [B, H, D]
    page_min[rows, :, page] = torch.where(opens, key, torch.minimum(page_min[rows, :, page], key))
    page_max[rows, :, page] = torch.where(opens, key, torch.maximum(page_max[rows, :, page], key))
    if int8_bounds is not None:
        q_min, q_max, scale = int8_bounds
        q_min[rows, :, page], q_max[rows, :, page], scale[rows, :, page] = quantize_bounds(
            page_min[rows, :, page], page_max[rows, :, page]
        )
    last_page.copy_(page)


class PendingFold(NamedTuple):
    """A decode token's bounds update that the caller runs later in the same step: the arguments of
    :func:`fold_last_token` (``fold_last_token(*pending)``). Quest's decode hands it to
    :func:`attnkit.kernels.page_scores.page_scores` (``fold=``), whose Triton kernel folds the token in the same
    launch as the scoring (the fold touches only the current page, which is never scored)."""

    keys: torch.Tensor
    page_min: torch.Tensor
    page_max: torch.Tensor
    last_page: torch.Tensor
    length: int | torch.Tensor
    pad: torch.Tensor
    page_size: int
    int8_bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
