"""Fidelity of a patched model to its dense self: likelihood, next-token divergence, and attention recall.

- :func:`nll`: mean next-token negative log-likelihood (``exp`` of it is the perplexity);
- :func:`compare_logits`: the patched model against the same model run dense (``attnkit.patch.dense``) on the
  same input: KL(dense ‖ patched), top-1 agreement, and both NLLs;
- :func:`attention_recall`: per patched layer, how much of the true softmax attention mass the blocks a
  block-sparse prefill method computed capture, next to the best any selection of as many blocks could do.

Conventions. ``input_ids`` is ``[B, S]`` (or ``[S]``); ``attention_mask`` is the usual ``[B, S]`` 0/1 mask
(left padding: 0 = padding). Position ``t`` is a column of ``input_ids``; the model's output at ``t`` is the
distribution of token ``t + 1`` given tokens ``≤ t``. Means are over (batch row, position) pairs, padding
excluded, so every real token weighs the same. All functions run under ``torch.no_grad()``.

Memory: the model is asked only for the logits it needs (``logits_to_keep``), and everything computed on
``[positions, vocab]`` in fp32 is processed in chunks of :data:`CHUNK_BYTES`; the model-dtype logits the forward
returns (``[B, kept positions, vocab]``) are held once (twice in :func:`compare_logits`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from attnkit.attention import AttnkitAttention, attention_modules
from attnkit.kernels.block_mass import block_attention_mass, column_attention_mass, query_block_rows
from attnkit.kernels.vertical_slash import VerticalSlashMask
from attnkit.patch import dense, is_patched

__all__ = [
    "CHUNK_BYTES", "LayerRecall", "RecallReport", "attention_recall", "compare_decode", "compare_logits", "corpus_ids",
    "fidelity_at_lengths", "nll",
]

CHUNK_BYTES = 256 * 2**20  # one fp32 [rows, vocab] tensor per chunk of positions


# ---------------------------------------------------------------------------------------------- plumbing
def _batch(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[S]`` or ``[B, S]`` ids and mask → ``ids [B, S]``, ``mask`` bool ``[B, S]`` or None, on the model's device."""
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [S] or [B, S], got {tuple(input_ids.shape)}")
    mask = None
    if attention_mask is not None:
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        mask = mask.to(_device(model)).bool()
    return ids.to(_device(model)), mask


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The model's logits at the last ``keep`` positions: ``[B, keep, V]`` in the model's dtype."""
    attention_mask = None if mask is None else mask.to(torch.long)
    out = model(input_ids=ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    return out.logits[:, -keep:]


def _row_chunks(batch: int, positions: int, vocab: int) -> Iterator[slice]:
    """Slices over positions such that one fp32 ``[B, rows, V]`` tensor stays under :data:`CHUNK_BYTES`."""
    rows = max(1, CHUNK_BYTES // max(1, 4 * batch * vocab))
    for start in range(0, positions, rows):
        yield slice(start, min(positions, start + rows))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None) -> tuple[float, int]:
    """Σ −log p(target) and the count, over valid entries. ``logits [B, N, V]``, ``targets``/``valid [B, N]``."""
    batch, n, vocab = logits.shape
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(batch, n, vocab):
        losses = F.cross_entropy(
            logits[:, rows].float().flatten(0, 1), targets[:, rows].flatten(), reduction="none"
        ).view(batch, -1)
        if valid is not None:
            losses = losses * valid[:, rows]
        total += losses.sum(dtype=torch.float64)
    count = batch * n if valid is None else int(valid.sum())
    return float(total), count


def _target_valid(mask: torch.Tensor | None, first: int) -> torch.Tensor | None:
    """Targets ``j >= first`` that count: ``mask[j] & mask[j - 1]`` (a real token predicted from a real one)."""
    if mask is None:
        return None
    return mask[:, first:] & mask[:, first - 1 : -1]


# ------------------------------------------------------------------------------------------------- nll
def nll(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    offset: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> float:
    """Mean next-token negative log-likelihood (nats) of the tokens at positions ``≥ offset``.

    The targets are tokens ``input_ids[b, j]`` for ``max(offset, 1) <= j < S``, each predicted from the model's
    output at position ``j - 1`` (so from the prefix ``input_ids[b, :j]``); position 0 has no prefix and never
    counts. ``offset=0`` is the usual causal-LM loss over the whole input; ``offset=k`` scores the continuation
    ``input_ids[:, k:]`` with the first ``k`` tokens as context. With ``attention_mask [B, S]``, a target counts
    only if it and the token before it are real (left padding: the first real token, predicted from padding,
    does not count). The mean is over all counted (row, position) pairs.

    Only the logits at positions ``max(offset, 1) - 1 .. S - 1`` are computed (``logits_to_keep``).

    Args:
        model: a causal LM (patched or not; patched models run their patched attention).
        input_ids: ``[B, S]`` or ``[S]`` token ids.
        offset: first target position.
        attention_mask: optional ``[B, S]`` (1 = real token).
    """
    ids, mask = _batch(model, input_ids, attention_mask)
    seq = ids.shape[1]
    first = max(offset, 1)
    if first >= seq:
        raise ValueError(f"no target positions: offset {offset} with a sequence of {seq} tokens")
    logits = _logits(model, ids, mask, seq - first + 1)[:, :-1]  # outputs at first-1 .. S-2
    total, count = _nll_sum(logits, ids[:, first:], _target_valid(mask, first))
    if count == 0:
        raise ValueError("no target position holds a real token (all padding)")
    return total / count


# ------------------------------------------------------------------------------------------ compare_logits
def compare_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    offset: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """The patched model against the same model run dense, on the same input.

    Runs ``model`` as it is (patched) and then inside :func:`attnkit.patch.dense` (an unpatched model is run
    twice, densely). Compares the next-token distributions at positions ``t`` with ``offset <= t < S`` (the output
    at ``t`` predicts token ``t + 1``; the last position, predicting past the input, included), skipping padding
    positions.

    Returns:
        ``kl``: mean over compared positions of ``KL(p_dense ‖ p_patched) = Σ_v p_d (log p_d − log p_p)`` (nats);
        ``top1_agreement``: fraction of compared positions whose argmax tokens agree;
        ``nll_dense`` / ``nll_patched``: :func:`nll` with the same ``offset`` (NaN when there is no target);
        ``positions``: how many (row, position) pairs were compared.

    Args:
        model: a causal LM, usually patched by :func:`attnkit.apply`.
        input_ids: ``[B, S]`` or ``[S]`` token ids.
        offset: first compared position.
        attention_mask: optional ``[B, S]`` (1 = real token).
    """
    ids, mask = _batch(model, input_ids, attention_mask)
    batch, seq = ids.shape
    if not 0 <= offset < seq:
        raise ValueError(f"offset {offset} leaves no position to compare in a sequence of {seq} tokens")
    first = max(offset, 1)  # first NLL target; its prediction sits at first - 1 <= offset
    keep = seq - first + 1  # logits at positions first-1 .. S-1
    patched = _logits(model, ids, mask, keep)
    with dense(model):
        reference = _logits(model, ids, mask, keep)

    # KL and top-1 at positions offset .. S-1 (kept rows `skip` ..).
    skip = offset - (first - 1)
    valid = None if mask is None else mask[:, offset:]
    vocab = patched.shape[-1]
    kl_sum = torch.zeros((), dtype=torch.float64, device=ids.device)
    agree = torch.zeros((), dtype=torch.float64, device=ids.device)
    for rows in _row_chunks(batch, seq - offset, vocab):
        sl = slice(rows.start + skip, rows.stop + skip)
        log_d = reference[:, sl].float().log_softmax(-1)
        log_p = patched[:, sl].float().log_softmax(-1)
        kl = F.kl_div(log_p, log_d, reduction="none", log_target=True).sum(-1)  # [B, rows]
        same = (log_d.argmax(-1) == log_p.argmax(-1)).to(torch.float64)
        if valid is not None:
            kl, same = kl * valid[:, rows], same * valid[:, rows]
        kl_sum += kl.sum(dtype=torch.float64)
        agree += same.sum()
    positions = batch * (seq - offset) if valid is None else int(valid.sum())
    if positions == 0:
        raise ValueError("no compared position holds a real token (all padding)")

    nlls = {"nll_dense": float("nan"), "nll_patched": float("nan")}
    if first < seq:
        targets, target_valid = ids[:, first:], _target_valid(mask, first)
        for name, logits in (("nll_dense", reference), ("nll_patched", patched)):
            total, count = _nll_sum(logits[:, :-1], targets, target_valid)
            if count:
                nlls[name] = total / count
    return {
        "kl": float(kl_sum) / positions,
        "top1_agreement": float(agree) / positions,
        **nlls,
        "positions": positions,
    }


# ---------------------------------------------------------------------------------------- attention recall
@dataclass(frozen=True)
class LayerRecall:
    """One layer's recall (see :func:`attention_recall`).

    Attributes:
        layer: layer index.
        recall: fraction of the true attention mass inside the blocks the method computed, mean over query heads
            and real query rows (1.0 = the method loses nothing).
        oracle_recall: the same for the best blocks at the same budget: per (batch row, head, query block), the
            as-many causally visible blocks with the largest mass.
        density: fraction of causally visible blocks computed (:meth:`BlockMask.density`).
        q_len, kv_len: the attention's lengths.
        oracle_density_95: fraction of causally visible blocks the oracle needs to hold 95% of each query
            block's mass (per batch row, head and query block, the fewest best blocks; weighted by real rows).
    """

    layer: int
    recall: float
    oracle_recall: float
    density: float
    q_len: int
    kv_len: int
    oracle_density_95: float | None = None

    @property
    def gap(self) -> float:
        """``oracle_recall - recall``: mass a better selection at the same density would have kept."""
        return self.oracle_recall - self.recall


@dataclass(frozen=True)
class RecallReport:
    """What :func:`attention_recall` measured.

    Attributes:
        layers: one :class:`LayerRecall` per measured layer, in layer order.
        skipped: layer index → why it was not measured (unpatched, no prefill method, dense fallback, ...).
    """

    layers: list[LayerRecall]
    skipped: dict[int, str] = field(default_factory=dict)

    def _mean(self, name: str) -> float | None:
        return sum(getattr(r, name) for r in self.layers) / len(self.layers) if self.layers else None

    @property
    def recall(self) -> float | None:
        """Mean over measured layers of :attr:`LayerRecall.recall` (None if no layer was measured)."""
        return self._mean("recall")

    @property
    def oracle_recall(self) -> float | None:
        """Mean over measured layers of :attr:`LayerRecall.oracle_recall`."""
        return self._mean("oracle_recall")

    @property
    def density(self) -> float | None:
        """Mean over measured layers of :attr:`LayerRecall.density`."""
        return self._mean("density")

    @property
    def oracle_density_95(self) -> float | None:
        """Mean over measured layers of :attr:`LayerRecall.oracle_density_95`."""
        return self._mean("oracle_density_95")

    def rows(self) -> list[dict[str, Any]]:
        """Per-layer rows as plain dicts (for tables / JSON), measured layers only."""
        return [{**dataclasses.asdict(r), "gap": r.gap} for r in self.layers]

    def as_dict(self) -> dict[str, Any]:
        return {
            "recall": self.recall,
            "oracle_recall": self.oracle_recall,
            "density": self.density,
            "oracle_density_95": self.oracle_density_95,
            "layers": self.rows(),
            "skipped": dict(self.skipped),
        }


def block_recall(
    mass: torch.Tensor, kept: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recall of a block selection and of the oracle selection of the same size, from a block mass.

    Args:
        mass: float ``[B, H, QB, KB]`` from :func:`~attnkit.kernels.block_mass.block_attention_mass`.
        kept: bool ``[B, H, QB, KB]`` (broadcastable), the computed blocks, already restricted to the causally
            visible ones.
        row_weights: ``[B or 1, QB]`` real query rows per query block
            (:func:`~attnkit.kernels.block_mass.query_block_rows`).

    Returns:
        ``(recall_sum, oracle_sum, weight)``: 0-d float64 tensors; ``recall_sum / weight`` is the selection's
        recall averaged over heads and real query rows, ``oracle_sum / weight`` the oracle's. The oracle keeps,
        per ``(b, h, query block)``, the ``kept.sum(-1)`` blocks of largest mass (blocks that are not causally
        visible have mass exactly 0, so they never displace a visible block).
    """
    kept = kept.expand_as(mass)
    weights = row_weights.to(torch.float64).expand(mass.shape[0], -1)[:, None, :]  # [B, 1, QB]
    recall = (mass * kept).sum(-1)  # [B, H, QB]
    count = kept.sum(-1)  # [B, H, QB]
    best = mass.sort(-1, descending=True).values.cumsum(-1)
    oracle = best.gather(-1, (count - 1).clamp_min(0)[..., None]).squeeze(-1)
    oracle = torch.where(count > 0, oracle, torch.zeros_like(oracle))
    weight = weights.sum() * mass.shape[1]
    return (recall * weights).sum(), (oracle * weights).sum(), weight


