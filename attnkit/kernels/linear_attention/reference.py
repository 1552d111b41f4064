"""Causal linear attention in plain PyTorch: the definition of correct for every backend.

Linear attention replaces ``softmax(q·k)`` by a kernel ``φ(q)·φ(k)`` with positive feature maps ``φ``, so that

    out_t = Σ_{s ≤ t} (φq_t · φk_s) v_s / Σ_{s ≤ t} (φq_t · φk_s)
          = φq_t S_t / (φq_t · z_t),       S_t = Σ_{s ≤ t} φk_s v_sᵀ  [F, D],   z_t = Σ_{s ≤ t} φk_s  [F]

and decoding keeps only ``(S, z)``: memory O(F·D) per head whatever the context length. This module holds

- :func:`linear_attention_quadratic`: the masked ``S × S`` form (the spec; O(S²));
- :func:`linear_attention_chunked`: the chunked causal form used for prefill and training (O(S·C) inside chunks of
  ``C`` tokens, O(S/C) state steps between them);
- :func:`linear_attention_recurrent`: one token at a time from the state (the decode step; any length for tests);
- :func:`hedgehog_decode_step`: the decode step from the raw post-RoPE token with Hedgehog feature maps
  (:func:`hedgehog_features` + :func:`linear_attention_recurrent`, state updated in place): the spec of the fused
  Triton kernel in ``triton.py``;
- :func:`window_linear_attention_quadratic` / :func:`window_linear_attention_chunked`: LoLCATs' sliding-window
  hybrid: softmax over the last ``window`` keys plus linear attention over every older key, under one normalizer
  (Zhang et al. 2024, "LoLCATs", ``hybrid_attention_quadratic``):

      a_win(t, s) = w · exp(q_t·k_s·scale − m_t)     for t − window < s ≤ t   (m_t: max of those scores)
      a_lin(t, s) = l · φq_t·φk_s                    for s ≤ t − window
      out_t = Σ_s (a_win + a_lin) v_s / Σ_s (a_win + a_lin)

  with per-query-head factors ``w`` (the window factor, LoLCATs' ``sigmoid(window_factors)``) and ``l`` (1, or
  ``1 − w`` with affine factors). The max ``m_t`` is taken over the window only, as in LoLCATs, so the two terms
  are combined on the window's scale; that is part of the definition, and the decode step reproduces it exactly
  because the window cache holds exactly the keys of the query's window.

Layouts (GQA without copies: query head ``h`` reads key/value head ``h // (Hq / Hkv)``):

- ``q_feat [B, Hq, S, F]``, ``k_feat [B, Hkv, S, F]``: feature-mapped queries/keys (non-negative);
- ``v [B, Hkv, S, D]``; outputs ``[B, Hq, S, D]`` in float32;
- state ``(kv [B, Hkv, F, D], z [B, Hkv, F])`` in float32: the sums over every token *before* this call.

Pure linear attention is always aligned: the ``S`` queries are the ``S`` keys of the call (earlier tokens live in
the state). The window hybrid takes a key buffer of ``L ≥ Sq`` tokens whose last ``Sq`` are the queries' own (the
window cache's kept keys come first), plus a state for every token before the buffer.

Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

LinearState = tuple[torch.Tensor, torch.Tensor]  # (kv [B, Hkv, F, D], z [B, Hkv, F]), float32

DEFAULT_EPS = 1e-12


def _check(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    if q_feat.dim() != 4 or k_feat.dim() != 4 or v.dim() != 4:
        raise ValueError("q_feat, k_feat, v must be 4-D [B, H, S, F|D]")
    batch, hq, _, feat = q_feat.shape
    hkv = k_feat.shape[1]
    if k_feat.shape[0] != batch or v.shape[0] != batch or v.shape[1] != hkv or k_feat.shape[-1] != feat:
        raise ValueError(
            f"shape mismatch: q_feat {tuple(q_feat.shape)}, k_feat {tuple(k_feat.shape)}, v {tuple(v.shape)}"
        )
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if k_feat.shape[2] != v.shape[2]:
        raise ValueError(f"k_feat has {k_feat.shape[2]} tokens but v has {v.shape[2]}")
    return hkv, hq // hkv


def empty_state(batch: int, kv_heads: int, features: int, head_dim: int, device) -> LinearState:
    """The state before any token: zeros, float32."""
    return (
        torch.zeros(batch, kv_heads, features, head_dim, device=device, dtype=torch.float32),
        torch.zeros(batch, kv_heads, features, device=device, dtype=torch.float32),
    )


def fold_state(k_feat: torch.Tensor, v: torch.Tensor, state: LinearState | None = None) -> LinearState:
    """``state`` plus the sums over ``k_feat [B, Hkv, S, F]`` / ``v [B, Hkv, S, D]`` (float32)."""
    k, vv = k_feat.float(), v.float()
    kv = torch.einsum("bhsf,bhsd->bhfd", k, vv)
    z = k.sum(2)
    if state is not None:
        kv, z = kv + state[0], z + state[1]
    return kv, z


def _grouped(q_feat: torch.Tensor, hkv: int) -> torch.Tensor:
    batch, hq, seq, feat = q_feat.shape
    return q_feat.float().view(batch, hkv, hq // hkv, seq, feat)


def linear_attention_quadratic(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Causal linear attention through the explicit ``S × S`` matrix ``(φq φkᵀ) ⊙ causal`` (the spec).

    Returns ``out [B, Hq, S, D]`` float32; ``normalize=False`` returns the numerator only.
    """
    hkv, _ = _check(q_feat, k_feat, v)
    batch, hq, seq, _ = q_feat.shape
    if k_feat.shape[2] != seq:
        raise ValueError("linear attention needs as many keys as queries (earlier tokens live in the state)")
    q = _grouped(q_feat, hkv)
    scores = torch.einsum("bhgsf,bhtf->bhgst", q, k_feat.float())
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    scores = scores * causal
    num = torch.einsum("bhgst,bhtd->bhgsd", scores, v.float())
    den = scores.sum(-1)
    if state is not None:
        num = num + torch.einsum("bhgsf,bhfd->bhgsd", q, state[0])
        den = den + torch.einsum("bhgsf,bhf->bhgs", q, state[1])
    out = num / (den[..., None] + eps) if normalize else num
    return out.reshape(batch, hq, seq, -1)


