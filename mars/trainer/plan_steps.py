"""A run's device programs built abstractly for mars.plan: the trainer's own jitted
functions and sharding rules, fed ShapeDtypeStructs (no weight is allocated).

Each Step holds a lowerable function, its abstract arguments, the per-device
bytes it keeps besides its arguments (the train state stays in HBM while the
sampler runs), and an analytic FLOP / HBM-traffic count to check XLA's
cost_analysis against (XLA counts a loop body once: the layer scan, the
micro-batch scan and the decode loop).
"""
import dataclasses
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mars import models, sharding
from mars.batch import RolloutBatch
from mars.episodes import multi_attempt, packing
from mars.models import qwen
from mars.rl import optim, step as step_lib
from mars.rl import micro as micro_lib
from mars.rl import seq_pack
from mars.models import paged
from mars.sampling import decode as decode_lib
from mars.sampling import engine, scheduler
from mars.trainer import specs

QUEUE_LEN = specs.SAMPLER_QUEUE_LEN  # the trainer's Sampler
FEEDBACK_TOKENS = 64    # a feedback turn, upper estimate (sizes the multi-attempt cache)


@dataclasses.dataclass
class Step:
  name: str
  fn: Any                 # a jitted function: fn.lower(*args, **kwargs)
  args: tuple
  kwargs: dict
  named: dict             # per-device bytes by category: params / optimizer / kv_cache
  resident: float         # per-device bytes held outside this program (not its arguments)
  flops: float            # analytic, per device
  hbm_bytes: float        # analytic HBM traffic lower bound, per device
  ideal_bytes: Optional[float] = None   # decode: params + live KV, each read once
  loop_trips: int = 1     # iterations of the loops XLA counts once (layers × micro-batches)
  out_bytes: float = 0    # per-device outputs not aliased to inputs (for a refused compile)
  shape: str = ""