def oracle_density(mass: torch.Tensor, visible: torch.Tensor, row_weights: torch.Tensor, coverage: float) -> float:
    """Fraction of causally visible blocks the oracle needs to hold ``coverage`` of the attention mass.

    ``mass [B, H, QB, KB]`` (row-averaged, rows sum to 1), ``visible [QB, KB]``, ``row_weights [B or 1, QB]``: per
    (b, h, query block) the fewest largest blocks whose mass reaches ``coverage``, over the visible blocks of that
    row, averaged with the real-row weights.
    """
    running = mass.double().sort(-1, descending=True).values.cumsum(-1)
    needed = (running < coverage - 1e-9).sum(-1) + 1  # [B, H, QB]
    visible_per_row = visible.sum(-1).clamp_min(1).double()  # [QB]
    needed = torch.minimum(needed.double(), visible_per_row)
    weights = row_weights.double().expand(mass.shape[0], -1)[:, None, :].expand(-1, mass.shape[1], -1)
    return float(((needed / visible_per_row) * weights).sum() / weights.sum().clamp_min(1e-30))


def vertical_slash_recall(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: VerticalSlashMask,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_recall` for a vertical-slash mask (blocks + token-level key columns), same return values.

    Recall counts the mass in the listed blocks plus the mass on listed columns outside them, per real query
    row. The oracle is block-granular: per ``(b, h, query block)`` the best ``n`` blocks, where ``n`` is the
    number of listed blocks plus the extra columns rounded up to whole key blocks (the same key budget).
    """
    bq, bk = mask.block_size
    if bq != bk:
        raise ValueError(f"vertical_slash_recall needs square blocks, got {mask.block_size}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    mass = column_attention_mass(query, key, bq, scale, key_padding_mask)  # [B, Hq, QB, Sk] row sums
    batch, heads, qb, sk = mass.shape
    kb = (sk + bk - 1) // bk
    mask = mask.to(mass.device).expand(batch, heads)
    blocks = mask.block_mask.to_dense().expand(batch, heads, -1, -1) & mask.block_mask.causal_blocks()
    columns = mask.columns.long()  # [B, H, C]
    valid = torch.arange(columns.shape[-1], device=mass.device) < mask.column_counts[..., None].long()
    in_blocks = blocks.gather(-1, (columns // bk)[:, :, None, :].expand(-1, -1, qb, -1))  # [B, H, QB, C]
    extra = valid[:, :, None, :] & ~in_blocks
    column_kept = (mass.gather(-1, columns[:, :, None, :].expand(-1, -1, qb, -1)) * extra).sum(-1)  # [B, H, QB]
    rows = query_block_rows(mask.q_len, mask.kv_len, bq, key_padding_mask, mass.device)  # [B or 1, QB]
    per_row = rows.clamp_min(1)[:, None, :, None]
    block_mass = torch.nn.functional.pad(mass, (0, kb * bk - sk)).reshape(batch, heads, qb, kb, bk).sum(-1)
    block_mass = (block_mass / per_row).double()  # row-averaged, as block_attention_mass
    recall_sum, _, weight = block_recall(block_mass, blocks, rows)
    weights = rows.double().expand(batch, -1)[:, None, :]
    recall_sum = recall_sum + (column_kept.double() / per_row[..., 0] * weights).sum()
    budget = blocks.sum(-1) + (extra.sum(-1) + bk - 1) // bk  # [B, H, QB]
    best = block_mass.sort(-1, descending=True).values.cumsum(-1)
    oracle = best.gather(-1, (budget.clamp(1, kb) - 1)[..., None]).squeeze(-1)
    oracle = torch.where(budget > 0, oracle, torch.zeros_like(oracle))
    return recall_sum, (oracle * weights).sum(), weight


_ARG_NAMES = ("query", "key", "value", "key_padding_mask", "scale")


class _RecallProbe:
    """A forward hook for :class:`AttnkitAttention` modules that turns each prefill into recall sums."""

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, Any]] = {}
        self.skipped: dict[int, str] = {}

    def __call__(self, module: AttnkitAttention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        inputs = dict(zip(_ARG_NAMES, args, strict=False)) | kwargs
        query, key = inputs["query"], inputs["key"]
        key_padding_mask, scale = inputs.get("key_padding_mask"), inputs.get("scale")
        idx, q_len, kv_len = module.layer_idx, query.shape[-2], key.shape[-2]
        if q_len <= 1:  # a decode step, not a prefill
            return
        if module.prefill is None:
            self.skipped[idx] = "no prefill method (prefill runs dense)"
            return
        block_mask = module.stats.get("block_mask")
        if module.stats.get("dense_fallback") or block_mask is None:
            self.skipped[idx] = (
                f"dense fallback (q_len {q_len} < min_seq_len {module.prefill.method.min_seq_len})"
            )
            return
        if module.decode is not None:  # the same remapping AttnkitAttention.forward applies
            key_padding_mask = module.decode.key_padding(key_padding_mask, kv_len)
        block_size = block_mask.block_size
        mass = block_attention_mass(query, key, block_size, scale, key_padding_mask)  # [B, Hq, QB, KB]
        weights = query_block_rows(q_len, kv_len, block_size, key_padding_mask, mass.device)
        if isinstance(block_mask, VerticalSlashMask):
            recall, oracle, weight = vertical_slash_recall(query, key, block_mask, scale, key_padding_mask)
            visible = block_mask.block_mask.causal_blocks()
        else:
            batch, heads = mass.shape[:2]
            block_mask = block_mask.to(mass.device)
            visible = block_mask.causal_blocks()
            kept = block_mask.to_dense().expand(batch, heads, -1, -1) & visible  # [B, Hq, QB, KB]
            recall, oracle, weight = block_recall(mass, kept, weights)
        needed_95 = oracle_density(mass, visible.to(mass.device), weights, 0.95)
        entry = self.sums.setdefault(
            idx,
            {"recall": 0.0, "oracle": 0.0, "weight": 0.0, "density": [], "needed_95": [], "lengths": (q_len, kv_len)},
        )
        entry["needed_95"].append(needed_95)
        entry["recall"] += float(recall)
        entry["oracle"] += float(oracle)
        entry["weight"] += float(weight)
        entry["density"].append(block_mask.density())
        entry["lengths"] = (q_len, kv_len)


@contextlib.contextmanager
def _hooks(modules: list[AttnkitAttention], probe: _RecallProbe) -> Iterator[None]:
    handles = [m.register_forward_hook(probe, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_recall(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> RecallReport:
    """How much true attention mass a block-sparse prefill method keeps, per layer, on one input.

    Runs one forward of the patched ``model`` with a forward hook on every :class:`AttnkitAttention`. Right after a
    layer's prefill, the hook takes that layer's ``query [B, Hq, Sq, D]`` and ``key [B, Hkv, Sk, D]`` (post-RoPE,
    as the method saw them) and the :class:`~attnkit.kernels.BlockMask` it selected (``layer.stats``), computes
    :func:`~attnkit.kernels.block_mass.block_attention_mass` (``[B, Hq, QB, KB]``), reduces it to a few numbers
    and lets everything go: one layer's q/k and mass are alive at a time.

    Per layer (see :class:`LayerRecall`): ``recall`` = mass inside the computed blocks, ``oracle_recall`` = mass
    inside the same number of best blocks per (row, head, query block), both averaged over query heads and real
    query rows; ``density`` = fraction of causally visible blocks computed. Layers that are not patched, have no
    prefill method, fell back to dense (``min_seq_len``), or did not go through attnkit at all (a mask that is
    not causal + padding) are listed in :attr:`RecallReport.skipped` with the reason.

    Args:
        model: a model patched with a block-sparse prefill method (:func:`attnkit.apply`).
        input_ids: ``[B, S]`` or ``[S]`` token ids.
        attention_mask: optional ``[B, S]`` (1 = real token; left padding supported).
    """
    if not is_patched(model):
        raise ValueError("attention_recall needs a model patched by attnkit.apply with a block-sparse prefill method")
    ids, mask = _batch(model, input_ids, attention_mask)

    attentions = attention_modules(model)
    layers = [a.attnkit for a in attentions if getattr(a, "attnkit", None) is not None]
    probe = _RecallProbe()
    with _hooks(layers, probe):
        _logits(model, ids, mask, 1)

    results, skipped = [], {}
    for idx, attention in enumerate(attentions):
        layer: AttnkitAttention | None = getattr(attention, "attnkit", None)
        if layer is None:
            skipped[idx] = "not patched (dense)"
        elif idx in probe.skipped:
            skipped[idx] = probe.skipped[idx]
        elif idx in probe.sums:
            s = probe.sums[idx]
            weight = max(s["weight"], 1e-30)
            q_len, kv_len = s["lengths"]
            results.append(
                LayerRecall(
                    layer=idx,
                    recall=s["recall"] / weight,
                    oracle_recall=s["oracle"] / weight,
                    density=sum(s["density"]) / len(s["density"]),
                    q_len=q_len,
                    kv_len=kv_len,
                    oracle_density_95=sum(s["needed_95"]) / len(s["needed_95"]),
                )
            )
        elif layer.prefill is None:
            skipped[idx] = "no prefill method (prefill runs dense)"
        else:
            skipped[idx] = "did not run through attnkit (the model's mask is not causal + padding: dense)"
    return RecallReport(results, skipped)


# ------------------------------------------------------------------------------------- the run-level summary
def corpus_ids(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of the built-in prose corpus (Python's documentation), cycled if too short."""
    from attnkit.eval.corpus import sentences

    text = " ".join(sentences())
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < length:
        ids = ids.repeat(length // ids.numel() + 1)
    return ids[:length].unsqueeze(0)


def fidelity_at_lengths(
    model: PreTrainedModel, tokenizer, lengths: list[int], offset_fraction: float = 0.5
) -> list[dict[str, Any]]:
    """Task-free fidelity of a patched model at each length, on the built-in corpus.

    Per length: :func:`compare_logits` over the positions past ``offset_fraction`` of the text (the long-context
    part, where sparse attention can lose something), and, where a layer runs a block-sparse prefill,
    :func:`attention_recall` (mean over those layers, with the oracle at equal density).

    Returns one dict per length: ``length, offset, kl, top1_agreement, nll_dense, nll_patched`` and, when measured,
    ``recall, oracle_recall, density``.
    """
    rows = []
    for length in lengths:
        ids = corpus_ids(tokenizer, length)
        offset = min(length - 1, int(length * offset_fraction))
        row: dict[str, Any] = {"length": length, "offset": offset}
        logits = compare_logits(model, ids, offset=offset)
        row.update({k: logits[k] for k in ("kl", "top1_agreement", "nll_dense", "nll_patched")})
        if is_patched(model):
            recall = attention_recall(model, ids)
            if recall.layers:
                row.update(
                    recall=recall.recall,
                    oracle_recall=recall.oracle_recall,
                    density=recall.density,
                    oracle_density_95=recall.oracle_density_95,
                )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ decode-time fidelity
@torch.no_grad()
def compare_decode(model: PreTrainedModel, input_ids: torch.Tensor, decode_tokens: int = 64) -> dict[str, float]:
    """The patched model's *decode steps* against the dense model's, teacher-forced on the same tokens.

    A prefill-only comparison (:func:`compare_logits`) cannot see a decode method (Quest): here all but the last
    ``decode_tokens`` tokens of ``input_ids [B, S]`` are prefilled with the cache the model generates with
    (:func:`attnkit.make_cache`; transformers' own when dense), then the last ones are fed one step at a time, and
    the next-token distributions of those ``decode_tokens`` steps are compared with the dense model run the same
    way (inside :func:`attnkit.dense`).

    Returns ``kl`` (mean KL(dense ‖ patched) per step, nats), ``top1_agreement``, ``nll_dense``, ``nll_patched``
    (of the fed tokens) and ``decode_tokens``.
    """
    from transformers import DynamicCache

    from attnkit.cache import make_cache

    ids, _ = _batch(model, input_ids, None)
    if not 0 < decode_tokens < ids.shape[1]:
        raise ValueError(f"decode_tokens must be in [1, {ids.shape[1] - 1}], got {decode_tokens}")
    prompt, tail = ids[:, :-decode_tokens], ids[:, -decode_tokens:]

    def run() -> torch.Tensor:
        cache = make_cache(model) or DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        steps = [out.logits[:, -1].float().log_softmax(-1)]
        for t in range(decode_tokens - 1):
            out = model(input_ids=tail[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1].float().log_softmax(-1))
        return torch.stack(steps, 1)  # [B, decode_tokens, V]: distributions of the tail tokens

    patched = run()
    with dense(model):
        reference = run()
    kl = (reference.exp() * (reference - patched)).sum(-1)
    return {
        "decode_tokens": decode_tokens,
        "kl": float(kl.mean()),
        "top1_agreement": float((reference.argmax(-1) == patched.argmax(-1)).float().mean()),
        "nll_dense": float(-reference.gather(-1, tail[..., None]).mean()),
        "nll_patched": float(-patched.gather(-1, tail[..., None]).mean()),
    }
