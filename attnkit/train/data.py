"""Token streams for training and calibration: fixed-length sequences from the built-in corpus, `datasets`, or ids.

:func:`token_sequences` yields ``LongTensor [seq_len]`` forever (it cycles), deterministically for a given seed, and
shards the stream over processes: process ``rank`` of ``world`` takes sequences ``rank, rank + world, ...`` of the
one global order, so ``accelerate launch`` runs see disjoint data and a resumed run can skip what it already used.

Sources:

- ``"builtin:corpus"``: the offline prose of :mod:`attnkit.eval.corpus` (Python's bundled documentation), tokenized
  once; each sequence is a window at a random offset (the text is read cyclically, so any ``seq_len`` works).
- a Hugging Face dataset name (``"wikitext"`` with ``data_config="wikitext-103-raw-v1"``), a local file
  (``.txt``, ``.json``/``.jsonl``, ``.parquet``, ``.csv``) or a local folder, read with ``datasets`` in streaming mode:
  documents (column ``text_field``) are tokenized, joined with the EOS token and cut into consecutive sequences, as
  SeerAttention's own training data is packed; at the end the dataset is read again.
- token ids (a tensor ``[N, S]`` or ``[S]``, or a list of 1D tensors): those rows, in order, cycled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

BUILTIN_CORPUS = "builtin:corpus"
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def token_sequences(
    source: str | torch.Tensor | list[torch.Tensor],
    tokenizer: Any = None,
    seq_len: int = 2048,
    *,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    data_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Iterator[torch.Tensor]:
    """An endless, deterministic, process-sharded stream of ``LongTensor [seq_len]`` sequences (see the module doc).

    Token-id sources ignore ``seq_len`` (their rows are used as they are) and need no tokenizer.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if torch.is_tensor(source) or isinstance(source, list | tuple):
        return _shard(_cycle_rows(source), rank, world)
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source must be a non-empty string or token ids, got {source!r}")
    if tokenizer is None:
        raise ValueError(f"data source {source!r} needs a tokenizer (load the model with attnkit.load_model)")
    if source == BUILTIN_CORPUS:
        return _shard(_corpus_windows(tokenizer, seq_len, seed), rank, world)
    if source.startswith("builtin:"):
        raise ValueError(f"unknown built-in data source {source!r}; the built-in one is {BUILTIN_CORPUS!r}")
    return _shard(_packed(source, tokenizer, seq_len, data_config, split, text_field), rank, world)


def batches(sequences: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive sequences into ``[batch_size, S]`` batches."""
    while True:
        yield torch.stack([next(sequences) for _ in range(batch_size)])


# -------------------------------------------------------------------------------------------------- sources
def _shard(stream: Iterator[torch.Tensor], rank: int, world: int) -> Iterator[torch.Tensor]:
    for i, item in enumerate(stream):
        if i % world == rank:
            yield item


def _cycle_rows(ids: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    rows = list(ids[None] if torch.is_tensor(ids) and ids.dim() == 1 else ids)
    if not rows or any(torch.as_tensor(r).dim() != 1 or torch.as_tensor(r).numel() == 0 for r in rows):
        raise ValueError("token-id data must be a non-empty [N, S] / [S] tensor or a list of non-empty 1D tensors")
    while True:
        for row in rows:
            yield torch.as_tensor(row, dtype=torch.long)


def _corpus_windows(tokenizer, seq_len: int, seed: int) -> Iterator[torch.Tensor]:
    from attnkit.eval.corpus import sentences

    tokens = tokenizer(" ".join(sentences()), return_tensors="pt", verbose=False)["input_ids"][0]
    n = tokens.numel()
    ring = tokens.repeat(seq_len // n + 2)  # a window may start anywhere and wrap around
    g = torch.Generator().manual_seed(seed)
    while True:
        start = int(torch.randint(0, n, (1,), generator=g))
        yield ring[start : start + seq_len].clone()


def _documents(source: str, data_config: str | None, split: str, text_field: str) -> Iterator[str]:
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            f"data source {source!r} is read with `datasets` (pip install 'attnkit[train]'), which is not installed"
        ) from err
    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unsupported file type (use one of {', '.join(sorted(_FILE_BUILDERS))})")
        dataset = load_dataset(builder, data_files=str(path), split="train", streaming=True)
    elif path.is_dir():
        dataset = load_dataset(str(path), data_config, split=split, streaming=True)
    else:
        dataset = load_dataset(source, data_config, split=split, streaming=True)
    for row in dataset:
        if text_field not in row:
            raise ValueError(f"data source {source!r} has no column {text_field!r} (columns: {sorted(row)}); set text_field")
        text = row[text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _packed(
    source: str, tokenizer, seq_len: int, data_config: str | None, split: str, text_field: str
) -> Iterator[torch.Tensor]:
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    while True:
        produced = False
        for text in _documents(source, data_config, split, text_field):
            buffer.extend(tokenizer(text, verbose=False)["input_ids"])
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= seq_len:
                produced = True
                yield torch.tensor(buffer[:seq_len], dtype=torch.long)
                del buffer[:seq_len]
        if not produced:
            raise ValueError(f"data source {source!r} holds fewer than {seq_len} tokens of text in column {text_field!r}")
