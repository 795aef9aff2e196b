"""Rollout engine: paged KV cache, continuous batching, prefix sharing, multi-token extend.

The device holds only the KV page pool (mars/models/paged.py). The host
holds every sequence: its transcript, its pages and its counters (`Rollout`).
Each device call takes a batch of rows the host builds from the sequences
that can run now, padded to power-of-two buckets of rows and table width, so
a call costs what the live tokens cost, not what the longest possible
sequence would:

- `extend_and_sample` feeds several tokens per row: a new prompt (or the tail
  of one whose full pages are shared with its group), a forced turn (a
  multi-attempt feedback turn, in one call and not token by token), or the
  re-prefill of a preempted sequence; long feeds go in `prefill_chunk` pieces.
- `decode_loop` runs up to `decode_chunk` steps on device and returns early
  once half of its rows have stopped, so the host can compact the batch and
  admit waiting sequences (continuous batching).

Pages are sized by a token budget (`kv_tokens`), not by batch × max length.
When the pool runs out, stopped sequences that still hold pages give them
back first, then the newest running sequence is preempted: its pages are
freed and it is re-prefilled later from its transcript. Sampling keys come
from (sequence id, position), so none of this changes what is sampled.

Output layout (`SampleOutput`): column s of row b; prompts right-aligned in
[0, P) (P = the padded prompt length), the response from column P on.
"""
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mars import distributed
from mars import models
from mars import sharding
from mars.models import kernels, paged
from mars.models import qwen
from mars.models.config import ModelConfig
from mars.sampling import decode
from mars.sampling.pages import OutOfPages, PagePool
from mars.sampling.rollout import Rollout, SampleOutput
from mars.sampling.scheduler import Scheduler
from mars.sampling.select import SamplingParams


_COMPILES = {"count": 0}


def compile_count() -> int:
  """Number of sampler programs traced in this process (log it per step)."""
  return _COMPILES["count"]


def _note_compile(what):
  _COMPILES["count"] += 1
  logging.info("Sampler: compiling %s (compile #%d)", what, _COMPILES["count"])


@functools.lru_cache(maxsize=16)
def _zeros_pool(shape, dtype, shardings):
  """A zeroed pool, allocated on device already sharded (one compile per shape)."""
  return jax.jit(lambda: paged.KVPool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                 out_shardings=shardings)


def pool_shardings(cfg: ModelConfig, mesh, page_size: int):
  """The KV pool's shardings (pages over data×fsdp, kv heads over tensor); None unsharded."""
  if mesh is None:
    return None
  shape = paged.pool_shape(cfg, sharding.batch_shards(mesh) * 2, page_size)
  return sharding.tree_shardings(mesh, paged.pool_axes(), paged.KVPool(shape, shape))


@functools.lru_cache(maxsize=None)
def _program(cfg: ModelConfig, stop_ids: tuple, mesh, page_size: int, kind: str, num_steps: int,
             decode_attention: str = "xla"):
  """jit of one extend (kind="extend") or decode-loop program; see Sampler.program."""
  stop = np.asarray(stop_ids, np.int32)

  def extend(params, pool, rows, rng, sampling):
    _note_compile(f"extend rows={rows.tokens.shape} table={rows.tables.shape[1]}")
    with sharding.use_mesh(mesh):
      return decode.extend_and_sample(cfg, params, pool, rows, rng, jnp.asarray(stop), sampling)

  def loop(params, pool, rows, rng, sampling, min_active):
    _note_compile(f"decode rows={rows.tokens.shape[0]} table={rows.tables.shape[1]} "
                  f"steps={num_steps}")
    with sharding.use_mesh(mesh):
      return decode.decode_loop(cfg, params, pool, rows, rng, min_active, jnp.asarray(stop),
                                sampling, num_steps=num_steps, attention=decode_attention)

  fn = extend if kind == "extend" else loop
  if mesh is None:
    return jax.jit(fn, donate_argnums=(1,))
  rep = sharding.replicated(mesh)
  row_sh = sharding.batch_sharding(mesh, 1)
  pool_sh = pool_shardings(cfg, mesh, page_size)
  in_sh = (models.param_shardings(cfg, mesh), pool_sh, None, rep, rep)
  if kind != "extend":
    in_sh += (rep,)
  return jax.jit(fn, donate_argnums=(1,), in_shardings=in_sh, out_shardings=(pool_sh, row_sh))


