"""lm-eval's own tasks pass through run_tasks: result parsing, and a clear error for names nobody knows."""

from __future__ import annotations

import math

import pytest

import attnkit
from attnkit.eval.harness import compare, read_external_results, run_tasks


def test_read_external_results_ruler_and_plain_metrics():
    output = {
        "results": {
            "niah_single_1": {"alias": "niah_single_1", "4096,none": 0.9, "4096_stderr,none": "N/A", "8192,none": 0.5,
                              "16384,none": -1},
            "longbench_qasper": {"alias": "x", "f1,none": 0.31, "f1_stderr,none": 0.02, "bad,none": True},
        },
        "n-samples": {"niah_single_1": {"effective": 10}, "longbench_qasper": {"effective": 7}},
    }
    rows = read_external_results(output)
    keyed = {(r.task, r.length): r for r in rows}
    assert set(keyed) == {("niah_single_1", 4096), ("niah_single_1", 8192), ("longbench_qasper:f1", 0)}
    assert keyed[("niah_single_1", 4096)].score == 0.9 and math.isnan(keyed[("niah_single_1", 4096)].stderr)
    assert keyed[("longbench_qasper:f1", 0)].stderr == 0.02 and keyed[("longbench_qasper:f1", 0)].n_samples == 7
    # Dense and patched runs of the same external tasks pair up like bundled ones.
    assert [r.ratio for r in compare(rows, rows)] == [1.0, 1.0, 1.0]


def test_unknown_task_names_say_where_tasks_come_from():
    model, tok = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    with pytest.raises(KeyError, match=r"neither bundled with attnkit .* nor lm-eval tasks"):
        run_tasks(model, tok, ["surely_not_a_task_name"], [256], samples=1, show_progress=False)


def test_ruler_task_runs_through_run_tasks():
    """lm-eval's RULER NIAH (repeated noise) end to end, when its extras are installed (not in CI)."""
    pytest.importorskip("wonderwords")
    pytest.importorskip("nltk")
    model, tok = attnkit.load_model("tiny-llama", dtype="float32", device="cpu")
    try:
        rows = run_tasks(model, tok, ["niah_single_1"], [1024], samples=2, show_progress=False)
    except RuntimeError as err:  # nltk's sentence data needs one download; offline machines cannot
        pytest.skip(f"RULER could not prepare its data here: {err}")
    assert [(r.task, r.length, r.n_samples) for r in rows] == [("niah_single_1", 1024, 2)]
    assert 0.0 <= rows[0].score <= 1.0
