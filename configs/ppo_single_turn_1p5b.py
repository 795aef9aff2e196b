"""Single-turn PPO baseline for multi_attempt_1p5b.py: identical except N = 1
and the plain single-turn prompt (the same episode code with max_attempts=1)."""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, 'multi_attempt_1p5b.py')
  c.episode.min_attempts = 1
  c.episode.max_attempts = 1
  return c
