"""XAttention (Xu et al. 2025, arXiv 2503.16428): block-sparse prefill chosen by strided antidiagonal scoring.

Per input, layer and query head, XAttention estimates how much attention each (query block, key block) pair
holds and keeps, per query block, the fewest key blocks whose estimated mass reaches a threshold ``τ``.

Scoring (:func:`antidiagonal_block_scores`). Cut the query rows and the keys into tiles of ``stride`` tokens. The
estimate of tile pair ``(n, m)`` is the sum of the ``stride`` products on its antidiagonal,
``Σ_t q[n·s + s-1-t] · k[m·s + t]`` (``s`` = stride): one antidiagonal per tile, i.e. every ``s``-th antidiagonal
of a block. As in the paper, this is one matmul of reshaped inputs: each key tile's ``s`` vectors are
concatenated in order, each query tile's in reverse order, and the dot product of the two ``s·D`` vectors is the
antidiagonal sum. The reduced logits are scaled by ``scale / stride`` (the reference divides by ``sqrt(D)`` and by
the stride), soft-maxed per reduced query row over the key tiles it may see, and summed over the reduced rows and
keys of every block. Like the reference, a tile whose pairs are only partly causal (the diagonal tiles) is scored
with its whole antidiagonal. The op lives in :mod:`attnkit.kernels.antidiagonal` (a PyTorch reference and a Triton
kernel that reads q/k in place, dispatched by ``ATTNKIT_KERNELS``); this module re-exports its entry point.

Selection (:func:`select_blocks_by_threshold`). Per query block row, the first key block and the diagonal key
block(s) (those holding the query block's own positions) are always kept and counted first; the remaining visible
blocks are taken in descending score order while the kept mass is still below ``τ`` times the row's total, so
the kept set is the smallest one reaching ``τ`` (the reference's ``find_blocks_chunked``). ``τ = 1`` keeps every
causally visible block, so the model then equals dense attention.

Conventions beyond the reference (which handles one unpadded sequence whose ``Sq`` and ``Sk`` are whole numbers
of chunks): queries are the last ``Sq`` of ``Sk`` positions and tiles/blocks are counted from query row 0 and
key 0 (see :mod:`attnkit.kernels.block_mask`); a key tile is visible to a reduced query row iff the tile holds a
key that one of the row's queries may see; padding keys and padding query rows (``key_padding_mask``) contribute
nothing, as the reference's zero padding at the sequence end does, and key tiles holding only padding get no
score. GQA-native: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator

from attnkit.kernels import BlockMask
from attnkit.kernels.antidiagonal import antidiagonal_block_scores
from attnkit.kernels.block_mask import causal_block_matrix
from attnkit.method import PrefillLayer, PrefillMethod
from attnkit.registry import register
from attnkit.sparsify.fixed import block_spans


# ----------------------------------------------------------------------------------------------- selection
def anchor_blocks(q_len: int, kv_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[QB, KB]``: the blocks XAttention always keeps — the first key block and the diagonal block(s),
    i.e. the key blocks holding the query block's own positions (two when ``Sk - Sq`` is not block-aligned)."""
    q_first, q_last, k_first, k_last = block_spans(q_len, kv_len, block_size, device)
    diagonal = (k_last >= q_first) & (k_first <= q_last)  # key blocks overlapping the query block's positions
    return diagonal | (k_first == 0)


