"""attnkit.eval: generated passkey tasks, the lm-eval model, the harness and dense-vs-patched comparison.

Fast tests use attnkit's ``tiny-llama`` (a 2-layer random Llama with a byte-level tokenizer); the slow tests run
lm-eval's CLI in a subprocess and the embedded SmolLM2-135M (when its folder exists).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from attnkit.eval.harness import UNINFORMATIVE_BELOW, ComparisonRow, TaskResult, compare, run_tasks
from attnkit.eval.tasks import (
    DATASETS_CACHE,
    PASSKEY_INSTRUCTION,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    answer_found,
    count_tokens,
    generate_task,
    score_contains_answer,
)
from attnkit.models import load_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402  (after the importorskip that guards the optional extra)
from lm_eval.tasks import TaskManager  # noqa: E402

from attnkit.eval.lm_eval import AttnkitLM  # noqa: E402

SMOLLM2_DIR = Path.home() / ".cache" / "attnkit" / "models" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """attnkit's ``tiny-llama`` (2 layers, hidden 64, GQA 2:1, fp32) and its byte-level tokenizer.

    One token per UTF-8 byte: prompt lengths are exact and cheap to reason about.
    """
    return load_model("tiny-llama", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny) -> PreTrainedTokenizerBase:
    return tiny[1]


@pytest.fixture(scope="module")
def tiny_model(tiny) -> PreTrainedModel:
    return tiny[0]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Task generation


def test_passkey_is_deterministic_for_a_seed(tokenizer, tmp_path):
    a = generate_task("passkey", tokenizer, 300, samples=6, seed=7, out_dir=tmp_path / "a")
    b = generate_task("passkey", tokenizer, 300, samples=6, seed=7, out_dir=tmp_path / "b")
    c = generate_task("passkey", tokenizer, 300, samples=6, seed=8, out_dir=tmp_path / "c")
    assert a.jsonl_path.read_bytes() == b.jsonl_path.read_bytes()
    assert [r["answer"] for r in _read_jsonl(a.jsonl_path)] != [
        r["answer"] for r in _read_jsonl(c.jsonl_path)
    ]
    assert a.name == "attnkit_passkey_300" and a.task == "passkey" and a.length == 300 and a.n_samples == 6


@pytest.mark.parametrize("length", [260, 517, 1024], ids=lambda n: f"L{n}")
def test_passkey_prompt_length_needle_and_depth(tokenizer, tmp_path, length):
    depths = (0.0, 0.1, 0.5, 0.9, 1.0)
    local = generate_task("passkey", tokenizer, length, samples=10, depths=depths, out_dir=tmp_path)
    records = _read_jsonl(local.jsonl_path)
    assert len(records) == 10
    # Samples cycle through the depths, so each depth gets samples / len(depths) of them.
    assert [r["depth"] for r in records] == [d for _ in range(2) for d in depths]
    for r in records:
        prompt, key = r["prompt"], r["answer"]
        assert re.fullmatch(r"[1-9]\d{4}", key)
        n_tokens = count_tokens(tokenizer, prompt)
        assert n_tokens == r["n_tokens"]
        assert length - 16 <= n_tokens <= length
        assert prompt.startswith(PASSKEY_INSTRUCTION) and prompt.endswith(PASSKEY_QUESTION)
        needle = PASSKEY_NEEDLE.format(key=key)
        assert prompt.count(needle) == 1
        assert prompt.count(key) == 2  # both inside the needle
        # Depth is a fraction of the noise between the instruction and the question.
        haystack_start = len(PASSKEY_INSTRUCTION) + 1
        haystack_chars = len(prompt) - haystack_start - len(PASSKEY_QUESTION) - len(needle) - 2
        depth_seen = (prompt.index(needle) - haystack_start) / haystack_chars
        # The needle snaps to a sentence boundary (≤ 22 bytes away here).
        assert abs(depth_seen - r["depth"]) <= 22 / haystack_chars + 0.01, (depth_seen, r["depth"])


@pytest.mark.parametrize("length", [1024, 2048, 4096], ids=lambda n: f"L{n}")
def test_passkey_lengths_with_a_real_bpe_tokenizer(tmp_path, length):
    """BPE merges across word boundaries, so the fill must measure whole prompts: check it on SmolLM2's."""
    if not SMOLLM2_DIR.is_dir():
        pytest.skip(f"{SMOLLM2_DIR} not found (the embedded SmolLM2 has not been materialized)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    local = generate_task("passkey", tok, length, samples=3, out_dir=tmp_path)
    for r in _read_jsonl(local.jsonl_path):
        assert length - 16 <= count_tokens(tok, r["prompt"]) == r["n_tokens"] <= length
        assert r["prompt"].count(PASSKEY_NEEDLE.format(key=r["answer"])) == 1


def test_passkey_rejects_a_length_too_short_for_the_frame(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        generate_task("passkey", tokenizer, 100, samples=1, out_dir=tmp_path)


def test_task_yaml_loads_with_lm_eval_task_manager(tokenizer, tmp_path):
    local = generate_task("passkey", tokenizer, 256, samples=4, out_dir=tmp_path)
    assert local.yaml_path.parent == tmp_path
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert local.name in manager.all_tasks
    task = manager.load([local.name])["tasks"][local.name]
    config = task.config
    assert config.output_type == "generate_until"
    assert config.generation_kwargs == {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    assert config.process_results is score_contains_answer
    docs = list(task.test_docs())
    assert len(docs) == 4
    assert task.doc_to_text(docs[0]) == _read_jsonl(local.jsonl_path)[0]["prompt"]
    assert (tmp_path / DATASETS_CACHE).is_dir()  # datasets' Arrow copy stays with the task, not in ~/.cache


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize(
    ("generation", "found"),
    [
        (" 68213. Remember it.", True),
        ("68213", True),
        (" the pass key is 68213", True),
        (" 68214.", False),
        (" 968213.", False),  # glued digits do not count
        (" 682135", False),
        (" 6821", False),
        ("", False),
    ],
)
def test_answer_found(generation, found):
    assert answer_found("68213", generation) is found
    assert score_contains_answer({"answer": "68213"}, [generation]) == {"contains_answer": float(found)}


class _PasskeyOracle(LM):
    """A fake lm-eval model that reads the pass key off the prompt and answers it (or a wrong key)."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request in requests:
            key = int(re.search(r"The pass key is (\d{5})\.", request.args[0]).group(1))
            answers.append(f" {key + 1 if self.wrong else key}. Remember it.")
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.mark.parametrize(("wrong", "expected"), [(False, 1.0), (True, 0.0)], ids=["right-key", "wrong-key"])
def test_generated_task_scores_a_fake_model(tokenizer, tmp_path, wrong, expected):
    """The YAML → lm-eval → metric path end to end: a model that knows the key scores 1, one that does not 0."""
    local = generate_task("passkey", tokenizer, 256, samples=3, out_dir=tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=_PasskeyOracle(wrong=wrong), tasks=[local.name], task_manager=manager, log_samples=False
    )
    assert out["results"][local.name]["contains_answer,none"] == expected
    assert out["n-samples"][local.name]["effective"] == 3


# ----------------------------------------------------------------------------------------------------------------
# The lm-eval model


def test_attnkit_model_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("attnkit") is AttnkitLM


def test_attnkit_lm_loads_a_checkpoint_path_through_attnkit_load(tiny_model, monkeypatch):
    import attnkit

    calls = []

    def fake_load(path):
        calls.append(path)
        return tiny_model, tiny_tokenizer()

    monkeypatch.setattr(attnkit, "load", fake_load, raising=False)
    lm = AttnkitLM(pretrained="some/checkpoint", device="cpu", dtype="float32", max_length=64)
    assert calls == ["some/checkpoint"]
    assert lm.model is tiny_model and lm.max_length == 64
    assert lm.get_model_info()["model_checkpoint"] == "some/checkpoint"


def test_attnkit_lm_leaves_the_callers_tokenizer_alone(tiny_model):
    """HFLM gives a pad-less tokenizer a pad token; AttnkitLM must do that on a copy, not the caller's."""
    tok = tiny_tokenizer()
    tok.pad_token = None
    lm = AttnkitLM(pretrained=tiny_model, tokenizer=tok)
    assert tok.pad_token is None
    assert lm.tokenizer.pad_token is not None


def test_generation_passes_the_attnkit_decode_cache(tiny_model, tokenizer, monkeypatch):
    """When make_cache returns a Cache, model.generate receives it as past_key_values; when None, nothing."""
    from transformers import DynamicCache

    import attnkit.cache

    lm = AttnkitLM(pretrained=tiny_model, tokenizer=tokenizer)
    seen = []
    original_generate = tiny_model.generate

    def spy_generate(*args, **kwargs):
        seen.append(kwargs.get("past_key_values"))
        return original_generate(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy_generate)
    context = torch.tensor([tokenizer("The pass key is")["input_ids"]])
    attention_mask = torch.ones_like(context)

    cache = DynamicCache()
    monkeypatch.setattr(attnkit.cache, "make_cache", lambda model: cache)
    out = lm._model_generate(
        context, context.shape[1] + 3, ["\n"], attention_mask=attention_mask, do_sample=False
    )
    assert seen[-1] is cache and out.shape == (1, context.shape[1] + 3)

    monkeypatch.setattr(attnkit.cache, "make_cache", lambda model: None)
    lm._model_generate(context, context.shape[1] + 3, ["\n"], attention_mask=attention_mask, do_sample=False)
    assert seen[-1] is None


# ----------------------------------------------------------------------------------------------------------------
# Harness


def test_run_tasks_on_a_tiny_model(tiny_model, tokenizer, tmp_path, caplog, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"run_tasks tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        results = run_tasks(
            tiny_model,
            tokenizer,
            lengths=(260, 320),
            samples=3,
            batch_size=2,
            work_dir=tmp_path,
            show_progress=False,
        )
    assert [(r.task, r.length, r.n_samples) for r in results] == [("passkey", 260, 3), ("passkey", 320, 3)]
    assert all(0.0 <= r.score <= 1.0 for r in results)
    assert not any("truncat" in rec.getMessage().lower() for rec in caplog.records)  # prompts went in whole
    assert {p.name for p in tmp_path.iterdir()} >= {"attnkit_passkey_260.yaml", "attnkit_passkey_320.jsonl"}

    rows = compare(results, results)
    assert [(row.task, row.length) for row in rows] == [("passkey", 260), ("passkey", 320)]
    # A random model scores ~0: a comparison against it is flagged.
    assert all(row.uninformative for row in rows if row.dense < UNINFORMATIVE_BELOW)


def test_compare_ratio_and_uninformative_flag():
    dense = [TaskResult("passkey", 1024, 1.0, 0.0, 10), TaskResult("passkey", 2048, 0.5, 0.17, 10)]
    patched = [TaskResult("passkey", 2048, 0.25, 0.14, 10), TaskResult("passkey", 1024, 0.9, 0.1, 10)]
    assert compare(dense, patched) == [
        ComparisonRow("passkey", 1024, dense=1.0, patched=0.9, ratio=0.9, uninformative=False),
        ComparisonRow("passkey", 2048, dense=0.5, patched=0.25, ratio=0.5, uninformative=True),
    ]
    zero = compare([TaskResult("passkey", 4096, 0.0, 0.0, 10)], [TaskResult("passkey", 4096, 0.0, 0.0, 10)])
    assert zero[0].ratio is None and zero[0].uninformative
    with pytest.raises(ValueError, match="differ"):
        compare(dense, patched[:1])


@pytest.mark.slow  # ~15 s on 2 cores: lm-eval's CLI indexes its ~15k built-in task configs on every run
def test_cli_entry_point_runs_lm_eval_with_the_attnkit_model(tiny_model, tokenizer, tmp_path):
    """`python -m attnkit.eval.lm_eval --model attnkit --model_args pretrained=DIR ...` end to end."""
    checkpoint = tmp_path / "tiny"
    tiny_model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    local = generate_task("passkey", tokenizer, 256, samples=2, out_dir=tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "attnkit.eval.lm_eval",
        "--model", "attnkit", "--model_args", f"pretrained={checkpoint}",
        "--tasks", local.name, "--include_path", str(local.yaml_path.parent), "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert local.name in proc.stdout and "contains_answer" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# The embedded model


@pytest.mark.slow
def test_smollm2_dense_passkey_at_1k(tmp_path):
    if not SMOLLM2_DIR.is_dir():
        pytest.skip(f"{SMOLLM2_DIR} not found (the embedded SmolLM2 has not been materialized)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    (result,) = run_tasks(model, tok, lengths=(1024,), samples=4, work_dir=tmp_path, show_progress=False)
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    print(
        f"\nSmolLM2-135M dense passkey 1K x 4: score {result.score:.2f}, {cpu:.1f} s CPU, {wall:.1f} s wall"
    )
    assert result.n_samples == 4
    assert result.score >= 0.75
