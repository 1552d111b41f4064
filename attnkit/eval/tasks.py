"""Locally generated long-context tasks, written as lm-eval task folders.

Every task here is produced on the fly for a given tokenizer and target length, so it runs offline and the
prompt length is exact in the tokens the model will actually see. A task is one generator function registered
with :func:`register_task`; :func:`generate_task` turns any registered generator into

* a JSONL file, one sample per line: ``{"prompt", "answer", "answers", "depth", "n_tokens", "length"}``, and
* an lm-eval task YAML next to it (``dataset_path: json``, greedy ``generate_until``), scored by
  :func:`score_contains_answer`, which lm-eval imports through ``!function``
  (``datasets`` caches its Arrow copy under ``<folder>/.hf_datasets``).

The tasks (all under one metric, :data:`METRIC`: the fraction of the expected answers found as whole words in
the generation, so 0/1 for single-answer tasks):

* ``passkey``: a 5-digit pass key in repeated noise sentences (Mohtashami & Jaggi 2023).
* The RULER-style tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
  Models?"), with our own wording; "prose" is the offline corpus of :mod:`attnkit.eval.corpus`:

  * ``niah_single``: one key -> 7-digit number needle in repeated noise; answer: the number.
  * ``niah_single_prose``: the same in prose.
  * ``niah_multikey``: the asked needle plus 3 distractor needles with other keys, in prose; answer: the number.
  * ``niah_multivalue_prose``: one key with 4 numbers, in prose; answer: all 4 numbers.
  * ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) in noise; answer: the 5
    variable names that hold the value.
  * ``common_words``: a numbered word list where 10 words occur many times and the rest a few times; answer: the
    10 frequent words.
  * ``needle_qa``: one fact sentence ("The secret ingredient of the Lisbon recipe is saffron.") in prose;
    answer: the word.

Needles go in at sentence boundaries: a task's answer-bearing needles form one group placed at ``depth`` of the
haystack (its middle at ``depth``; at 0 it opens the haystack, at 1 it closes it), one haystack sentence apart;
distractor needles go at random boundaries elsewhere. Every question ends with a completion stem ("... The
secret number for silver-harbor is") so that base and instruct models alike answer in plain continuation.

Adding a task (e.g. a NIAH variant) is one function::

    @register_task("my_task", until=("\\n",), max_gen_toks=32)
    def my_task(tokenizer, length, depth, rng) -> TaskSample: ...
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase

from attnkit.eval import corpus

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
        answer: the string that must appear in the model's continuation for the sample to count as solved; for
            a multi-answer sample, a display string (the answers joined by ``", "``).
        depth: where the needle sits, as a fraction of the haystack (0 = right after the instruction, 1 = just
            before the question).
        n_tokens: length of ``prompt`` in tokens of the generating tokenizer, special tokens included (what
            lm-eval's HFLM feeds the model).
        answers: every string the continuation should hold, for multi-answer tasks (the score is the fraction
            found); empty means just ``answer``.
    """

    prompt: str
    answer: str
    depth: float
    n_tokens: int
    answers: tuple[str, ...] = ()


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
    """lm-eval ``process_results`` hook: the fraction of the doc's answers found in the (single) generation.

    A doc with an ``answers`` list of two or more strings scores the fraction of them that :func:`answer_found`
    finds (3 of 4 values: 0.75); a doc without one, or with a single answer, scores 1.0 when ``answer`` is found
    and 0.0 otherwise.
    """
    answers = doc.get("answers") or ()
    if len(answers) <= 1:
        return {METRIC: float(answer_found(str(doc["answer"]), results[0]))}
    found = sum(answer_found(str(a), results[0]) for a in answers)
    return {METRIC: found / len(answers)}


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
    text = render(_largest_fitting(tokenizer, length, render, unit_text))
    return text, count_tokens(tokenizer, text)


def _largest_fitting(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    render: Callable[[int], str],
    unit_text: str,
) -> int:
    """The largest ``n`` such that ``render(n)`` is at most ``length`` tokens (see :func:`_fill_to_length`)."""
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
    return lo


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
# Haystacks and needle placement shared by the RULER-style tasks (Hsieh et al. 2024)


@dataclass(frozen=True)
class _Haystack:
    """An endless haystack: ``words`` read cyclically from ``start``; ``ends[i]``: ``words[i]`` ends a sentence."""

    words: tuple[str, ...]
    ends: tuple[bool, ...]
    start: int = 0

    def take(self, n: int) -> tuple[list[str], list[int]]:
        """The next ``n`` words and the sentence boundaries among them (0, after every sentence end, and n)."""
        size = len(self.words)
        idx = [(self.start + i) % size for i in range(n)]
        boundaries = [0, *(i + 1 for i, j in enumerate(idx) if self.ends[j])]
        if boundaries[-1] != n:
            boundaries.append(n)  # the haystack may stop mid-sentence
        return [self.words[j] for j in idx], boundaries


