"""`VerticalSlashMask`: MInference's vertical-slash pattern as key blocks plus token-level key columns.

MInference (Jiang et al., 2024) keeps, per head, a few *vertical* key columns that every later query attends to
and a few *slash* lines (fixed query-key offsets, the local window among them). Slash lines run diagonally, so a
caller covers them with the key blocks they cross; vertical columns are scattered single tokens, and rounding each
one up to a whole block would compute up to ``block`` times the pairs it needs. Hence two parts:

- ``block_mask``: a :class:`~attnkit.kernels.block_mask.BlockMask`, the listed key blocks per
  (batch, query head, query block), exactly as the block-sparse kernel reads them;
- ``columns``: int32 ``[B, H, C]``, per (batch, query head) the vertical key columns at token granularity, in
  strictly ascending order in the first ``column_counts[b, h]`` slots (the slots after that are padding and never
  read), each in ``[0, kv_len)``;
- ``column_counts``: int32 ``[B, H]``.

``B`` and ``H`` may be 1 (broadcast), for the block lists and the columns independently; ``H`` counts query heads.

Query row ``r`` sits at absolute position ``r + kv_len - q_len`` (the queries are the last ``q_len`` keys) and
attends to the union of the keys in its query block's listed blocks and the listed columns, in both cases only
keys ``<= position`` (causal) and real keys (``key_padding_mask``). A column that lies inside one of the row's listed
blocks is attended once, not twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from attnkit.kernels.block_mask import BlockMask, num_blocks


@dataclass
class VerticalSlashMask:
    block_mask: BlockMask  # the slash bands and the local window, as key blocks
    columns: torch.Tensor  # int32 [B, H, C], ascending token indices in the first column_counts slots
    column_counts: torch.Tensor  # int32 [B, H]

    def __post_init__(self) -> None:
        if not isinstance(self.block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask, got {type(self.block_mask).__name__}")
        if self.columns.dtype != torch.int32 or self.column_counts.dtype != torch.int32:
            raise ValueError(
                f"columns and column_counts must be int32, got {self.columns.dtype} and {self.column_counts.dtype}"
            )
        if self.columns.dim() != 3:
            raise ValueError(f"columns must be [B, H, C], got {tuple(self.columns.shape)}")
        if tuple(self.column_counts.shape) != tuple(self.columns.shape[:2]):
            raise ValueError(
                f"column_counts must be [B, H] = {list(self.columns.shape[:2])}, got {tuple(self.column_counts.shape)}"
            )
        if self.columns.shape[-1] > self.kv_len:
            raise ValueError(
                f"columns has {self.columns.shape[-1]} slots for kv_len {self.kv_len} keys: "
                "a list of distinct key positions cannot be longer than the keys"
            )
        for name, mine, blocks in (
            ("batch", self.columns.shape[0], self.block_mask.shape[0]),
            ("heads", self.columns.shape[1], self.block_mask.shape[1]),
        ):
            if mine != blocks and 1 not in (mine, blocks):
                raise ValueError(f"columns and block_mask disagree on {name}: {mine} vs {blocks} (each 1 or equal)")
        if self.columns.device != self.block_mask.device or self.column_counts.device != self.block_mask.device:
            raise ValueError(
                f"columns ({self.columns.device}), column_counts ({self.column_counts.device}) and block_mask "
                f"({self.block_mask.device}) must be on one device"
            )

    # ----------------------------------------------------------------------------------------------- shapes
    @property
    def q_len(self) -> int:
        return self.block_mask.q_len

    @property
    def kv_len(self) -> int:
        return self.block_mask.kv_len

    @property
    def block_size(self) -> tuple[int, int]:
        return self.block_mask.block_size

    @property
    def q_offset(self) -> int:
        """Absolute position of query row 0 (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    @property
    def batch_heads(self) -> tuple[int, int]:
        """``(B, H)`` after broadcasting the block lists against the columns."""
        return (
            max(self.columns.shape[0], self.block_mask.shape[0]),
            max(self.columns.shape[1], self.block_mask.shape[1]),
        )

    @property
    def device(self) -> torch.device:
        return self.columns.device

    def with_dense_last_rows(self, rows: int) -> VerticalSlashMask:
        """The same pattern with the last ``rows`` query blocks computed dense (see
        :meth:`BlockMask.with_dense_last_rows`); the columns stay, and the kernel attends a column inside a listed
        block once."""
        return self if rows <= 0 else replace(self, block_mask=self.block_mask.with_dense_last_rows(rows))

    # ----------------------------------------------------------------------------------------- conversions
    @classmethod
    def from_dense_columns(
        cls,
        block_dense: torch.Tensor,
        column_dense: torch.Tensor,
        q_len: int,
        kv_len: int,
        block_size: int | tuple[int, int],
    ) -> VerticalSlashMask:
        """From a boolean block matrix ``[B, H, QB, KB]`` and a boolean column vector ``[B, H, Sk]`` (True = keep).

        The column list gets ``max(1, most columns of any head)`` slots (one host sync).
        """
        block_mask = BlockMask.from_dense(block_dense, q_len, kv_len, block_size)
        column_dense = column_dense.bool()
        if column_dense.dim() != 3 or column_dense.shape[-1] != kv_len:
            raise ValueError(f"column_dense must be [B, H, {kv_len}], got {tuple(column_dense.shape)}")
        counts = column_dense.sum(-1, dtype=torch.int32)
        # A stable sort of ~mask puts the kept positions first, still ascending (as BlockMask.from_dense does).
        order = torch.sort((~column_dense).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        width = max(1, int(counts.max())) if counts.numel() else 1
        order = order[..., :width]
        slot = torch.arange(width, device=column_dense.device)
        columns = torch.where(slot < counts.unsqueeze(-1), order, torch.zeros_like(order))
        return cls(block_mask, columns.contiguous(), counts.contiguous())

    def column_dense(self) -> torch.Tensor:
        """Boolean ``[B, H, Sk]``: the listed columns (padding slots ignored)."""
        valid = torch.arange(self.columns.shape[-1], device=self.device) < self.column_counts.unsqueeze(-1)
        index = torch.where(valid, self.columns, torch.zeros_like(self.columns)).long()
        out = torch.zeros(*self.columns.shape[:2], self.kv_len, dtype=torch.int32, device=self.device)
        out.scatter_add_(-1, index, valid.to(torch.int32))
        return out > 0

    def check_columns(self) -> None:
        """Raise if a column list is not strictly ascending inside ``[0, kv_len)`` (reads the lists: a host sync).

        ``__post_init__`` checks shapes only, so that building a mask on the GPU never waits for it.
        """
        counts = self.column_counts
        if bool(((counts < 0) | (counts > self.columns.shape[-1])).any()):
            raise ValueError(f"column_counts must lie in [0, {self.columns.shape[-1]}]")
        valid = torch.arange(self.columns.shape[-1], device=self.device) < counts.unsqueeze(-1)
        cols = self.columns
        if bool((valid & ((cols < 0) | (cols >= self.kv_len))).any()):
            raise ValueError(f"columns must lie in [0, kv_len) = [0, {self.kv_len})")
        if bool((valid[..., 1:] & (cols[..., 1:] <= cols[..., :-1])).any()):
            raise ValueError("columns must be strictly ascending in their first column_counts slots")

    def to(self, device: torch.device | str) -> VerticalSlashMask:
        """The same mask with its lists on ``device``."""
        return VerticalSlashMask(self.block_mask.to(device), self.columns.to(device), self.column_counts.to(device))

    def expand(self, batch: int, heads: int) -> VerticalSlashMask:
        """Broadcast ``B == 1`` / ``H == 1`` parts to ``[batch, heads, ...]`` (views, no copies)."""
        return VerticalSlashMask(
            self.block_mask.expand(batch, heads),
            self.columns.expand(batch, heads, -1),
            self.column_counts.expand(batch, heads),
        )

    # -------------------------------------------------------------------------------------------- density
    def density(self) -> float:
        """Fraction of the causally visible (query, key) token pairs that are computed, mean over batch and heads.

        Exact at token granularity (partial blocks on the diagonal and at the ends count only their visible pairs,
        a column inside a listed block counts once), computed blockwise: no ``Sq × Sk`` tensor. Padding is not
        considered (it belongs to the inputs, not to the mask).
        """
        return float(self.head_pairs().sum()) / (self.visible_pairs() * self.batch_heads[0] * self.batch_heads[1])

    def head_density(self) -> torch.Tensor:
        """Float ``[H]``: per head, the token-level :meth:`density` (mean over the batch)."""
        return (self.head_pairs().double() / self.visible_pairs()).mean(0).float()

    def visible_pairs(self) -> int:
        """Causally visible (query, key) pairs of one head: row ``r`` sees ``r + kv_len - q_len + 1`` keys."""
        sq, off = self.q_len, self.q_offset
        return sq * (off + 1) + sq * (sq - 1) // 2

    def head_pairs(self) -> torch.Tensor:
        """int64 ``[B, H]``: computed causally visible pairs per (batch row, head), broadcast shape."""
        batch, heads = self.batch_heads
        bq, bk = self.block_size
        sq, off = self.q_len, self.q_offset
        qb, kb = num_blocks(sq, bq), num_blocks(self.kv_len, bk)
        dev = self.device
        pairs = _causal_pairs_per_block(sq, self.kv_len, (bq, bk), dev)  # int64 [QB, KB]
        # Rows of query block i at or after key c: how many rows of the block see column c.
        row_start = torch.arange(qb, device=dev) * bq
        row_stop = torch.clamp(row_start + bq, max=sq)
        counts, indices = self.block_mask.kv_num_blocks, self.block_mask.kv_indices
        out = torch.zeros(batch, heads, dtype=torch.int64, device=dev)
        for b in range(batch):
            for h in range(heads):
                mb, mh = min(b, counts.shape[0] - 1), min(h, counts.shape[1] - 1)
                cb, ch = min(b, self.columns.shape[0] - 1), min(h, self.columns.shape[1] - 1)
                listed = _lists_to_dense(counts[mb, mh], indices[mb, mh], kb)  # [QB, KB]
                total = (pairs * listed).sum()
                n = int(self.column_counts[cb, ch])
                if n:
                    cols = self.columns[cb, ch, :n].long()
                    seen = torch.clamp(row_stop[:, None] - torch.clamp(cols[None, :] - off, min=0), min=0)
                    seen = torch.minimum(seen, row_stop[:, None] - row_start[:, None])  # [QB, n]
                    inside = listed[:, cols // bk]  # [QB, n]: already counted with its block
                    total = total + (seen * ~inside).sum()
                out[b, h] = total
        return out


def _lists_to_dense(counts: torch.Tensor, indices: torch.Tensor, kb: int) -> torch.Tensor:
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    out = torch.zeros(*indices.shape[:-1], kb, dtype=torch.int32, device=indices.device)
    out.scatter_add_(-1, torch.where(valid, indices, 0).long(), valid.to(torch.int32))
    return out > 0


def _causal_pairs_per_block(
    q_len: int, kv_len: int, block_size: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """int64 ``[QB, KB]``: causally visible (query, key) pairs in each block, in closed form.

    Row ``r`` of query block ``i`` (position ``p = r + off``) sees ``clamp(p + 1 - first_key, 0, width)`` keys of key
    block ``j``; summing that over the block's consecutive positions is a difference of ``S(n) = Σ_{x<=n}
    clamp(x, 0, width)``.
    """
    bq, bk = block_size
    qb, kb = num_blocks(q_len, bq), num_blocks(kv_len, bk)
    off = kv_len - q_len
    first_pos = torch.arange(qb, device=device, dtype=torch.int64)[:, None] * bq + off
    last_pos = torch.clamp(first_pos + bq, max=kv_len) - 1
    first_key = torch.arange(kb, device=device, dtype=torch.int64)[None, :] * bk
    width = torch.clamp(kv_len - first_key, max=bk)

    def prefix(n: torch.Tensor) -> torch.Tensor:  # S(n) for x = p + 1 - first_key up to n
        n = n.clamp(min=-1)
        small = n * (n + 1) // 2
        big = width * (width + 1) // 2 + (n - width) * width
        return torch.where(n <= width, small, big)

    return prefix(last_pos + 1 - first_key) - prefix(first_pos - first_key)