def linear_attention_recurrent(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, LinearState]:
    """Token by token from the state: ``S += φk vᵀ; z += φk; out = φq S / (φq · z)``. Returns ``(out, state)``.

    With ``S == 1`` this is the decode step (O(F·D) per head, independent of the context length).
    """
    hkv, _ = _check(q_feat, k_feat, v)
    batch, hq, seq, feat = q_feat.shape
    if k_feat.shape[2] != seq:
        raise ValueError("linear attention needs as many keys as queries (earlier tokens live in the state)")
    kv, z = state if state is not None else empty_state(batch, hkv, feat, v.shape[-1], q_feat.device)
    q = _grouped(q_feat, hkv)
    if seq == 1:  # the decode step: one batched op per line over every head (GQA: q as [B, Hkv, G, F])
        k0 = k_feat[:, :, 0].float()
        kv = torch.addcmul(kv, k0[..., None], v[:, :, 0, None, :])  # fp32 state; v upcast inside the op
        z = z + k0
        q0 = q[:, :, :, 0]
        num = torch.matmul(q0, kv)  # [B, Hkv, G, D]
        if normalize:
            num = num.div_(torch.matmul(q0, z[..., None]).add_(eps))
        return num.view(batch, hq, 1, -1), (kv, z)
    k, vv = k_feat.float(), v.float()
    outs = []
    for t in range(seq):
        kv = kv + k[:, :, t, :, None] * vv[:, :, t, None, :]
        z = z + k[:, :, t]
        num = torch.einsum("bhgf,bhfd->bhgd", q[:, :, :, t], kv)
        den = torch.einsum("bhgf,bhf->bhg", q[:, :, :, t], z)
        outs.append(num / (den[..., None] + eps) if normalize else num)
    out = torch.stack(outs, 3).reshape(batch, hq, seq, -1)
    return out, (kv, z)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``cumsum`` shifted by one along ``dim`` (element i = sum of elements < i)."""
    c = x.cumsum(dim)
    return torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c.narrow(dim, 0, c.shape[dim] - 1)], dim)


def linear_attention_chunked(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None = None,
    chunk_size: int = 64,
    normalize: bool = True,
    eps: float = DEFAULT_EPS,
    output_state: bool = False,
) -> tuple[torch.Tensor, LinearState | None]:
    """Chunked causal linear attention: quadratic inside chunks of ``chunk_size`` tokens, state across them.

    Same result as :func:`linear_attention_quadratic`; memory O(S·C + (S/C)·F·D) per head. Returns
    ``(out [B, Hq, S, D] float32, state after the last token or None)``.
    """
    hkv, groups = _check(q_feat, k_feat, v)
    batch, hq, seq, feat = q_feat.shape
    dim = v.shape[-1]
    if k_feat.shape[2] != seq:
        raise ValueError("linear attention needs as many keys as queries (earlier tokens live in the state)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    c = chunk_size
    pad = (-seq) % c
    q, k, vv = q_feat.float(), k_feat.float(), v.float()
    if pad:  # zero keys add nothing to either sum; the padded query rows are dropped
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
    n = (seq + pad) // c
    qc = q.view(batch, hkv, groups, n, c, feat)
    kc = k.view(batch, hkv, n, c, feat)
    vc = vv.view(batch, hkv, n, c, dim)
    scores = (
        torch.einsum("bhgncf,bhnmf->bhgncm", qc, kc)
        * torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    )
    num = torch.einsum("bhgncm,bhnmd->bhgncd", scores, vc)
    den = scores.sum(-1)
    chunk_kv = torch.einsum("bhnmf,bhnmd->bhnfd", kc, vc)  # [B, Hkv, N, F, D]
    chunk_z = kc.sum(3)  # [B, Hkv, N, F]
    prior_kv, prior_z = _exclusive_cumsum(chunk_kv, 2), _exclusive_cumsum(chunk_z, 2)
    if state is not None:
        prior_kv = prior_kv + state[0][:, :, None]
        prior_z = prior_z + state[1][:, :, None]
    num = num + torch.einsum("bhgncf,bhnfd->bhgncd", qc, prior_kv)
    den = den + torch.einsum("bhgncf,bhnf->bhgnc", qc, prior_z)
    out = num / (den[..., None] + eps) if normalize else num
    out = out.reshape(batch, hq, n * c, dim)[:, :, :seq]
    final = None
    if output_state:
        final = (prior_kv[:, :, -1] + chunk_kv[:, :, -1], prior_z[:, :, -1] + chunk_z[:, :, -1])
    return out, final


# ------------------------------------------------------------------------------------ sliding-window hybrid
def _factors(factor: torch.Tensor | float, hkv: int, groups: int, device) -> torch.Tensor:
    """A per-query-head factor (``[Hq]`` tensor or a float) as ``[1, Hkv, G, 1, 1]`` float32."""
    f = torch.as_tensor(factor, dtype=torch.float32, device=device)
    if f.dim() == 0:
        return f.view(1, 1, 1, 1, 1)
    return f.float().reshape(1, hkv, groups, 1, 1)


def window_linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    window: int,
    window_factor: torch.Tensor | float,
    linear_factor: torch.Tensor | float = 1.0,
    scale: float | None = None,
    state: LinearState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """LoLCATs' sliding-window + linear attention through the explicit ``Sq × L`` matrices (the spec).

    Args:
        q: ``[B, Hq, Sq, D]`` post-RoPE queries, the last ``Sq`` positions of the key buffer.
        k, v: ``[B, Hkv, L, D]`` the key buffer (``L ≥ Sq``): kept window keys, then the call's own keys.
        q_feat: ``[B, Hq, Sq, F]``; k_feat: ``[B, Hkv, L, F]`` feature maps of ``q`` / ``k``.
        window: softmax window in tokens, the query itself included (≥ 1).
        window_factor, linear_factor: per-query-head ``[Hq]`` (or scalar) weights of the two terms.
        scale: softmax scale (default ``D ** -0.5``).
        state: sums over every token before the buffer (all older than any query's window).
        key_padding_mask: optional bool ``[B, L]`` (True = real token): padded keys join neither term.

    Returns ``out [B, Hq, Sq, D]`` float32.
    """
    hkv, groups = _check(q_feat, k_feat, v)
    batch, hq, sq, dim = q.shape
    length = k.shape[2]
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    if length < sq or q_feat.shape[2] != sq or k_feat.shape[2] != length:
        raise ValueError(f"need Sq ≤ L: q {tuple(q.shape)}, k {tuple(k.shape)}, q_feat {tuple(q_feat.shape)}")
    scale = dim**-0.5 if scale is None else scale
    device = q.device
    qi = torch.arange(length - sq, length, device=device)[:, None]
    kj = torch.arange(length, device=device)[None, :]
    in_window = (kj <= qi) & (kj > qi - window)
    in_linear = kj <= qi - window
    kf = k_feat.float()
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, None, :]  # [B, 1, 1, 1, L]
        in_window = in_window & real
        kf = kf * key_padding_mask.to(device=device, dtype=torch.float32)[:, None, :, None]
    qg = q.float().view(batch, hkv, groups, sq, dim)
    scores = torch.einsum("bhgsd,bhld->bhgsl", qg, k.float()) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    # a window of padding only: no softmax term
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = _factors(window_factor, hkv, groups, device)
    lin = _factors(linear_factor, hkv, groups, device)
    a_win = w * torch.exp(scores - top)
    fq = _grouped(q_feat, hkv)
    a_lin = lin * torch.einsum("bhgsf,bhlf->bhgsl", fq, kf) * in_linear
    a = a_win + a_lin
    num = torch.einsum("bhgsl,bhld->bhgsd", a, v.float())
    den = a.sum(-1)
    if state is not None:
        num = num + lin * torch.einsum("bhgsf,bhfd->bhgsd", fq, state[0])
        den = den + lin[..., 0] * torch.einsum("bhgsf,bhf->bhgs", fq, state[1])
    return (num / (den[..., None] + eps)).reshape(batch, hq, sq, dim)


def window_linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    window: int,
    window_factor: torch.Tensor | float,
    linear_factor: torch.Tensor | float = 1.0,
    scale: float | None = None,
    state: LinearState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The same as :func:`window_linear_attention_quadratic` in O(L·C) memory (``C = max(chunk_size, window)``).

    The buffer is cut into chunks of ``C`` tokens (left-padded to a multiple of ``C``). With ``window ≤ C`` a query
    of chunk ``n`` finds its window inside chunks ``n − 1`` and ``n``; those two chunks are scored explicitly
    (softmax on the window, linear on the older part), and every chunk up to ``n − 2`` enters through an exclusive
    prefix sum of per-chunk linear states. Same arguments and result.
    """
    hkv, groups = _check(q_feat, k_feat, v)
    batch, hq, sq, dim = q.shape
    length = k.shape[2]
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    if length < sq or q_feat.shape[2] != sq or k_feat.shape[2] != length:
        raise ValueError(f"need Sq ≤ L: q {tuple(q.shape)}, k {tuple(k.shape)}, q_feat {tuple(q_feat.shape)}")
    scale = dim**-0.5 if scale is None else scale
    device = q.device
    feat = q_feat.shape[-1]
    c = max(chunk_size, window)
    pad = (-length) % c
    total = length + pad
    n = total // c
    real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=device, dtype=torch.bool).expand(batch, length)
    # Left padding: the buffer ends at a chunk end; rows before the queries are dropped at the end.
    real = torch.nn.functional.pad(real, (pad, 0), value=False)
    front = total - sq
    qq = torch.nn.functional.pad(q.float(), (0, 0, front, 0))
    fq = torch.nn.functional.pad(q_feat.float(), (0, 0, front, 0))
    kk = torch.nn.functional.pad(k.float(), (0, 0, pad, 0))
    vv = torch.nn.functional.pad(v.float(), (0, 0, pad, 0))
    kf = torch.nn.functional.pad(k_feat.float(), (0, 0, pad, 0)) * real[:, None, :, None]

    qc = qq.view(batch, hkv, groups, n, c, dim)
    fqc = fq.view(batch, hkv, groups, n, c, feat)
    kc, vc, kfc = (
        kk.view(batch, hkv, n, c, dim),
        vv.view(batch, hkv, n, c, dim),
        kf.view(batch, hkv, n, c, feat),
    )
    realc = real.view(batch, n, c)

    def two(x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, C, X]`` → chunks n−1 and n side by side: ``[B, H, N, 2C, X]``."""
        prev = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], 2)
        return torch.cat([prev, x], 3)

    k2, v2, kf2 = two(kc), two(vc), two(kfc)
    real2 = two(realc[:, None, :, :, None])[:, 0, :, :, 0]  # [B, N, 2C]; chunk −1 is not real
    real2[:, 0, :c] = False
    r = torch.arange(c, device=device)[:, None] + c  # a query's index inside the two chunks
    j = torch.arange(2 * c, device=device)[None, :]
    in_window = (j <= r) & (j > r - window)
    in_linear = j <= r - window
    in_window = in_window & real2[:, None, None, :, None, :]  # [B, 1, 1, N, C, 2C]

    scores = torch.einsum("bhgncd,bhnmd->bhgncm", qc, k2) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = _factors(window_factor, hkv, groups, device)[..., None]
    lin = _factors(linear_factor, hkv, groups, device)[..., None]
    a = w * torch.exp(scores - top) + lin * torch.einsum("bhgncf,bhnmf->bhgncm", fqc, kf2) * in_linear
    num = torch.einsum("bhgncm,bhnmd->bhgncd", a, v2)
    den = a.sum(-1)

    chunk_kv = torch.einsum("bhnmf,bhnmd->bhnfd", kfc, vc)
    chunk_z = kfc.sum(3)
    # chunks ≤ n − 2: exclusive prefix, shifted by one more chunk
    prior_kv = _exclusive_cumsum(chunk_kv, 2)
    prior_z = _exclusive_cumsum(chunk_z, 2)
    prior_kv = torch.cat([torch.zeros_like(prior_kv[:, :, :1]), prior_kv[:, :, :-1]], 2)
    prior_z = torch.cat([torch.zeros_like(prior_z[:, :, :1]), prior_z[:, :, :-1]], 2)
    if state is not None:
        prior_kv = prior_kv + state[0][:, :, None]
        prior_z = prior_z + state[1][:, :, None]
    num = num + lin * torch.einsum("bhgncf,bhnfd->bhgncd", fqc, prior_kv)
    den = den + lin[..., 0] * torch.einsum("bhgncf,bhnf->bhgnc", fqc, prior_z)
    out = (num / (den[..., None] + eps)).reshape(batch, hq, total, dim)
    return out[:, :, total - sq :]


# ---------------------------------------------------------------------------- fused Hedgehog decode step
HEDGEHOG_FEATURE_EPS = 1e-12  # the clamp of attnkit.convert.linearize.FEATURE_EPS (LoLCATs' value)


def hedgehog_features(
    x: torch.Tensor, weight: torch.Tensor, feature_eps: float = HEDGEHOG_FEATURE_EPS
) -> torch.Tensor:
    """Hedgehog's feature map ``[softmax(x W), softmax(−x W)]`` clamped at ``feature_eps``, per head, in float32:
    ``x [B, H, S, D]``, ``weight [H, D, Fh]`` → ``[B, H, S, 2·Fh]``. The definition
    :class:`attnkit.convert.linearize.HedgehogFeatureMap` computes (tested equal)."""
    proj = torch.einsum("bhsd,hdf->bhsf", x.float(), weight.float())
    return torch.cat([torch.softmax(proj, -1), torch.softmax(-proj, -1)], -1).clamp_min(feature_eps)


def check_hedgehog_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    kv_state: torch.Tensor,
    z_state: torch.Tensor,
    real: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` unless the arguments fit :func:`hedgehog_decode_step` (shared by every backend)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key, value must be 4-D [B, H, 1, D]")
    batch, hq, sq, dim = query.shape
    hkv = key.shape[1]
    if sq != 1 or key.shape != (batch, hkv, 1, dim) or value.shape != (batch, hkv, 1, dim):
        raise ValueError(
            f"the decode step takes one token: query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)} (need [B, Hq, 1, D] and [B, Hkv, 1, D])"
        )
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (
        q_weight.dim() != 3
        or q_weight.shape[:2] != (hq, dim)
        or k_weight.shape != (hkv, dim, q_weight.shape[2])
    ):
        raise ValueError(
            f"feature-map weights must be [Hq, D, Fh] / [Hkv, D, Fh] = [{hq}, {dim}, Fh] / [{hkv}, {dim}, Fh]; got "
            f"{tuple(q_weight.shape)} / {tuple(k_weight.shape)}"
        )
    feat = 2 * q_weight.shape[2]
    if kv_state.shape != (batch, hkv, feat, dim) or z_state.shape != (batch, hkv, feat):
        raise ValueError(
            f"state must be kv [B, Hkv, 2·Fh, D] = [{batch}, {hkv}, {feat}, {dim}] and z [B, Hkv, 2·Fh]; got "
            f"{tuple(kv_state.shape)} / {tuple(z_state.shape)}"
        )
    if kv_state.dtype != torch.float32 or z_state.dtype != torch.float32:
        raise ValueError(f"the state is float32; got {kv_state.dtype} / {z_state.dtype}")
    if real is not None and real.shape != (batch,):
        raise ValueError(f"real must be [B] = [{batch}], got {tuple(real.shape)}")


def hedgehog_decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    kv_state: torch.Tensor,
    z_state: torch.Tensor,
    real: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    feature_eps: float = HEDGEHOG_FEATURE_EPS,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One decode step of pure linear attention with Hedgehog feature maps, from the raw post-RoPE token.

    Args:
        query: ``[B, Hq, 1, D]``; key, value: ``[B, Hkv, 1, D]`` (model dtype). Query head ``h`` reads KV head
            ``h // (Hq / Hkv)`` (GQA without copies).
        q_weight: ``[Hq, D, Fh]``, k_weight: ``[Hkv, D, Fh]``: the Hedgehog projections (:func:`hedgehog_features`;
            ``F = 2·Fh`` features).
        kv_state: ``[B, Hkv, F, D]`` float32, ``Σ φk vᵀ`` over every earlier token; z_state: ``[B, Hkv, F]`` float32,
            ``Σ φk``. **Updated in place** to include this token: the tensors belong to the caller's cache
            (:class:`attnkit.cache.LinearAttentionLayer`), which must own their memory (no view of a larger buffer,
            no tensor shared with another row or layer).
        real: optional ``[B]`` (bool or 0/1): 0 marks a padded row, whose key adds nothing to the state (its
            ``φk`` is multiplied by 0, as the prefill path does with ``key_padding_mask``); its query still reads.
        eps: added to the normalizer; feature_eps: the clamp of the feature maps.
        out_dtype: dtype of the output (float32 by default; the model dtype saves the caller a cast).

    The step (the same order as :func:`linear_attention_recurrent`, which this calls):
    ``φk = real · hedgehog(k)``, ``S += φk vᵀ``, ``z += φk``, then ``out = (φq S) / (φq · z + eps)`` with
    ``φq = hedgehog(q)``: the token attends to itself. Returns ``out [B, Hq, 1, D]``.
    """
    check_hedgehog_decode(query, key, value, q_weight, k_weight, kv_state, z_state, real)
    q_feat = hedgehog_features(query, q_weight, feature_eps)
    k_feat = hedgehog_features(key, k_weight, feature_eps)
    if real is not None:
        k_feat = k_feat * real.to(device=k_feat.device, dtype=k_feat.dtype)[:, None, None, None]
    out, (kv, z) = linear_attention_recurrent(q_feat, k_feat, value, (kv_state, z_state), eps=eps)
    kv_state.copy_(kv)
    z_state.copy_(z)
    return out.to(out_dtype)