def _noise_haystack() -> _Haystack:
    """The passkey noise ("The grass is green. The sky is blue. ..."), repeated."""
    words = tuple(" ".join(PASSKEY_NOISE).split(" "))
    return _Haystack(words, tuple(w.endswith(".") for w in words))


@functools.cache
def _prose_words() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """The corpus as (words, sentence-end flags, index of every sentence's first word)."""
    words: list[str] = []
    ends: list[bool] = []
    starts: list[int] = []
    for sentence in corpus.sentences():
        starts.append(len(words))
        pieces = sentence.split(" ")
        words.extend(pieces)
        ends.extend(i == len(pieces) - 1 for i in range(len(pieces)))
    return tuple(words), tuple(ends), tuple(starts)


def _prose_haystack(rng: random.Random) -> _Haystack:
    """Documentation prose from :mod:`attnkit.eval.corpus`, from a random sentence on (one draw of ``rng``)."""
    words, ends, starts = _prose_words()
    return _Haystack(words, ends, starts[rng.randrange(len(starts))])


def _insert_needles(
    words: Sequence[str],
    boundaries: Sequence[int],
    depth: float,
    group: Sequence[str],
    others: Sequence[tuple[float, str]] = (),
) -> str:
    """Join ``words`` with the needles inserted at sentence boundaries.

    ``group`` (the needles that carry the answer, in order) goes at consecutive boundaries, one haystack
    sentence apart when there is room, placed so that the group's middle is nearest to ``depth`` of the words
    (so depth 0 opens the haystack with the group and depth 1 closes it). Each of ``others`` (fraction, needle),
    e.g. a distractor, goes at the free boundary nearest to its fraction.
    """
    n, nb = len(words), len(boundaries)
    group_at: dict[int, list[str]] = {}
    if group:
        k = len(group)
        step = 2 if nb >= 2 * k - 1 else 1 if nb >= k else 0
        span = (k - 1) * step
        target = depth * n
        first = min(range(nb - span), key=lambda i: abs((boundaries[i] + boundaries[i + span]) / 2 - target))
        for j, needle in enumerate(group):
            group_at.setdefault(first + j * step, []).append(needle)
    others_at: dict[int, list[str]] = {}
    for fraction, needle in others:
        # A free slot if any is left, else one without the group, else any (a haystack of a word or two).
        free = [i for i in range(nb) if i not in group_at and i not in others_at]
        free = free or [i for i in range(nb) if i not in group_at] or list(range(nb))
        slot = min(free, key=lambda i: abs(boundaries[i] - fraction * n))
        others_at.setdefault(slot, []).append(needle)
    pieces: list[str] = []
    prev = 0
    for slot in sorted(group_at.keys() | others_at.keys()):
        pieces.append(" ".join(words[prev : boundaries[slot]]))
        # Sharing a slot, the group stays on the side of its depth (so depth 0 still opens the haystack with it).
        mine, theirs = group_at.get(slot, []), others_at.get(slot, [])
        pieces.extend([*theirs, *mine] if depth >= 0.5 else [*mine, *theirs])
        prev = boundaries[slot]
    pieces.append(" ".join(words[prev:]))
    return " ".join(piece for piece in pieces if piece)


def _needle_task(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    haystack: _Haystack,
    *,
    instruction: str,
    question: str,
    group: Sequence[str],
    answers: Sequence[str],
    others: Sequence[tuple[float, str]] = (),
) -> TaskSample:
    """A needle prompt filled to at most ``length`` tokens, one haystack word at a time.

    Layout: ``<instruction>\\n<haystack with the needles>\\n<question>``; the haystack is one paragraph.
    """

    def render(n_words: int) -> str:
        words, boundaries = haystack.take(n_words)
        text = _insert_needles(words, boundaries, depth, group, others)
        return "\n".join(part for part in (instruction, text, question) if part)

    prompt, n_tokens = _fill_to_length(tokenizer, length, render, haystack.words[haystack.start])
    return TaskSample(
        prompt=prompt,
        answer=", ".join(answers),
        depth=depth,
        n_tokens=n_tokens,
        answers=tuple(answers) if len(answers) > 1 else (),
    )


# ----------------------------------------------------------------------------------------------------------------
# niah_*: needle in a haystack, key -> 7-digit number (RULER's NIAH family, words as keys, numbers as values)

