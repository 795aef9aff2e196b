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
import dataclasses
import functools
import logging
import math
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mars import distributed
from mars import models
from mars import sharding
from mars.models import paged
from mars.models import qwen
from mars.models.config import ModelConfig
from mars.sampling import decode
from mars.sampling.pages import OutOfPages, PagePool
from mars.sampling.select import SamplingParams


@dataclasses.dataclass
class SampleOutput:
  """Host (numpy) view of a finished rollout."""
  tokens: np.ndarray         # [B, S]
  prompt_mask: np.ndarray    # [B, S]
  gen_mask: np.ndarray       # [B, S]
  forced_mask: np.ndarray    # [B, S]
  logp: np.ndarray           # [B, S] policy logprob (T=1, unfiltered) of sampled tokens
  sampler_logp: np.ndarray   # [B, S] logprob under the sampling distribution
  lengths: np.ndarray        # [B] sampled tokens per row
  truncated: np.ndarray      # [B]
  stopped: np.ndarray        # [B]
  prompt_len: int

  def response_tokens(self, row: int) -> list:
    """Sampled + forced tokens of a row, in order (what follows the prompt)."""
    keep = self.gen_mask[row] | self.forced_mask[row]
    return self.tokens[row][keep].tolist()


@dataclasses.dataclass
class Rollout:
  """Host state of one rollout: this process's sequences and the device page pool."""
  tokens: np.ndarray         # [B, S] int32, SampleOutput's layout
  gen_mask: np.ndarray       # [B, S] bool
  forced_mask: np.ndarray    # [B, S] bool
  logp: np.ndarray           # [B, S] f32
  sampler_logp: np.ndarray   # [B, S] f32
  prompt_mask: np.ndarray    # [B, S] bool
  prompt_tokens: np.ndarray  # [B] real prompt tokens per row
  response_len: np.ndarray   # [B]
  cached: np.ndarray         # [B] transcript tokens whose K/V are in the row's pages
  num_generated: np.ndarray  # [B]
  max_new: np.ndarray        # [B]
  done: np.ndarray           # [B] bool
  stopped: np.ndarray        # [B] bool
  truncated: np.ndarray      # [B] bool
  resident: np.ndarray       # [B] bool: holds pages (its cached K/V are valid)
  group: np.ndarray          # [B] local data-parallel group of the row
  seq_ids: np.ndarray        # [B] global sequence ids
  pages: List[List[int]]
  allocators: List[PagePool]
  pool: Optional[paged.KVPool]
  key: jax.Array
  prompt_len: int
  stats: dict

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def cache_len(self) -> int:
    return self.tokens.shape[1]

  def length(self, b) -> int:
    return int(self.prompt_tokens[b] + self.response_len[b])

  def first_col(self, b) -> int:
    return self.prompt_len - int(self.prompt_tokens[b])

  def transcript(self, b) -> np.ndarray:
    return self.tokens[b, self.first_col(b):self.prompt_len + self.response_len[b]]

  def capacity(self, b) -> int:
    return self.cache_len - self.first_col(b)


def bucket(n: int, lo: int = 1) -> int:
  """The power of two >= max(n, lo)."""
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


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


def default_cache_len(prompt_len: int, max_new_tokens: int) -> int:
  """Sampler.start's transcript capacity: prompt + budget + 1 (mars.plan sizes it too)."""
  return prompt_len + max_new_tokens + 1


