"""AdamW with warmup + cosine-to-min-lr and global-norm clipping, from config.

opt_cfg: an optimizer section of the config (actor_optim / critic_optim, as a dict or
ConfigDict), every field required; the defaults are mars.config's, none here:
  lr                    peak learning rate.
  min_lr_ratio          end lr of the cosine as a fraction of lr.
  warmup_steps          linear warmup from 0 to lr.
  delay_steps           lr 0 for this many updates before the warmup: a PPO
                        actor waits while a fresh critic learns its values
                        (verl's critic_warmup); Adam's moments still fill.
  total_steps           length of warmup + cosine decay (> warmup_steps for "cosine";
                        the trainer derives it from the run when the config has 0).
  schedule              "constant" (after warmup) or "cosine".
  b1, b2, eps, weight_decay   AdamW's.
  grad_clip             global-norm clip; 0 disables it.

Weight decay skips norms and biases (the usual LLM recipe: decaying a norm
scale towards 0 is not regularisation, it is damage).
"""
from typing import Any

import jax
import optax


def make_schedule(opt_cfg) -> optax.Schedule:
  delay = int(opt_cfg["delay_steps"])
  if delay <= 0:
    return _schedule(opt_cfg)
  rest = dict(opt_cfg)
  if opt_cfg["total_steps"]:  # the cosine still ends at total_steps
    rest["total_steps"] = int(opt_cfg["total_steps"]) - delay
  schedule = _schedule(rest)
  return optax.join_schedules([optax.constant_schedule(0.0), schedule], [delay])


def _schedule(opt_cfg) -> optax.Schedule:
  lr = float(opt_cfg["lr"])
  warmup = int(opt_cfg["warmup_steps"])
  kind = opt_cfg["schedule"]
  if kind == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind == "cosine":
    total = opt_cfg["total_steps"]
    if not total or int(total) <= warmup:
      raise ValueError(f"cosine schedule needs total_steps > warmup_steps ({warmup}), "
                       f"got total_steps={total}.")
    min_lr = lr * float(opt_cfg["min_lr_ratio"])
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
  clip = opt_cfg["grad_clip"]
  adamw = optax.adamw(
      make_schedule(opt_cfg),
      b1=float(opt_cfg["b1"]), b2=float(opt_cfg["b2"]),
      eps=float(opt_cfg["eps"]),
      weight_decay=float(opt_cfg["weight_decay"]), mask=decay_mask)
  if not clip:
    return adamw
  return optax.chain(optax.clip_by_global_norm(float(clip)), adamw)
