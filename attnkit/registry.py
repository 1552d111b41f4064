"""The one registry: method name → Method class.

Recipes, checkpoints and the CLI all resolve method names here, so a method exists for attnkit the moment its
module is imported and its class is decorated with :func:`register`. Built-in methods are imported lazily on the
first lookup (``attnkit.sparsify`` etc.), which keeps ``import attnkit`` cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from attnkit.method import Method

M = TypeVar("M", bound="type[Method]")

_METHODS: dict[str, type[Method]] = {}

# Modules whose import registers the built-in methods.
_BUILTIN_MODULES = (
    "attnkit.sparsify.fixed",
    "attnkit.sparsify.streaming",
    "attnkit.sparsify.xattention",
    "attnkit.sparsify.minference",
    "attnkit.sparsify.flexprefill",
    "attnkit.sparsify.seer",
    "attnkit.sparsify.quest",
    "attnkit.convert.gqa",
    "attnkit.convert.mla",
    "attnkit.convert.linearize",
)
_builtins_loaded = False


class UnknownMethodError(KeyError):
    """Raised when a recipe or checkpoint names a method that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(name: str):
    """Class decorator: register a :class:`~attnkit.method.Method` subclass under ``name``.

    Example::

        @register("streaming_llm")
        class StreamingLLM(PrefillMethod):
            sink: int = 64
            window: int = 1024
    """

    def decorator(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def get_method(name: str) -> type[Method]:
    """The Method class registered under ``name``; :class:`UnknownMethodError` lists the known names."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "(none)"
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {known}") from None


def list_methods() -> dict[str, type[Method]]:
    """All registered methods, by name."""
    _load_builtins()
    return dict(sorted(_METHODS.items()))
