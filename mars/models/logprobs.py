"""Next-token log-probabilities (and entropies) of a full sequence, optionally
over chunks of positions so the [B, T, V] logits never exist at once."""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mars.models import qwen
from mars.models.config import ModelConfig

Params = qwen.Params


def pick_logprobs(logits, targets):
  """log softmax(logits)[target] over the last axis, in fp32: [..., V], [...] -> [...].

  The target's logit is selected by a one-hot mask and a sum, not a gather:
  the gather's gradient is a scatter into a zeroed [..., V] buffer (one more
  pass over the largest tensor of the update, 7% of the cpu-small step in
  benchmarks/update.py), while the mask's gradient fuses into the softmax's,
  and a sum over a vocabulary sharded on the tensor axis is a plain reduction.
  Exact: the sum adds one nonzero term.
  """
  logits = logits.astype(jnp.float32)
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def logprobs_from_logits(logits, tokens):
  """Next-token logprobs aligned to the token they score (column 0 is 0)."""
  picked = pick_logprobs(logits[:, :-1], tokens[:, 1:])
  return jnp.pad(picked, ((0, 0), (1, 0)))


def entropy_from_logits(logits):
  """Entropy H = logsumexp(z) − Σ softmax(z)·z over the last axis, in fp32.

  Logits are shifted by their max first, so large logits do not cancel
  catastrophically (H of a near one-hot stays near 0, not ulp(max z)), and the
  logsumexp form never takes log of a 0 probability, so -inf logits (masked
  vocab) stay finite. [..., V] -> [...].
  """
  logits = logits.astype(jnp.float32)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  logsumexp = jax.nn.logsumexp(logits, axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  # Where p == 0 the logit may be -inf; p·z would be NaN, and contributes 0.
  p_times_z = jnp.where(probs > 0, probs * logits, 0.0)
  return logsumexp - jnp.sum(p_times_z, axis=-1)


def _score(cfg: ModelConfig, params: Params, hidden, targets, with_entropy: bool):
  """(logp, entropy or None) of `targets` [B, C] under the logits of hidden [B, C, D]."""
  logits = qwen.lm_logits(cfg, params, hidden).astype(jnp.float32)
  return pick_logprobs(logits, targets), (entropy_from_logits(logits) if with_entropy else None)


def logprobs_from_hidden(cfg: ModelConfig, params: Params, hidden, tokens,
                         with_entropy: bool = False):
  """Next-token (logp [B, T], entropy [B, T] or None) from final-normed hidden states.

  Aligned like `logprobs_from_logits`: column t scores tokens[:, t] from the
  hidden state at t − 1; column 0 is 0. With cfg.logits_chunk = c > 0 the
  lm_head and log-softmax run over c positions at a time under
  `jax.checkpoint`, so the forward keeps only [B, c, V] fp32 logits alive and
  the backward recomputes each chunk's logits instead of storing [B, T, V]
  (at Qwen's 151,936-token vocabulary, the largest activation of the update).
  The result equals the unchunked one up to fp32 summation order.
  """
  h, targets = hidden[:, :-1], tokens[:, 1:]
  B, T1, D = h.shape
  chunk = cfg.logits_chunk
  if not chunk or chunk >= T1:
    logp, ent = _score(cfg, params, h, targets, with_entropy)
  else:
    n = -(-T1 // chunk)
    pad = n * chunk - T1
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(xs):
      picked, ent = _score(cfg, params, *xs, with_entropy)
      return picked, (ent if with_entropy else jnp.zeros_like(picked))

    logp, ent = jax.lax.map(one, (h, targets))
    logp = logp.swapaxes(0, 1).reshape(B, n * chunk)[:, :T1]
    ent = ent.swapaxes(0, 1).reshape(B, n * chunk)[:, :T1] if with_entropy else None
  col0 = ((0, 0), (1, 0))
  return jnp.pad(logp, col0), (jnp.pad(ent, col0) if ent is not None else None)


def sequence_logprobs(cfg: ModelConfig, params: Params, tokens, attention_mask,
                      positions=None, with_entropy: bool = False, segment_ids=None):
  """(logp [B, T], entropy [B, T] or None) of a padded (or packed, with
  `segment_ids`) batch: forward + scoring."""
  hidden = qwen.forward(cfg, params, tokens, attention_mask, positions, return_hidden=True,
                        segment_ids=segment_ids)
  return logprobs_from_hidden(cfg, params, hidden, tokens, with_entropy)


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(cfg: ModelConfig, params: Params, tokens, attention_mask,
                   positions: Optional[jax.Array] = None):
  """log p(tokens[:, t] | tokens[:, :t]) aligned to t ([B, T]; 0 at t = 0)."""
  return sequence_logprobs(cfg, params, tokens, attention_mask, positions)[0]