def default_cache_len(prompt_len: int, max_new_tokens: int) -> int:
  """Sampler.start's transcript capacity: prompt + budget + 1 (mars.plan sizes it too)."""
  return prompt_len + max_new_tokens + 1


class Sampler(Scheduler):
  """Rollout engine for one model config (and optional mesh).

      sampler = Sampler(cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id, mesh=mesh)
      out = sampler.generate(params, prompts, mask, n=8, max_new_tokens=1024, key=key)

  Chunked use (multi-attempt episodes):
      state = sampler.start(params, prompts, mask, n=..., max_new_tokens=..., key=...)
      state = sampler.run(params, state, num_steps=64)    # ≤ 64 sampled tokens per row
      state = sampler.force(state, {row: feedback_ids})   # resumes those rows
      state = sampler.rewind(state, {row: col})
      out = sampler.outputs(state)                        # ends the rollout, frees its pages
  """

  def __init__(self, cfg: ModelConfig, stop_ids: Sequence[int] = (), pad_id: int = 0,
               mesh=None, queue_len: int = 64, *, page_size: int = 16, kv_tokens: int = 0,
               max_slots: int = 0, decode_chunk: int = 256, prefill_chunk: int = 512,
               decode_attention: str = "xla"):
    for name, value in (("page_size", page_size), ("decode_chunk", decode_chunk),
                        ("prefill_chunk", prefill_chunk)):
      if int(value) < 1:
        raise ValueError(f"Sampler: {name} must be >= 1, got {value}.")
    if int(kv_tokens) < 0 or int(max_slots) < 0:
      raise ValueError(f"Sampler: kv_tokens and max_slots must be >= 0 (0: enough for every "
                       f"sequence), got {kv_tokens} and {max_slots}.")
    self.cfg = cfg
    self.stop_ids = tuple(int(t) for t in stop_ids) or (-1,)
    self.pad_id = int(pad_id)
    self.mesh = mesh
    self.queue_len = queue_len
    self.page_size, self.kv_tokens, self.max_slots = int(page_size), int(kv_tokens), int(max_slots)
    self.decode_chunk, self.prefill_chunk = int(decode_chunk), int(prefill_chunk)
    if decode_attention not in kernels.DECODE_KINDS:
      raise ValueError(f"Sampler: unknown decode_attention {decode_attention!r}; choose one of "
                       f"{kernels.DECODE_KINDS}.")
    # "auto" for the devices the programs compile for (the mesh's, else the default).
    platform = (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    self.decode_attention = kernels.resolve_decode(decode_attention, platform)
    self._param_shardings = models.param_shardings(cfg, mesh) if mesh is not None else None
    self._totals = {}
    self.last_stats = {}  # the last rollout's preemptions, device calls, peak pages

  @property
  def compile_count(self) -> int:
    return compile_count()

  @property
  def groups(self) -> int:
    """Data-parallel groups (one page pool each) across all processes."""
    return 1 if self.mesh is None else sharding.batch_shards(self.mesh)

  @property
  def local_groups(self) -> int:
    return self.groups // (jax.process_count() if distributed.is_multiprocess() else 1)

  # -- device programs --------------------------------------------------------

  def pool_shardings(self):
    return pool_shardings(self.cfg, self.mesh, self.page_size)

  def program(self, kind, num_steps=0):
    """The jitted extend / decode program (shared by every Sampler of this model,
    stop ids, mesh and page size in the process: a second engine, e.g. the
    evaluator's or a resumed run's, reuses the compiled programs)."""
    return _program(self.cfg, self.stop_ids, self.mesh, self.page_size, kind, num_steps,
                    self.decode_attention if kind != "extend" else "xla")

  def rollout_params(self, params):
    """The params the sampler reads: a copy in the model's compute dtype.

    Training keeps fp32 master params; decode is memory-bound, so it reads a
    bf16 copy made once per rollout phase (call this once, pass the result to
    every start/run/generate of the phase) rather than casting fp32 weights
    on every decode step. Params already in the compute dtype come back as they are.
    Cast where they are, then placed: half the bytes cross to the sampler's
    layout (or to a split run's rollout devices).
    """
    return self._place_params(qwen.cast_params(params, self.cfg.dtype))

  def _place_params(self, params):
    if self._param_shardings is None:
      return params
    return jax.device_put(params, self._param_shardings)  # no-op if already laid out so

  def _to_device(self, local: np.ndarray, *, rows=True):
    if self.mesh is None:
      return jnp.asarray(local)
    if not rows:
      return jax.device_put(local, sharding.replicated(self.mesh))
    return distributed.global_array_from_local(local, sharding.batch_sharding(self.mesh,
                                                                              local.ndim))

  # -- validation and setup ---------------------------------------------------

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

  def pages_per_group(self, rows_per_group: int, cache_len: int) -> int:
    p = self.page_size
    if self.kv_tokens:
      per_group = -(-self.kv_tokens // (self.groups * p))
      if per_group < -(-cache_len // p) and rows_per_group:
        logging.info("Sampler: kv_tokens=%d holds less than one full sequence per group (%d "
                     "tokens); long sequences will be preempted.", self.kv_tokens, cache_len)
    else:  # enough for every sequence at full length: never preempts
      per_group = rows_per_group * -(-cache_len // p)
    return per_group + 1  # + the trash page

  def start(self, params, prompt_tokens, prompt_mask, *, key, n: int = 1, max_new_tokens=256,
            cache_len: Optional[int] = None, sampling: SamplingParams = SamplingParams()):
    """Prefills the prompts (once per group of n samples) and returns a Rollout of B·n rows.

    `max_new_tokens` is an int or a per-row [B·n] array (the multi-attempt
    token budget); `cache_len` is the transcript capacity in output columns
    (default: P + max_new_tokens + 1). In a multi-host run, the prompts (and
    max_new_tokens) are this process's rows and every process passes the
    same P and cache_len.
    """
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    rows, P = prompt_tokens.shape
    B = rows * n
    max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (B,)).astype(np.int64)
    if cache_len is None:
      cache_len = default_cache_len(P, distributed.agree_max(int(max_new.max())))
    self.validate(prompt_tokens, prompt_mask, n, cache_len, sampling)
    S = int(cache_len)
    tokens = np.full((B, S), self.pad_id, np.int32)
    pmask = np.zeros((B, S), bool)
    counts = prompt_mask.sum(-1)
    for q in range(rows):  # right-align each prompt's real tokens in [0, P)
      ids = prompt_tokens[q][prompt_mask[q]]
      tokens[q * n:(q + 1) * n, P - len(ids):P] = ids
      pmask[q * n:(q + 1) * n, P - len(ids):P] = True
    G = self.local_groups
    group = np.arange(B) * G // B
    row0 = 0
    if self.mesh is not None and distributed.is_multiprocess():
      row0 = distributed.local_rows(B * jax.process_count(),
                                    sharding.batch_sharding(self.mesh, 1)).start
    npg = self.pages_per_group(int(np.bincount(group, minlength=G).max()), S)
    zeros = lambda dt: np.zeros((B,), dt)
    state = Rollout(
        tokens=tokens, gen_mask=np.zeros((B, S), bool), forced_mask=np.zeros((B, S), bool),
        logp=np.zeros((B, S), np.float32), sampler_logp=np.zeros((B, S), np.float32),
        prompt_mask=pmask, prompt_tokens=np.repeat(counts, n), response_len=zeros(np.int64),
        cached=zeros(np.int64), num_generated=zeros(np.int64), max_new=max_new,
        done=zeros(bool), stopped=zeros(bool), truncated=zeros(bool), resident=zeros(bool),
        group=group, seq_ids=row0 + np.arange(B), pages=[[] for _ in range(B)],
        allocators=[PagePool(npg) for _ in range(G)], pool=self._new_pool(npg), key=key,
        prompt_len=P, page_size=self.page_size, stats=dict(preemptions=0, extend_calls=0, decode_calls=0, decode_steps=0,
                                 shared_prefix_tokens=0))
    params = self._place_params(params)
    if n > 1:
      self._share_prefixes(params, state, n, sampling)
    return state

  def _new_pool(self, pages_per_group: int) -> paged.KVPool:
    shape = paged.pool_shape(self.cfg, pages_per_group * self.groups, self.page_size)
    return _zeros_pool(shape, jnp.dtype(self.cfg.dtype).name, self.pool_shardings())()

  def _share_prefixes(self, params, state: Rollout, n: int, sampling):
    """Prefills each prompt's full pages once per group; its n samples share them."""
    p = self.page_size
    items = []
    for q in range(state.batch_size // n):
      children = range(q * n, (q + 1) * n)
      shared = (int(state.prompt_tokens[q * n]) - 1) // p * p  # the tail page is each sample's own
      if not shared:
        continue
      for g in sorted({int(state.group[b]) for b in children}):
        members = [b for b in children if state.group[b] == g]
        if len(members) < 2:
          continue
        try:
          pages = state.allocators[g].alloc(shared // p)
        except OutOfPages:
          continue  # no room to share: each sample prefills its own copy
        items.append(dict(group=g, feed=state.transcript(members[0])[:shared], cached=0,
                          pages=pages, seq_ids=0, num_generated=0, max_new=1,
                          max_len=state.cache_len, steps=0, members=members))
    self._extend(params, state, items, sampling)
    for it in items:
      for b in it["members"]:
        state.pages[b] = state.allocators[it["group"]].share(it["pages"])
        state.cached[b], state.resident[b] = len(it["feed"]), True
      state.allocators[it["group"]].release(it["pages"])
      state.stats["shared_prefix_tokens"] += len(it["feed"]) * (len(it["members"]) - 1)

  # -- the host loop ------------------------------------------------------------------

  def run(self, params, state: Rollout, num_steps: int,
          sampling: SamplingParams = SamplingParams()) -> Rollout:
    """Continues every unfinished row by up to `num_steps` sampled tokens (forced
    tokens queued by `force` go in first, in one extend)."""
    sampling.validate()
    params = self._place_params(params)
    quota = np.where(state.done, 0, int(num_steps)).astype(np.int64)
    while distributed.any_process(bool((~state.done & (quota > 0)).any())):
      self._admit_and_extend(params, state, quota, sampling)
      self._decode_round(params, state, quota, sampling)
    return state

  # -- episode control ----------------------------------------------------------------

  def force(self, state: Rollout, queued: dict) -> Rollout:
    """Appends forced tokens to some rows ({row: [ids]}) and (re)activates them.

    A row that was done (e.g. it emitted <|im_end|>) becomes active again: the
    next `run` feeds the forced tokens in one extend (they carry no logprob),
    then the row resumes sampling.
    """
    for b, ids in queued.items():
      if len(ids) > self.queue_len:
        raise ValueError(f"Sampler.force: {len(ids)} forced tokens exceed queue_len={self.queue_len}.")
      if not len(ids):
        continue
      room = state.capacity(b) - state.length(b)
      state.append(b, list(ids)[:room])
      state.done[b] = state.stopped[b] = state.truncated[b] = False
      if room <= len(ids) or state.num_generated[b] >= state.max_new[b]:
        state.end(b, False, True)  # no room or budget left for a reply
    return state

  def rewind(self, state: Rollout, keep_until: dict) -> Rollout:
    """Drops each row's tokens from column `keep_until[row]` on ({row: col}).

    Used when an attempt ends mid-chunk (a box closed at column c-1): tokens
    the model wrote after it leave the transcript, the dropped sampled tokens
    are refunded to the budget, and pages past the kept tokens go back to the
    pool; the next token continues from the kept transcript, exactly as if it
    had been prefilled fresh.
    """
    for b, col in keep_until.items():
      end = state.prompt_len + int(state.response_len[b])
      if col >= end:
        continue
      state.tokens[b, col:end] = self.pad_id
      for buf in (state.gen_mask, state.forced_mask):
        buf[b, col:end] = False
      state.logp[b, col:end] = state.sampler_logp[b, col:end] = 0
      state.response_len[b] = col - state.prompt_len
      state.num_generated[b] = int(state.gen_mask[b].sum())
      state.cached[b] = min(int(state.cached[b]), state.length(b) - 1)
      if state.resident[b]:
        state.trim(b)
    return state

  def finish(self, state: Rollout, rows) -> Rollout:
    """Marks rows as done (the host decided their episode is over) and frees their pages."""
    for b in rows:
      state.done[b] = True
      if state.resident[b]:
        state.evict(b)
    return state

  def take_stats(self) -> dict:
    """Totals over the rollouts since the last call (the trainer logs them per step):
    preemptions, device calls and steps, prompt tokens shared, peak pool use."""
    totals, self._totals = self._totals, {}
    if distributed.is_multiprocess():  # every process calls this: totals over all rows
      for k in ("preemptions", "shared_prefix_tokens"):
        totals[k] = distributed.agree_sum(totals.get(k, 0))
    if "kv_peak_frac" in totals:  # in millionths, exchanged as an int
      totals["kv_peak_frac"] = distributed.agree_max(int(1e6 * totals["kv_peak_frac"])) / 1e6
    return totals

  def local_batch_size(self, state: Rollout) -> int:
    """Rows of `state` that belong to this process (all of them in one process)."""
    return state.batch_size

  def outputs(self, state: Rollout) -> SampleOutput:
    """Ends the rollout: frees every page and the pool, and returns the host view."""
    for b in np.flatnonzero(state.resident):
      state.evict(b)
    leaked = [g for g, a in enumerate(state.allocators) if not a.is_whole()]
    if leaked:
      raise AssertionError(f"Sampler: KV pages leaked in groups {leaked}.")
    state.stats["peak_pages"] = max(a.peak_used for a in state.allocators)
    state.pool = None
    self.last_stats = dict(state.stats)
    for k in ("preemptions", "extend_calls", "decode_calls", "decode_steps",
              "shared_prefix_tokens"):
      self._totals[k] = self._totals.get(k, 0) + state.stats[k]
    self._totals["kv_peak_frac"] = max(self._totals.get("kv_peak_frac", 0.0), max(
        a.peak_used / a.capacity for a in state.allocators))
    return SampleOutput(
        tokens=state.tokens.copy(), prompt_mask=state.prompt_mask.copy(),
        gen_mask=state.gen_mask.copy(), forced_mask=state.forced_mask.copy(),
        logp=state.logp.copy(), sampler_logp=state.sampler_logp.copy(),
        lengths=state.num_generated.copy(), truncated=state.truncated.copy(),
        stopped=state.stopped.copy(), prompt_len=state.prompt_len)

  def generate(self, params, prompt_tokens, prompt_mask, *, key, n: int = 1,
               max_new_tokens: int = 256, sampling: SamplingParams = SamplingParams(),
               cache_len: Optional[int] = None) -> SampleOutput:
    """Prefill + decode to completion, with continuous batching."""
    state = self.start(params, prompt_tokens, prompt_mask, key=key, n=n,
                       max_new_tokens=max_new_tokens, cache_len=cache_len, sampling=sampling)
    state = self.run(params, state, state.cache_len, sampling)
    return self.outputs(state)
