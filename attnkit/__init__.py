"""attnkit: a post-training attention toolkit for Hugging Face causal LMs.

Public API (see README and DESIGN)::

    model, tokenizer = attnkit.load_model("llama")
    recipe = attnkit.Recipe.load("streaming_llm")
    model = attnkit.apply(model, recipe)
    attnkit.save(model, "out/", tokenizer=tokenizer)
    model, tokenizer = attnkit.load("out/")
    attnkit.unpatch(model)
    attnkit.convert(recipe="streaming_llm", model="llama", out="out/")
    report = attnkit.evaluate("out/", tasks=["passkey"], lengths=[2048])
    cache = attnkit.make_cache(model)                       # a decode method's cache, for model.generate
    new_tokens = attnkit.generate_graphed(model, input_ids, 64)   # Quest: decode steps replayed from a CUDA graph
"""

__version__ = "0.1.0"

from attnkit import attention as _attention  # noqa: F401  (registers "attnkit" with transformers)
from attnkit import registry
from attnkit.cache import make_cache
from attnkit.checkpoint import load, save
from attnkit.generation import generate_graphed
from attnkit.kernels import BlockMask, block_sparse_attention
from attnkit.models import load_model
from attnkit.patch import apply, dense, unpatch
from attnkit.pipeline import convert, evaluate
from attnkit.recipe import Recipe

__all__ = [
    "BlockMask",
    "Recipe",
    "__version__",
    "apply",
    "block_sparse_attention",
    "convert",
    "dense",
    "evaluate",
    "generate_graphed",
    "load",
    "load_model",
    "make_cache",
    "registry",
    "save",
    "unpatch",
]