def device_bytes(tree) -> int:
  """Bytes one device holds of an abstract, sharded pytree (its shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    try:
      itemsize = jnp.dtype(x.dtype).itemsize
    except TypeError:   # PRNG keys
      itemsize = 8
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * itemsize
  return total


def compile_footprint(step: Step) -> tuple:
  """(compiled, xla figures, per-device total bytes) of `step` on its devices.

  The total is what the device must hold while the program runs: the bytes kept
  outside it (step.resident) + its arguments + outputs not aliased to donated
  arguments + XLA's temporaries + code. Raises jax.errors.JaxRuntimeError when
  the compiler refuses the program (a TPU compile over HBM).
  """
  compiled = step.fn.lower(*step.args, **step.kwargs).compile()
  mem = compiled.memory_analysis()
  xla = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
             alias=mem.alias_size_in_bytes, temps=mem.temp_size_in_bytes,
             code=mem.generated_code_size_in_bytes)
  return compiled, xla, total_bytes(step, xla)


def total_bytes(step: Step, xla: dict) -> float:
  return step.resident + (xla["arguments"] + xla["outputs"] - xla["alias"] + xla["temps"]
                          + xla["code"])


def local_capacity(device) -> tuple:
  """(bytes, source) one local device can hold: its allocator's limit (GPU, TPU),
  else this host's RAM shared by its devices (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), "device memory"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram / len(device.client.local_devices()), "host RAM / devices"


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _sds(shape, dtype, sh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


# ----------------------------------------------------------------------------
# Analytic counts.

def matmul_params(cfg, lm_head: bool = True) -> int:
  """Weights that enter a matmul per token (embedding lookups excluded)."""
  D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return cfg.num_layers * (D * (q + 2 * kv) + q * D + 3 * D * F) + (
      cfg.vocab_size * D if lm_head else 0)


def attention_flops(cfg, rows: int, q_len: int, kv_len: int, causal_blocks: int = 0) -> float:
  """QKᵀ and PV. Dense attention (and the sampler's) scores every key slot, masked
  or not; with `causal_blocks` (chunked attention's block size, q_len == kv_len)
  only the n(n+1)/2 blocks on or below the diagonal of the n×n grid are computed."""
  flops = 4.0 * rows * q_len * kv_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
  if causal_blocks:
    n = math.ceil(q_len / min(causal_blocks, q_len))
    flops *= (n + 1) / (2 * n)
  return flops


def forward_flops(cfg, rows: int, T: int, lm_head: bool = True) -> float:
  """The full-sequence forward (update, logprob recompute) with the config's attention:
  chunked and the kernels (splash's causal mask is block-sparse) skip the blocks
  above the diagonal."""
  block = {"chunked": cfg.attention_block, "splash": cfg.attention_block,
           "pallas_gpu": min(cfg.attention_block, 128)}.get(cfg.attention, 0)
  return 2.0 * matmul_params(cfg, lm_head) * rows * T + attention_flops(cfg, rows, T, T, block)


# ----------------------------------------------------------------------------
# Rollout geometry.

@dataclasses.dataclass
class Geometry:
  prompts: int        # prefill rows (one per question)
  n: int              # rows per prefill row
  prompt_len: int
  max_new: int
  cache_len: int
  train_len: int      # packed row length T of the update
  rows: int           # rollout rows


def geometry(c, prompt_len: int) -> Geometry:
  G = c.rollout.group_size
  if c.episode.kind == "multi_attempt":
    max_new = c.episode.budget
    cache_len = multi_attempt.cache_length(prompt_len, c.episode.max_attempts, FEEDBACK_TOKENS,
                                           c.episode)
    response = cache_len - prompt_len
  else:
    max_new = c.rollout.max_new_tokens
    cache_len = engine.default_cache_len(prompt_len, max_new)
    response = max_new
  return Geometry(prompts=c.data.prompts_per_step, n=G, prompt_len=prompt_len, max_new=max_new,
                  cache_len=cache_len, train_len=packing.total_length(prompt_len, response),
                  rows=c.data.prompts_per_step * G)


# ----------------------------------------------------------------------------
# The steps.

def build(c, model_cfg, mesh, prompt_len: int, only: Optional[tuple] = None,
          rollout_mesh=None) -> tuple:
  """(steps, facts) for config `c` on `mesh`; facts are per-device byte counts.
  `only`: build just these steps (names as in the plan: update, logprob, values,
  prefill, decode). `rollout_mesh`: a split run's rollout group (rollout.devices),
  where the prefill and decode compile, holding only the sampler's params copy
  and the KV pool; default `mesh`."""
  want = lambda name: only is None or name in only
  ndev = mesh.size
  tensor = sharding.mesh_axis_size(mesh, "tensor")
  geo = geometry(c, prompt_len)
  policy_opt = optim.make_optimizer(specs.optim_config(c.actor_optim, c))
  critic_opt = (optim.make_optimizer(specs.optim_config(c.critic_optim, c))
                if c.algorithm == "ppo" else None)
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  state = _abstract(jax.eval_shape(lambda: specs.abstract_train_state(model_cfg, policy_opt, critic_opt)),
                    state_sh)
  ref = None
  if c.rl.kl_coef > 0:
    ref = _abstract(jax.eval_shape(lambda p: specs.reference_params(model_cfg, p), state.params),
                    state_sh.params)
  rollout_params = _abstract(jax.eval_shape(lambda p: qwen.cast_params(p, model_cfg.dtype),
                                            state.params), state_sh.params)
  f = dict(params=device_bytes(state.params), critic=device_bytes(state.critic_params),
           optimizer=device_bytes((state.opt_state, state.critic_opt_state)),
           ref=device_bytes(ref), rollout_params=device_bytes(rollout_params))
  train_state = f["params"] + f["critic"] + f["optimizer"]

  T, rows, micro = geo.train_len, geo.rows, c.rl.micro_batch_size or None
  mb = c.rl.minibatch_size or rows
  two, one = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)

  def batch(n):
    m = lambda dt: _sds((n, T), dt, two)
    v = lambda dt: _sds((n,), dt, one)
    return RolloutBatch(
        tokens=m(jnp.int32), attention_mask=m(jnp.bool_), positions=m(jnp.int32),
        loss_mask=m(jnp.bool_), transparent_mask=m(jnp.bool_), behaviour_logp=m(jnp.float32),
        old_logp=m(jnp.float32), ref_logp=m(jnp.float32), values=m(jnp.float32),
        reward=v(jnp.float32), group_id=v(jnp.int32), is_off_policy=v(jnp.bool_),
        truncated=v(jnp.bool_), sampler_logp=m(jnp.float32), policy_version=v(jnp.int32))

  def pack_index(n_rows):
    """With rl.packing, the largest PackIndex of n_rows padded rows (as many packed rows
    as the padded micro-batch: seq_pack.plan's cap), so the plan is an upper bound."""
    shapes = seq_pack.largest_shapes(n_rows, T, n_rows // (micro or n_rows), c.rl.pack_length)
    return jax.tree.map(lambda s, sh: _sds(s, jnp.int32, sh), shapes,
                        micro_lib.pack_index_shardings(mesh),
                        is_leaf=lambda x: isinstance(x, tuple))

  full_batch = device_bytes(batch(rows))
  has_critic = critic_opt is not None
  L, V, D = model_cfg.num_layers, model_cfg.vocab_size, model_cfg.hidden_size
  cbytes = jnp.dtype(model_cfg.dtype).itemsize
  n_micro = mb // (micro or mb)
  rows_dev = lambda r: r / (ndev // tensor)          # rows over data×fsdp
  full_w = lambda b: b * ndev / tensor                # FSDP gathers a layer's weights whole
  logits_io = lambda r: 3 * rows_dev(r) * T * V * 4 / tensor   # write, softmax read, bwd
  steps = []

  # The update: one optimizer step on one minibatch (actor and critic together).
  sharding.check_batch(mb, mesh, "minibatch")
  sharding.check_batch(micro or mb, mesh, "micro_batch_size")
  train_step = step_lib.make_train_step(model_cfg, specs.rl_step_config(c), policy_opt, critic_opt, mesh,
                                        state_sh)
  passes = 3 if model_cfg.remat == "none" else 4     # remat recomputes the forward in the backward
  # The lm_head is outside the remat'ed layers; chunked logits recompute it in the backward.
  head_passes = 4 if model_cfg.logits_chunk and model_cfg.logits_chunk < T else 3
  flops = passes * forward_flops(model_cfg, mb, T, lm_head=False) + head_passes * 2.0 * V * D * mb * T
  if has_critic:
    flops += passes * forward_flops(model_cfg, mb, T, lm_head=False)
  w = (f["params"] + f["critic"]) / 4 * cbytes      # compute-dtype copy of the masters
  traffic = (n_micro * (passes * full_w(w) + 2 * (f["params"] + f["critic"])
                        + logits_io(micro or mb)) + 2 * train_state)
  steps.append(Step(
      "update" + ("+critic" if has_critic else ""), train_step.jitted,
      (state, batch(mb), _sds((mb, T), jnp.float32, two), _sds((mb, T), jnp.float32, two))
      + ((pack_index(mb),) if c.rl.packing else ()), {},
      named=dict(params=f["params"] + f["critic"] + f["ref"], optimizer=f["optimizer"]),
      resident=f["ref"] + full_batch, flops=flops / ndev, hbm_bytes=traffic,
      loop_trips=L * n_micro, shape=f"{mb} rows × {T}, micro {micro or mb}"))

  # Old / reference logprobs (and critic values) over the whole rollout batch.
  sharding.check_batch(micro or rows, mesh, "micro_batch_size")
  rows_args = (_sds((rows, T), jnp.int32, two), _sds((rows, T), jnp.bool_, two),
               _sds((rows, T), jnp.int32, two))
  n_micro_all = rows // (micro or rows)
  for what, params, critic_fwd in (("logprob", state.params, False),
                                   ("values", state.critic_params, True)):
    if params is None:
      continue
    what_fn = "values" if critic_fwd else "logprobs"
    pb = f["critic"] if critic_fwd else f["params"]
    if c.rl.packing:
      fn = micro_lib.recompute_fn(model_cfg, mesh, micro, what_fn, True)
      args = (params, rows_args[0], rows_args[2], pack_index(rows))
    else:
      fn = micro_lib.recompute_fn(model_cfg, mesh, micro, what_fn)
      args = (params,) + rows_args
    steps.append(Step(
        what, fn, args, {},
        named=dict(params=f["params"] + f["critic"] + f["ref"], optimizer=f["optimizer"]),
        resident=train_state - pb + f["ref"] + full_batch,
        flops=forward_flops(model_cfg, rows, T, lm_head=not critic_fwd) / ndev,
        hbm_bytes=n_micro_all * (full_w(pb)
                                 + (0 if critic_fwd else logits_io(micro or rows) * 2 / 3)),
        loop_trips=L * n_micro_all, out_bytes=device_bytes(rows_args[0]),
        shape=f"{rows} rows × {T}, micro {micro or rows}"))

  # The sampler (mars/sampling/engine.py): the page pool, a prefill (extend) call over
  # the prompts, and the decode loop at the rows and table width it runs when the
  # pool is full.
  sampler_resident = train_state + f["ref"]
  sampler_named = dict(params=f["params"] + f["critic"] + f["ref"] + f["rollout_params"],
                       optimizer=f["optimizer"])
  if rollout_mesh is not None and rollout_mesh is not mesh:  # its own devices
    mesh, ndev, tensor = rollout_mesh, rollout_mesh.size, sharding.mesh_axis_size(rollout_mesh, "tensor")
    rollout_params = _abstract(rollout_params, models.param_shardings(model_cfg, mesh))
    f["rollout_params"] = device_bytes(rollout_params)
    sampler_resident, sampler_named = 0, dict(params=f["rollout_params"])
    two, one = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  P, S, B, n = geo.prompt_len, geo.cache_len, geo.prompts, geo.n
  sharding.check_batch(B, mesh, "prompt batch")
  sharding.check_batch(B * n, mesh, "rollout batch (prompts × n)")
  sampler = engine.Sampler(model_cfg, mesh=mesh, queue_len=QUEUE_LEN,
                           **specs.sampler_kwargs(c.sampling))
  G, p = sampler.groups, sampler.page_size
  pages = sampler.pages_per_group(B * n // G, S)
  pool_shape = paged.pool_shape(model_cfg, pages * G, p)
  pool = _abstract(jax.eval_shape(lambda: paged.KVPool(
      jax.ShapeDtypeStruct(pool_shape, model_cfg.dtype), jax.ShapeDtypeStruct(pool_shape, model_cfg.dtype))),
      sampler.pool_shardings())
  kv = device_bytes(pool)
  kv_token = kv / ((pages - 1) * p)        # one token's K/V per device
  rep = sharding.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  sampling_args = (_sds((), jnp.float32, rep), _sds((), jnp.float32, rep), _sds((), jnp.int32, rep))

  def rows_spec(rows, width, table):
    m = lambda w: _sds((rows, w), jnp.int32, two)
    v = _sds((rows,), jnp.int32, one)
    return decode_lib.Rows(tokens=m(width), feed_len=v, cached=v, tables=m(table), seq_ids=v,
                           num_generated=v, max_new=v, max_len=v, steps=v)

  sampler_named["kv_cache"] = kv
  # Weight bytes one device reads per sampler forward: the whole compute copy, over tensor.
  weights_read = sum(x.size * jnp.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(rollout_params)) / tensor
  C = min(scheduler.bucket(P, min(16, sampler.prefill_chunk)), sampler.prefill_chunk)
  Rg = min(scheduler.bucket(-(-B // G)), sampler.extend_rows_cap(C))
  M = sampler.table_width(S, -(-P // p))
  prefill_args = (rollout_params, pool, rows_spec(Rg * G, C, M), _sds(key.shape, key.dtype, rep),
                  sampling_args)
  prefill_flops = (2.0 * matmul_params(model_cfg, lm_head=False) * Rg * G * C
                   + attention_flops(model_cfg, Rg * G, C, M * p + C) + 2.0 * V * D * Rg * G)
  steps.append(Step(
      "prefill", sampler.program("extend"), prefill_args, {},
      named=sampler_named, resident=sampler_resident, flops=prefill_flops / ndev,
      hbm_bytes=weights_read + kv_token * Rg * C, loop_trips=L,
      out_bytes=0, shape=f"{Rg * G} prompts × {C} tokens (of {P}), pool {pages * G} pages × {p}"))
  # Decode: every slot's row as long as the pool allows (its table width), capped
  # like the engine caps it (gathered pages ≤ 2 × the pool).
  slots = min(B * n, sampler.max_slots or B * n)
  Rd = scheduler.bucket(-(-slots // G))
  Md = sampler.table_width(S, min(-(-S // p), max(1, (pages - 1) // Rd)))
  Rd = min(Rd, max(1, sampler.decode_rows_cap(pages, Md)))
  K = scheduler.bucket(sampler.decode_chunk)
  decode_args = (rollout_params, pool, rows_spec(Rd * G, 1, Md), _sds(key.shape, key.dtype, rep),
                 sampling_args, _sds((), jnp.int32, rep))
  live = min(Rd * Md * p, (pages - 1) * p)  # tokens a full pool holds for these rows
  ideal = weights_read + kv_token * live
  steps.append(Step(
      "decode", sampler.program("decode", K), decode_args, {}, named=sampler_named,
      resident=sampler_resident,
      flops=(2.0 * matmul_params(model_cfg) * Rd * G
             + attention_flops(model_cfg, Rd * G, 1, Md * p)) / ndev,
      hbm_bytes=ideal, ideal_bytes=ideal, loop_trips=L,
      shape=f"{Rd * G} rows × {Md * p} KV slots (one token)"))
  facts = dict(f, kv_tokens=(pages - 1) * p * G, kv_cache=kv, train_state=train_state, geometry=dataclasses.asdict(geo))
  return [st for st in steps if want(st.name.split("+")[0])], facts
