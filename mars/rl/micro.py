"""Micro-batching (rows split so each micro-batch spans every shard) and the
log-prob / value recompute over a rollout batch, one micro-batch at a time."""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mars import sharding
from mars.batch import RolloutBatch
from mars.models import logprobs, qwen
from mars.models.config import ModelConfig
from mars.rl import critic as critic_lib

Params = qwen.Params


# ----------------------------------------------------------------------------
# Micro-batching.

def num_micro(batch_size: int, micro_batch_size: Optional[int]) -> int:
  if not micro_batch_size or micro_batch_size >= batch_size:
    return 1
  if batch_size % micro_batch_size:
    raise ValueError(f"batch of {batch_size} rows is not divisible by "
                     f"micro_batch_size={micro_batch_size}.")
  return batch_size // micro_batch_size


def split_micro(x, n: int):
  """[B, ...] -> [n, B/n, ...]; micro-batch i holds rows i, i+n, ... (spans every shard)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def merge_micro(x):
  """Inverse of `split_micro`."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def constrain_rows(tree):
  return jax.tree.map(lambda x: sharding.constrain(x, ("batch",) + ("length",) * (x.ndim - 1)),
                      tree)


# ----------------------------------------------------------------------------
# Logprob / value recompute.

@functools.lru_cache(maxsize=None)
def recompute_fn(cfg: ModelConfig, mesh, micro_batch_size, what: str):
  def run(params, tokens, attention_mask, positions):
    with sharding.use_mesh(mesh):
      n = num_micro(tokens.shape[0], micro_batch_size)

      def one(xs):
        tok, am, pos = constrain_rows(xs)
        if what == "values":
          return critic_lib.critic_values(cfg, params, tok, am, pos)
        return logprobs.sequence_logprobs(cfg, params, tok, am, pos)[0]

      # lax.map: one micro-batch of logits alive at a time.
      out = jax.lax.map(one, tuple(split_micro(x, n) for x in (tokens, attention_mask, positions)))
      return sharding.constrain(merge_micro(out), ("batch", "length"))

  if mesh is None:
    return jax.jit(run)
  p_sh = (critic_lib.critic_shardings(cfg, mesh) if what == "values" else
          sharding.tree_shardings(mesh, qwen.param_axes(cfg), qwen.param_shapes(cfg)))
  rows = sharding.batch_sharding(mesh, 2)
  return jax.jit(run, in_shardings=(p_sh, rows, rows, rows), out_shardings=rows)


def compute_logprobs(cfg: ModelConfig, params: Params, batch: RolloutBatch, *,
                     micro_batch_size: Optional[int] = None, mesh=None):
  """log π(tokens[:, t] | tokens[:, :t]) for a RolloutBatch: [B, T] f32, column 0 is 0.

  Used for `old_logp` (policy params) and `ref_logp` (reference params). Runs
  under the params' logical shardings with rows over data×fsdp when `mesh` is given.
  """
  if mesh is not None:
    sharding.check_batch(micro_batch_size or batch.tokens.shape[0], mesh, "micro_batch_size")
  fn = recompute_fn(cfg, mesh, micro_batch_size, "logprobs")
  return fn(params, batch.tokens, batch.attention_mask, batch.positions)


def compute_values(cfg: ModelConfig, critic_params: Params, batch: RolloutBatch, *,
                   micro_batch_size: Optional[int] = None, mesh=None):
  """Critic values V(s_t) for a RolloutBatch: [B, T] f32 (see mars.rl.critic)."""
  if mesh is not None:
    sharding.check_batch(micro_batch_size or batch.tokens.shape[0], mesh, "micro_batch_size")
  fn = recompute_fn(cfg, mesh, micro_batch_size, "values")
  return fn(critic_params, batch.tokens, batch.attention_mask, batch.positions)
