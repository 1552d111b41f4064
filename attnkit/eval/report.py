"""Run folders: every ``attnkit eval`` / ``convert`` / ``bench`` run leaves JSON, a markdown summary and plots.

Layout of a run folder (default ``runs/<kind>-<YYYYmmdd-HHMMSS>``)::

    results.json      everything measured, plus the environment (versions, device, command, git commit)
    summary.md        the tables, ready to paste into benchmarks/RESULTS.md
    scores.png        eval: score vs length, dense vs patched, one panel per task
    density.png       eval: block density per layer and query head of the last prefill (heatmap)
    block_masks.png   eval: the computed blocks of a few layers (head 0, batch row 0)
    speed.png         bench: prefill / decode speedup vs length (with the ideal 1/density line) and TTFT

Plots need matplotlib (part of the ``eval`` extra); without it the folder gets JSON and markdown only and the
summary says so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "new_run_dir", "run_dir_path", "write_bench_report", "write_eval_report"]


def run_dir_path(out: str | Path | None, kind: str) -> Path:
    """``out``, or ``runs/<kind>-<timestamp>`` (not created: a run that fails early leaves nothing behind)."""
    return Path(out) if out is not None else Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(out: str | Path | None, kind: str) -> Path:
    """:func:`run_dir_path`, created (an existing folder is reused, its files overwritten)."""
    path = run_dir_path(out, kind)
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What produced the numbers: library versions, device name, command line, git commit, date."""
    import transformers

    import attnkit

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([_program(), *sys.argv[1:]]),
        "attnkit": attnkit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        env["device"] = torch.cuda.get_device_name(dev)
    else:
        env["device"] = "cpu"
    if os.environ.get("ATTNKIT_COMMIT"):  # a copy whose .git lags the tree it runs (the GPU machine's)
        env["commit"] = os.environ["ATTNKIT_COMMIT"]
        return env
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(attnkit.__file__).parent,
        )
        env["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return "attnkit" if name in ("__main__.py", "attnkit") else name


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=1))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


