"""rl.micro_batch_size="auto": the largest micro batch whose compiled update step fits
the devices, read from XLA's memory analysis through the planner's step builders."""
import copy
import logging
import time

import jax

from mars import sharding
from mars.config_validation import ConfigError
from mars.trainer import plan_steps

GIB = 2 ** 30


def candidates(c, mesh) -> list:
  """Micro batches the update accepts: divisors of the minibatch that the
  data×fsdp axes divide (each device gets whole rows), ascending."""
  rows = c.data.prompts_per_step * c.rollout.group_size
  minibatch = c.rl.minibatch_size or rows
  batch_axis = sharding.mesh_axis_size(mesh, sharding.LOGICAL_RULES["batch"])
  return [m for m in range(batch_axis, minibatch + 1, batch_axis) if minibatch % m == 0]


def update_bytes(c, model_cfg, mesh, prompt_len: int, micro: int) -> float:
  """Per-device bytes the update step needs at `micro` (inf if the compiler refuses it)."""
  trial = copy.deepcopy(c)   # keeps micro_batch_size's int-or-"auto" field type
  trial.rl.micro_batch_size = micro
  (step,), _ = plan_steps.build(trial, model_cfg, mesh, prompt_len, only=("update",))
  try:
    return plan_steps.compile_footprint(step)[2]
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):   # a TPU compile over HBM
      return float("inf")
    raise


def resolve(c, model_cfg, mesh, capacity: float, prompt_len: int = None) -> int:
  """The largest candidate micro batch whose update needs at most
  (1 − rl.auto_micro_batch_margin) × `capacity` bytes per device.

  Rows are sized as the planner sizes them: `prompt_len` (default
  rl.auto_micro_batch_prompt_len) prompt tokens + the episode's response
  budget, the longest packed row the run can produce. Memory grows with the
  micro batch, so a binary search compiles about log2(#candidates) programs.
  Raises ConfigError (one line, naming the fixes) when micro batch
  data×fsdp does not fit either.
  """
  prompt_len = prompt_len or c.rl.auto_micro_batch_prompt_len
  limit = (1 - c.rl.auto_micro_batch_margin) * capacity
  options = candidates(c, mesh)
  t0 = time.perf_counter()
  needed = {}
  lo, hi, best = 0, len(options) - 1, None
  while lo <= hi:
    mid = (lo + hi) // 2
    needed[options[mid]] = update_bytes(c, model_cfg, mesh, prompt_len, options[mid])
    if needed[options[mid]] <= limit:
      best, lo = options[mid], mid + 1
    else:
      hi = mid - 1
  tried = ", ".join(f"{m}: {b / GIB:.2f} GiB" for m, b in sorted(needed.items()))
  if best is None:
    smallest = options[0]
    if smallest not in needed:
      needed[smallest] = update_bytes(c, model_cfg, mesh, prompt_len, smallest)
    raise ConfigError(
        f"rl.micro_batch_size=auto: even micro batch {smallest} needs "
        f"{needed[smallest] / GIB:.2f} GiB per device of {limit / GIB:.2f} GiB usable; "
        f"set model.remat=full, model.attention=chunked, model.logits_chunk, or put more "
        f"devices on the fsdp axis of mesh_shape.")
  logging.info("rl.micro_batch_size=auto -> %d (per-device need by micro batch: %s; usable "
               "%.2f GiB; %.1f s of compiles)", best, tried, limit / GIB, time.perf_counter() - t0)
  return best
