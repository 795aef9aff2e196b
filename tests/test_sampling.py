"""Rollout engine: parity with HF generate, logprobs against the trainer's forward,
stopping, sampling distribution, forced tokens, chunking, prefix sharing, page
sizes, preemption, continuous batching, sharding, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mars.models as mm
from mars import sharding
from mars.sampling import GREEDY, Sampler, SamplingParams, filter_logits

P, NEW = 12, 32


@pytest.fixture(scope="module")
def models(tiny_qwen2, tiny_qwen3):
  return {name: (mm.load_hf(path), hf) for name, (path, hf) in
          (("qwen2", tiny_qwen2), ("qwen3", tiny_qwen3))}


@pytest.fixture(scope="module")
def samplers(models):
  return {name: Sampler(cfg, stop_ids=[], pad_id=0) for name, ((cfg, _), _) in models.items()}


def _prompts(B=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 211, (B, P))
  mask = np.ones((B, P), bool)
  mask[0, :5] = False
  if B > 2:
    mask[2, :3] = False
  tokens[~mask] = 0
  return tokens, mask


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_greedy_matches_hf_generate(models, samplers, name):
  (cfg, params), hf = models[name]
  tokens, mask = _prompts()
  out = samplers[name].generate(params, tokens, mask, key=jax.random.key(0), max_new_tokens=NEW,
                                sampling=GREEDY)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                      max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0).numpy()
  np.testing.assert_array_equal(out.tokens[:, P:P + NEW], ref[:, P:])
  assert out.gen_mask[:, P:P + NEW].all() and not out.gen_mask[:, :P].any()
  assert (out.lengths == NEW).all() and out.truncated.all() and not out.stopped.any()


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_logprobs_equal_teacher_forced_forward(models, samplers, name):
  (cfg, params), _ = models[name]
  tokens, mask = _prompts()
  out = samplers[name].generate(params, tokens, mask, key=jax.random.key(1), max_new_tokens=NEW,
                                sampling=SamplingParams(temperature=0.7, top_k=20))
  seq = out.tokens[:, :P + NEW]
  seq_mask = np.concatenate([mask, np.ones((4, NEW), bool)], 1)
  ref = np.asarray(mm.token_logprobs(cfg, params, jnp.asarray(seq), jnp.asarray(seq_mask)))
  np.testing.assert_allclose(out.logp[:, P:P + NEW], ref[:, P:], atol=1e-4)
  # The sampler-distribution logprob differs (T=0.7, top-k renormalized) and is >= policy's here.
  assert np.abs(out.sampler_logp[:, P:P + NEW] - ref[:, P:]).max() > 1e-2


def test_stop_ids_end_rows_and_loop_exits_early(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  free = Sampler(cfg, pad_id=0).generate(params, tokens, mask, key=jax.random.key(0),
                                         max_new_tokens=NEW, sampling=GREEDY)
  stop = int(free.tokens[1, P + 5])
  first_hit = [np.flatnonzero(free.tokens[b, P:P + NEW] == stop) for b in range(4)]
  out = Sampler(cfg, stop_ids=[stop], pad_id=0).generate(
      params, tokens, mask, key=jax.random.key(0), max_new_tokens=NEW, sampling=GREEDY)
  for b in range(4):
    if first_hit[b].size:  # the row stops right after its first stop token
      n = first_hit[b][0] + 1
      assert out.lengths[b] == n and out.stopped[b] and not out.truncated[b]
      np.testing.assert_array_equal(out.tokens[b, P:P + n], free.tokens[b, P:P + n])
      assert not out.gen_mask[b, P + n:].any()
    else:  # the other rows keep going to the budget
      assert out.lengths[b] == NEW and out.truncated[b]
  assert out.lengths[1] <= 6
  # Every token a stop token: each row stops on the token its prefill samples; no decode runs.
  sampler = Sampler(cfg, stop_ids=range(cfg.vocab_size), pad_id=0)
  state = sampler.start(params, tokens, mask, key=jax.random.key(0), max_new_tokens=NEW)
  state = sampler.run(params, state, num_steps=NEW)
  assert (state.response_len == 1).all() and bool(state.done.all())
  assert state.stats["decode_calls"] == 0


def _expected_probs(logits, temperature, top_k, top_p):
  filtered = np.asarray(filter_logits(jnp.asarray(logits / temperature)[None], top_p, top_k))[0]
  p = np.exp(filtered - filtered.max())
  return p / p.sum()


def _numpy_keep(scaled, top_p, top_k):
  """HF's rule with a plain numpy sort: keep a token while the mass before it < top_p,
  and among the top_k (ties at the threshold kept)."""
  order = np.argsort(-scaled, kind="stable")
  probs = np.exp(scaled[order].astype(np.float64) - scaled.max())
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  n = int(np.sum((before < top_p) & (np.arange(len(order)) < (top_k or len(order)))))
  return scaled >= scaled[order][n - 1]


@pytest.mark.parametrize("top_p,top_k", [(0.95, 0), (0.5, 0), (1e-6, 0), (1.0, 50), (0.9, 20),
                                         (0.3, 1)])
def test_filter_logits_keeps_what_a_sort_keeps(top_p, top_k):
  """The bisection filter against the numpy sort on Qwen's 151,936-token vocabulary
  (random logits, a row with ties and -inf entries)."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(3, 151936)) * 3).astype(np.float32)
  x[1, :1000] = x[1, 0]                      # ties
  x[2, ::2] = -np.inf                        # masked vocabulary
  got = np.asarray(jax.jit(filter_logits)(jnp.asarray(x), top_p, top_k))
  for row in range(3):
    np.testing.assert_array_equal(np.isfinite(got[row]), _numpy_keep(x[row], top_p, top_k))
    assert np.all(got[row][np.isfinite(got[row])] == x[row][np.isfinite(got[row])])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 12, 1.0), (1.3, 0, 0.6)])
