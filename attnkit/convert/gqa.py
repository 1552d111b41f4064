"""Fewer KV heads: MHA → GQA, GQA → fewer groups, → MQA, by merging whole KV heads (``gqa`` method).

A model with ``Hq`` query heads and ``Hkv`` KV heads of size ``D`` becomes one with ``G`` KV heads (``G`` divides
``Hkv``; each new head merges ``Hkv / G`` old ones and serves their ``Hq / G`` query heads). Three choices:

1. **Grouping** (``grouping``): ``contiguous`` merges neighbouring heads, as Ainslie et al. (2023) mean-pool them;
   ``activation`` groups heads whose keys and values are alike on calibration text: the cost of merging heads
   ``a`` and ``b`` is ``E‖k_a − R k_b‖² / E‖k‖² + E‖v_a − Q v_b‖² / E‖v‖²`` (after the alignment below when
   ``align``), computed from second moments of the pre-RoPE projections; groups are formed greedily (seed = the
   unassigned head farthest from the rest, then its nearest unassigned heads).
2. **Alignment** (``align``): before averaging, every head of a group is rotated onto the group's most central head
   (least total merge cost to the others; listed first in the report's groups) by an orthogonal Procrustes rotation fitted on calibration activations, and the rotation is absorbed into the
   projections so that the model's function does not change (``rotate_heads``; tested). Values: any orthogonal
   ``Q`` (``v → Q v`` in ``v_proj``, ``Qᵀ`` into the ``o_proj`` columns of the head's queries): the closed form
   ``Q = W Uᵀ`` from the SVD ``E[v_b v_refᵀ] = U Σ Wᵀ``. Keys: RoPE rotates each pair of dimensions
   ``(i, i + D/2)`` by its own frequency; an orthogonal map commutes with *all* those rotations only if it is itself
   a rotation within each pair (a complex phase per frequency; a reflection or a mix of pairs does not commute).
   So keys are aligned by one angle per frequency, ``φ = −arg E[z_b · conj(z_ref)]`` with ``z = k_i + i·k_{i+D/2}``
   (the optimal phase), applied to ``k_proj`` rows and to the queries of that head, which keeps ``q·k`` exact at
   every position.
3. **Merging**: mean of the (aligned) ``k_proj``/``v_proj`` weights and biases of a group (Ainslie et al.), query
   heads reordered (``q_proj`` rows, ``o_proj`` columns, q bias) so that each new KV head's queries are contiguous.

The result is a native config (``num_key_value_heads = G``): ``attnkit.save`` writes plain weights that
``AutoModelForCausalLM.from_pretrained`` loads as the converted model. With ``G = Hkv`` nothing changes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from attnkit.convert.conversion import (
    ConversionMethod,
    calibration_batches,
    kv_second_moments,
    replace_linear,
)
from attnkit.registry import register


@register("gqa")
class GQA(ConversionMethod):
    """Merge KV heads (mean-pooling, optionally activation-aware grouping and Procrustes alignment)."""

    conversion_stage = 0

    num_kv_heads: int | None = Field(
        None, gt=0, description="KV heads after conversion (a divisor of the model's); overrides kv_fraction"
    )
    kv_fraction: float = Field(
        0.5, gt=0, le=1, description="the largest valid KV head count ≤ this fraction of the model's (0.5: halve; a "
        "model with 3 KV heads goes to 1)"
    )
    grouping: Literal["contiguous", "activation"] = Field(
        "activation", description="contiguous (Ainslie mean pooling of neighbours) or by calibration similarity"
    )
    align: bool = Field(True, description="Procrustes-align heads (function-preserving) before averaging them")

    @model_validator(mode="after")
    def _all_layers(self) -> GQA:
        if self.layers != "all":
            raise ValueError("gqa converts every layer (a transformers config has one num_key_value_heads): "
                             "leave `layers: all`")
        return self

    # ------------------------------------------------------------------------------------------ targets
    def target_heads(self, kv_heads: int) -> int:
        """The KV head count this step converts a model with ``kv_heads`` heads to (raises on an invalid count)."""
        valid = [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]
        if self.num_kv_heads is not None:
            if self.num_kv_heads not in valid:
                raise ValueError(
                    f"gqa: num_kv_heads {self.num_kv_heads} is invalid for a model with {kv_heads} KV heads: whole heads "
                    f"are merged, so it must divide {kv_heads} (valid: {valid})"
                )
            return self.num_kv_heads
        return max(g for g in valid if g <= max(1.0, self.kv_fraction * kv_heads) + 1e-9)

    def check(self, model) -> None:
        _check_plain_attention(model)
        self.target_heads(model.config.num_key_value_heads)

    # -------------------------------------------------------------------------------------------- convert
    def convert(self, model, data: Any = None) -> dict[str, Any]:
        from attnkit.attention import attention_modules

        self.check(model)
        attentions = attention_modules(model)
        kv_heads = model.config.num_key_value_heads
        target = self.target_heads(kv_heads)
        report: dict[str, Any] = {"method": "gqa", "kv_heads": [kv_heads, target], "layers": {}}
        if target == kv_heads:
            return report
        size = kv_heads // target
        need_stats = self.grouping == "activation" or self.align
        stats = {}
        if need_stats:
            batches = calibration_batches(model, self, data)
            stats = kv_second_moments(model, batches, list(range(len(attentions))))
            report["calibration_tokens"] = sum(b.numel() for b in batches)
        for idx, attention in enumerate(attentions):
            head_dim = attention.head_dim
            moments = stats[idx]["kv"] / stats[idx]["n"] if need_stats else None
            cost = merge_costs(moments, kv_heads, head_dim, self.align) if need_stats else None
            if self.grouping == "activation":
                groups = greedy_groups(cost, size)
            else:
                groups = [list(range(g * size, (g + 1) * size)) for g in range(target)]
            if self.align:  # the reference of each group (listed first) is its most central head
                groups = [sorted(g, key=lambda h, g=g: (float(sum(cost[h, o] for o in g)), h)) for g in groups]
            layer_report: dict[str, Any] = {"groups": groups}
            if self.align:
                key_rot, value_rot = alignment_rotations(moments, groups, kv_heads, head_dim)
                rotate_heads(attention, key_rot, value_rot)
                layer_report["aligned"] = True
            merge_heads(attention, groups)
            report["layers"][idx] = layer_report
        model.config.num_key_value_heads = target
        return report

    def restore(self, model) -> None:
        # The checkpoint's config already says the converted head count: nothing to rebuild, only to check.
        heads = model.config.num_key_value_heads
        valid = self.num_kv_heads is None or self.num_kv_heads == heads
        if not valid:
            raise ValueError(f"gqa: the checkpoint has {heads} KV heads but its recipe converts to {self.num_kv_heads}")


# ---------------------------------------------------------------------------------------------- pieces
def _check_plain_attention(model) -> None:
    from attnkit.attention import attention_modules

    for attention in attention_modules(model):
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not isinstance(getattr(attention, n, None),
                                                                                        nn.Linear)]
        if missing:
            raise ValueError(
                f"{type(attention).__name__} has no plain {', '.join(missing)} projection(s): KV-head conversion needs "
                "Llama/Qwen2-style attention (or it was converted already)"
            )
        if getattr(attention, "q_norm", None) is not None or getattr(attention, "k_norm", None) is not None:
            raise ValueError(
                f"{type(attention).__name__} normalises q/k per head before RoPE (Qwen3-style): merging or rotating "
                "heads would change those norms; KV-head conversion supports Llama/Qwen2-style attention"
            )


def _head_block(moments: torch.Tensor, part: int, a: int, b: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``E[y_a y_bᵀ]`` ``[D, D]`` of head ``a`` and head ``b`` of the keys (``part`` 0) or values (1)."""
    off = part * kv_heads * head_dim
    return moments[off + a * head_dim : off + (a + 1) * head_dim, off + b * head_dim : off + (b + 1) * head_dim]


