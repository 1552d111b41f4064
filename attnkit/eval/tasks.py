"""Locally generated long-context tasks, written as lm-eval task folders.

Every task here is produced on the fly for a given tokenizer and target length, so it runs offline and the
prompt length is exact in the tokens the model will actually see. A task is one generator function registered
with :func:`register_task`; :func:`generate_task` turns any registered generator into

* a JSONL file, one sample per line: ``{"prompt", "answer", "depth", "n_tokens", "length"}``, and
* an lm-eval task YAML next to it (``dataset_path: json``, greedy ``generate_until``), scored by
  :func:`score_contains_answer`, which lm-eval imports through ``!function``
  (``datasets`` caches its Arrow copy under ``<folder>/.hf_datasets``).

Adding a task (e.g. a NIAH variant) is one function::

    @register_task("my_task", until=("\\n",), max_gen_toks=32)
    def my_task(tokenizer, length, depth, rng) -> TaskSample: ...
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase

__all__ = [
    "DATASETS_CACHE",
    "METRIC",
    "TASKS",
    "LocalTask",
    "TaskSample",
    "TaskSpec",
    "answer_found",
    "count_tokens",
    "generate_task",
    "register_task",
    "score_contains_answer",
    "task_name",
]

# The metric key reported by every generated task (lm-eval adds the filter name: "contains_answer,none").
METRIC = "contains_answer"
# Subfolder of a task folder where `datasets` keeps its Arrow copies of the JSONL files.
DATASETS_CACHE = ".hf_datasets"


@dataclass(frozen=True)
class TaskSample:
    """One generated prompt.

    Attributes:
        prompt: the full text given to the model (no chat template).
        answer: the string that must appear in the model's continuation for the sample to count as solved.
        depth: where the needle sits, as a fraction of the haystack (0 = right after the instruction, 1 = just
            before the question).
        n_tokens: length of ``prompt`` in tokens of the generating tokenizer, special tokens included (what
            lm-eval's HFLM feeds the model).
    """

    prompt: str
    answer: str
    depth: float
    n_tokens: int


# (tokenizer, length, depth, rng) -> TaskSample; the sample must satisfy n_tokens <= length.
SampleBuilder = Callable[[PreTrainedTokenizerBase, int, float, random.Random], TaskSample]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task generator and its decoding settings.

    Attributes:
        name: short task name (``"passkey"``); lm-eval task names are derived with :func:`task_name`.
        build: draws one sample for a (tokenizer, length, depth, rng).
        until: stop strings for greedy decoding.
        max_gen_toks: generation budget; the harness sizes the model's ``max_length`` as length + this.
    """

    name: str
    build: SampleBuilder
    until: tuple[str, ...]
    max_gen_toks: int


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str, *, until: Sequence[str], max_gen_toks: int
) -> Callable[[SampleBuilder], SampleBuilder]:
    """Register a sample builder under ``name`` (decorator). Raises ``ValueError`` on a duplicate name."""

    def decorate(build: SampleBuilder) -> SampleBuilder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = TaskSpec(name=name, build=build, until=tuple(until), max_gen_toks=max_gen_toks)
        return build

    return decorate


@dataclass(frozen=True)
class LocalTask:
    """A generated task on disk, ready for ``TaskManager(include_path=yaml_path.parent)``.

    Attributes:
        name: the lm-eval task name, unique per (task, length): ``attnkit_passkey_2048``.
        task: the registered generator's name (``"passkey"``).
        length: the requested prompt length in tokens (every prompt is at most this long).
        yaml_path: the lm-eval task config.
        jsonl_path: the samples.
        n_samples: number of samples written.
    """

    name: str
    task: str
    length: int
    yaml_path: Path
    jsonl_path: Path
    n_samples: int


def task_name(task: str, length: int) -> str:
    """The lm-eval task name for a (task, length) pair, e.g. ``attnkit_passkey_2048``."""
    return f"attnkit_{task}_{length}"


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens in ``text`` as lm-eval's HFLM will encode it (default ``add_special_tokens``, so a BOS counts)."""
    # verbose=False: long prompts are the point here, the "longer than model_max_length" warning is noise.
    return len(tokenizer(text, verbose=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Scoring (lm-eval imports these through `process_results: !function attnkit.eval.tasks.score_contains_answer`)


def answer_found(answer: str, generation: str) -> bool:
    """Whether ``answer`` appears in ``generation`` as a whole word.

    The answer must not be glued to other letters or digits, so ``68213`` is found in ``" 68213. Remember"`` but
    not in ``"968213"``: a model that rambles digits should not score by accident.
    """
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer.strip())}(?![0-9A-Za-z])"
    return re.search(pattern, generation) is not None


