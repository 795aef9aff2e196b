"""Micro-batching (rows split so each micro-batch spans every shard) and the
log-prob / value recompute over a rollout batch, one micro-batch at a time,
padded or packed (mars/rl/seq_pack.py)."""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mars import sharding
from mars.batch import RolloutBatch
from mars.models import logprobs, qwen
from mars.models.config import ModelConfig
from mars.rl import critic as critic_lib
from mars.rl import seq_pack

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

def _model_outputs(cfg: ModelConfig, params: Params, what: str, tokens, attention_mask,
                   positions, segment_ids=None):
  if what == "values":
    return critic_lib.critic_values(cfg, params, tokens, attention_mask, positions, segment_ids)
  return logprobs.sequence_logprobs(cfg, params, tokens, attention_mask, positions,
                                    segment_ids=segment_ids)[0]


def pack_index_shardings(mesh):
  """A PackIndex's shardings: packed rows and padded rows both over data×fsdp."""
  packed = sharding.micro_rows_sharding(mesh, 3)
  return seq_pack.PackIndex(source=packed, segment=packed,
                            target=sharding.batch_sharding(mesh, 2),
                            order=sharding.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _row_spans_fn(mesh):
  return jax.jit(seq_pack.row_spans, out_shardings=sharding.replicated(mesh))


def plan_packing(attention_mask, micro_batch_size: Optional[int], mesh=None, length: int = 0):
  """(PackIndex placed on the mesh, efficiency) for a [B, T] batch split into
  micro-batches of `micro_batch_size` rows (seq_pack.plan_batch). Every process
  plans the same global index from the global mask."""
  n = num_micro(attention_mask.shape[0], micro_batch_size)
  spans = None
  if mesh is not None:   # replicated, so every process reads every row's span
    spans = _row_spans_fn(mesh)(attention_mask)
  pack = seq_pack.plan_batch(attention_mask, n,
                             sharding.batch_shards(mesh) if mesh is not None else 1, length,
                             spans)
  efficiency = seq_pack.efficiency(pack)
  if mesh is None:
    return jax.tree.map(jnp.asarray, pack), efficiency
  pack = jax.tree.map(lambda x, sh: jax.make_array_from_callback(x.shape, sh, x.__getitem__),
                      pack, pack_index_shardings(mesh))
  return pack, efficiency


@functools.lru_cache(maxsize=None)
def recompute_fn(cfg: ModelConfig, mesh, micro_batch_size, what: str, packed: bool = False):
  def run(params, tokens, attention_mask, positions):
    with sharding.use_mesh(mesh):
      n = num_micro(tokens.shape[0], micro_batch_size)

      def one(xs):
        tok, am, pos = constrain_rows(xs)
        return _model_outputs(cfg, params, what, tok, am, pos)

      # lax.map: one micro-batch of logits alive at a time.
      out = jax.lax.map(one, tuple(split_micro(x, n) for x in (tokens, attention_mask, positions)))
      return sharding.constrain(merge_micro(out), ("batch", "length"))

  def run_packed(params, tokens, positions, index):
    with sharding.use_mesh(mesh):
      n = index.source.shape[0]
      tok, pos, seg = seq_pack.pack_inputs(index, *seq_pack.reorder_rows((tokens, positions),
                                                                         index))

      def one(xs):
        tok, pos, seg, target = xs
        tok, pos, seg = constrain_rows((tok, pos, seg))
        out = _model_outputs(cfg, params, what, tok, seg > 0, pos, seg)
        return seq_pack.unpack(out, target)

      out = jax.lax.map(one, (tok, pos, seg, split_micro(index.target, n)))
      return sharding.constrain(seq_pack.restore_rows(merge_micro(out), index),
                                ("batch", "length"))

  fn = run_packed if packed else run
  if mesh is None:
    return jax.jit(fn)
  p_sh = (critic_lib.critic_shardings(cfg, mesh) if what == "values" else
          sharding.tree_shardings(mesh, qwen.param_axes(cfg), qwen.param_shapes(cfg)))
  rows = sharding.batch_sharding(mesh, 2)
  if packed:
    return jax.jit(fn, in_shardings=(p_sh, rows, rows, pack_index_shardings(mesh)),
                   out_shardings=rows)
  return jax.jit(fn, in_shardings=(p_sh, rows, rows, rows), out_shardings=rows)


def _recompute(cfg, params, batch, micro_batch_size, mesh, what, pack):
  if mesh is not None:
    sharding.check_batch(micro_batch_size or batch.tokens.shape[0], mesh, "micro_batch_size")
  if pack is not None:
    if pack.shape[0] != num_micro(batch.tokens.shape[0], micro_batch_size):
      raise ValueError(f"pack index has {pack.shape[0]} micro-batches; micro_batch_size="
                       f"{micro_batch_size} makes {num_micro(batch.tokens.shape[0], micro_batch_size)}.")
    fn = recompute_fn(cfg, mesh, micro_batch_size, what, True)
    return fn(params, batch.tokens, batch.positions, pack)
  fn = recompute_fn(cfg, mesh, micro_batch_size, what)
  return fn(params, batch.tokens, batch.attention_mask, batch.positions)


def compute_logprobs(cfg: ModelConfig, params: Params, batch: RolloutBatch, *,
                     micro_batch_size: Optional[int] = None, mesh=None,
                     pack: Optional[seq_pack.PackIndex] = None):
  """log π(tokens[:, t] | tokens[:, :t]) for a RolloutBatch: [B, T] f32, column 0 is 0.

  Used for `old_logp` (policy params) and `ref_logp` (reference params). Runs
  under the params' logical shardings with rows over data×fsdp when `mesh` is
  given. With `pack` (seq_pack.plan_batch for this batch and micro-batch count)
  the model runs on packed rows; each sequence's first token comes back as 0.
  """
  return _recompute(cfg, params, batch, micro_batch_size, mesh, "logprobs", pack)


def compute_values(cfg: ModelConfig, critic_params: Params, batch: RolloutBatch, *,
                   micro_batch_size: Optional[int] = None, mesh=None,
                   pack: Optional[seq_pack.PackIndex] = None):
  """Critic values V(s_t) for a RolloutBatch: [B, T] f32 (see mars.rl.critic)."""
  return _recompute(cfg, critic_params, batch, micro_batch_size, mesh, "values", pack)