NIAH_INSTRUCTION = (
    "The text below hides some secret numbers among irrelevant sentences. Read it carefully and remember every "
    "secret number: you will be asked about them at the end."
)
NIAH_NEEDLE = "One of the secret numbers for {key} is {value}."
NIAH_QUESTION = "What is the secret number for {key} in the text above? The secret number for {key} is"
NIAH_QUESTION_ALL = (
    "What are all the secret numbers for {key} in the text above? The secret numbers for {key} are"
)
NIAH_DISTRACTORS = 3  # niah_multikey: needles with other keys (RULER: 4 keys in all)
NIAH_VALUES = 4  # niah_multivalue_prose: numbers under the asked key (RULER: 4)
# Keys are "adjective-noun" pairs: hyphenated, so no haystack text can hold one by chance.
KEY_ADJECTIVES = (
    "brave", "calm", "clever", "dusty", "eager", "fancy", "gentle", "golden", "hollow", "icy", "jolly",
    "lively", "misty", "noble", "quiet", "rapid", "rustic", "silent", "silver", "sunny", "tidy", "velvet",
    "wild", "witty", "zesty", "bright", "frosty", "humble", "lucky", "mellow", "amber", "crimson",
)  # fmt: skip
KEY_NOUNS = (
    "anchor", "badge", "candle", "castle", "comet", "cookie", "dragon", "engine", "feather", "garden",
    "harbor", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "needle", "orchard",
    "pebble", "pillow", "rocket", "saddle", "tunnel", "wagon", "window", "compass", "glacier", "parrot",
)  # fmt: skip


def _keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct "adjective-noun" keys."""
    picks = rng.sample(range(len(KEY_ADJECTIVES) * len(KEY_NOUNS)), k)
    return [f"{KEY_ADJECTIVES[i // len(KEY_NOUNS)]}-{KEY_NOUNS[i % len(KEY_NOUNS)]}" for i in picks]


def _values(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct 7-digit numbers."""
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), k)]


def _niah_single(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, haystack: _Haystack, rng: random.Random
) -> TaskSample:
    (key,), (value,) = _keys(rng, 1), _values(rng, 1)
    return _needle_task(
        tokenizer,
        length,
        depth,
        haystack,
        instruction=NIAH_INSTRUCTION,
        question=NIAH_QUESTION.format(key=key),
        group=[NIAH_NEEDLE.format(key=key, value=value)],
        answers=[value],
    )


