"""Rollout engine: the jitted prefill and decode programs, and the Sampler that drives them.

The decode loop (decode.py) is a `lax.while_loop` that stays on device for up to K steps
(or until every row is done), then returns control to the host. The host can
inspect the rows, queue *forced tokens* for some of them (a feedback turn in a
multi-attempt episode), and resume from the same cache: no re-prefill.

Buffers are aligned with cache slots: column s of `tokens` is the token whose
K/V sit in cache slot s. Prompts occupy columns [0, P) (left-padded), the
response grows from column P for every row in lockstep.
"""
import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mars import distributed
from mars import sharding
from mars import models
from mars.models import qwen
from mars.models.config import ModelConfig
from mars.sampling.decode import DecodeState, decode_loop, state_axes
from mars.sampling.select import SamplingParams


@dataclasses.dataclass
class SampleOutput:
  """Host (numpy) view of a finished or paused batch."""
  tokens: np.ndarray         # [B, S]
  prompt_mask: np.ndarray    # [B, S]
  gen_mask: np.ndarray       # [B, S]
  forced_mask: np.ndarray    # [B, S]
  logp: np.ndarray           # [B, S]
  sampler_logp: np.ndarray   # [B, S]
  lengths: np.ndarray        # [B] sampled tokens per row
  truncated: np.ndarray      # [B]
  stopped: np.ndarray        # [B]
  prompt_len: int

  def response_tokens(self, row: int) -> list:
    """Sampled + forced tokens of a row, in order (what follows the prompt)."""
    keep = self.gen_mask[row] | self.forced_mask[row]
    return self.tokens[row][keep].tolist()


def _prefill(cfg, params, prompt_tokens, prompt_mask, key, max_new, *, n, cache_len, queue_len,
             pad_id):
  """Prefills B prompts once and fans the cache out to B·n rows (group-major)."""
  B, P = prompt_tokens.shape
  logits, cache = qwen.prefill(cfg, params, prompt_tokens, prompt_mask, cache_len, last_only=True)
  rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
  cache = qwen.KVCache(k=rep(cache.k, 1), v=rep(cache.v, 1), valid=rep(cache.valid),
                       index=cache.index)
  tokens = jnp.full((B * n, cache_len), pad_id, jnp.int32).at[:, :P].set(rep(prompt_tokens))
  zeros_b = jnp.zeros((B * n,), jnp.int32)
  return DecodeState(
      cache=cache, tokens=tokens,
      gen_mask=jnp.zeros((B * n, cache_len), bool), forced_mask=jnp.zeros((B * n, cache_len), bool),
      logp=jnp.zeros((B * n, cache_len), jnp.float32),
      sampler_logp=jnp.zeros((B * n, cache_len), jnp.float32),
      last_logits=rep(logits[:, -1].astype(jnp.float32)),
      position=rep(prompt_mask.sum(-1).astype(jnp.int32)),
      num_generated=zeros_b, max_new=max_new,
      done=jnp.zeros((B * n,), bool), stopped=jnp.zeros((B * n,), bool),
      truncated=jnp.zeros((B * n,), bool),
      force_queue=jnp.full((B * n, queue_len), pad_id, jnp.int32),
      force_len=zeros_b, force_ptr=zeros_b, key=key, prompt_len=P)


_COMPILES = {"count": 0}


def compile_count() -> int:
  """Number of sampler programs traced in this process (log it per step)."""
  return _COMPILES["count"]


def _note_compile(what):
  _COMPILES["count"] += 1
  logging.info("Sampler: compiling %s (compile #%d)", what, _COMPILES["count"])


# Module-level jits keyed by static args: every Sampler with the same model
# config, mesh and shapes shares one compiled program.
@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "n", "cache_len", "queue_len", "pad_id"))
def _jit_prefill(params, prompt_tokens, prompt_mask, rng, max_new, *, cfg, mesh, n, cache_len,
                 queue_len, pad_id):
  _note_compile(f"prefill {prompt_tokens.shape} n={n} cache={cache_len}")
  with sharding.use_mesh(mesh):
    return _prefill(cfg, params, prompt_tokens, prompt_mask, rng, max_new, n=n,
                    cache_len=cache_len, queue_len=queue_len, pad_id=pad_id)


