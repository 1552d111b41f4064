"""The ``attnkit`` command: convert, calibrate, distill, eval, bench, recipes, inspect, models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training attention toolkit for HF causal LMs.")
console = Console()
err_console = Console(stderr=True)


def _int_list(text: str | None) -> list[int] | None:
    """`2048,4k,8K` → [2048, 4096, 8192]."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a length (use e.g. 2048 or 2k)") from None
    return out


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2)


def print_report(report) -> None:
    """The dense-vs-patched table: method, mean density over layers, task scores."""
    density = "n/a" if report.mean_density is None else f"{report.mean_density:.3f}"
    table = Table(title=f"attnkit {report.recipe} on {report.model}")
    for col in ("method", "mean density", "task", "length", "dense", "patched", "patched/dense"):
        table.add_column(col, justify="right" if col not in ("method", "task") else "left")
    for row in report.rows:
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.2f}"
        flag = " (dense < 0.8: uninformative)" if row.uninformative else ""
        table.add_row(
            report.methods_summary(), density, row.task, str(row.length), f"{row.dense:.2f}", f"{row.patched:.2f}", ratio + flag
        )
    if not report.rows:
        table.add_row(report.methods_summary(), density, "-", "-", "-", "-", "-")
    console.print(table)
    if report.out:
        console.print(f"checkpoint: {report.out}  (reload: attnkit.load({str(report.out)!r}))", soft_wrap=True)
    if report.seconds:
        console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
    for f in getattr(report, "fidelity", []):
        recall = "" if "recall" not in f else (
            f", attention recall {f['recall']:.3f} (oracle {f['oracle_recall']:.3f} at density {f['density']:.3f})"
        )
        console.print(f"fidelity @{f['length']}: KL {f['kl']:.4f}, top-1 {f['top1_agreement']:.3f}, "
                      f"NLL {f['nll_dense']:.3f} → {f['nll_patched']:.3f}{recall}", soft_wrap=True)
    for conversion in getattr(report, "conversion", []) or []:
        console.print(_describe_conversion(conversion), soft_wrap=True, highlight=False)
    if getattr(report, "report_dir", None):
        console.print(f"run folder: {report.report_dir} (results.json, summary.md, plots)", soft_wrap=True)


def _describe_conversion(conversion: dict) -> str:
    """One or two lines per conversion step: what changed, the KV bytes per token, the recovery's loss."""
    if conversion["method"] == "gqa":
        before, after = conversion["kv_heads"]
        text = f"gqa: {before} → {after} KV heads"
    else:
        ranks = sorted({layer["rank"] for layer in conversion["layers"].values()})
        rope = next(iter(conversion["layers"].values()))["rope_dim"] if conversion["layers"] else 0
        text = f"mla: {len(conversion['layers'])} layers, latent rank {'/'.join(map(str, ranks))} + rope key {rope}"
    kv = conversion["kv_bytes_per_token"]
    text += f"; KV cache {kv['before']} → {kv['after']} bytes/token in bf16 ({kv['after'] / kv['before'] - 1:+.0%})"
    recovery = conversion.get("recovery")
    if recovery:
        text += (f"\n  recovery: {recovery['steps']} steps, {recovery['tokens']:,} tokens, {recovery['seconds']:.0f} s, "
                 f"loss {recovery['first_loss']:.4f} → {recovery['loss']:.4f}")
    return text


@app.command()
def convert(
    recipe: str = typer.Option(..., "--recipe", "-r", help="built-in recipe name or YAML path"),
    model: str = typer.Option("llama", "--model", "-m", help="alias (llama, qwen, tiny-llama), HF id, dir or .gguf"),
    out: Path = typer.Option(None, "--out", "-o", help="checkpoint folder (default runs/<recipe>-<model>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="evaluate dense vs patched after saving"),
    tasks: str = typer.Option(None, help="comma-separated tasks (default: the recipe's eval block)"),
    lengths: str = typer.Option(None, help="comma-separated prompt lengths, e.g. 2k,4k"),
    samples: int = typer.Option(None, help="samples per task and length"),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default fp32 on CPU, bf16 on GPU)"),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)"),
    fidelity: bool = typer.Option(False, "--fidelity", help="also KL/top-1 vs dense, NLL and attention recall"),
) -> None:
    """Load → apply a recipe → save → evaluate dense vs patched, and print the comparison."""
    from attnkit.pipeline import convert as run_convert

    if out is None:
        out = Path("runs") / f"{Path(recipe).stem}-{Path(model).name}"
    try:
        report = run_convert(
            recipe,
            model,
            out,
            overwrite=overwrite,
            evaluate=evaluate,
            tasks=tasks.split(",") if tasks else None,
            lengths=_int_list(lengths),
            samples=samples,
            dtype=dtype,
            device=device,
            fidelity=fidelity,
        )
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        _fail(err)
    print_report(report)


