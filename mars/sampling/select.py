"""Next-token selection: greedy, temperature, top-k and top-p (nucleus).

All knobs are traced scalars, so changing them between calls never
recompiles. The top-k/top-p filter (a bisection, no sort) is skipped
(lax.cond) when both are off, which is the RL default (temperature 1, full
distribution).
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0   # 0 means greedy.
  top_p: float = 1.0         # in (0, 1]; 1 disables.
  top_k: int = 0             # 0 disables.

  def validate(self):
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    return self

  @classmethod
  def from_config(cls, cfg) -> "SamplingParams":
    """From any config with temperature / top_p / top_k (missing ones: defaults)."""
    d = cls()
    return cls(temperature=float(getattr(cfg, "temperature", d.temperature)),
               top_p=float(getattr(cfg, "top_p", d.top_p)),
               top_k=int(getattr(cfg, "top_k", d.top_k)))

  def as_arrays(self):
    return (jnp.float32(self.temperature), jnp.float32(self.top_p), jnp.int32(self.top_k))


GREEDY = SamplingParams(temperature=0.0)


def _ordered_keys(x):
  """float32 -> int32 with the same order (negative floats' bits flipped), so a
  threshold can be bisected exactly over the 2^32 float values."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def filter_logits(scaled, top_p, top_k):
  """Masks logits outside the top-k set and outside the top-p nucleus to -inf.

  Nucleus: the smallest prefix of tokens (by probability) whose mass reaches
  top_p; a token is kept if the mass *before* it is still < top_p, so at least
  one token always survives (same rule as HF's TopPLogitsWarper).

  Why no sort: each set is {logit >= t} for the largest t whose set still
  holds top_p of the mass (k tokens), and that t is found by bisection over
  the float32 values (32 halvings of their int32 order, exact), each a masked
  sum over the vocabulary. A full sort of a 151,936-token vocabulary per row
  and step took 0.30 s for 8 rows on 2 CPU cores; this takes 0.015 s.
  Ties at the threshold are kept, as with a sort.
  """
  vocab = scaled.shape[-1]
  keys = _ordered_keys(scaled)
  probs = jax.nn.softmax(scaled.astype(jnp.float32), axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.float32)
  lowest, highest = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)

  def halve(_, bounds):
    # Invariant: the answer is in [lo, hi]; the set {keys >= lo} always qualifies.
    lo_p, hi_p, lo_k, hi_k = bounds
    # ceil((lo + hi) / 2) without int32 overflow.
    mid_p = (lo_p >> 1) + (hi_p >> 1) + ((lo_p | hi_p) & 1)
    mid_k = (lo_k >> 1) + (hi_k >> 1) + ((lo_k | hi_k) & 1)
    ok_p = jnp.sum(jnp.where(keys >= mid_p[..., None], probs, 0.0), axis=-1) >= top_p
    ok_k = jnp.sum((keys >= mid_k[..., None]).astype(jnp.float32), axis=-1) >= k
    return (jnp.where(ok_p, mid_p, lo_p), jnp.where(ok_p, hi_p, mid_p - 1),
            jnp.where(ok_k, mid_k, lo_k), jnp.where(ok_k, hi_k, mid_k - 1))

  lo_p, _, lo_k, _ = jax.lax.fori_loop(0, 32, halve, (lowest, highest, lowest, highest))
  threshold = jnp.maximum(lo_p, lo_k)
  return jnp.where(keys >= threshold[..., None], scaled, -jnp.inf)


def row_keys(key, seq_ids, positions):
  """One key per row from (sequence id, transcript position): a sequence's draws do
  not depend on its slot, the batch it ran in, the pool size or preemptions."""
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(key, s), t))(seq_ids, positions)


def select_tokens(logits, keys, temperature, top_p, top_k):
  """Picks one token per row with its own key (keys [R]); returns (tokens [R],
  sampler-distribution logp [R]).

  The *policy* logprob (temperature 1, unfiltered) is computed by the caller:
  PPO ratios need the unmodified distribution, not this one.
  """
  logits = logits.astype(jnp.float32)
  greedy = temperature <= 0.0

  def sample(logits):
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    needs_filter = (top_p < 1.0) | (top_k > 0)
    scaled = jax.lax.cond(needs_filter, lambda s: filter_logits(s, top_p, top_k), lambda s: s,
                          scaled)
    # Inverse-CDF draw: one uniform per row (the Gumbel trick needs one per vocab
    # entry, 3x the time of the whole draw on CPU). Filtered tokens have zero mass
    # and are never picked.
    lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    cdf = jnp.cumsum(jnp.exp(scaled - lse), axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    tokens = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), logits.shape[-1] - 1)
    tokens = tokens.astype(jnp.int32)
    return tokens, (jnp.take_along_axis(scaled, tokens[:, None], -1) - lse)[:, 0]

  # Greedy skips the draw, the filters' sort and the sampler log-softmax.
  greedy_pick = lambda logits: (jnp.argmax(logits, axis=-1).astype(jnp.int32),
                                jnp.zeros(logits.shape[:1], jnp.float32))
  return jax.lax.cond(greedy, greedy_pick, sample, logits)