def _key_phase_products(moments: torch.Tensor, a: int, b: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``E[z_a · conj(z_b)]`` per RoPE frequency (complex ``[D/2]``), ``z = k_i + i·k_{i+D/2}``."""
    m = _head_block(moments, 0, a, b, kv_heads, head_dim)
    half = head_dim // 2
    i = torch.arange(half, device=m.device)
    xx, yy = m[i, i], m[i + half, i + half]
    yx, xy = m[i + half, i], m[i, i + half]
    return torch.complex(xx + yy, yx - xy)


def merge_costs(moments: torch.Tensor, kv_heads: int, head_dim: int, align: bool) -> torch.Tensor:
    """``[Hkv, Hkv]`` normalised cost of merging two heads (see the module docstring); symmetric, zero diagonal."""
    cost = torch.zeros(kv_heads, kv_heads, dtype=torch.float64)
    energy = [sum(torch.trace(_head_block(moments, p, h, h, kv_heads, head_dim)) for h in range(kv_heads)) / kv_heads
              for p in (0, 1)]
    for a in range(kv_heads):
        for b in range(a + 1, kv_heads):
            total = 0.0
            for part in (0, 1):
                diag = torch.trace(_head_block(moments, part, a, a, kv_heads, head_dim)) + torch.trace(
                    _head_block(moments, part, b, b, kv_heads, head_dim))
                cross = _head_block(moments, part, b, a, kv_heads, head_dim)
                if not align:
                    best = torch.trace(cross)
                elif part == 1:
                    best = torch.linalg.svdvals(cross).sum()  # max over orthogonal Q of tr(Q E[v_b v_aᵀ])
                else:
                    best = _key_phase_products(moments, b, a, kv_heads, head_dim).abs().sum()
                total += float((diag - 2 * best) / energy[part].clamp_min(1e-30))
            cost[a, b] = cost[b, a] = max(total, 0.0)
    return cost


def greedy_groups(cost: torch.Tensor, size: int) -> list[list[int]]:
    """Equal-size groups of ``size`` heads: seed = the unassigned head farthest from the others, then its nearest."""
    left = list(range(cost.shape[0]))
    groups = []
    while left:
        sub = cost[left][:, left]
        seed = left[int(sub.sum(1).argmax())]
        rest = sorted((h for h in left if h != seed), key=lambda h: (float(cost[seed, h]), h))
        group = [seed, *sorted(rest[: size - 1])]
        groups.append(group)
        left = [h for h in left if h not in group]
    return sorted(groups, key=lambda g: min(g))


def alignment_rotations(
    moments: torch.Tensor, groups: list[list[int]], kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head, the key rotation (RoPE-commuting: one 2D rotation per frequency pair) and the value rotation
    ``[Hkv, D, D]`` that map it onto its group's first head, the reference (identity for the reference)."""
    eye = torch.eye(head_dim, dtype=torch.float64)
    key_rot = eye.repeat(kv_heads, 1, 1)
    value_rot = eye.repeat(kv_heads, 1, 1)
    half = head_dim // 2
    i = torch.arange(half)
    for group in groups:
        ref = group[0]
        for b in group[1:]:
            phase = -torch.angle(_key_phase_products(moments, b, ref, kv_heads, head_dim)).cpu()
            cos, sin = torch.cos(phase), torch.sin(phase)
            r = torch.zeros(head_dim, head_dim, dtype=torch.float64)
            r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = cos, -sin, sin, cos
            key_rot[b] = r
            u, _, wt = torch.linalg.svd(_head_block(moments, 1, b, ref, kv_heads, head_dim).cpu())
            value_rot[b] = wt.T @ u.T
    return key_rot, value_rot


def _weights(attention) -> dict[str, torch.Tensor | None]:
    get = lambda m: (m.weight.detach().double(), None if m.bias is None else m.bias.detach().double())  # noqa: E731
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[name], out[name + ".bias"] = get(getattr(attention, name))
    return out


@torch.no_grad()
def rotate_heads(attention, key_rot: torch.Tensor, value_rot: torch.Tensor) -> None:
    """Absorb per-KV-head rotations into the projections: ``k_h → R_h k_h`` (and its queries ``q → R_h q``),
    ``v_h → Q_h v_h`` (and ``o_proj`` columns of its queries ``· Q_hᵀ``). ``key_rot`` must commute with RoPE
    (see :func:`alignment_rotations`); then the layer computes exactly the same function."""
    w = _weights(attention)
    d = attention.head_dim
    kv_heads = w["k_proj"].shape[0] // d
    q_heads = w["q_proj"].shape[0] // d
    per = q_heads // kv_heads
    dev = w["q_proj"].device
    rk, rv = key_rot.to(dev), value_rot.to(dev)
    owner = torch.arange(q_heads, device=dev) // per
    wq = torch.einsum("hde,hei->hdi", rk[owner], w["q_proj"].view(q_heads, d, -1)).reshape(q_heads * d, -1)
    wk = torch.einsum("hde,hei->hdi", rk, w["k_proj"].view(kv_heads, d, -1)).reshape(kv_heads * d, -1)
    wv = torch.einsum("hde,hei->hdi", rv, w["v_proj"].view(kv_heads, d, -1)).reshape(kv_heads * d, -1)
    wo = torch.einsum("ohd,hed->ohe", w["o_proj"].view(-1, q_heads, d), rv[owner]).reshape(-1, q_heads * d)
    bq = None if w["q_proj.bias"] is None else torch.einsum("hde,he->hd", rk[owner], w["q_proj.bias"].view(q_heads, d))
    bk = None if w["k_proj.bias"] is None else torch.einsum("hde,he->hd", rk, w["k_proj.bias"].view(kv_heads, d))
    bv = None if w["v_proj.bias"] is None else torch.einsum("hde,he->hd", rv, w["v_proj.bias"].view(kv_heads, d))
    attention.q_proj = replace_linear(attention.q_proj, wq, None if bq is None else bq.flatten())
    attention.k_proj = replace_linear(attention.k_proj, wk, None if bk is None else bk.flatten())
    attention.v_proj = replace_linear(attention.v_proj, wv, None if bv is None else bv.flatten())
    attention.o_proj = replace_linear(attention.o_proj, wo, w["o_proj.bias"])


@torch.no_grad()
def merge_heads(attention, groups: list[list[int]]) -> None:
    """Mean-pool the KV heads of each group into one and reorder the query heads so that new KV head ``g`` serves
    queries ``[g·Hq/G, (g+1)·Hq/G)`` (the reference formula: ``W_k^g = mean_{h∈group g} W_k^h``, same for
    ``v_proj`` and the biases)."""
    w = _weights(attention)
    d = attention.head_dim
    kv_heads = w["k_proj"].shape[0] // d
    q_heads = w["q_proj"].shape[0] // d
    per = q_heads // kv_heads
    flat = sorted(h for g in groups for h in g)
    if flat != list(range(kv_heads)) or len({len(g) for g in groups}) != 1:
        raise ValueError(f"groups {groups} must partition the {kv_heads} KV heads into equal sizes")
    order = [h * per + j for g in groups for h in g for j in range(per)]  # new query head → old query head
    k, v = w["k_proj"].view(kv_heads, d, -1), w["v_proj"].view(kv_heads, d, -1)
    wk = torch.stack([k[g].mean(0) for g in groups]).reshape(len(groups) * d, -1)
    wv = torch.stack([v[g].mean(0) for g in groups]).reshape(len(groups) * d, -1)
    bk = bv = None
    if w["k_proj.bias"] is not None:
        bk = torch.stack([w["k_proj.bias"].view(kv_heads, d)[g].mean(0) for g in groups]).flatten()
    if w["v_proj.bias"] is not None:
        bv = torch.stack([w["v_proj.bias"].view(kv_heads, d)[g].mean(0) for g in groups]).flatten()
    wq = w["q_proj"].view(q_heads, d, -1)[order].reshape(q_heads * d, -1)
    bq = None if w["q_proj.bias"] is None else w["q_proj.bias"].view(q_heads, d)[order].flatten()
    wo = w["o_proj"].view(-1, q_heads, d)[:, order].reshape(-1, q_heads * d)
    attention.q_proj = replace_linear(attention.q_proj, wq, bq)
    attention.k_proj = replace_linear(attention.k_proj, wk, bk)
    attention.v_proj = replace_linear(attention.v_proj, wv, bv)
    attention.o_proj = replace_linear(attention.o_proj, wo, w["o_proj.bias"])
    attention.num_key_value_groups = q_heads // len(groups)