def test_sampled_distribution_matches_softmax(models, temperature, top_k, top_p):
  """Chi-square test of 4096 first tokens against softmax(logits/T) with filters."""
  from scipy import stats
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts(B=1)
  logits = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))[0, -1]
  n = 4096
  out = Sampler(cfg, pad_id=0).generate(params, tokens, mask, key=jax.random.key(7), n=n,
                                        max_new_tokens=1,
                                        sampling=SamplingParams(temperature, top_p, top_k))
  counts = np.bincount(out.tokens[:, P], minlength=cfg.vocab_size)
  # Independent reference for the filters: plain numpy sort.
  scaled = logits / temperature
  order = np.argsort(-scaled)
  keep = np.zeros_like(scaled, bool)
  probs_sorted = np.exp(scaled[order] - scaled.max())
  probs_sorted /= probs_sorted.sum()
  before = np.cumsum(probs_sorted) - probs_sorted
  kept = order[(before < top_p) & (np.arange(len(order)) < (top_k or len(order)))]
  keep[kept] = True
  assert counts[~keep].sum() == 0, "sampled a token outside the top-k/top-p set"
  p = np.where(keep, np.exp(scaled.astype(np.float64) - scaled.max()), 0)
  p /= p.sum()
  np.testing.assert_allclose(_expected_probs(logits, temperature, top_k, top_p), p, atol=1e-5)
  big = p * n >= 5  # pool rare tokens so the chi-square approximation holds
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(p[big] * n, p[~big].sum() * n)
  obs, exp = obs[exp > 0], exp[exp > 0]
  exp = exp * obs.sum() / exp.sum()  # float64 renormalisation for scipy's sum check
  assert stats.chisquare(obs, exp).pvalue > 1e-3


def _teacher_forced(cfg, params, out):
  """The trainer's logprobs of every column of a SampleOutput (prompt + response)."""
  valid = out.prompt_mask | out.gen_mask | out.forced_mask
  return np.asarray(mm.token_logprobs(cfg, params, jnp.asarray(out.tokens), jnp.asarray(valid)))


