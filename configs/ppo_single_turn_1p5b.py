"""Single-turn PPO baseline for multi_attempt_1p5b.py: identical except N = 1
and the plain single-turn prompt (the same episode code with max_attempts=1)."""
import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_attempt_1p5b.py")
  spec = importlib.util.spec_from_file_location("multi_attempt_1p5b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.episode.min_attempts = 1
  c.episode.max_attempts = 1
  return c
