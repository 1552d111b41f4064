"""Recipes: a versioned, typed list of method steps plus what to evaluate.

```yaml
attnkit: 1                      # schema version
name: streaming_llm
description: StreamingLLM attention sinks + recent window, at prefill and decode
steps:
  - method: streaming_llm
    sink: 64
    window: 1024
eval: {tasks: [passkey], lengths: [2048], samples: 10}
```

``Recipe.load`` accepts a built-in name (``attnkit recipes`` lists them), a YAML path or a dict. Every error names
the source (file or built-in), the key path and what was expected, and nothing is applied before the whole recipe
validated. ``to_yaml()`` round-trips: ``Recipe.load(yaml.safe_load(r.to_yaml())) == r``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attnkit.method import Method, PrefillMethod
from attnkit.registry import UnknownMethodError, get_method

SCHEMA_VERSION = 1


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the source, the key and what was expected."""


class EvalSpec(BaseModel):
    """What ``attnkit convert`` evaluates after saving (dense vs patched, same samples)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["passkey"])
    lengths: list[int] = Field(default_factory=lambda: [2048])
    samples: int = Field(10, gt=0, description="samples per task and length")

    @field_validator("lengths")
    @classmethod
    def _positive_lengths(cls, value: list[int]) -> list[int]:
        if any(length <= 0 for length in value):
            raise ValueError(f"lengths must be positive token counts, got {value}")
        return value


class Recipe(BaseModel):
    """A validated recipe. ``steps`` hold the registered methods' own validated configs."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    version: Literal[1] = Field(SCHEMA_VERSION, alias="attnkit")
    name: str
    description: str = ""
    steps: list[Method] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("steps", mode="before")
    @classmethod
    def _build_steps(cls, value: Any) -> list[Method]:
        if not isinstance(value, list):
            raise ValueError("steps must be a list of {method: NAME, ...parameters} mappings")
        steps = []
        for i, step in enumerate(value):
            if isinstance(step, Method):
                steps.append(step)
                continue
            if not isinstance(step, dict) or "method" not in step:
                raise ValueError(f"steps[{i}] must be a mapping with a `method:` key, got {step!r}")
            params = {k: v for k, v in step.items() if k != "method"}
            try:
                method_cls = get_method(step["method"])
            except UnknownMethodError as err:
                raise ValueError(f"steps[{i}].method: {err}") from None
            try:
                steps.append(method_cls.model_validate(params))
            except ValidationError as err:
                raise ValueError(f"steps[{i}] ({step['method']}): {_describe(err)}") from None
        return steps

    @model_validator(mode="after")
    def _one_prefill_per_layer(self) -> Recipe:
        # Two prefill methods on one layer cannot both decide its blocks. Layer lists are checked here as far as
        # they can be without the model ("all" overlaps everything); attnkit.apply checks again with the model.
        prefill = [s for s in self.steps if isinstance(s, PrefillMethod)]
        for a in range(len(prefill)):
            for b in range(a + 1, len(prefill)):
                la, lb = prefill[a].layers, prefill[b].layers
                if la == "all" or lb == "all" or set(la) & set(lb):
                    raise ValueError(
                        f"steps: {prefill[a].method_name} and {prefill[b].method_name} are both prefill methods on "
                        "the same layers; give them disjoint `layers:` lists"
                    )
        return self

    @model_validator(mode="after")
    def _conversion_order(self) -> Recipe:
        from attnkit.convert.conversion import check_conversion_order

        check_conversion_order(self.steps)
        return self

    @model_validator(mode="after")
    def _no_sparse_prefill_on_replaced_layers(self) -> Recipe:
        # A method that replaces a layer's attention (linearize) leaves no softmax prefill to sparsify there. Checked
        # here where the layer lists decide it without the model; attnkit.apply checks every case with the model.
        replacing = [s for s in self.steps if getattr(s, "replaces_attention", False)]
        prefill = [s for s in self.steps if isinstance(s, PrefillMethod)]
        for r in replacing:
            keep = getattr(r, "keep_softmax_every", 0)
            for p in prefill:
                if p.layers == "all":
                    clash = True
                elif r.layers == "all":  # every layer but every keep-th one: clashes unless p names only those
                    clash = not keep or any(i >= 0 and (i + 1) % keep for i in p.layers)
                else:
                    ours = {i for i in r.layers if i < 0 or not keep or (i + 1) % keep}
                    clash = bool(ours & set(p.layers))
                if clash:
                    raise ValueError(
                        f"steps: {r.method_name} replaces the attention of its layers, so {p.method_name} (a sparse "
                        "prefill method) cannot run on them too; give them disjoint `layers:` lists"
                    )
        return self

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str | os.PathLike | dict | Recipe) -> Recipe:
        """A recipe from a built-in name, a YAML file path, a dict, or a Recipe (returned as is)."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, dict):
            return cls._validate(source, "<dict>")
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist")
            return cls._validate(_read_yaml(path), str(path))
        builtin = builtin_recipes()
        if str(source) not in builtin:
            raise RecipeError(
                f"unknown recipe {str(source)!r}: not a file and not a built-in recipe "
                f"(built-in: {', '.join(sorted(builtin)) or 'none'})"
            )
        return cls._validate(_read_yaml(builtin[str(source)]), f"built-in recipe {source!r}")

    @classmethod
    def _validate(cls, data: Any, where: str) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
        if "attnkit" not in data:
            raise RecipeError(f"{where}: missing `attnkit: {SCHEMA_VERSION}` (the recipe schema version)")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise RecipeError(f"{where}: {_describe(err)}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "attnkit": self.version,
            "name": self.name,
            "description": self.description,
            "steps": [step.to_step() for step in self.steps],
            "eval": self.eval.model_dump(mode="json"),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _describe(err: ValidationError) -> str:
    """pydantic's errors as `key.path: message (got value)` lines."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "value_error":
            # Our own validators' messages already say what was expected (and nested steps name their key).
            msg = str(e["ctx"]["error"])
            lines.append(msg if loc == "steps" else f"{loc}: {msg}")
            continue
        msg = "unknown key (typo?)" if e["type"] == "extra_forbidden" else e["msg"]
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        lines.append(f"{loc}: {msg}{got}")
    return "; ".join(lines)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name → file (``recipes/*.yaml``, shipped inside the wheel as ``attnkit/recipes``)."""
    folder = resources.files("attnkit") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}
