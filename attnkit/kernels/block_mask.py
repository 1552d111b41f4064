"""`BlockMask`: which key blocks each query block attends to, per batch row and head.

Layout (the same as FlexAttention's and the Triton kernel's):

- ``kv_num_blocks``: int32 ``[B, H, QB]``, how many key blocks query block ``i`` visits;
- ``kv_indices``: int32 ``[B, H, QB, KB]``, the visited key-block indices in ascending order in the first
  ``kv_num_blocks[b, h, i]`` slots; the remaining slots are padding (filled with 0) and never read.

``B`` and ``H`` may be 1 (broadcast over the batch / over heads). ``H`` counts *query* heads: heads of one GQA
group may visit different key blocks, and the kernel reads the group's shared K/V without copies.

Causal alignment when ``Sq < Sk`` (chunked prefill, decode): the ``Sq`` queries are the *last* ``Sq`` positions
of the ``Sk`` keys, i.e. query row ``r`` sits at absolute position ``r + (Sk - Sq)`` and may see key ``j`` iff
``j <= r + (Sk - Sq)``. Query blocks tile the query rows from row 0; key blocks tile the keys from key 0. The block
lists say which blocks are *computed*; the causal condition inside a block is always applied by the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_blocks(length: int, block: int) -> int:
    return (length + block - 1) // block


@dataclass
class BlockMask:
    kv_num_blocks: torch.Tensor  # int32 [B, H, QB]
    kv_indices: torch.Tensor  # int32 [B, H, QB, KB]
    q_len: int
    kv_len: int
    block_size: tuple[int, int]  # (query block, key block) in tokens

    def __post_init__(self) -> None:
        bq, bk = self.block_size
        if bq <= 0 or bk <= 0:
            raise ValueError(f"block sizes must be positive, got {self.block_size}")
        if self.q_len > self.kv_len:
            raise ValueError(f"q_len ({self.q_len}) > kv_len ({self.kv_len}): queries must be the last keys")
        qb, kb = num_blocks(self.q_len, bq), num_blocks(self.kv_len, bk)
        if self.kv_num_blocks.dim() != 3 or self.kv_num_blocks.shape[-1] != qb:
            raise ValueError(f"kv_num_blocks must be [B, H, {qb}], got {tuple(self.kv_num_blocks.shape)}")
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[-2:] != (qb, kb):
            raise ValueError(f"kv_indices must be [B, H, {qb}, {kb}], got {tuple(self.kv_indices.shape)}")

    # ----------------------------------------------------------------------------------------------- shapes
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, QB, KB)``."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def q_offset(self) -> int:
        """Absolute position of query row 0 (``Sk - Sq``)."""
        return self.kv_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    # ----------------------------------------------------------------------------------------- conversions
    @classmethod
    def from_dense(cls, mask: torch.Tensor, q_len: int, kv_len: int, block_size: int | tuple[int, int]) -> BlockMask:
        """From a boolean block matrix ``mask [B, H, QB, KB]`` (True = compute the block)."""
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        mask = mask.bool()
        counts = mask.sum(-1, dtype=torch.int32)
        # A stable sort of ~mask puts the kept block indices first, still ascending.
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        kb = mask.shape[-1]
        slot = torch.arange(kb, device=mask.device)
        indices = torch.where(slot < counts.unsqueeze(-1), order, torch.zeros_like(order))
        return cls(counts.contiguous(), indices.contiguous(), q_len, kv_len, (bq, bk))

    def to_dense(self) -> torch.Tensor:
        """Boolean block matrix ``[B, H, QB, KB]`` (True = the block is computed)."""
        return _blocks_from_lists(self.kv_num_blocks, self.kv_indices)

    def causal_blocks(self) -> torch.Tensor:
        """Boolean ``[QB, KB]``: blocks that hold at least one causally visible (query, key) pair."""
        return causal_block_matrix(self.q_len, self.kv_len, self.block_size, self.device)

    def density(self) -> float:
        """Fraction of the causally visible blocks that are computed (mean over batch and heads)."""
        visible = self.causal_blocks()
        kept = self.to_dense() & visible
        return float(kept.sum()) / float(visible.sum() * kept.shape[0] * kept.shape[1])

    def to(self, device: torch.device | str) -> BlockMask:
        """The same mask with its lists on ``device``."""
        return BlockMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.q_len, self.kv_len, self.block_size
        )

    def head_density(self) -> torch.Tensor:
        """Float ``[H]``: per head, the fraction of causally visible blocks computed (mean over the batch)."""
        visible = self.causal_blocks()
        kept = (self.to_dense() & visible).sum((-1, -2)).float()  # [B, H]
        return (kept / visible.sum()).mean(0)

    def with_dense_last_rows(self, rows: int) -> BlockMask:
        """The same mask with its last ``rows`` query blocks computing every causally visible key block.

        The last query block of a prompt usually holds the question, and retrieval tasks hinge on it reaching the
        needle's block; computing it dense costs ``rows / QB`` of dense attention at most (SeerAttention's
        ``last_block_dense``). Only those rows of the lists are rewritten: row ``i`` lists key blocks
        ``0 .. n_i - 1`` where ``n_i`` is its number of visible blocks. ``rows <= 0`` returns ``self``.
        """
        if rows <= 0:
            return self
        bq, bk = self.block_size
        qb, kb = self.shape[-2:]
        first = qb - min(rows, qb)
        # Visible key blocks of query block i: those whose first key ≤ the position of its last row.
        last_pos = torch.clamp((torch.arange(first, qb, device=self.device) + 1) * bq - 1, max=self.q_len - 1)
        visible = torch.clamp((last_pos + self.q_offset) // bk + 1, max=kb).to(torch.int32)  # [rows]
        # clone() of a broadcast (expanded) view materializes it, so the in-place writes below touch one copy only.
        counts, indices = self.kv_num_blocks.clone(), self.kv_indices.clone()
        slot = torch.arange(kb, device=self.device, dtype=torch.int32)
        counts[..., first:] = visible
        indices[..., first:, :] = torch.where(slot < visible[:, None], slot, torch.zeros_like(slot))
        return BlockMask(counts, indices, self.q_len, self.kv_len, self.block_size)

    def expand(self, batch: int, heads: int) -> BlockMask:
        """Broadcast a ``B == 1`` / ``H == 1`` mask to ``[batch, heads, ...]`` (views, no copies)."""
        _b, _h, qb, kb = self.shape
        return BlockMask(
            self.kv_num_blocks.expand(batch, heads, qb),
            self.kv_indices.expand(batch, heads, qb, kb),
            self.q_len,
            self.kv_len,
            self.block_size,
        )

    def to_flex(self, key_padding_mask: torch.Tensor | None = None, causal: bool = True):
        """This mask as a ``torch.nn.attention.flex_attention.BlockMask`` (offset-causal ``mask_mod`` included).

        Listed blocks that need no element mask (wholly causally visible, wholly inside the keys, no padding) go
        to FlexAttention's *full* lists, where its kernel skips ``mask_mod``; the rest (diagonal and edge blocks) go
        to the partial lists. That is FlexAttention's fastest form of the same mask, the fair peer in benchmarks.

        ``key_padding_mask``: optional bool ``[B, Sk]``, True = real token.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        offset = self.q_offset
        bq, bk = self.block_size
        # The block lists are repeated inside mask_mod: FlexAttention's fused kernels skip unlisted blocks, but
        # its unfused (eager, CPU) path evaluates mask_mod on every pair and ignores the lists.
        listed = self.to_dense()

        def mask_mod(b, h, q_idx, kv_idx):
            keep = listed[b, h, q_idx // bq, kv_idx // bk]
            if causal:
                keep = keep & (kv_idx <= q_idx + offset)
            if key_padding_mask is not None:
                keep = keep & key_padding_mask[b, kv_idx]
            return keep

        qb, kb = self.shape[2], self.shape[3]
        full = torch.zeros(qb, kb, dtype=torch.bool, device=listed.device)
        if key_padding_mask is None:
            first_pos = torch.arange(qb, device=listed.device) * bq + offset  # the first row's position
            last_key = torch.clamp((torch.arange(kb, device=listed.device) + 1) * bk, max=self.kv_len) - 1
            full = last_key[None, :] <= first_pos[:, None] if causal else full | True
            full = full & ((torch.arange(kb, device=listed.device) + 1) * bk <= self.kv_len)[None, :]
            full = full & ((torch.arange(qb, device=listed.device) + 1) * bq <= self.q_len)[:, None]
        full_blocks = listed & full
        partial = BlockMask.from_dense(listed & ~full, self.q_len, self.kv_len, self.block_size)
        full_lists = BlockMask.from_dense(full_blocks, self.q_len, self.kv_len, self.block_size)
        return FlexBlockMask.from_kv_blocks(
            partial.kv_num_blocks,
            partial.kv_indices,
            full_lists.kv_num_blocks,
            full_lists.kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )

    @classmethod
    def from_flex(cls, flex_mask) -> BlockMask:
        """From a FlexAttention ``BlockMask``: partial and full blocks are both "computed" blocks here."""
        q_len, kv_len = flex_mask.seq_lengths
        dense = _blocks_from_lists(flex_mask.kv_num_blocks, flex_mask.kv_indices)
        if flex_mask.full_kv_num_blocks is not None:
            dense = dense | _blocks_from_lists(flex_mask.full_kv_num_blocks, flex_mask.full_kv_indices)
        qb, kb = num_blocks(q_len, flex_mask.BLOCK_SIZE[0]), num_blocks(kv_len, flex_mask.BLOCK_SIZE[1])
        return cls.from_dense(dense[..., :qb, :kb], q_len, kv_len, tuple(flex_mask.BLOCK_SIZE))


def _blocks_from_lists(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Counts + index lists → boolean block matrix; padding slots (past the count) are ignored."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    out = torch.zeros(indices.shape, dtype=torch.int32, device=indices.device)
    out.scatter_add_(-1, indices.long(), valid.to(torch.int32))
    return out > 0


def causal_block_matrix(
    q_len: int, kv_len: int, block_size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean ``[QB, KB]``: block ``(i, j)`` holds a visible pair iff its first key ≤ its last query's position."""
    bq, bk = block_size
    qb, kb = num_blocks(q_len, bq), num_blocks(kv_len, bk)
    last_row = torch.clamp((torch.arange(qb, device=device) + 1) * bq - 1, max=q_len - 1)
    last_pos = last_row + (kv_len - q_len)
    first_key = torch.arange(kb, device=device) * bk
    return first_key[None, :] <= last_pos[:, None]