@app.command()
def calibrate(
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="built-in recipe name or YAML path (xattention, minference, seer_attention)"
    ),
    model: str = typer.Option("llama", "--model", "-m", help="alias, HF id, folder or .gguf"),
    out: Path = typer.Option(None, "--out", "-o", help="checkpoint folder (default runs/<recipe>-<model>-calibrated)"),
    length: str = typer.Option(None, help="tokens of calibration text, e.g. 4k (default: the recipe's)"),
    target_recall: float = typer.Option(
        None, help="XAttention, SeerAttention: fraction of the true attention mass to keep"
    ),
    target_density: float = typer.Option(None, help="fraction of the causally visible blocks/pairs to compute"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    dtype: str = typer.Option(None),
    device: str = typer.Option(None),
) -> None:
    """Calibrate a recipe's thresholds / per-head patterns on calibration text and save the checkpoint."""
    from attnkit.pipeline import calibrate as run_calibrate

    if out is None:
        out = Path("runs") / f"{Path(recipe).stem}-{Path(model).name}-calibrated"
    lengths = _int_list(length)
    try:
        report = run_calibrate(
            recipe,
            model,
            out,
            length=lengths[0] if lengths else None,
            target_recall=target_recall,
            target_density=target_density,
            overwrite=overwrite,
            dtype=dtype,
            device=device,
        )
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        _fail(err)
    for method, layers in report.choices.items():
        console.print(f"[bold]{method}[/bold]: {len(layers)} layers calibrated in {report.seconds['calibrate']:.1f} s")
        for layer, heads in sorted(layers.items()):
            console.print(f"  layer {layer:>3}: {_describe_heads(heads)}", soft_wrap=True)
    console.print(f"saved: {report.out}")


@app.command()
def distill(
    recipe: str = typer.Option("seer_attention", "--recipe", "-r", help="built-in recipe name or YAML path with a "
                               "seer_attention or linearize step (hedgehog, lolcats)"),
    model: str = typer.Option("llama", "--model", "-m", help="alias (llama, qwen, tiny-llama), HF id, dir or .gguf"),
    out: Path = typer.Option(None, "--out", "-o", help="checkpoint folder (default runs/<recipe>-<model>-distilled)"),
    steps: int = typer.Option(None, help="optimizer steps (default: the recipe's train.steps)"),
    data: str = typer.Option(None, help='training text: "builtin:corpus", a Hugging Face dataset name, or a local '
                             "file/folder (default: the recipe's train.data)"),
    seq_len: int = typer.Option(None, "--seq-len", help="tokens per training sequence (default: the recipe's)"),
    batch_size: int = typer.Option(None, "--batch-size", help="sequences per process and step (default: the recipe's)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from <out>.train/state.pt"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out (and an unfinished run) if they exist"),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default fp32 on CPU, bf16 on GPU)"),
    device: str = typer.Option(None, help="cpu | cuda (default: accelerate's device for this process)"),
    fsdp: bool = typer.Option(False, "--fsdp", help="shard the frozen model with FSDP2 over the processes (automatic "
                              "under an accelerate FSDP2 config; the trained modules stay replicated)"),
) -> None:
    """Self-distil a recipe's SeerAttention gates or linear-attention feature maps (under accelerate) and save.

    Runs in one process, or on several GPUs with `accelerate launch -m attnkit distill ...`. The loss curve
    (loss.jsonl, loss.png) and the resumable state go to <out>/train/ (to <out>.train/ while running).
    """
    from accelerate import PartialState

    from attnkit.train.distill import distill as run_distill

    if out is None:
        out = Path("runs") / f"{Path(recipe).stem}-{Path(model).name}-distilled"
    try:
        report = run_distill(
            recipe, model, out, data=data, steps=steps, seq_len=seq_len, batch_size=batch_size, overwrite=overwrite,
            resume=resume, dtype=dtype, device=device, fsdp=fsdp,
        )
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, ImportError) as err:
        _fail(err)
    if not PartialState().is_main_process:
        return
    console.print(report.summary(), soft_wrap=True, highlight=False)
    for r in report.results:
        if r.out_dir is not None:
            plot = r.out_dir / "loss.png"
            curve = f"{r.out_dir / 'loss.jsonl'}" + (f", {plot}" if plot.is_file() else "")
            console.print(f"loss curve: {curve}", soft_wrap=True, highlight=False)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
    console.print(f"checkpoint: {report.out}  (evaluate: attnkit eval {report.out})", soft_wrap=True, highlight=False)


def _describe_heads(heads: list) -> str:
    """One line per layer: thresholds, or pattern counts with the mean recall/density the search measured."""
    if heads and isinstance(heads[0], dict):
        counts: dict[str, int] = {}
        for h in heads:
            counts[h["pattern"]] = counts.get(h["pattern"], 0) + 1
        recall = sum(h["recall"] for h in heads) / len(heads)
        density = sum(h["density"] for h in heads) / len(heads)
        kinds = ", ".join(f"{n}× {p}" for p, n in sorted(counts.items()))
        return f"{kinds}; recall {recall:.3f} at density {density:.3f}"
    return "thresholds " + " ".join(f"{t:g}" for t in heads)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(None, help="an attnkit checkpoint folder (or use --model with --recipe)"),
    model: str = typer.Option(None, "--model", "-m", help="model to patch in memory with --recipe"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="built-in recipe name or YAML path (with --model)"),
    tasks: str = typer.Option(None, help="comma-separated tasks (default: the recipe's eval block)"),
    lengths: str = typer.Option(None, help="comma-separated prompt lengths, e.g. 2k,4k"),
    samples: int = typer.Option(10, help="samples per task and length"),
    out: Path = typer.Option(None, "--out", "-o", help="run folder (default runs/eval-<timestamp>)"),
    fidelity: bool = typer.Option(False, "--fidelity", help="also KL/top-1 vs dense, NLL and attention recall"),
    dtype: str = typer.Option(None),
    device: str = typer.Option(None),
) -> None:
    """Evaluate dense vs patched on locally generated tasks (a checkpoint, or --model with --recipe)."""
    from attnkit.eval.report import run_dir_path
    from attnkit.pipeline import evaluate

    if (checkpoint is None) == (model is None) or (model is None) != (recipe is None):
        _fail(ValueError("give a checkpoint folder, or --model and --recipe (a checkpoint carries its own recipe)"))
    try:
        report = evaluate(
            checkpoint, tasks.split(",") if tasks else None, _int_list(lengths), samples, dtype=dtype, device=device,
            model=model, recipe=recipe, out=run_dir_path(out, "eval"), fidelity=fidelity,
        )
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        _fail(err)
    print_report(report)


