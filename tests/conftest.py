"""Shared fixtures: tiny deterministic models and NaN-poisoned allocations (a kernel that skips a tile fails)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. It is chosen when a kernel is
# decorated, so this must be set before any attnkit kernel module imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_empty(monkeypatch):
    """Make ``torch.empty``/``empty_like`` return NaN-filled float tensors, as fla's test-suite does."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))


@pytest.fixture(params=["tiny-llama", "tiny-qwen2"])
def tiny(request):
    """A tiny random model (fp32, CPU) and its tokenizer; tiny-qwen2 has GQA 3:1 and qkv bias."""
    import attnkit

    model, tokenizer = attnkit.load_model(request.param, dtype="float32", device="cpu")
    return model, tokenizer


def random_batch(vocab: int, batch: int, length: int, pad_lengths: list[int] | None = None, seed: int = 0):
    """Random token ids ``[B, S]`` and a left-padding attention mask (``pad_lengths[b]`` pads in row b)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(pad_lengths or []):
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask
