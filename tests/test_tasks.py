"""The RULER-style bundled tasks (niah_*, variable_tracking, common_words, needle_qa), their corpus and scoring.

Lengths are checked with attnkit's ``tiny-llama`` byte-level tokenizer (one token per byte, so character
positions are token positions); one test repeats the length check with SmolLM2's BPE tokenizer when present.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import attnkit
from attnkit.eval import corpus
from attnkit.eval.tasks import (
    CWE_COMMON,
    CWE_INSTRUCTION,
    METRIC,
    NIAH_DISTRACTORS,
    NIAH_INSTRUCTION,
    NIAH_VALUES,
    QA_FACTS,
    QA_INSTRUCTION,
    QA_PLACES,
    TASKS,
    VT_HOPS,
    VT_INSTRUCTION,
    count_tokens,
    generate_task,
    score_contains_answer,
)

SMOLLM2_DIR = Path.home() / ".cache" / "attnkit" / "models" / "smollm2-135m-instruct"

NEW_TASKS = (
    "niah_single",
    "niah_single_prose",
    "niah_multikey",
    "niah_multivalue_prose",
    "variable_tracking",
    "common_words",
    "needle_qa",
)
NEEDLE_TASKS = tuple(t for t in NEW_TASKS if t != "common_words")
INSTRUCTIONS = {
    "niah_single": NIAH_INSTRUCTION,
    "niah_single_prose": NIAH_INSTRUCTION,
    "niah_multikey": NIAH_INSTRUCTION,
    "niah_multivalue_prose": NIAH_INSTRUCTION,
    "variable_tracking": VT_INSTRUCTION,
    "common_words": CWE_INSTRUCTION,
    "needle_qa": QA_INSTRUCTION,
}
N_ANSWERS = {"niah_multivalue_prose": NIAH_VALUES, "variable_tracking": VT_HOPS + 1, "common_words": CWE_COMMON}
DEPTHS = (0.0, 0.5, 1.0)
# The fill adds one haystack word (or list entry) at a time: the prompt ends within one of them of the length.
# Corpus words are at most 24 characters, so with one byte per token a prompt is at most 25 tokens short.
SLACK = 25


@pytest.fixture(scope="module")
def tiny():
    """attnkit's ``tiny-llama`` and its byte-level tokenizer (one token per UTF-8 byte)."""
    return attnkit.load_model("tiny-llama", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _words(text: str, word: str) -> int:
    """Whole-word occurrences of ``word`` in ``text`` (the rule answer_found applies to generations)."""
    return len(re.findall(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", text))


def _needle_spans(task: str, record: dict) -> list[tuple[int, int]]:
    """Character spans, within the haystack line, of the needles that carry the answers (in answer order)."""
    _, haystack, question = record["prompt"].split("\n")
    spans = []
    for answer in record["answers"]:
        if task.startswith("niah"):
            key = re.search(r"secret numbers? for (\S+) in the text above", question).group(1)
            pattern = rf"One of the secret numbers for {re.escape(key)} is {answer}\."
        elif task == "variable_tracking":
            pattern = rf"VAR {answer} = [^.]+\."
        else:
            pattern = rf"The [^.]+ {answer}\."
        (match,) = re.finditer(pattern, haystack)
        spans.append(match.span())
    return spans


# ----------------------------------------------------------------------------------------------------------------
# The corpus


def test_corpus_is_cached_plain_prose_long_enough_for_32k_tokens():
    sentences = corpus.sentences()
    assert corpus.sentences() is sentences  # functools.cache
    text = " ".join(sentences)
    # ~4 characters per token for English BPE: 32K tokens need ~130K characters.
    assert len(text) >= 150_000 and len(sentences) >= 1000
    assert text.isascii() and "\n" not in text
    assert all(s[0].isupper() and s.endswith(".") and ">>>" not in s and "::=" not in s for s in sentences)
    assert len(set(sentences)) == len(sentences)
    vocab = corpus.vocabulary()
    assert len(vocab) >= 1000 and list(vocab) == sorted(set(vocab))
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in vocab)


def test_qa_answers_and_places_are_absent_from_the_corpus():
    """So the fact sentence is the only place in the prompt that holds the answer."""
    text = " ".join(corpus.sentences())
    for word in [*QA_PLACES, *(a for _, _, pool in QA_FACTS for a in pool)]:
        assert _words(text, word) == 0 and _words(text, word.capitalize()) == 0, word


# ----------------------------------------------------------------------------------------------------------------
# Generation


def test_new_tasks_are_registered_with_room_for_their_answers():
    for name in NEW_TASKS:
        spec = TASKS[name]
        assert spec.max_gen_toks >= (16 if name not in N_ANSWERS else 48), name
        assert spec.until in (("\n",), ("\n\n",))
    # Multi-answer tasks may list their answers one per line: they stop at a blank line, not a newline.
    assert all(TASKS[name].until == ("\n\n",) for name in N_ANSWERS)


@pytest.mark.parametrize("length", [700, 1200, 2500], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("task", NEW_TASKS)
def test_prompt_length_frame_and_answers(tok, tmp_path, task, length):
    local = generate_task(task, tok, length, samples=3, depths=DEPTHS, seed=1, out_dir=tmp_path)
    records = _read_jsonl(local.jsonl_path)
    assert [r["depth"] for r in records] == list(DEPTHS)
    for r in records:
        prompt, answers = r["prompt"], r["answers"]
        assert count_tokens(tok, prompt) == r["n_tokens"]
        assert length - SLACK <= r["n_tokens"] <= length, (r["n_tokens"], length)
        assert r["length"] == length
        # instruction, one haystack paragraph, question ending in a completion stem
        instruction, haystack, question = prompt.split("\n")
        assert instruction == INSTRUCTIONS[task] and haystack
        assert re.search(r"(?:is|are|the|:)$", question), question
        assert len(answers) == N_ANSWERS.get(task, 1) and len(set(answers)) == len(answers)
        assert r["answer"] == ", ".join(answers)
        for answer in answers:
            assert _words(question, answer) == 0  # the question never gives an answer away
        if task in ("niah_single", "niah_single_prose", "niah_multikey", "niah_multivalue_prose"):
            assert all(re.fullmatch(r"[1-9]\d{6}", a) and _words(haystack, a) == 1 for a in answers)
            needles = re.findall(r"One of the secret numbers for (\S+) is (\d{7})\.", haystack)
            key = re.search(r"secret numbers? for (\S+) in", question).group(1)
            assert [v for k, v in needles if k == key] == answers  # in the group's order
            distractors = [(k, v) for k, v in needles if k != key]
            assert len(distractors) == (NIAH_DISTRACTORS if task == "niah_multikey" else 0)
            assert len({k for k, _ in distractors}) == len(distractors)
            assert not {v for _, v in distractors} & set(answers)
        elif task == "variable_tracking":
            value = re.search(r"the value (\d{5})\b", question).group(1)
            assert f"VAR {answers[0]} = {value}." in haystack
            for source, name in itertools.pairwise(answers):
                assert f"VAR {name} = VAR {source}." in haystack
            assert all(re.fullmatch(r"[A-Z]{5}", a) for a in answers)
            assert f"the {VT_HOPS + 1} variables" in question
        elif task == "common_words":
            entries = re.findall(r"(\d+)\. ([a-z]+)", haystack)
            assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
            counts = Counter(w for _, w in entries)
            common = {counts[a] for a in answers}
            assert len(common) == 1  # every common word occurs equally often
            first = [w for _, w in entries[: len(answers) * next(iter(common))]]
            assert set(first) != set(answers)  # shuffled, not one block of common words
            rare_top = max((n for w, n in counts.items() if w not in answers), default=0)
            assert 0 < rare_top < common.pop()
        else:  # needle_qa
            (answer,) = answers
            assert _words(prompt, answer) == 1
            assert re.search(rf"The [^.]+ {answer}\.", haystack)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_same_seed_same_file_other_seed_other_answers(tok, tmp_path, task):
    a = generate_task(task, tok, 900, samples=3, seed=5, out_dir=tmp_path / "a")
    b = generate_task(task, tok, 900, samples=3, seed=5, out_dir=tmp_path / "b")
    c = generate_task(task, tok, 900, samples=3, seed=6, out_dir=tmp_path / "c")
    longer = generate_task(task, tok, 1500, samples=3, seed=5, out_dir=tmp_path / "d")
    assert a.jsonl_path.read_bytes() == b.jsonl_path.read_bytes()
    answers = [r["answers"] for r in _read_jsonl(a.jsonl_path)]
    assert answers != [r["answers"] for r in _read_jsonl(c.jsonl_path)]
    # The answers do not depend on the length: results at two lengths differ only by length.
    assert answers == [r["answers"] for r in _read_jsonl(longer.jsonl_path)]


@pytest.mark.parametrize("length", [1200, 2500], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needles_sit_at_the_requested_depth(tok, tmp_path, task, length):
    local = generate_task(task, tok, length, samples=6, depths=DEPTHS, seed=3, out_dir=tmp_path)
    for r in _read_jsonl(local.jsonl_path):
        haystack = r["prompt"].split("\n")[1]
        spans = _needle_spans(task, r)
        assert spans == sorted(spans)  # a group keeps its order (a variable chain reads forwards)
        if r["depth"] == 0.0:
            assert spans[0][0] == 0  # the haystack opens with the (first) needle
        elif r["depth"] == 1.0:
            assert spans[-1][1] == len(haystack)  # and closes with the (last) one
        else:
            middle = (spans[0][0] + spans[-1][1]) / 2 / len(haystack)
            # The group snaps to sentence boundaries: within half a sentence (prose: up to 300 characters) and
            # the distractor needles of niah_multikey (3 x ~55 characters) of the middle.
            tolerance = (30 if task in ("niah_single", "variable_tracking") else 230) / len(haystack)
            assert abs(middle - 0.5) <= tolerance, (middle, tolerance)


def test_a_length_too_short_for_the_frame_is_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        generate_task("niah_multivalue_prose", tok, 300, samples=1, out_dir=tmp_path)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_lengths_with_a_real_bpe_tokenizer(tmp_path, task):
    """BPE merges across word boundaries, so the fill must measure whole prompts: check it on SmolLM2's."""
    if not SMOLLM2_DIR.is_dir():
        pytest.skip(f"{SMOLLM2_DIR} not found (the embedded SmolLM2 has not been materialized)")
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    local = generate_task(task, bpe, 2048, samples=2, out_dir=tmp_path)
    for r in _read_jsonl(local.jsonl_path):
        assert 2048 - 16 <= count_tokens(bpe, r["prompt"]) == r["n_tokens"] <= 2048


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def test_multi_answer_scoring_is_the_fraction_found():
    doc = {
        "answer": "1234567, 2345678, 3456789, 4567890",
        "answers": ["1234567", "2345678", "3456789", "4567890"],
    }
    assert score_contains_answer(doc, [" 1234567, 2345678, 3456789 and 4567890."]) == {METRIC: 1.0}
    assert score_contains_answer(doc, [" 4567890\n2345678"]) == {METRIC: 0.5}
    assert score_contains_answer(doc, [" 1234567, 2345678, 3456789"]) == {METRIC: 0.75}
    assert score_contains_answer(doc, [" none of them"]) == {METRIC: 0.0}
    # Glued digits are not the number: " 12345678" holds "1234567" only as a prefix.
    assert score_contains_answer(doc, [" 12345678, 02345678, 34567890x, 4567890"]) == {METRIC: 0.25}
    assert score_contains_answer(doc, [""]) == {METRIC: 0.0}


@pytest.mark.parametrize("answers", [None, [], ["68213"]], ids=["no-answers-key", "empty", "one"])
def test_single_answer_scoring_is_unchanged(answers):
    doc = {"answer": "68213"} if answers is None else {"answer": "68213", "answers": answers}
    assert score_contains_answer(doc, [" 68213. Remember it."]) == {METRIC: 1.0}
    assert score_contains_answer(doc, [" 968213."]) == {METRIC: 0.0}
    assert score_contains_answer(doc, [" 68214."]) == {METRIC: 0.0}


@pytest.mark.parametrize("task", NEW_TASKS)
def test_generated_docs_score_all_half_and_none(tok, tmp_path, task):
    local = generate_task(task, tok, 1000, samples=2, out_dir=tmp_path)
    for doc in _read_jsonl(local.jsonl_path):
        answers = doc["answers"]
        half = answers[: len(answers) // 2]
        assert score_contains_answer(doc, [" " + ", ".join(answers) + "."]) == {METRIC: 1.0}
        assert score_contains_answer(doc, [" " + ", ".join(half)]) == {METRIC: len(half) / len(answers)}
        assert score_contains_answer(doc, [" " + " ".join("x" + a + "9" for a in answers)]) == {METRIC: 0.0}

    # Single-answer records carry the list too (uniform JSONL columns).
    (passkey,) = _read_jsonl(generate_task("passkey", tok, 300, samples=1, out_dir=tmp_path).jsonl_path)
    assert passkey["answers"] == [passkey["answer"]]


# ----------------------------------------------------------------------------------------------------------------
# Through lm-eval


def test_fraction_scores_come_through_lm_eval(tok, tmp_path):
    """YAML -> datasets -> process_results keeps the answers list: a model naming 2 of 4 values scores 0.5."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class HalfOracle(LM):
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for request in requests:
                prompt = request.args[0]
                key = re.search(r"secret numbers for (\S+) in the text above", prompt).group(1)
                values = re.findall(rf"secret numbers for {re.escape(key)} is (\d{{7}})\.", prompt)
                out.append(" " + ", ".join(values[:2]))
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    local = generate_task("niah_multivalue_prose", tok, 700, samples=3, out_dir=tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=HalfOracle(), tasks=[local.name], task_manager=manager, log_samples=False
    )
    assert out["results"][local.name][f"{METRIC},none"] == 0.5


def test_run_tasks_runs_a_new_task_on_a_tiny_model(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from attnkit.eval.harness import run_tasks

    model, tok = tiny
    (result,) = run_tasks(
        model, tok, ["niah_multikey"], [700], samples=2, work_dir=tmp_path, show_progress=False
    )
    assert (result.task, result.length, result.n_samples) == ("niah_multikey", 700, 2)
    assert 0.0 <= result.score <= 1.0
