"""Quest's per-token page-bound update in plain PyTorch: the definition the Triton kernel is tested against.

A decode step appends one key per row at slot ``length - 1``. Rows are paged from their first real token
(``pad[b]`` leading padding slots), so the token is at position ``r = length - 1 - pad[b]`` of its row, in page
``r // page_size``: it starts that page's bounds when ``r % page_size == 0`` and tightens them otherwise.
"""

from __future__ import annotations

import torch


def fold_last_token(
    keys: torch.Tensor,
    page_min: torch.Tensor,
    page_max: torch.Tensor,
    last_page: torch.Tensor,
    length: int,
    pad: torch.Tensor,
    page_size: int,
) -> None:
    """Fold the key at slot ``length - 1`` of every row into its page's bounds, in place.

    Args:
        keys: ``[B, H, capacity, D]``, the cache's key buffer (slots ``< length`` hold keys).
        page_min, page_max: ``[B, H, pages, D]`` bounds, updated in place.
        last_page: ``[B]`` int32, set to the index of each row's last page (the token's page).
        length: slots stored, the new token included.
        pad: ``[B]`` int32 leading padding slots per row.
        page_size: tokens per page.
    """
    rows = torch.arange(keys.shape[0], device=keys.device)
    real = length - 1 - pad.long()
    page = real // page_size
    opens = (real % page_size == 0)[:, None, None]
    key = keys[:, :, length - 1]  # [B, H, D]
    page_min[rows, :, page] = torch.where(opens, key, torch.minimum(page_min[rows, :, page], key))
    page_max[rows, :, page] = torch.where(opens, key, torch.maximum(page_max[rows, :, page], key))
    last_page.copy_(page)