# ------------------------------------------------------------------------------------------------------- eval
def write_eval_report(
    out: Path,
    *,
    title: str,
    rows: Sequence[Any],
    env: dict[str, Any],
    mean_density: float | None = None,
    per_layer: dict[int, dict] | None = None,
    per_head: dict[int, list[float]] | None = None,
    block_masks: dict[int, Any] | None = None,
    fidelity: Sequence[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write an eval run: ``rows`` are :class:`attnkit.eval.harness.ComparisonRow`; returns the files written.

    ``per_layer`` / ``per_head`` / ``block_masks`` come from ``model.attnkit_stats`` after the patched run (the last
    prefill); ``extra`` holds anything else measured (e.g. fidelity metrics), stored in the JSON and the summary.
    """
    files = [out / "results.json", out / "summary.md"]
    _write_json(files[0], {
        "kind": "eval", "title": title, "env": env, "mean_density": mean_density, "rows": list(rows),
        "per_layer": per_layer or {}, "per_head_density": per_head or {}, "fidelity": list(fidelity or []),
        "extra": extra or {},
    })
    lines = [f"# {title}", "", _env_line(env), ""]
    if mean_density is not None:
        lines += [f"Mean block density over layers (last prefill): {mean_density:.3f}", ""]
    lines += ["| task | length | dense | patched | patched/dense | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = "dense < 0.8: uninformative" if r.uninformative else ""
        lines.append(f"| {r.task} | {r.length} | {r.dense:.2f} | {r.patched:.2f} | {_fmt(r.ratio)} | {note} |")
    if fidelity:
        lines += ["", "## Fidelity (built-in corpus; KL and NLL over positions past the offset)", "",
                  "| length | offset | KL(dense‖patched) | top-1 agreement | NLL dense | NLL patched | recall | oracle recall "
                  "| density |", "|---|---|---|---|---|---|---|---|---|"]
        for f in fidelity:
            lines.append(
                f"| {f['length']} | {f['offset']} | {f['kl']:.4f} | {f['top1_agreement']:.3f} | {_fmt(f['nll_dense'], '.3f')} "
                f"| {_fmt(f['nll_patched'], '.3f')} | {_fmt(f.get('recall'), '.3f')} | {_fmt(f.get('oracle_recall'), '.3f')} "
                f"| {_fmt(f.get('density'), '.3f')} |"
            )
    if extra:
        lines += ["", "## Other measurements", "", "```", json.dumps(_jsonable(extra), indent=1), "```"]
    plt = _pyplot()
    if plt is None:
        lines += ["", "(no plots: matplotlib is not installed; `pip install 'attnkit[eval]'`)"]
    else:
        if rows:
            files.append(_plot_scores(plt, out / "scores.png", title, rows))
        if per_head:
            files.append(_plot_density(plt, out / "density.png", title, per_head))
        if block_masks:
            files.append(_plot_block_masks(plt, out / "block_masks.png", title, block_masks))
        lines += ["", *(f"![{p.stem}]({p.name})" for p in files[2:])]
    files[1].write_text("\n".join(lines) + "\n")
    return files


def _env_line(env: dict[str, Any]) -> str:
    return (f"{env.get('date')} · {env.get('device')} · torch {env.get('torch')} · transformers "
            f"{env.get('transformers')} · attnkit {env.get('attnkit')} · commit {env.get('commit')} · "
            f"`{env.get('command')}`")


def _plot_scores(plt, path: Path, title: str, rows) -> Path:
    tasks = sorted({r.task for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sel = sorted((r for r in rows if r.task == task), key=lambda r: r.length)
        xs = [r.length for r in sel]
        ax.plot(xs, [r.dense for r in sel], "o-", label="dense")
        ax.plot(xs, [r.patched for r in sel], "s--", label="patched")
        ax.set(title=task, xlabel="prompt tokens", ylabel="score", ylim=(-0.05, 1.05), xscale="log", xticks=xs)
        ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 else str(x) for x in xs])
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_density(plt, path: Path, title: str, per_head: dict[int, list[float]]) -> Path:
    layers = sorted(per_head)
    grid = torch.tensor([per_head[i] for i in layers])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * grid.shape[1] + 2), max(3, 0.22 * len(layers) + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set(xlabel="query head", ylabel="layer", title=f"{title}: block density (last prefill)")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_block_masks(plt, path: Path, title: str, block_masks: dict[int, Any], show: int = 3) -> Path:
    layers = sorted(block_masks)
    picked = sorted({layers[0], layers[len(layers) // 2], layers[-1]})[:show]
    fig, axes = plt.subplots(1, len(picked), figsize=(4 * len(picked), 4), squeeze=False)
    for ax, idx in zip(axes[0], picked, strict=True):
        mask = block_masks[idx]
        blocks = mask.to_dense()[0, 0].float().cpu()
        visible = mask.causal_blocks().cpu()
        image = torch.where(visible, blocks, torch.full_like(blocks, float("nan")))
        cmap = plt.get_cmap("Blues").with_extremes(bad="#d9d9d9")
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=f"layer {idx}, head 0 ({mask.density():.2f})", xlabel="key block", ylabel="query block")
    fig.suptitle(f"{title}: computed blocks (blue), skipped (white), above the diagonal (grey)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ bench
def write_bench_report(
    out: Path, *, title: str, rows: Sequence[Any], comparisons: Sequence[Any], env: dict[str, Any]
) -> list[Path]:
    """Write a bench run: ``rows`` are :class:`~attnkit.eval.speed.SpeedRow`, ``comparisons`` their pairing."""
    files = [out / "results.json", out / "summary.md"]
    _write_json(files[0], {"kind": "bench", "title": title, "env": env, "rows": list(rows),
                           "comparisons": list(comparisons)})
    cpu = any(r.device != "cuda" for r in rows)
    lines = [f"# {title}", "", _env_line(env), ""]
    if cpu:
        lines += ["**CPU run: these timings show the code runs; they are not speed claims.**", ""]
    lines += [
        "| mode | length | batch | TTFT ms | TPOT ms | peak MB | KV MB | KV B/token | density |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.length} | {r.batch} | {r.prefill_ms:.2f} | {_fmt(r.decode_ms_per_token)} | "
            f"{_fmt(r.peak_memory_mb, '.0f')} | {r.kv_cache_mb:.1f} | {r.kv_bytes_per_token:.0f} | "
            f"{_fmt(r.density, '.3f')} |"
        )
    if comparisons:
        lines += ["", "| length | density | ideal (1/density) | prefill speedup | decode speedup | KV patched/dense |",
                  "|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(
                f"| {c.length} | {_fmt(c.density, '.3f')} | {_fmt(c.ideal_prefill_speedup)} | {c.prefill_speedup:.2f} | "
                f"{_fmt(c.decode_speedup)} | {_fmt(c.kv_ratio)} |"
            )
    plt = _pyplot()
    if plt is None:
        lines += ["", "(no plots: matplotlib is not installed; `pip install 'attnkit[eval]'`)"]
    elif rows:
        files.append(_plot_speed(plt, out / "speed.png", title, rows, comparisons, cpu))
        lines += ["", "![speed](speed.png)"]
    files[1].write_text("\n".join(lines) + "\n")
    return files


def _plot_speed(plt, path: Path, title: str, rows, comparisons, cpu: bool) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, marker in (("dense", "o-"), ("patched", "s--")):
        sel = sorted((r for r in rows if r.mode == mode), key=lambda r: r.length)
        if sel:
            axes[0].plot([r.length for r in sel], [r.prefill_ms for r in sel], marker, label=f"{mode} TTFT")
    axes[0].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms", title="time to first token")
    axes[0].legend()
    if comparisons:
        xs = [c.length for c in comparisons]
        axes[1].plot(xs, [c.prefill_speedup for c in comparisons], "o-", label="prefill")
        if all(c.decode_speedup for c in comparisons):
            axes[1].plot(xs, [c.decode_speedup for c in comparisons], "^-", label="decode")
        if all(c.ideal_prefill_speedup for c in comparisons):
            axes[1].plot(xs, [c.ideal_prefill_speedup for c in comparisons], "k:", label="ideal attention (1/density)")
        axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(xscale="log", xlabel="prompt tokens", ylabel="dense / patched time", title="speedup")
    axes[1].legend()
    fig.suptitle(title + (" (CPU: not a speed claim)" if cpu else ""))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