# Donating the state lets XLA update the KV cache in place.
@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "stop_ids", "pad_id"),
                   donate_argnames=("state",))
def _jit_loop(params, state, num_steps, temperature, top_p, top_k, *, cfg, mesh, stop_ids, pad_id):
  _note_compile(f"decode loop {state.tokens.shape}")
  with sharding.use_mesh(mesh):
    return decode_loop(cfg, params, state, num_steps, jnp.asarray(stop_ids, jnp.int32), pad_id,
                        temperature, top_p, top_k)


def default_cache_len(prompt_len: int, max_new_tokens: int) -> int:
  """Sampler.start's cache length: prompt + budget + 1, rounded up to 128 (mars.plan sizes it too)."""
  return -(-(prompt_len + max_new_tokens + 1) // 128) * 128


class Sampler:
  """Compiled rollout engine for one model config (and optional mesh).

      sampler = Sampler(cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id, mesh=mesh)
      out = sampler.generate(params, prompts, mask, n=8, max_new_tokens=1024, key=key)

  Chunked use (multi-attempt episodes):
      state = sampler.start(params, prompts, mask, n=..., max_new_tokens=..., key=...)
      state = sampler.run(params, state, num_steps=64)
      state = sampler.force(state, {row: feedback_ids})   # resumes those rows
      state = sampler.run(params, state, num_steps=64)
  """

  def __init__(self, cfg: ModelConfig, stop_ids: Sequence[int] = (), pad_id: int = 0,
               mesh=None, queue_len: int = 64):
    self.cfg = cfg
    self.stop_ids = tuple(int(t) for t in stop_ids) or (-1,)
    self.pad_id = int(pad_id)
    self.mesh = mesh
    self.queue_len = queue_len
    self._param_shardings = None
    self._state_sharding_cache = {}
    if mesh is not None:
      self._param_shardings = models.param_shardings(cfg, mesh)

  @property
  def compile_count(self) -> int:
    return compile_count()

  def _state_shardings(self, state):
    # Called on every force/rewind (once per chunk): build the tree once per shape.
    key = (state.tokens.shape, state.cache.k.shape, state.force_queue.shape, state.prompt_len)
    if key not in self._state_sharding_cache:
      self._state_sharding_cache[key] = sharding.tree_shardings(
          self.mesh, state_axes(state), jax.tree.map(lambda x: tuple(x.shape), state))
    return self._state_sharding_cache[key]

  def rollout_params(self, params):
    """The params the sampler reads: a copy in the model's compute dtype.

    Training keeps fp32 master params; decode is memory-bound, so it reads a
    bf16 copy made once per rollout phase (call this once, pass the result to
    every start/run/generate of the phase) rather than casting fp32 weights
    on every decode step. Params already in the compute dtype come back as they are.
    """
    return qwen.cast_params(self._place_params(params), self.cfg.dtype)

  def _place_params(self, params):
    if self._param_shardings is None:
      return params
    return jax.device_put(params, self._param_shardings)  # no-op if already laid out so

  def _place_state(self, state):
    if self.mesh is None:
      return state
    return jax.device_put(state, self._state_shardings(state))

  # Multi-host: host-side arguments and results cover only this process's rows
  # (the ones its devices hold); on device every array is global.
  def _rows_to_device(self, local, dtype):
    local = np.asarray(local, dtype)
    if self.mesh is None:
      return jnp.asarray(local)
    rows = sharding.batch_sharding(self.mesh, local.ndim)
    return distributed.global_array_from_local(local, rows)

  def local_batch_size(self, state: DecodeState) -> int:
    """Rows of `state` that belong to this process (all of them in one process)."""
    if self.mesh is None or not distributed.is_multiprocess():
      return state.batch_size
    rows = distributed.local_rows(state.batch_size, sharding.batch_sharding(self.mesh, 1))
    return rows.stop - rows.start

  # -- public API -------------------------------------------------------------

  def validate(self, prompt_tokens, prompt_mask, n, cache_len, sampling: SamplingParams):
    sampling.validate()
    prompt_mask = np.asarray(prompt_mask)
    if prompt_mask.ndim != 2 or prompt_mask.shape[0] == 0:
      raise ValueError("Sampler: prompts must be a non-empty [B, P] batch.")
    empty = np.flatnonzero(~prompt_mask.any(-1))
    if empty.size:
      raise ValueError(f"Sampler: prompt row {int(empty[0])} is empty.")
    P = prompt_mask.shape[1]
    if P >= cache_len:
      raise ValueError(f"Sampler: prompt length {P} does not fit the cache of length {cache_len} "
                       "(it needs room for at least one new token).")
    if self.mesh is not None:
      # Each process passes its own rows; the mesh sees all processes' rows.
      rows = prompt_mask.shape[0] * (jax.process_count() if distributed.is_multiprocess() else 1)
      sharding.check_batch(rows, self.mesh, "prompt batch")
      sharding.check_batch(rows * n, self.mesh, "rollout batch (prompts × n)")

  def start(self, params, prompt_tokens, prompt_mask, *, key, n: int = 1, max_new_tokens=256,
            cache_len: Optional[int] = None, sampling: SamplingParams = SamplingParams()):
    """Prefills the prompts once and returns a DecodeState of B·n rows.

    `max_new_tokens` is an int or a per-prompt-row [B·n] array (the
    multi-attempt token budget); `cache_len` defaults to P + max_new_tokens
    rounded up to a multiple of 128 (a handful of compiled shapes per run).
    In a multi-host run, the prompts (and max_new_tokens) are this process's
    rows and every process passes the same P and cache_len.
    """
    P = np.asarray(prompt_tokens).shape[1]
    max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (np.asarray(prompt_tokens).shape[0] * n,))
    if cache_len is None:
      cache_len = default_cache_len(P, distributed.agree_max(int(max_new.max())))
    self.validate(prompt_tokens, prompt_mask, n, cache_len, sampling)
    params = self._place_params(params)
    prompt_tokens = self._rows_to_device(prompt_tokens, np.int32)
    prompt_mask = self._rows_to_device(prompt_mask, bool)
    state = _jit_prefill(params, prompt_tokens, prompt_mask, key,
                         self._rows_to_device(max_new, np.int32),
                         cfg=self.cfg, mesh=self.mesh, n=n, cache_len=cache_len,
                         queue_len=self.queue_len, pad_id=self.pad_id)
    return self._place_state(state)

  def run(self, params, state: DecodeState, num_steps: int,
          sampling: SamplingParams = SamplingParams()) -> DecodeState:
    """Continues decoding for up to `num_steps` tokens (one compiled loop)."""
    sampling.validate()
    return _jit_loop(self._place_params(params), state, jnp.int32(num_steps),
                     *sampling.as_arrays(), cfg=self.cfg, mesh=self.mesh,
                     stop_ids=self.stop_ids, pad_id=self.pad_id)

  def force(self, state: DecodeState, queued: dict) -> DecodeState:
    """Queues forced tokens for some rows ({row: [ids]}) and (re)activates them.

    A row that was done (e.g. it emitted <|im_end|>) becomes active again: the
    forced tokens enter the cache like any other token, are marked forced, and
    carry no logprob; then the row resumes sampling.
    """
    if not queued and not distributed.is_multiprocess():
      return state  # (every process must take part in a multi-host update)
    B = self.local_batch_size(state)
    queue = np.full((B, self.queue_len), self.pad_id, np.int32)
    lengths = np.zeros((B,), np.int32)
    rows = np.zeros((B,), bool)
    for row, ids in queued.items():
      if len(ids) > self.queue_len:
        raise ValueError(f"Sampler.force: {len(ids)} forced tokens exceed queue_len={self.queue_len}.")
      if not ids:
        continue
      queue[row, :len(ids)] = ids
      lengths[row] = len(ids)
      rows[row] = True
    rows_j = self._rows_to_device(rows, bool)
    state = state.replace(
        force_queue=jnp.where(rows_j[:, None], self._rows_to_device(queue, np.int32),
                              state.force_queue),
        force_len=jnp.where(rows_j, self._rows_to_device(lengths, np.int32), state.force_len),
        force_ptr=jnp.where(rows_j, 0, state.force_ptr),
        done=state.done & ~rows_j,
        stopped=state.stopped & ~rows_j,
        truncated=state.truncated & ~rows_j)
    return self._place_state(state)

  def rewind(self, state: DecodeState, keep_until: dict) -> DecodeState:
    """Drops each row's tokens from column `keep_until[row]` on ({row: col}).

    Used when an attempt ends mid-chunk (a box closed at column c-1): tokens
    the model wrote after it leave the transcript. Their cache slots are
    marked invalid (masked from attention forever), the row's RoPE position
    returns to its count of kept tokens, and the dropped sampled tokens are
    refunded to the budget. The next token is written at the shared cache
    index, so the KV state equals a fresh prefill of the kept transcript.
    """
    if not keep_until and not distributed.is_multiprocess():
      return state
    S = state.cache_len
    cut = np.full((self.local_batch_size(state),), S, np.int32)
    for row, col in keep_until.items():
      cut[row] = col
    drop = jnp.arange(S)[None, :] >= self._rows_to_device(cut, np.int32)[:, None]
    valid = state.cache.valid & ~drop
    gen_mask = state.gen_mask & ~drop
    state = state.replace(
        cache=state.cache._replace(valid=valid),
        tokens=jnp.where(drop & (state.gen_mask | state.forced_mask), self.pad_id, state.tokens),
        gen_mask=gen_mask, forced_mask=state.forced_mask & ~drop,
        logp=jnp.where(drop, 0.0, state.logp), sampler_logp=jnp.where(drop, 0.0, state.sampler_logp),
        position=valid.sum(-1).astype(jnp.int32),
        num_generated=gen_mask.sum(-1).astype(jnp.int32))
    return self._place_state(state)

  def finish(self, state: DecodeState, rows) -> DecodeState:
    """Marks rows as done (the host decided their episode is over)."""
    mask = np.zeros((self.local_batch_size(state),), bool)
    mask[list(rows)] = True
    return state.replace(done=state.done | self._rows_to_device(mask, bool))

  def outputs(self, state: DecodeState) -> SampleOutput:
    """Host copy of this process's rows (all rows in a single process)."""
    host = distributed.host_local
    gen_mask = host(state.gen_mask)
    prompt_mask = np.zeros_like(gen_mask)
    prompt_mask[:, :state.prompt_len] = host(state.cache.valid)[:, :state.prompt_len]
    return SampleOutput(
        tokens=host(state.tokens), prompt_mask=prompt_mask,
        gen_mask=gen_mask, forced_mask=host(state.forced_mask),
        logp=host(state.logp), sampler_logp=host(state.sampler_logp),
        lengths=host(state.num_generated), truncated=host(state.truncated),
        stopped=host(state.stopped), prompt_len=state.prompt_len)

  def generate(self, params, prompt_tokens, prompt_mask, *, key, n: int = 1,
               max_new_tokens: int = 256, sampling: SamplingParams = SamplingParams(),
               cache_len: Optional[int] = None) -> SampleOutput:
    """Prefill + decode to completion; one call, all on device."""
    state = self.start(params, prompt_tokens, prompt_mask, key=key, n=n,
                       max_new_tokens=max_new_tokens, cache_len=cache_len, sampling=sampling)
    state = self.run(params, state, state.cache_len, sampling)
    return self.outputs(state)