class Sampler:
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
               max_slots: int = 0, decode_chunk: int = 256, prefill_chunk: int = 512):
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
    self._param_shardings = models.param_shardings(cfg, mesh) if mesh is not None else None
    self._programs = {}

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
    if self.mesh is None:
      return None
    shape = paged.pool_shape(self.cfg, self.groups * 2, self.page_size)
    return sharding.tree_shardings(self.mesh, paged.pool_axes(), paged.KVPool(shape, shape))

  def program(self, kind, num_steps=0):
    key = (kind, num_steps)
    if key not in self._programs:
      cfg, stop_ids, mesh = self.cfg, jnp.asarray(self.stop_ids, jnp.int32), self.mesh

      def extend(params, pool, rows, rng, sampling):
        _note_compile(f"extend rows={rows.tokens.shape} table={rows.tables.shape[1]}")
        with sharding.use_mesh(mesh):
          return decode.extend_and_sample(cfg, params, pool, rows, rng, stop_ids, sampling)

      def loop(params, pool, rows, rng, sampling, min_active):
        _note_compile(f"decode rows={rows.tokens.shape[0]} table={rows.tables.shape[1]} "
                      f"steps={num_steps}")
        with sharding.use_mesh(mesh):
          return decode.decode_loop(cfg, params, pool, rows, rng, min_active, stop_ids, sampling,
                                    num_steps=num_steps)

      fn = extend if kind == "extend" else loop
      if mesh is None:
        self._programs[key] = jax.jit(fn, donate_argnums=(1,))
      else:
        rep = sharding.replicated(mesh)
        row_sh = sharding.batch_sharding(mesh, 1)
        in_sh = (self._param_shardings, self.pool_shardings(), None, rep, rep)
        if kind != "extend":
          in_sh += (rep,)
        self._programs[key] = jax.jit(fn, donate_argnums=(1,), in_shardings=in_sh,
                                      out_shardings=(self.pool_shardings(), row_sh))
    return self._programs[key]

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
        prompt_len=P, stats=dict(preemptions=0, extend_calls=0, decode_calls=0, decode_steps=0,
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

  # -- device batches -----------------------------------------------------------

  def table_width(self, cache_len: int, pages_needed: int) -> int:
    """Page-table columns of a device call: a power of two, so few shapes compile.
    A floor on it keeps the number of compiled shapes small; the cap on the floor
    keeps a short row's step cheap under a long budget."""
    floor = min(bucket(-(-cache_len // self.page_size) // 4), 32)
    return bucket(pages_needed, floor)

  def extend_rows_cap(self, width: int) -> int:
    """Rows per group in one extend call of `width` tokens: ~8 prefill chunks of
    tokens, so a first prefill of many unshared prompts is split into calls of
    bounded activation memory."""
    return max(1, 8 * self.prefill_chunk // width)

  def decode_rows_cap(self, pages_per_group: int, width: int) -> int:
    """Rows per group in one decode call whose gathered pages (rows × table width)
    stay within twice the group's pool: the XLA reference attention materialises
    the gathered K/V of one layer."""
    return max(1, 2 * pages_per_group // width)

  def _rows(self, state: Rollout, items: list, width: int) -> decode.Rows:
    """Device rows for `items`, group-major, each group padded to one agreed bucket."""
    G = self.local_groups
    per_group = [[it for it in items if it["group"] == g] for g in range(G)]
    Rg = bucket(max(len(x) for x in per_group))
    M = self.table_width(state.cache_len, max([len(it["pages"]) for it in items] or [1]))
    Rg, M, width = distributed.agree_max(Rg, M, width)
    R = Rg * G
    a = dict(tokens=np.full((R, width), self.pad_id, np.int32), tables=np.zeros((R, M), np.int32),
             **{k: np.zeros((R,), np.int32) for k in ("feed_len", "cached", "seq_ids",
                                                       "num_generated", "max_new", "max_len",
                                                       "steps")})
    for g, group_items in enumerate(per_group):
      for j, it in enumerate(group_items):
        r = it["_row"] = g * Rg + j
        a["tokens"][r, :len(it["feed"])] = it["feed"]
        a["tables"][r, :len(it["pages"])] = it["pages"]
        a["feed_len"][r] = len(it["feed"])
        for k in ("cached", "seq_ids", "num_generated", "max_new", "max_len", "steps"):
          a[k][r] = it[k]
    return decode.Rows(**{k: self._to_device(v) for k, v in a.items()})

  def _item(self, state: Rollout, b: int, feed, steps: int) -> dict:
    return dict(group=int(state.group[b]), feed=feed, cached=int(state.cached[b]),
                pages=state.pages[b], seq_ids=int(state.seq_ids[b]),
                num_generated=int(state.num_generated[b]), max_new=int(state.max_new[b]),
                max_len=state.capacity(b), steps=steps, row=b)

  def _extend(self, params, state: Rollout, items: list, sampling):
    """Feeds each item's `feed` in prefill_chunk pieces; an item with steps=1 then
    samples its next token (item["out"])."""
    fed = [0] * len(items)
    while distributed.any_process(any(fed[i] < len(it["feed"]) for i, it in enumerate(items))):
      todo = [i for i, it in enumerate(items) if fed[i] < len(it["feed"])]
      longest = max([len(items[i]["feed"]) - fed[i] for i in todo] or [1])
      C = min(bucket(longest, min(16, self.prefill_chunk)), self.prefill_chunk)
      pieces, per_group = [], {}
      for i in todo:
        it = items[i]
        per_group[it["group"]] = per_group.get(it["group"], 0) + 1
        if per_group[it["group"]] > self.extend_rows_cap(C):
          continue  # the next call takes it
        piece = dict(it, feed=it["feed"][fed[i]:fed[i] + C], cached=it["cached"] + fed[i])
        fed[i] += len(piece["feed"])
        piece["steps"] = int(bool(it.get("steps")) and fed[i] == len(it["feed"]))
        piece.setdefault("seq_ids", 0)
        pieces.append((i, piece))
      rows = self._rows(state, [pc for _, pc in pieces], C)
      state.pool, out = self.program("extend")(params, state.pool, rows, state.key,
                                                sampling.as_arrays())
      state.stats["extend_calls"] += 1
      out = {k: distributed.host_local(v) for k, v in out.items()}
      for i, pc in pieces:
        if pc["steps"]:
          items[i]["out"] = {k: v[pc["_row"]] for k, v in out.items()}

  def _append(self, state: Rollout, b: int, tokens, logp=None, sampler_logp=None):
    """Appends sampled (with logps) or forced (without) tokens to row b's transcript."""
    start = state.prompt_len + int(state.response_len[b])
    cols = slice(start, start + len(tokens))
    state.tokens[b, cols] = tokens
    sampled = logp is not None
    state.gen_mask[b, cols] = sampled
    state.forced_mask[b, cols] = not sampled
    if sampled:
      state.logp[b, cols], state.sampler_logp[b, cols] = logp, sampler_logp
      state.num_generated[b] += len(tokens)
    state.response_len[b] += len(tokens)

  def _end_rows(self, state: Rollout, b: int, stopped, truncated):
    state.stopped[b] |= bool(stopped)
    state.truncated[b] |= bool(truncated)
    state.done[b] |= bool(stopped) or bool(truncated)

  # -- pages ----------------------------------------------------------------------

  def _evict(self, state: Rollout, b: int):
    state.allocators[state.group[b]].release(state.pages[b])
    state.pages[b], state.cached[b], state.resident[b] = [], 0, False

  def _reserve(self, state: Rollout, g: int, need: int, keep: set, runnable) -> bool:
    """Frees pages in group g until `need` are free: stopped rows' pages first, then
    the newest running row outside `keep` is preempted (re-prefilled later)."""
    alloc = state.allocators[g]
    while alloc.free < need:
      held = [b for b in range(state.batch_size)
              if state.group[b] == g and state.resident[b] and b not in keep]
      idle = [b for b in held if not runnable[b]]
      if idle:
        self._evict(state, idle[0])
      elif held:
        self._evict(state, max(held, key=lambda b: state.seq_ids[b]))
        state.stats["preemptions"] += 1
      else:
        return False
    return True

  def _grow(self, state: Rollout, b: int, tokens: int, keep: set, runnable) -> bool:
    """Row b's pages cover transcript positions [0, tokens)."""
    need = -(-tokens // self.page_size) - len(state.pages[b])
    if need <= 0:
      return True
    if not self._reserve(state, int(state.group[b]), need, keep | {b}, runnable):
      return False
    state.pages[b] = state.pages[b] + state.allocators[state.group[b]].alloc(need)
    return True

  def _too_small(self, state: Rollout, b: int, tokens: int):
    raise ValueError(f"Sampler: the KV pool ({state.allocators[0].capacity} pages of "
                     f"{self.page_size} tokens per group) cannot hold one sequence of {tokens} "
                     f"tokens; raise kv_tokens (now {self.kv_tokens}).")

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

  def _slots_per_group(self, state):
    return -(-self.max_slots // self.groups) if self.max_slots else state.batch_size

  def _admit_and_extend(self, params, state: Rollout, quota, sampling):
    runnable = ~state.done & (quota > 0)
    items, keep = [], set()
    for g in range(self.local_groups):
      rows = [b for b in np.flatnonzero(runnable & (state.group == g))]
      running = sum(bool(state.resident[b]) for b in rows)
      for b in rows:
        L = state.length(b)
        if state.resident[b] and L - state.cached[b] < 2:
          continue  # only its pending token: decode takes it
        if not state.resident[b] and running >= self._slots_per_group(state):
          continue  # waits for a slot
        if not self._grow(state, b, L, keep, runnable):
          if not keep and running <= int(state.resident[b]):
            self._too_small(state, b, L)
          continue  # waits for pages
        running += not state.resident[b]
        state.resident[b] = True
        keep.add(b)
        items.append(self._item(state, b, state.transcript(b)[state.cached[b]:], steps=1))
    self._extend(params, state, items, sampling)
    for it in items:
      b, out = it["row"], it["out"]
      state.cached[b] = state.length(b)
      self._append(state, b, [out["token"]], [out["logp"]], [out["sampler_logp"]])
      self._end_rows(state, b, out["stopped"], out["truncated"])
      quota[b] -= 1

  def _decode_round(self, params, state: Rollout, quota, sampling):
    runnable = ~state.done & (quota > 0)
    items, keep, waiting = [], set(), False
    for g in range(self.local_groups):
      rows = [b for b in np.flatnonzero(runnable & (state.group == g) & state.resident)
              if state.length(b) - state.cached[b] == 1]
      waiting |= int((runnable & (state.group == g)).sum()) > len(rows)
      for b in rows[:self._slots_per_group(state)]:
        if not state.resident[b]:
          continue  # preempted for an earlier row of this round
        L = state.length(b)
        steps = int(min(quota[b], self.decode_chunk, state.capacity(b) - L))
        if steps <= 0:  # no room left in its columns
          self._end_rows(state, b, False, True)
          continue
        width = self.table_width(state.cache_len, max(
            [-(-(int(state.cached[b]) + steps) // self.page_size)]
            + [len(it["pages"]) for it in items if it["group"] == g]))
        scheduled = sum(it["group"] == g for it in items)
        if scheduled and bucket(scheduled + 1) > self.decode_rows_cap(
            state.allocators[g].num_pages, width):
          waiting = True
          break
        if not self._grow(state, b, int(state.cached[b]) + steps, keep, runnable):
          if not keep:
            self._too_small(state, b, int(state.cached[b]) + steps)
          waiting = True
          break
        keep.add(b)
        items.append(self._item(state, b, state.transcript(b)[-1:], steps=steps))
      waiting |= len(rows) > len([it for it in items if it["group"] == g])
    total = distributed.agree_sum(len(items))
    if not total:
      return
    waiting = distributed.any_process(waiting)
    # Return to the host when a quarter of the rows (rows are waiting) or half of
    # them (none are) have ended: refill the slots, or compact to a smaller bucket.
    min_active = total - max(1, total // 4) if waiting else total // 2
    K = distributed.agree_max(min(bucket(max(it["steps"] for it in items) if items else 1),
                                  bucket(self.decode_chunk)))
    rows = self._rows(state, items, 1)
    state.pool, out = self.program("decode", K)(params, state.pool, rows, state.key,
                                                 sampling.as_arrays(), jnp.int32(min_active))
    out = {k: distributed.host_local(v) for k, v in out.items()}
    state.stats["decode_calls"] += 1
    state.stats["decode_steps"] += int(out["count"].max(initial=0))
    for it in items:
      b, r = it["row"], it["_row"]
      n = int(out["count"][r])
      state.cached[b] += n
      self._append(state, b, out["token"][r, :n], out["logp"][r, :n], out["sampler_logp"][r, :n])
      self._end_rows(state, b, out["stopped"][r], out["truncated"][r])
      quota[b] -= n
      self._trim(state, b)

  def _trim(self, state: Rollout, b: int):
    """Gives back pages past the row's cached tokens and its pending one."""
    keep = -(-(int(state.cached[b]) + 1) // self.page_size)
    if len(state.pages[b]) > keep:
      state.allocators[state.group[b]].release(state.pages[b][keep:])
      state.pages[b] = state.pages[b][:keep]

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
      self._append(state, b, list(ids)[:room])
      state.done[b] = state.stopped[b] = state.truncated[b] = False
      if room <= len(ids) or state.num_generated[b] >= state.max_new[b]:
        self._end_rows(state, b, False, True)  # no room or budget left for a reply
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
        self._trim(state, b)
    return state

  def finish(self, state: Rollout, rows) -> Rollout:
    """Marks rows as done (the host decided their episode is over) and frees their pages."""
    for b in rows:
      state.done[b] = True
      if state.resident[b]:
        self._evict(state, b)
    return state

  def local_batch_size(self, state: Rollout) -> int:
    """Rows of `state` that belong to this process (all of them in one process)."""
    return state.batch_size

  def outputs(self, state: Rollout) -> SampleOutput:
    """Ends the rollout: frees every page and the pool, and returns the host view."""
    for b in np.flatnonzero(state.resident):
      self._evict(state, b)
    leaked = [g for g, a in enumerate(state.allocators) if not a.is_whole()]
    if leaked:
      raise AssertionError(f"Sampler: KV pages leaked in groups {leaked}.")
    state.stats["peak_pages"] = max(a.peak_used for a in state.allocators)
    state.pool = None
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
    out = self.outputs(state)
    self.last_stats = dict(state.stats)  # preemptions, calls, peak pages (benchmarks, logs)
    return out