def test_forced_tokens_then_sampling_match_the_trainers_forward(models):
  (cfg, params), _ = models["qwen3"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, pad_id=0, page_size=4)
  state = sampler.start(params, tokens, mask, key=jax.random.key(3), n=2, max_new_tokens=40,
                        cache_len=64)
  state = sampler.run(params, state, num_steps=5)
  feedback = {0: [17, 18, 19, 20], 5: [5, 6]}
  state = sampler.force(state, feedback)
  state = sampler.run(params, state, num_steps=7)
  out = sampler.outputs(state)
  for row in range(8):
    ids = feedback.get(row, [])
    forced_cols = np.flatnonzero(out.forced_mask[row])
    np.testing.assert_array_equal(forced_cols, np.arange(P + 5, P + 5 + len(ids)))
    np.testing.assert_array_equal(out.tokens[row, forced_cols], ids)
    assert (out.logp[row, forced_cols] == 0).all() and not out.gen_mask[row, forced_cols].any()
    assert out.lengths[row] == 12  # 5 sampled, the forced turn in one extend, then 7 more
    np.testing.assert_array_equal(np.flatnonzero(out.gen_mask[row] | out.forced_mask[row]),
                                  np.arange(P, P + 12 + len(ids)))
  # Every sampled token's logprob (after shared prompt pages, a forced turn and a
  # resumed decode) equals the trainer's forward over the final transcript.
  ref = _teacher_forced(cfg, params, out)
  np.testing.assert_allclose(out.logp[out.gen_mask], ref[out.gen_mask], atol=1e-4)


def test_rewind_drops_tokens_and_continues_as_if_fresh(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, pad_id=0, page_size=4)
  state = sampler.start(params, tokens, mask, key=jax.random.key(4), max_new_tokens=30,
                        cache_len=64)
  state = sampler.run(params, state, 9)
  state = sampler.rewind(state, {1: P + 3, 2: P + 8})
  assert state.num_generated.tolist() == [9, 3, 8, 9]  # refunded to the budget
  state = sampler.force(state, {1: [7, 7]})
  state = sampler.run(params, state, 6)
  out = sampler.outputs(state)
  assert out.lengths.tolist() == [15, 9, 14, 15]
  assert out.forced_mask[1, P + 3:P + 5].all() and out.forced_mask[1].sum() == 2
  ref = _teacher_forced(cfg, params, out)
  np.testing.assert_allclose(out.logp[out.gen_mask], ref[out.gen_mask], atol=1e-4)


def test_forcing_reactivates_a_stopped_row(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, stop_ids=range(cfg.vocab_size), pad_id=0)  # every row stops at once
  state = sampler.start(params, tokens, mask, key=jax.random.key(0), max_new_tokens=8, cache_len=64)
  state = sampler.run(params, state, 4)
  assert bool(state.done.all())
  state = sampler.run(params, sampler.force(state, {3: [9, 9, 9]}), 10)
  out = sampler.outputs(state)
  assert out.forced_mask[3].sum() == 3 and out.lengths[3] == 2 and out.stopped[3]
  assert (out.lengths[:3] == 1).all()
  np.testing.assert_array_equal(np.flatnonzero(out.forced_mask[3]), [P + 1, P + 2, P + 3])


def test_chunked_equals_uninterrupted(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, pad_id=0)
  kw = dict(key=jax.random.key(11), n=2, max_new_tokens=24, cache_len=64)
  whole = sampler.outputs(sampler.run(params, sampler.start(params, tokens, mask, **kw), 64))
  state = sampler.start(params, tokens, mask, **kw)
  for _ in range(5):
    state = sampler.run(params, state, 5)
  chunked = sampler.outputs(state)
  np.testing.assert_array_equal(whole.tokens, chunked.tokens)
  # Chunks run as device calls of other shapes (steps, rows): float rounding only.
  np.testing.assert_allclose(whole.logp, chunked.logp, atol=1e-5)
  assert whole.tokens.shape[0] == 8
  compiles = sampler.compile_count
  sampler.outputs(sampler.run(params, sampler.start(params, tokens, mask, **kw), 64))
  assert sampler.compile_count == compiles  # same shapes: no recompile


