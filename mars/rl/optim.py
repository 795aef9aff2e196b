"""AdamW with warmup + cosine-to-min-lr and global-norm clipping, from config.

Config keys (ml_collections.ConfigDict or dict; defaults in brackets):
  lr [1e-6]             peak learning rate.
  min_lr_ratio [0.0]    end lr as a fraction of lr; `min_lr` (absolute) wins if set.
  warmup_steps [0]      linear warmup from 0 to lr.
  delay_steps [0]       lr 0 for this many updates before the warmup: a PPO
                        actor waits while a fresh critic learns its values
                        (verl's critic_warmup); Adam's moments still fill.
  total_steps [None]    length of warmup + cosine decay (required for "cosine").
  schedule ["constant"] "constant" (after warmup) or "cosine".
  b1 [0.9], b2 [0.999], eps [1e-8], weight_decay [0.0].
  grad_clip [1.0]       global-norm clip; 0 / None disables it.

Weight decay skips norms and biases (the usual LLM recipe: decaying a norm
scale towards 0 is not regularisation, it is damage).
"""
from typing import Any

import jax
import optax


def _get(cfg, key, default=None):
  value = cfg.get(key, default) if cfg is not None else default
  return default if value is None else value


def make_schedule(opt_cfg) -> optax.Schedule:
  delay = int(_get(opt_cfg, "delay_steps", 0))
  if delay <= 0:
    return _schedule(opt_cfg)
  rest = dict(opt_cfg)
  if _get(opt_cfg, "total_steps") is not None:  # the cosine still ends at total_steps
    rest["total_steps"] = int(opt_cfg["total_steps"]) - delay
  schedule = _schedule(rest)
  return optax.join_schedules([optax.constant_schedule(0.0), schedule], [delay])


def _schedule(opt_cfg) -> optax.Schedule:
  lr = float(_get(opt_cfg, "lr", 1e-6))
  warmup = int(_get(opt_cfg, "warmup_steps", 0))
  kind = _get(opt_cfg, "schedule", "constant")
  if kind == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind == "cosine":
    total = _get(opt_cfg, "total_steps")
    if total is None or int(total) <= warmup:
      raise ValueError(f"cosine schedule needs total_steps > warmup_steps ({warmup}), "
                       f"got total_steps={total}.")
    min_lr = _get(opt_cfg, "min_lr")
    if min_lr is None:
      min_lr = lr * float(_get(opt_cfg, "min_lr_ratio", 0.0))
    # optax's decay_steps counts the warmup too: cosine ends exactly at total_steps.
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, int(total), float(min_lr))
  raise ValueError(f"unknown schedule {kind!r}; expected 'constant' or 'cosine'.")


def decay_mask(params: Any):
  """True for matrices that take weight decay; False for norm scales and biases."""
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return not ("norm" in name or "bias" in name)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  clip = _get(opt_cfg, "grad_clip", 1.0)
  adamw = optax.adamw(
      make_schedule(opt_cfg),
      b1=float(_get(opt_cfg, "b1", 0.9)), b2=float(_get(opt_cfg, "b2", 0.999)),
      eps=float(_get(opt_cfg, "eps", 1e-8)),
      weight_decay=float(_get(opt_cfg, "weight_decay", 0.0)), mask=decay_mask)
  if not clip:
    return adamw
  return optax.chain(optax.clip_by_global_norm(float(clip)), adamw)