@register_task("niah_single", until=("\n",), max_gen_toks=24)
def niah_single(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """One needle ``One of the secret numbers for silver-harbor is 4817302.`` in the repeated passkey noise.

    RULER's ``niah_single_1``; the expected continuation is `` 4817302.``.
    """
    return _niah_single(tokenizer, length, depth, _noise_haystack(), rng)


@register_task("niah_single_prose", until=("\n",), max_gen_toks=24)
def niah_single_prose(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """:func:`niah_single` in documentation prose (RULER's ``niah_single_2`` uses essays)."""
    return _niah_single(tokenizer, length, depth, _prose_haystack(rng), rng)


@register_task("niah_multikey", until=("\n",), max_gen_toks=24)
def niah_multikey(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """The asked needle at ``depth`` plus 3 needles with other keys (and numbers) at random places, in prose.

    RULER's ``niah_multikey_1``; only the asked key's number is the answer.
    """
    keys = _keys(rng, 1 + NIAH_DISTRACTORS)
    values = _values(rng, 1 + NIAH_DISTRACTORS)
    fractions = [rng.random() for _ in range(NIAH_DISTRACTORS)]
    haystack = _prose_haystack(rng)
    needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    return _needle_task(
        tokenizer,
        length,
        depth,
        haystack,
        instruction=NIAH_INSTRUCTION,
        question=NIAH_QUESTION.format(key=keys[0]),
        group=needles[:1],
        others=list(zip(fractions, needles[1:], strict=True)),
        answers=values[:1],
    )


@register_task("niah_multivalue_prose", until=("\n\n",), max_gen_toks=48)
def niah_multivalue_prose(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """One key with 4 numbers, each in its own needle, in prose; all 4 must be returned.

    RULER's multi-value NIAH, with a prose haystack (named ``_prose`` so that lm-eval's own RULER task
    ``niah_multivalue`` stays reachable through :func:`attnkit.eval.harness.run_tasks`). The needles sit one prose
    sentence apart around ``depth``. Decoding stops at a blank line, so an answer listed one number per line
    still counts.
    """
    (key,) = _keys(rng, 1)
    values = _values(rng, NIAH_VALUES)
    haystack = _prose_haystack(rng)
    return _needle_task(
        tokenizer,
        length,
        depth,
        haystack,
        instruction=NIAH_INSTRUCTION,
        question=NIAH_QUESTION_ALL.format(key=key),
        group=[NIAH_NEEDLE.format(key=key, value=v) for v in values],
        answers=values,
    )


# ----------------------------------------------------------------------------------------------------------------
# variable_tracking: follow a chain of assignments (RULER's multi-hop tracing, 1 chain of 4 hops)

VT_INSTRUCTION = (
    "The text below hides a chain of variable assignments among irrelevant sentences. Follow every assignment: "
    "you will be asked about them at the end."
)
VT_FIRST = "VAR {name} = {value}."
VT_HOP = "VAR {name} = VAR {source}."
VT_QUESTION = (
    "Which variables hold the value {value} after all the assignments in the text above? Following the chain, "
    "the {count} variables that hold the value {value} are:"
)
VT_HOPS = 4


@register_task("variable_tracking", until=("\n\n",), max_gen_toks=48)
def variable_tracking(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """``VAR QWHXK = 48213.``, then ``VAR LMOZA = VAR QWHXK.`` and 3 more hops, in the repeated passkey noise.

    The 5 statements sit in order, one noise sentence apart, around ``depth``. The answer is the 5 names (any
    order, any separator); decoding stops at a blank line.
    """
    value = str(rng.randint(10000, 99999))
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    chain = [VT_FIRST.format(name=names[0], value=value)]
    chain += [VT_HOP.format(name=name, source=source) for source, name in itertools.pairwise(names)]
    return _needle_task(
        tokenizer,
        length,
        depth,
        _noise_haystack(),
        instruction=VT_INSTRUCTION,
        question=VT_QUESTION.format(value=value, count=len(names)),
        group=chain,
        answers=names,
    )


# ----------------------------------------------------------------------------------------------------------------
# common_words: common words extraction (RULER's CWE)

CWE_INSTRUCTION = (
    "Below is a numbered list of words. A few words occur in it many times, all the others only a few times. "
    "Count carefully: you will be asked which words occur most often."
)
CWE_QUESTION = (
    "What are the {count} words that occur most often in the list above? The {count} most frequent words in the "
    "list are:"
)
CWE_COMMON = 10  # words to find (RULER: 10)
# RULER's frequency of a common word; lower at short lengths, where 10 x 30 entries do not fit.
CWE_MAX_COMMON_FREQ = 30


@register_task("common_words", until=("\n\n",), max_gen_toks=64)
def common_words(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """A shuffled numbered list ``1. word 2. word ...``: 10 common words ``fc`` times each, the rest rarely.

    The words come from :func:`attnkit.eval.corpus.vocabulary` (~1,700). The list grows one rare entry at a time;
    its frequencies are set from the number of entries that fit the length: each common word occurs ``fc =
    clamp(entries // 20, 2, 30)`` times (30 from ~600 entries, about 4K BPE tokens: RULER's setting, which starts
    at 4K; below that the common words would crowd out the rest), each rare word ``fr = clamp((fc - 1) // 3, 1,
    3)`` times. So the common words make up at most half of the list, and less and less of it past 4K tokens.
    Once the vocabulary is used up (~35K BPE tokens), rare words come round again, a few more times each (the
    most frequent rare word stays below ``fc``; ``fc`` is raised when a very long list would break that).
    ``depth`` has no meaning here; it is recorded as given. The answer is the 10 common words; decoding stops at
    a blank line.
    """
    frame_words = set(re.findall(r"[a-z]+", (CWE_INSTRUCTION + CWE_QUESTION).lower()))
    vocab = [w for w in corpus.vocabulary() if w not in frame_words]
    common = rng.sample(vocab, CWE_COMMON)
    layout = rng.getrandbits(64)  # seeds the rare words' order and every shuffle, whatever the length
    chosen = set(common)
    rare = [w for w in vocab if w not in chosen]
    random.Random(layout).shuffle(rare)
    question = CWE_QUESTION.format(count=CWE_COMMON)

    def entries(fc: int, fr: int, n_rare: int) -> list[str]:
        return [w for w in common for _ in range(fc)] + [rare[(j // fr) % len(rare)] for j in range(n_rare)]

    def renderer(fc: int, fr: int) -> Callable[[int], str]:
        def render(n_rare: int) -> str:
            items = entries(fc, fr, n_rare)
            random.Random(f"{layout}:{fc}:{n_rare}").shuffle(items)
            listing = " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))
            return "\n".join((CWE_INSTRUCTION, listing, question))

        return render

    # Frequencies from a rough count of the entries that fit, fixed before the fill so that it adds one at a time.
    frame = count_tokens(tokenizer, "\n".join((CWE_INSTRUCTION, "", question)))
    per_entry = max(1, count_tokens(tokenizer, f" 100. {common[0]}") - count_tokens(tokenizer, ""))
    fc = min(CWE_MAX_COMMON_FREQ, max(2, (length - frame) // per_entry // (2 * CWE_COMMON)))
    fr = min(3, max(1, (fc - 1) // 3))
    n_rare = _largest_fitting(tokenizer, length, renderer(fc, fr), f"100. {rare[0]}")
    top_rare = max(Counter(entries(fc, fr, n_rare)[CWE_COMMON * fc :]).values(), default=0)
    if top_rare >= fc:  # a list long enough to cycle the vocabulary many times: keep the common words ahead
        fc = top_rare + 2
        n_rare = _largest_fitting(tokenizer, length, renderer(fc, fr), f"100. {rare[0]}")
    prompt = renderer(fc, fr)(n_rare)
    return TaskSample(
        prompt=prompt,
        answer=", ".join(common),
        depth=depth,
        n_tokens=count_tokens(tokenizer, prompt),
        answers=tuple(common),
    )


# ----------------------------------------------------------------------------------------------------------------
# needle_qa: one fact sentence in prose, asked as a question (a synthetic stand-in for RULER's QA)

QA_INSTRUCTION = (
    "The text below hides one fact among irrelevant sentences. Read it carefully: you will be asked about it at "
    "the end."
)
QA_SPICES = (
    "saffron",
    "cardamom",
    "turmeric",
    "nutmeg",
    "cinnamon",
    "paprika",
    "vanilla",
    "ginger",
    "fennel",
)
QA_ANIMALS = (
    "otter",
    "falcon",
    "badger",
    "walrus",
    "lynx",
    "heron",
    "beaver",
    "jaguar",
    "pelican",
    "hedgehog",
)
QA_INSTRUMENTS = ("cello", "oboe", "harp", "tuba", "bassoon", "violin", "clarinet", "trombone", "mandolin")
QA_GEMS = ("sapphire", "garnet", "topaz", "opal", "amethyst", "jade", "onyx", "emerald", "turquoise", "ruby")
# (fact, question ending in a completion stem, possible answers); the answers and places are single words that
# the prose corpus does not contain.
QA_FACTS = (
    (
        "The secret ingredient of the {place} recipe is {answer}.",
        "What is the secret ingredient of the {place} recipe? The secret ingredient of the {place} recipe is",
        QA_SPICES,
    ),
    (
        "The mascot of the {place} rowing club is the {answer}.",
        "What is the mascot of the {place} rowing club? The mascot of the {place} rowing club is the",
        QA_ANIMALS,
    ),
    (
        "The oldest instrument of the {place} orchestra is the {answer}.",
        "What is the oldest instrument of the {place} orchestra? The oldest instrument of the {place} "
        "orchestra is the",
        QA_INSTRUMENTS,
    ),
    (
        "The codename of the {place} expedition is {answer}.",
        "What is the codename of the {place} expedition? The codename of the {place} expedition is",
        QA_GEMS,
    ),
)
QA_PLACES = (
    "Lisbon", "Oslo", "Kyoto", "Lima", "Nairobi", "Quebec", "Dublin", "Krakow", "Seville", "Tbilisi", "Hanoi",
    "Perth", "Bergen", "Porto", "Cusco", "Zurich", "Valencia", "Montreal", "Istanbul", "Marrakesh", "Helsinki",
    "Bogota", "Glasgow", "Adelaide",
)  # fmt: skip


@register_task("needle_qa", until=("\n",), max_gen_toks=16)
def needle_qa(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random
) -> TaskSample:
    """``The secret ingredient of the Lisbon recipe is saffron.`` at ``depth`` of the prose; answer: the word."""
    fact, question, pool = rng.choice(QA_FACTS)
    place, answer = rng.choice(QA_PLACES), rng.choice(pool)
    haystack = _prose_haystack(rng)
    return _needle_task(
        tokenizer,
        length,
        depth,
        haystack,
        instruction=QA_INSTRUCTION,
        question=question.format(place=place),
        group=[fact.format(place=place, answer=answer)],
        answers=[answer],
    )


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
        seed: seeds the answers (passkeys, needle values, ...); the same seed gives the same files, and the same
            answers at every length, so results at different lengths differ only by length.
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
                "answers": list(sample.answers) or [sample.answer],
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