def select_blocks_by_threshold(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    causal_visible: torch.Tensor,
    always_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per query block row, the smallest set of key blocks whose score reaches ``threshold`` of the row's total.

    Args:
        scores: non-negative ``[..., QB, KB]`` block scores (e.g. :func:`antidiagonal_block_scores`).
        threshold: ``τ`` in (0, 1], a float or a tensor broadcastable to ``scores[..., :1]`` (e.g. ``[Hq, 1, 1]``
            per query head). ``τ >= 1`` keeps every causally visible block.
        causal_visible: boolean ``[QB, KB]`` (or broadcastable): blocks holding a causally visible pair; no other
            block is ever selected, and only these count in a row's total.
        always_keep: boolean, broadcastable to ``scores``: blocks kept whatever their score and counted first;
            default: the first key block and each row's last visible block (the diagonal block when the
            query/key offset is block-aligned; see :func:`anchor_blocks` for the general case).

    Returns:
        boolean ``scores.shape``: the forced (visible) blocks, then the other visible blocks in descending score
        order (stable: equal scores in ascending block order) while the kept sum before each one is still below
        ``τ · total``. Computed in fp64.
    """
    visible = causal_visible.to(device=scores.device, dtype=torch.bool)
    kb = scores.shape[-1]
    if always_keep is None:
        last_visible = (visible.long() * torch.arange(1, kb + 1, device=scores.device)).argmax(-1, keepdim=True)
        always_keep = torch.zeros_like(visible).scatter_(-1, last_visible, True)
        always_keep[..., 0] = True
    keep = always_keep.to(device=scores.device, dtype=torch.bool) & visible
    keep = keep.expand(scores.shape)
    values = torch.where(visible, scores.double(), 0.0)
    tau = threshold.to(device=scores.device, dtype=torch.float64) if torch.is_tensor(threshold) else float(threshold)
    required = values.sum(-1, keepdim=True) * tau
    forced_sum = torch.where(keep, values, 0.0).sum(-1, keepdim=True)
    candidate = visible & ~keep
    # Scores are >= 0, so -1 puts the non-candidates last; the stable sort keeps ties in block order.
    order = torch.sort(torch.where(candidate, values, -1.0), dim=-1, descending=True, stable=True).indices
    ordered = values.gather(-1, order)
    before = torch.cat([forced_sum, ordered[..., :-1]], -1).cumsum(-1)  # kept mass before each candidate
    take = candidate.gather(-1, order) & (before < required)
    selected = torch.zeros_like(take).scatter_(-1, order, take)
    selected = selected | keep
    if torch.is_tensor(tau):
        selected = selected | (visible & (tau >= 1))
    elif tau >= 1:
        selected = selected | visible
    return selected


# ---------------------------------------------------------------------------------------------------- method
@register("xattention")
class XAttention(PrefillMethod):
    """XAttention: per input and head, the fewest key blocks whose antidiagonal-estimated mass reaches ``threshold``."""

    stride: int = Field(8, gt=0, description="antidiagonal stride in tokens (a divisor of block_size)")
    threshold: float = Field(0.9, description="fraction of the estimated attention mass each query block keeps, in (0, 1]")

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {value}")
        return value

    calibrate_recall: float | None = Field(
        None,
        description="if set, fit per-head thresholds: each head gets the smallest τ of CALIBRATION_GRID whose blocks "
        "hold this fraction of the true attention mass on calibration text (None: `threshold` for every head)",
    )
    calibrate_density: float | None = Field(
        None,
        description="if set, fit per-head thresholds: each head gets the largest τ of CALIBRATION_GRID whose blocks "
        "are at most this fraction of the causally visible blocks on calibration text (exclusive with calibrate_recall)",
    )
    calibration_length: int = Field(2048, gt=0, description="tokens of calibration text (built-in corpus by default)")

    @field_validator("calibrate_recall", "calibrate_density")
    @classmethod
    def _target_range(cls, value: float | None, info) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{info.field_name} must be in (0, 1], got {value}")
        return value

    def calibration_settings(self, length=None, target_recall=None, target_density=None) -> XAttention:
        if target_recall is None and target_density is None:
            target_recall = self.calibrate_recall if self.calibrate_density is None else None
            target_density = self.calibrate_density
            if target_recall is None and target_density is None:
                target_recall = 0.95
        return self.model_copy(
            update={
                "calibrate_recall": target_recall,
                "calibrate_density": target_density,
                "calibration_length": length or self.calibration_length,
            }
        )

    @model_validator(mode="after")
    def _stride_divides_block(self) -> XAttention:
        if self.block_size % self.stride:
            raise ValueError(f"stride ({self.stride}) must divide block_size ({self.block_size})")
        if self.calibrate_recall is not None and self.calibrate_density is not None:
            raise ValueError("calibrate_recall and calibrate_density are exclusive: set one target")
        return self

    def make_prefill_layer(self, layer_idx: int, attention) -> PrefillLayer:
        heads = attention.config.num_attention_heads
        return XAttentionLayer(self, layer_idx, heads, getattr(attention, "scaling", None))

    def fit(self, model, data=None) -> None:
        """Per-head thresholds reaching ``calibrate_recall`` of the true attention mass, or at most
        ``calibrate_density`` of the visible blocks (nothing if both are None).

        ``data``: token ids ``[B, S]`` (or ``[S]``); default: ``calibration_length`` tokens of the built-in corpus,
        tokenized with the tokenizer ``attnkit.load_model`` attached to the model.
        """
        if self.calibrate_recall is None and self.calibrate_density is None:
            return
        calibrate_thresholds(model, self, data)


class XAttentionLayer(PrefillLayer):
    """Scores the blocks of each input by antidiagonals and keeps those reaching the threshold, per query head."""

    method: XAttention

    def __init__(self, method: XAttention, layer_idx: int, num_heads: int, scale: float | None = None):
        super().__init__(method, layer_idx)
        self.scale = scale  # the attention module's softmax scale (None: head_dim ** -0.5)
        # τ per query head: the recipe's threshold, or calibrated values (saved in attnkit.safetensors).
        self.register_buffer("thresholds", torch.full((num_heads,), float(method.threshold)))

    def select_blocks(self, query, key, key_padding_mask) -> BlockMask:
        m = self.method
        bs = m.block_size
        q_len, kv_len = query.shape[-2], key.shape[-2]
        scores = antidiagonal_block_scores(query, key, bs, m.stride, self.scale, key_padding_mask)
        visible = causal_block_matrix(q_len, kv_len, (bs, bs), query.device)
        anchors = anchor_blocks(q_len, kv_len, bs, query.device)
        keep = select_blocks_by_threshold(scores, self.thresholds.view(-1, 1, 1), visible, anchors)
        return BlockMask.from_dense(keep, q_len, kv_len, bs)


# ------------------------------------------------------------------------------------------------ calibration
# Candidate thresholds, ascending: each head takes the first one whose true recall reaches the target.
CALIBRATION_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0)


@torch.no_grad()
def calibrate_thresholds(model, method: XAttention, data=None) -> dict[int, list[float]]:
    """Set each XAttention layer's per-head ``thresholds`` from a target recall or a target density.

    With ``calibrate_recall``: the smallest grid value whose recall reaches it. With ``calibrate_density``: the
    largest grid value whose density (computed / causally visible blocks) stays at or below it (the smallest grid
    value if none does).

    One forward pass over the calibration input with every threshold at 1 (so the model runs dense and later
    layers see dense inputs); a forward hook on each layer computes, from its ``query``/``key``, the antidiagonal
    scores, the true block attention mass (:func:`~attnkit.kernels.block_mass.block_attention_mass`, blockwise)
    and, for every grid value, the fraction of the true mass the selected blocks hold, per query head (weighted by
    real query rows). Returns layer → thresholds.
    """
    from attnkit.attention import attention_modules
    from attnkit.kernels.block_mass import block_attention_mass, query_block_rows

    layers = {
        idx: a.attnkit.prefill
        for idx, a in enumerate(attention_modules(model))
        if getattr(a, "attnkit", None) is not None
        and isinstance(a.attnkit.prefill, XAttentionLayer)
        and a.attnkit.prefill.method is method
    }
    if not layers:
        return {}
    if data is None:
        tokenizer = getattr(model, "attnkit_tokenizer", None)
        if tokenizer is None:
            raise ValueError("XAttention calibration needs token ids (data=) or a model loaded by attnkit.load_model")
        from attnkit.eval.fidelity import corpus_ids

        data = corpus_ids(tokenizer, method.calibration_length)
    ids = torch.as_tensor(data)
    ids = (ids[None] if ids.dim() == 1 else ids).to(next(model.parameters()).device)
    grid = torch.tensor(CALIBRATION_GRID, dtype=torch.float64)
    kept = {idx: torch.zeros(len(grid), layer.thresholds.numel(), dtype=torch.float64) for idx, layer in layers.items()}
    total = {idx: torch.zeros(layer.thresholds.numel(), dtype=torch.float64) for idx, layer in layers.items()}
    blocks = {idx: torch.zeros(len(grid), layer.thresholds.numel(), dtype=torch.float64) for idx, layer in layers.items()}
    visible_blocks = {idx: torch.zeros((), dtype=torch.float64) for idx in layers}

    def hook(idx):
        layer = layers[idx]

        def run(module, args, kwargs, output):
            query, key = args[0], args[1]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            if query.shape[-2] < max(2, method.min_seq_len):
                return
            bs = method.block_size
            q_len, kv_len = query.shape[-2], key.shape[-2]
            scores = antidiagonal_block_scores(query, key, bs, method.stride, layer.scale, kpm)
            mass = block_attention_mass(query, key, bs, layer.scale, kpm).double()  # [B, Hq, QB, KB]
            rows = query_block_rows(q_len, kv_len, bs, kpm, query.device).double()  # [B or 1, QB]
            visible = causal_block_matrix(q_len, kv_len, (bs, bs), query.device)
            anchors = anchor_blocks(q_len, kv_len, bs, query.device)
            weight = mass.sum(-1) * rows[:, None]  # [B, Hq, QB]
            total[idx] += weight.sum((0, 2)).cpu()
            visible_blocks[idx] += float(visible.sum()) * query.shape[0]
            for g, tau in enumerate(CALIBRATION_GRID):
                keep = select_blocks_by_threshold(scores, tau, visible, anchors)
                kept[idx][g] += ((mass * keep).sum(-1) * rows[:, None]).sum((0, 2)).cpu()
                blocks[idx][g] += (keep & visible).sum((0, 2, 3)).double().cpu()

        return run

    saved = {idx: layer.thresholds.clone() for idx, layer in layers.items()}
    handles = []
    try:
        for idx, layer in layers.items():
            layer.thresholds.fill_(1.0)
            attention = attention_modules(model)[idx].attnkit
            handles.append(attention.register_forward_hook(hook(idx), with_kwargs=True))
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except BaseException:
        for idx, layer in layers.items():
            layer.thresholds.copy_(saved[idx])
        raise
    finally:
        for handle in handles:
            handle.remove()

    out = {}
    for idx, layer in layers.items():
        if method.calibrate_density is None:
            recall = kept[idx] / total[idx].clamp_min(1e-30)  # [grid, Hq]
            reached = recall >= method.calibrate_recall - 1e-12
            reached[-1] = True  # τ = 1 keeps every visible block: recall 1
            choice = reached.double().argmax(0)  # the smallest grid value that reaches the target
        else:
            density = blocks[idx] / visible_blocks[idx].clamp_min(1)  # [grid, Hq], rises with τ
            within = density <= method.calibrate_density + 1e-12
            # the last grid index still within the target (index 0 when none is)
            choice = (within.long() * torch.arange(1, len(grid) + 1)[:, None]).argmax(0)
        layer.thresholds.copy_(grid[choice].to(layer.thresholds))
        out[idx] = layer.thresholds.tolist()
    model.attnkit_calibration = {"xattention": out}
    return out