def test_n_samples_share_the_prompt_pages(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, pad_id=0, page_size=4)
  state = sampler.start(params, tokens, mask, key=jax.random.key(5), n=3, max_new_tokens=8,
                        sampling=GREEDY)
  # Full pages of each prompt (all but its last token, rounded down to a page) are held
  # once, by all 3 samples.
  for q, plen in enumerate(mask.sum(-1)):
    shared = (plen - 1) // 4
    rows = range(3 * q, 3 * q + 3)
    assert [len(state.pages[b]) for b in rows] == [shared] * 3
    assert all(state.pages[b] == state.pages[3 * q] for b in rows)
    assert all(state.allocators[0].refs(pg) == 3 for pg in state.pages[3 * q])
  assert state.stats["shared_prefix_tokens"] == sum(2 * 4 * ((plen - 1) // 4) for plen in mask.sum(-1))
  out = sampler.outputs(sampler.run(params, state, 8, GREEDY))
  assert out.tokens.shape[0] == 12
  for b in range(4):  # greedy: the 3 copies of a prompt are identical, group-major order
    for j in range(1, 3):
      np.testing.assert_array_equal(out.tokens[3 * b], out.tokens[3 * b + j])


@pytest.mark.parametrize("engine_kw", [
    dict(page_size=4), dict(page_size=16), dict(page_size=1),
    dict(page_size=4, kv_tokens=56),                # a pool of 14 pages: preemptions
    dict(page_size=4, max_slots=3, decode_chunk=5),  # a waiting queue, refilled
    dict(page_size=8, kv_tokens=64, max_slots=5, decode_chunk=3, prefill_chunk=4)])
def test_output_does_not_depend_on_pages_pool_or_slots(models, engine_kw):
  """Greedy tokens are identical (and sampled ones too: keys come from (sequence,
  position)) for any page size, pool size, slot count and chunking, with
  preemption and re-prefill, with shared prefixes."""
  (cfg, params), _ = models["qwen3"]
  tokens, mask = _prompts()
  ref = {}
  for name, sp in (("greedy", GREEDY), ("sampled", SamplingParams(1.0, 0.95, 0))):
    kw = dict(key=jax.random.key(6), n=3, max_new_tokens=24, sampling=sp)
    ref = Sampler(cfg, pad_id=0).generate(params, tokens, mask, **kw)
    sampler = Sampler(cfg, pad_id=0, **engine_kw)
    out = sampler.generate(params, tokens, mask, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=name)
    np.testing.assert_allclose(out.logp, ref.logp, atol=2e-5)
  if "kv_tokens" in engine_kw:
    assert sampler.last_stats["preemptions"] > 0


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (8, 1, 1)])
def test_sharded_sampler_equals_unsharded(models, mesh_shape):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts(B=8)
  kw = dict(key=jax.random.key(2), max_new_tokens=16, sampling=SamplingParams(1.0, 0.9, 0))
  ref = Sampler(cfg, pad_id=0).generate(params, tokens, mask, **kw)
  mesh = sharding.make_mesh(mesh_shape)
  sampler = Sampler(cfg, pad_id=0, mesh=mesh)
  state = sampler.start(params, tokens, mask, key=kw["key"], max_new_tokens=16)
  assert state.pool.k.sharding.spec[1] == ("data", "fsdp")  # one page pool per group
  out = sampler.outputs(sampler.run(params, state, 64, kw["sampling"]))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)


def test_bad_input_errors_before_compile(models):
  (cfg, params), _ = models["qwen2"]
  tokens, mask = _prompts()
  sampler = Sampler(cfg, pad_id=0)
  compiles = sampler.compile_count
  bad = mask.copy()
  bad[1] = False
  with pytest.raises(ValueError, match="prompt row 1 is empty"):
    sampler.start(params, tokens, bad, key=jax.random.key(0))
  with pytest.raises(ValueError, match="does not fit the cache"):
    sampler.start(params, tokens, mask, key=jax.random.key(0), cache_len=P)
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match="top_p must be in"):
      sampler.start(params, tokens, mask, key=jax.random.key(0), sampling=SamplingParams(top_p=top_p))
  meshed = Sampler(cfg, pad_id=0, mesh=sharding.make_mesh((8, 1, 1)))
  with pytest.raises(sharding.ShardingError, match="prompt batch size 4 is not divisible"):
    meshed.start(params, tokens, mask, key=jax.random.key(0))
  assert sampler.compile_count == compiles  # every error came before any compile

