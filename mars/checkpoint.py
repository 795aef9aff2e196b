"""Orbax checkpoints of the whole run state, with exact resume.

A checkpoint at step s holds everything the loop needs to continue as if
never stopped: the TrainState (policy + critic params and optimizer states,
step, skipped-update counter), the PRNG key, the prompt pipeline position and
the config. Orbax writes each step to a temporary directory and renames it
when complete, so a process killed mid-save leaves no partial step behind;
a step that is complete but unreadable (e.g. a corrupted file) is skipped
with a warning and the previous one is used.
"""
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointNotFoundError(FileNotFoundError):
  """No usable checkpoint where one was required."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` (async where available)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and `meta` (JSON: key, data position, config)."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state, step: Optional[int] = None):
    """Restores (step, state, meta) from `step` or the newest readable step.

    `abstract_state` (e.g. from jax.eval_shape, with .sharding set) decides
    shapes, dtypes and where each restored shard lands.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointNotFoundError(f"No checkpoint found in {self.directory}.")
    errors = []
    for s in candidates:
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        if errors:
          logging.warning("Restored step %d after skipping unreadable newer checkpoints: %s",
                          s, "; ".join(errors))
        return s, restored["state"], restored["meta"]
      except Exception as e:  # corrupted or partial: fall back to the previous one
        msg = f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.warning("Checkpoint %s is unreadable (%s); trying the previous one.", s, msg)
        errors.append(msg)
    raise CheckpointNotFoundError(
        f"No readable checkpoint in {self.directory} ({'; '.join(errors)}).")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings, if given) describing `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def key_to_json(key) -> list:
  """A PRNG key as JSON (raw uint32 words), so it fits the meta item."""
  data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.asarray(data).tolist()


def key_from_json(words) -> jax.Array:
  return jax.random.wrap_key_data(np.asarray(words, np.uint32))
