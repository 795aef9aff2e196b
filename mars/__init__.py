"""mars: JAX/Flax RL post-training of reasoning LLMs that learn from their failures.

Import stays cheap (no jax import here) so `python -c "import mars"` is fast;
submodules are imported on first attribute access.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "models", "sharding", "tokenizer", "prompts", "sampling", "rewards", "data",
    "episodes", "rl", "batch", "train", "evaluate", "export", "sft", "checkpoint",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"mars.{name}")
  raise AttributeError(f"module 'mars' has no attribute {name!r}")
