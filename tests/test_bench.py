"""Model-level speed bench (functional on CPU), run folders, and the eval/bench CLI paths."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import attnkit
from attnkit.cli import app
from attnkit.eval.report import write_bench_report
from attnkit.eval.speed import SpeedRow, bench_model, compare_speed, kv_cache_bytes
from attnkit.models import MODEL_SHAPES, ModelNotFoundError, random_model

STREAMING = {"attnkit": 1, "name": "s", "steps": [{"method": "streaming_llm", "sink": 16, "window": 48, "block_size": 16}]}
runner = CliRunner(env={"COLUMNS": "200"})


def test_bench_dense_and_patched_rows():
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    dense_only = bench_model(model, [64], new_tokens=2, repeats=1, warmup=0, show_progress=False)
    assert [r.mode for r in dense_only] == ["dense"] and compare_speed(dense_only) == []

    attnkit.apply(model, STREAMING)
    rows = bench_model(model, [64, 200], new_tokens=3, repeats=2, warmup=1, show_progress=False)
    assert [(r.mode, r.length) for r in rows] == [("dense", 64), ("patched", 64), ("dense", 200), ("patched", 200)]
    for r in rows:
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.device == "cpu" and r.peak_memory_mb is None
    cfg = model.config
    dense_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32
    d200, p200 = rows[2], rows[3]
    assert d200.kv_bytes_per_token == dense_per_token
    # The sink+window cache holds sink + window - 1 tokens after decoding, whatever the context.
    assert p200.kv_cache_mb * 2**20 == (16 + 48 - 1) * dense_per_token
    assert 0 < p200.density < 1
    _, c200 = compare_speed(rows)
    assert c200.kv_ratio == pytest.approx((16 + 48 - 1) / 203)
    assert c200.ideal_prefill_speedup == pytest.approx(1 / p200.density)


def test_kv_cache_bytes_counts_every_layer():
    from transformers import DynamicCache

    model, _ = attnkit.load_model("tiny-qwen2", dtype="float32", device="cpu")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (2, 30)), past_key_values=cache, use_cache=True)
    cfg = model.config
    assert kv_cache_bytes(cache) == 2 * 2 * 30 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4


def test_random_model_shapes():
    model, _ = random_model("smollm2-135m", 1, dtype="float32", device="cpu")
    attn = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim) == (9, 3, 64)
    assert set(MODEL_SHAPES) >= {"llama3-8b", "smollm2-135m", "qwen2.5-0.5b"}
    with pytest.raises(ModelNotFoundError, match="unknown shape"):
        random_model("gpt5", 1)
    with pytest.raises(ValueError, match="layers"):
        random_model("smollm2-135m", 0)


def test_load_model_random_spec():
    from attnkit.models import load_model

    model, tokenizer = load_model("random:smollm2-135m:2", device="cpu")
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 3
    assert tokenizer.pad_token is not None
    with pytest.raises(ModelNotFoundError, match="random:SHAPE:LAYERS"):
        load_model("random:smollm2-135m", device="cpu")
    with pytest.raises(ModelNotFoundError, match="unknown shape"):
        load_model("random:gpt5:2", device="cpu")


def test_bench_report_files(tmp_path):
    rows = [
        SpeedRow("dense", 128, 1, 10.0, 2.0, None, 1.0, 4096.0, None, "cpu"),
        SpeedRow("patched", 128, 1, 5.0, 1.0, None, 0.5, 2048.0, 0.4, "cpu"),
    ]
    files = write_bench_report(tmp_path, title="t", rows=rows, comparisons=compare_speed(rows), env={"device": "cpu"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["comparisons"][0]["prefill_speedup"] == 2.0 and data["comparisons"][0]["kv_ratio"] == 0.5
    summary = (tmp_path / "summary.md").read_text()
    assert "not speed claims" in summary and "| patched | 128 |" in summary
    pytest.importorskip("matplotlib")
    assert (tmp_path / "speed.png").stat().st_size > 1000 and tmp_path / "speed.png" in files


def test_cli_bench_writes_a_run_folder(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--recipe", "sliding_window", "--lengths", "128",
                                 "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "not speed claims" in result.output and "prefill" in result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["dense", "patched"]


def test_bench_on_text_uses_windows_of_it(monkeypatch):
    model, _ = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    seen = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(k["input_ids"].clone()) or real_forward(*a, **k))
    text = torch.arange(10, 47)  # 37 tokens, shorter than the prompt: windows wrap around
    bench_model(model, [100], batch=2, new_tokens=0, repeats=1, warmup=0, show_progress=False, text=text)
    prompt = seen[0]
    assert prompt.shape == (2, 100)
    for row in prompt:  # consecutive tokens of the (cyclic) text
        assert torch.equal((row[1:] - 10) % 37, (row[:-1] - 10 + 1) % 37)


def test_cli_bench_on_corpus_text(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--model", "tiny-llama", "--recipe", "xattention", "--lengths", "128",
                                 "--text", "corpus", "--new-tokens", "0", "--repeats", "1", "--warmup", "0",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "corpus" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["eval"], "give a checkpoint folder"),
    (["eval", "--model", "tiny-llama"], "give a checkpoint folder"),
    (["eval", "some-dir", "--recipe", "sliding_window"], "carries its own recipe"),
    (["bench", "--shape", "nope"], "unknown shape"),
    (["bench", "--shape", "llama3-8b", "--text", "corpus"], "needs a real model"),
    (["bench", "--text", "lorem"], "text must be"),
])
def test_cli_errors(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli_eval_model_and_recipe_writes_a_run_folder(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--recipe", "streaming_llm", "--tasks", "passkey",
                                 "--lengths", "300", "--samples", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["rows"][0]["task"] == "passkey" and data["rows"][0]["length"] == 300
    assert set(data["per_head_density"]) == {"0", "1"} and len(data["per_head_density"]["0"]) == 4
    assert "| passkey | 300 |" in (out / "summary.md").read_text()
    pytest.importorskip("matplotlib")
    assert {"scores.png", "density.png", "block_masks.png"} <= {p.name for p in out.iterdir()}


def test_eval_fidelity_rows_in_report(tmp_path):
    from attnkit.pipeline import evaluate

    recipe = {"attnkit": 1, "name": "w", "steps": [{"method": "sliding_window", "window": 64, "block_size": 16}],
              "eval": {"tasks": ["passkey"], "lengths": [400], "samples": 1}}
    report = evaluate(model="tiny-qwen2", recipe=recipe, samples=1, out=tmp_path / "run", fidelity=True,
                      show_progress=False)
    (row,) = report.fidelity
    assert row["length"] == 400 and row["offset"] == 200
    assert row["kl"] > 0 and 0 <= row["top1_agreement"] <= 1
    assert 0 < row["recall"] <= row["oracle_recall"] <= 1 and 0 < row["density"] < 1
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["fidelity"][0]["recall"] == pytest.approx(row["recall"])
    assert "## Fidelity" in (tmp_path / "run" / "summary.md").read_text()
