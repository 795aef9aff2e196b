"""DAPO baseline on Qwen3-4B-Base (Yu et al. 2025): clip-higher (0.2 / 0.28),
dynamic sampling (drop all-equal groups and resample), token-mean loss,
overlong reward shaping (4096-token buffer), no KL. Other values as grpo_4b.py.
Assumptions: 3 resample rounds at most per step."""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, 'grpo_4b.py')
  c.algorithm = "dapo"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.28
  c.rl.dynamic_sampling = True
  c.rl.max_resample_rounds = 3
  c.rl.overlong_buffer = 4096
  c.rl.agg_mode = "token-mean"
  return c