@app.command()
def bench(
    checkpoint: Path = typer.Argument(None, help="an attnkit checkpoint folder (or --model / --shape)"),
    model: str = typer.Option("llama", "--model", "-m", help="alias, HF id, folder or .gguf"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="patch with this recipe (omit: dense only)"),
    shape: str = typer.Option(None, help="random-weight model of a real architecture: llama3-8b, smollm2-135m, "
                                         "qwen2.5-0.5b (for lengths the embedded models cannot reach)"),
    layers: int = typer.Option(2, help="decoder layers of the --shape model"),
    lengths: str = typer.Option("4k", help="comma-separated prompt lengths, e.g. 4k,16k,32k"),
    batch: int = typer.Option(1, help="sequences per forward"),
    new_tokens: int = typer.Option(16, help="greedy decode steps timed after the prefill"),
    repeats: int = typer.Option(3, help="timed runs (median)"),
    warmup: int = typer.Option(1, help="untimed runs first"),
    out: Path = typer.Option(None, "--out", "-o", help="run folder (default runs/bench-<timestamp>)"),
    dtype: str = typer.Option(None),
    device: str = typer.Option(None),
    text: str = typer.Option("random", help="prompts: random ids, or 'corpus' (built-in prose; use it for "
                                            "input-dependent methods, whose density differs on random ids)"),
) -> None:
    """Time to first token, time per output token, peak memory and KV bytes/token, dense vs patched."""
    from attnkit.eval.report import run_dir_path
    from attnkit.pipeline import bench as run_bench

    try:
        report = run_bench(
            model, recipe, checkpoint=checkpoint, shape=shape, layers=layers, lengths=_int_list(lengths),
            batch=batch, new_tokens=new_tokens, warmup=warmup, repeats=repeats, dtype=dtype, device=device,
            out=run_dir_path(out, "bench"), text=text,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    table = Table(title=f"attnkit bench: {report.title}")
    for col in ("mode", "length", "TTFT ms", "TPOT ms", "peak MB", "KV B/token", "density"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in report.rows:
        table.add_row(
            r.mode, str(r.length), f"{r.prefill_ms:.2f}",
            "n/a" if r.decode_ms_per_token is None else f"{r.decode_ms_per_token:.2f}",
            "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}",
            f"{r.kv_bytes_per_token:.0f}", "n/a" if r.density is None else f"{r.density:.3f}",
        )
    console.print(table)
    for c in report.comparisons:
        ideal = "" if c.ideal_prefill_speedup is None else f" (attention-only ideal {c.ideal_prefill_speedup:.2f}x)"
        decode = "" if c.decode_speedup is None else f", decode {c.decode_speedup:.2f}x"
        console.print(f"{c.length} tokens: prefill {c.prefill_speedup:.2f}x{ideal}{decode}, KV {c.kv_ratio:.2f} of dense")
    if report.device != "cuda":
        console.print("[yellow]CPU run: these timings show the code runs; they are not speed claims.[/]")
    console.print(f"run folder: {report.report_dir}", soft_wrap=True)


@app.command()
def recipes(name: str = typer.Argument(None, help="show this recipe's YAML")) -> None:
    """List the built-in recipes, or show one."""
    from attnkit.recipe import Recipe, builtin_recipes

    if name:
        try:
            console.print(Recipe.load(name).to_yaml(), highlight=False, markup=False)
        except ValueError as err:
            _fail(err)
        return
    table = Table(title="built-in recipes")
    table.add_column("name")
    table.add_column("methods")
    table.add_column("description")
    for recipe_name in sorted(builtin_recipes()):
        recipe = Recipe.load(recipe_name)
        table.add_row(recipe_name, ", ".join(s.method_name for s in recipe.steps), recipe.description)
    console.print(table)


@app.command()
def inspect(checkpoint: Path = typer.Argument(..., help="an attnkit checkpoint folder")) -> None:
    """Per-layer methods, the recipe, and KV-cache bytes per token of a checkpoint (reads files only)."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        _fail(FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no config.json)"))
    config = json.loads(config_path.read_text())
    block = config.get("attnkit")
    layers = config.get("num_hidden_layers", 0)
    kv_heads = config.get("num_key_value_heads", config.get("num_attention_heads", 0))
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(dtype), 2)
    kv_bytes = 2 * layers * kv_heads * head_dim * elem
    console.print(f"[bold]{checkpoint}[/]: {config.get('architectures', ['?'])[0]}, {layers} layers, "
                  f"{config.get('num_attention_heads')} q / {kv_heads} kv heads, head_dim {head_dim}")
    mla = _mla_layer_values(block)
    if mla:  # MLA layers cache latent + rope key instead of 2·Hkv·D values
        plain = layers - len(mla)
        kv_bytes = (2 * plain * kv_heads * head_dim + sum(mla.values())) * elem
        console.print(f"KV cache: {kv_bytes} bytes/token ({dtype}: {len(mla)} MLA layers caching latent + rope key "
                      f"({'/'.join(map(str, sorted(set(mla.values()))))} values), {plain} GQA layers × 2 × {kv_heads} heads "
                      f"× {head_dim}; × {elem} B)")
    else:
        console.print(f"KV cache: {kv_bytes} bytes/token ({dtype}: 2 × {layers} layers × {kv_heads} heads × {head_dim} × {elem} B)")
    if block is None:
        console.print("no attnkit block: a plain (dense) checkpoint")
        return
    recipe = block["recipe"]
    console.print(f"recipe [bold]{recipe['name']}[/] (attnkit {block['versions'].get('attnkit')}, "
                  f"transformers {block['versions'].get('transformers')})")
    table = Table()
    for col in ("layers", "prefill", "decode"):
        table.add_column(col)
    groups: dict[tuple, list[int]] = {}
    for idx, methods in block["layers"].items():
        groups.setdefault((methods.get("prefill", "dense"), methods.get("decode", "dense")), []).append(int(idx))
    for (prefill, decode), idxs in groups.items():
        table.add_row(_ranges(sorted(idxs)), prefill, decode)
    console.print(table)
    for step in recipe["steps"]:
        params = ", ".join(f"{k}={v}" for k, v in step.items() if k != "method")
        console.print(f"  {step['method']}: {params}")
        if step["method"] == "linearize":
            head_dim_or = int(head_dim)
            kind, fd = step.get("feature_map", "hedgehog"), int(step.get("feature_dim", 64))
            features = {"hedgehog": 2 * fd, "performer": fd, "elu": head_dim_or, "cosformer": 2 * head_dim_or}[kind]
            state = kv_heads * features * (head_dim_or + 1) * 4  # fp32 Σφ(k)vᵀ and Σφ(k)
            window = max(0, int(step.get("window", 0)) - 1) * 2 * kv_heads * head_dim_or * elem
            console.print(f"    decode state per linearized layer: {(state + window) / 1024:.1f} KiB per sequence, "
                          "constant in the context length")
        if step["method"] == "streaming_llm" and step.get("evict", True):
            bound = step["sink"] + step["window"]
            console.print(f"    decode KV cache bounded at {bound} tokens = {bound * kv_bytes / 2**20:.1f} MiB per sequence")


def _mla_layer_values(block: dict | None) -> dict[int, int]:
    """Layer → values cached per token (latent rank + rope_dim) of a checkpoint's MLA layers ({} if none)."""
    for step in (block or {}).get("recipe", {}).get("steps", []):
        if step["method"] == "mla" and step.get("layer_ranks"):
            return {int(i): int(r) + int(step["rope_dim"]) for i, r in step["layer_ranks"].items()}
    return {}


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="an attnkit checkpoint of an MLA-converted model"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the native checkpoint"),
    format: str = typer.Option("deepseek-v3", "--format", help="deepseek-v3 (DeepseekV3ForCausalLM, dense MLPs)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Write an MLA checkpoint as a native DeepSeek-V3 checkpoint (plain from_pretrained, vLLM, SGLang)."""
    import attnkit
    from attnkit.convert.mla import export_deepseek_v3

    if format != "deepseek-v3":
        _fail(ValueError(f"unknown export format {format!r} (supported: deepseek-v3)"))
    try:
        model, tokenizer = attnkit.load(checkpoint)
        report = export_deepseek_v3(model, out, tokenizer=tokenizer, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    exact = "exact" if report["exact"] else "approximate: " + "; ".join(report["approximations"])
    console.print(f"DeepseekV3ForCausalLM written to {out}: kv_lora_rank {report['kv_lora_rank']}, "
                  f"qk_rope_head_dim {report['qk_rope_head_dim']} ({exact})", soft_wrap=True, highlight=False)


def _ranges(idxs: list[int]) -> str:
    out, start = [], None
    for i, idx in enumerate(idxs):
        start = idx if start is None else start
        if i + 1 == len(idxs) or idxs[i + 1] != idx + 1:
            out.append(str(start) if start == idx else f"{start}-{idx}")
            start = None
    return ",".join(out)


@app.command()
def models() -> None:
    """The model aliases attnkit knows (any HF id, local folder or .gguf path works too)."""
    from attnkit.models import list_models

    table = Table(title="model aliases")
    aliases = list_models()
    fields = [f for f in ("alias", "description", "architecture", "heads", "context", "source", "cached")]
    for f in fields:
        table.add_column(f)
    for alias in aliases:
        table.add_row(*(str(getattr(alias, f, "")) for f in fields))
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
