"""Page accounting of the rollout engine's scheduler, over 1,000 random request mixes.

The device programs are replaced by host fakes that check what the scheduler
hands them (every fed position has a real page of its own; no page that another
row still holds is written) and answer with random tokens and stops. After every
host call the reference counts equal the number of rows holding each page, and
after every rollout the pool is whole again.
"""
import jax
import numpy as np
import pytest

import mars.models as mm
from mars.sampling import SamplingParams, engine
from mars.sampling.pages import OutOfPages, PagePool


def test_page_pool_refcounts_and_bad_use():
  pool = PagePool(6)
  assert pool.capacity == 5 and pool.free == 5
  a = pool.alloc(3)
  assert 0 not in a  # the trash page is never handed out
  pool.share(a[:2])
  pool.release(a)
  assert pool.free == 3 and pool.refs(a[0]) == 1 and pool.refs(a[2]) == 0
  with pytest.raises(OutOfPages):
    pool.alloc(4)
  pool.release(a[:2])
  assert pool.is_whole() and pool.peak_used == 3
  with pytest.raises(AssertionError):
    pool.release(a[:1])
  with pytest.raises(ValueError, match="at least 2 pages"):
    PagePool(1)


class FakeDevice:
  """Stands in for Sampler.program: checks the rows it gets, answers at random."""

  def __init__(self, sampler, rng):
    self.sampler, self.rng, self.state = sampler, rng, None
    self.calls = 0

  def program(self, kind, num_steps=0):
    return self.extend if kind == "extend" else (
        lambda *a: self.decode(*a, num_steps=num_steps))

  def _check_writes(self, rows, counts):
    p = self.sampler.page_size
    tables, cached = np.asarray(rows.tables), np.asarray(rows.cached)
    written = set()
    for r in range(tables.shape[0]):
      for pos in range(cached[r], cached[r] + counts[r]):
        page = tables[r, pos // p]
        assert page != 0, "a real token written to the trash page"
        assert (page, pos % p) not in written, "two rows write one slot"
        written.add((page, pos % p))
        assert self.state.allocators[0].refs(int(page)) == 1, "wrote a shared page"

  def _tokens(self, n):
    return self.rng.integers(0, 50, n).astype(np.int32)

  def extend(self, params, pool, rows, key, sampling):
    self.calls += 1
    self._check_writes(rows, np.asarray(rows.feed_len))
    R = rows.tokens.shape[0]
    tok = self._tokens(R)
    samples = np.asarray(rows.steps) > 0
    length = np.asarray(rows.cached) + np.asarray(rows.feed_len) + 1
    stopped = samples & (tok < 5)
    truncated = samples & ~stopped & ((np.asarray(rows.num_generated) + 1 >= np.asarray(rows.max_new))
                                      | (length >= np.asarray(rows.max_len)))
    z = np.zeros(R, np.float32)
    return pool, dict(token=tok, logp=z, sampler_logp=z, stopped=stopped, truncated=truncated)

  def decode(self, params, pool, rows, key, sampling, min_active, *, num_steps):
    self.calls += 1
    R = rows.tokens.shape[0]
    steps, ngen = np.asarray(rows.steps), np.asarray(rows.num_generated).copy()
    cached = np.asarray(rows.cached).copy()
    active = steps > 0
    count = np.zeros(R, np.int32)
    out = np.zeros((R, num_steps), np.int32)
    stopped, truncated = np.zeros(R, bool), np.zeros(R, bool)
    for i in range(num_steps):
      if active.sum() <= int(min_active):
        break
      tok = self._tokens(R)
      cached += active
      ngen += active
      stop = active & (tok < 3)
      trunc = active & ~stop & ((ngen >= np.asarray(rows.max_new))
                                | (cached + 1 >= np.asarray(rows.max_len)))
      out[:, i] = np.where(active, tok, 0)
      count += active
      stopped |= stop
      truncated |= trunc
      active &= ~stop & ~trunc & (count < steps)
    self._check_writes(rows, count)
    z = np.zeros((R, num_steps), np.float32)
    return pool, dict(token=out, logp=z, sampler_logp=z, count=count, stopped=stopped,
                      truncated=truncated)


def _check_refs(state):
  held = {}
  for b in np.flatnonzero(state.resident):
    assert len(state.pages[b]) * state.pool.page_size >= state.cached[b]  # cached K/V has pages
    for page in state.pages[b]:
      held[page] = held.get(page, 0) + 1
  alloc = state.allocators[0]
  for page in range(1, alloc.num_pages):
    assert alloc.refs(page) == held.get(page, 0), f"page {page}"
  assert not any(state.pages[b] for b in np.flatnonzero(~state.resident))


def test_random_request_mixes_leave_the_pool_whole():
  cfg = mm.tiny_config(num_layers=1, hidden_size=16, intermediate_size=16, num_heads=2,
                       num_kv_heads=1, head_dim=8, vocab_size=64)
  rng = np.random.default_rng(0)
  preempted = forced_rows = 0
  for mix in range(1000):
    page = int(rng.integers(1, 9))
    prompts, n = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    P, max_new = int(rng.integers(1, 21)), int(rng.integers(1, 21))
    cache_len = P + max_new + int(rng.integers(1, 12))
    kv_tokens = 0 if rng.random() < 0.3 else int(rng.integers(cache_len + page, 4 * cache_len))
    sampler = engine.Sampler(cfg, stop_ids=[0], page_size=page, kv_tokens=kv_tokens,
                             max_slots=int(rng.integers(0, 6)),
                             decode_chunk=int(rng.integers(1, 9)),
                             prefill_chunk=int(rng.integers(1, 17)))
    fake = FakeDevice(sampler, rng)
    sampler.program = fake.program
    tokens = rng.integers(1, 60, (prompts, P))
    mask = np.ones((prompts, P), bool)
    for q in range(prompts):
      mask[q, :int(rng.integers(0, P))] = False
    start = sampler.start
    # The fake checks writes against the state: give it the state before the prefill runs.
    orig_share = sampler._share_prefixes

    def share(params, state, n_, sampling, orig=orig_share):
      fake.state = state
      return orig(params, state, n_, sampling)

    sampler._share_prefixes = share
    state = start(None, tokens, mask, key=jax.random.key(mix), n=n, max_new_tokens=max_new,
                  cache_len=cache_len)
    fake.state = state
    _check_refs(state)
    for _ in range(int(rng.integers(1, 5))):
      state = sampler.run(None, state, int(rng.integers(1, 12)), SamplingParams())
      _check_refs(state)
      B = state.batch_size
      rows = rng.choice(B, size=int(rng.integers(0, B + 1)), replace=False)
      for b in rows[:len(rows) // 3]:  # drop the tail of an attempt
        end = state.prompt_len + int(state.response_len[b])
        if end > state.prompt_len:
          state = sampler.rewind(state, {int(b): int(rng.integers(state.prompt_len, end))})
      queued = {int(b): list(rng.integers(1, 60, int(rng.integers(1, 6))))
                for b in rows[len(rows) // 3:2 * len(rows) // 3]}
      forced_rows += len(queued)
      state = sampler.force(state, queued)
      state = sampler.finish(state, [int(b) for b in rows[2 * len(rows) // 3:]])
      _check_refs(state)
    state = sampler.run(None, state, max_new, SamplingParams())
    _check_refs(state)
    preempted += state.stats["preemptions"]
    out = sampler.outputs(state)  # raises if a page leaked
    assert state.allocators[0].is_whole()
    assert (out.lengths <= max_new).all()
    assert ((out.gen_mask | out.forced_mask).sum(-1) + out.prompt_mask.sum(-1) <= cache_len).all()
  assert preempted > 100 and forced_rows > 500  # the mixes did exercise both paths