def score_contains_answer(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook: 1.0 when the doc's answer appears in the (single) generation."""
    return {METRIC: float(answer_found(str(doc["answer"]), results[0]))}


# ----------------------------------------------------------------------------------------------------------------
# Haystack filling


def _fill_to_length(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    render: Callable[[int], str],
    unit_text: str,
) -> tuple[str, int]:
    """Find the largest ``n`` such that ``render(n)`` is at most ``length`` tokens; return (text, tokens).

    ``render(n)`` builds a full prompt from ``n`` haystack units (e.g. words); ``unit_text`` is a typical unit,
    used only for the first guess. Token counts are measured on the whole rendered prompt, never summed per
    piece, because BPE merges across piece boundaries.
    """
    base = count_tokens(tokenizer, render(0))
    if base > length:
        raise ValueError(f"length {length} is shorter than the prompt without any haystack ({base} tokens)")
    # First guess from one unit's token count (with its joining space, minus any BOS); doubled until it overshoots.
    per_unit = max(1, count_tokens(tokenizer, " " + unit_text) - count_tokens(tokenizer, ""))
    hi = (length - base) // per_unit + 8
    while count_tokens(tokenizer, render(hi)) <= length:
        hi *= 2
    lo = 0  # invariant: render(lo) fits, render(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, render(mid)) <= length:
            lo = mid
        else:
            hi = mid
    text = render(lo)
    return text, count_tokens(tokenizer, text)


# ----------------------------------------------------------------------------------------------------------------
# passkey: Mohtashami & Jaggi 2023 (Landmark Attention), repeated-noise haystack

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@register_task("passkey", until=("\n",), max_gen_toks=16)
def passkey(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random) -> TaskSample:
    """The classic passkey retrieval prompt, filled with repeated noise to at most ``length`` tokens.

    Layout (lines joined by ``\\n``, as in the Landmark Attention reference code)::

        <instruction>
        <noise before the needle>
        The pass key is 68213. Remember it. 68213 is the pass key.
        <noise after the needle>
        What is the pass key? The pass key is

    The noise cycles through its five sentences and grows one word at a time (the reference code cuts it at a
    character), so the prompt ends within one word (1–3 BPE tokens) of ``length``. The needle goes in at the sentence
    boundary nearest to ``depth`` of the noise words. The expected continuation is `` 68213.``; decoding stops at
    a newline.
    """
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    noise_words = " ".join(PASSKEY_NOISE).split(" ")

    def render(n_words: int) -> str:
        words = [noise_words[i % len(noise_words)] for i in range(n_words)]
        # Sentence boundaries: 0, after every word ending a sentence, and the (possibly mid-sentence) end.
        boundaries = [0, *(i + 1 for i, w in enumerate(words) if w.endswith(".")), n_words]
        cut = min(boundaries, key=lambda b: abs(b - depth * n_words))
        parts = [PASSKEY_INSTRUCTION, " ".join(words[:cut]), needle, " ".join(words[cut:]), PASSKEY_QUESTION]
        return "\n".join(part for part in parts if part)

    prompt, n_tokens = _fill_to_length(tokenizer, length, render, noise_words[0])
    return TaskSample(prompt=prompt, answer=key, depth=depth, n_tokens=n_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Writing the lm-eval task


def generate_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    *,
    samples: int,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    seed: int = 0,
    out_dir: str | Path,
) -> LocalTask:
    """Generate ``samples`` prompts of task ``name`` and write them as an lm-eval task under ``out_dir``.

    Args:
        name: a registered task (see ``TASKS``), e.g. ``"passkey"``.
        tokenizer: the tokenizer of the model to be evaluated; lengths are measured in its tokens.
        length: target prompt length in tokens; every prompt is at most this long and within a few tokens of it.
        samples: number of prompts. Sample ``i`` uses depth ``depths[i % len(depths)]``, so depths are covered
            evenly (exactly when ``samples`` is a multiple of ``len(depths)``).
        depths: needle positions as fractions of the haystack, each in [0, 1].
        seed: seeds the answers (passkeys); the same seed gives the same files, and the same answers at every
            length, so results at different lengths differ only by length.
        out_dir: folder for ``<task name>.jsonl`` and ``<task name>.yaml`` (created if missing; files with the
            same name are overwritten, so one folder can hold many (task, length) pairs).

    Returns:
        The written :class:`LocalTask`.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty sequence of fractions in [0, 1], got {depths!r}")
    spec = TASKS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_name = task_name(name, length)
    jsonl_path = out / f"{full_name}.jsonl"
    yaml_path = out / f"{full_name}.yaml"

    rng = random.Random(seed)
    with jsonl_path.open("w", encoding="utf-8") as f:
        for i in range(samples):
            sample = spec.build(tokenizer, length, float(depths[i % len(depths)]), rng)
            record = {
                "prompt": sample.prompt,
                "answer": sample.answer,
                "depth": sample.depth,
                "n_tokens": sample.n_tokens,
                "length": length,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    config = {
        "task": full_name,
        "dataset_path": "json",
        # Absolute paths: lm-eval hands these to `datasets.load_dataset`, which resolves relative paths against
        # the working directory, not the YAML's folder. The datasets cache (an Arrow copy of every JSONL) lives
        # next to the task, so it goes when the folder goes instead of piling up in ~/.cache/huggingface.
        "dataset_kwargs": {
            "data_files": {"test": str(jsonl_path.resolve())},
            "cache_dir": str((out / DATASETS_CACHE).resolve()),
        },
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        # Column names, not Jinja templates: lm-eval reads doc[column] directly when the name is a feature.
        "doc_to_text": "prompt",
        "doc_to_target": "answer",
        "generation_kwargs": {
            "until": list(spec.until),
            "max_gen_toks": spec.max_gen_toks,
            "do_sample": False,
        },
        "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "length": length, "seed": seed, "depths": [float(d) for d in depths]},
    }
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    # `!function` is lm-eval's YAML tag for a callable; safe_dump cannot emit custom tags, so it is appended.
    text += f"process_results: !function {__name__}.score_contains_answer\n"
    yaml_path.write_text(text, encoding="utf-8")
    return LocalTask(
        name=full_name,
        task=name,
        length=length,
        yaml_path=yaml_path,
        jsonl_path=jsonl_path,
        n_samples=samples,
    )
