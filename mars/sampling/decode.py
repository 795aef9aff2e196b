"""The rollout engine's two device programs, over a batch of rows built by the host.

- `extend_and_sample`: feeds C tokens per row (a prompt, a forced turn, a
  re-prefill; chunked by the host when long), then samples each finishing
  row's next token.
- `decode_loop`: up to K decode steps on device (`lax.while_loop`), one
  sampled token per active row per step; it returns early once the active
  rows fall to `min_active`, so the host can refill or compact the batch.

A row's transcript invariant: every token but the last is cached; the last
(a sampled token, or the end of a forced turn) is fed by the next program.
Sampling keys come from (sequence id, transcript position) (select.row_keys).
"""
import flax.struct
import jax
import jax.numpy as jnp

from mars.models import paged
from mars.models.config import ModelConfig
from mars.sampling.select import row_keys, select_tokens


@flax.struct.dataclass
class Rows:
  """One device call's rows (host-built, padded to a bucket; padding rows have steps 0
  and feed_len 0)."""
  tokens: jax.Array         # [R, C] int32 fed tokens (decode: [R, 1], the pending token)
  feed_len: jax.Array       # [R] int32 real tokens in `tokens`
  cached: jax.Array         # [R] int32 tokens already in the row's pages
  tables: jax.Array         # [R, M] int32 page table (group-local page ids)
  seq_ids: jax.Array        # [R] int32 global sequence id (sampling keys)
  num_generated: jax.Array  # [R] int32 sampled tokens so far
  max_new: jax.Array        # [R] int32 budget of sampled tokens
  max_len: jax.Array        # [R] int32 transcript capacity
  steps: jax.Array          # [R] int32 tokens this call may sample (extend: 0 or 1)


def rows_axes(rows_like: Rows) -> Rows:
  return jax.tree.map(lambda x: ("batch",) + (None,) * (x.ndim - 1), rows_like)


def _sample(logits, key, seq_ids, positions, sampling):
  tok, sampler_logp = select_tokens(logits, row_keys(key, seq_ids, positions), *sampling)
  policy_logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
  return tok, policy_logp, sampler_logp


def _ends(tok, samples, num_generated, max_new, length, max_len, stop_ids):
  """(stopped, truncated) after appending `tok`; `length` counts it."""
  stop = samples & jnp.isin(tok, stop_ids)
  truncated = samples & ~stop & ((num_generated >= max_new) | (length >= max_len))
  return stop, truncated


def extend_and_sample(cfg: ModelConfig, params, pool, rows: Rows, key, stop_ids, sampling):
  logits, pool = paged.forward(cfg, params, pool, rows.tokens, rows.feed_len, rows.cached,
                               rows.tables)
  length = rows.cached + rows.feed_len  # the new token's position
  samples = rows.steps > 0
  tok, logp, sampler_logp = _sample(logits, key, rows.seq_ids, length, sampling)
  stopped, truncated = _ends(tok, samples, rows.num_generated + samples, rows.max_new, length + 1,
                             rows.max_len, stop_ids)
  return pool, dict(token=tok, logp=logp, sampler_logp=sampler_logp, stopped=stopped,
                    truncated=truncated)


def decode_loop(cfg: ModelConfig, params, pool, rows: Rows, key, min_active, stop_ids, sampling,
                *, num_steps: int, attention: str = "xla"):
  """Up to `num_steps` decode steps; row r samples at most rows.steps[r] tokens.

  The rows' pages are gathered once into a dense working cache, decoded on,
  and scattered back (models/paged.py explains why). `attention`: the decode
  attention (models/kernels.DECODE_KINDS, resolved).
  """
  R = rows.tokens.shape[0]
  out = lambda dt: jnp.zeros((R, num_steps), dt)
  work_k, work_v = paged.gather_rows(pool, rows.tables)
  init = dict(work_k=work_k, work_v=work_v, tok=rows.tokens[:, 0], cached=rows.cached,
              num_generated=rows.num_generated, active=rows.steps > 0,
              stopped=jnp.zeros((R,), bool), truncated=jnp.zeros((R,), bool),
              token=out(jnp.int32), logp=out(jnp.float32), sampler_logp=out(jnp.float32),
              count=jnp.zeros((R,), jnp.int32), i=jnp.int32(0))

  def cond(c):
    return (c["i"] < num_steps) & (jnp.sum(c["active"]) > min_active)

  def body(c):
    active = c["active"]
    logits, work_k, work_v = paged.decode_step(cfg, params, c["work_k"], c["work_v"], c["tok"],
                                               active, c["cached"], attention,
                                               pool.page_size)
    cached = c["cached"] + active
    tok, logp, sampler_logp = _sample(logits, key, rows.seq_ids, cached, sampling)
    num_generated = c["num_generated"] + active
    stop, trunc = _ends(tok, active, num_generated, rows.max_new, cached + 1, rows.max_len,
                        stop_ids)
    count = c["count"] + active
    put = lambda buf, x: jax.lax.dynamic_update_slice(
        buf, jnp.where(active, x, 0).astype(buf.dtype)[:, None], (0, c["i"]))
    return dict(work_k=work_k, work_v=work_v, tok=jnp.where(active, tok, c["tok"]), cached=cached,
                num_generated=num_generated,
                active=active & ~stop & ~trunc & (count < rows.steps),
                stopped=c["stopped"] | stop, truncated=c["truncated"] | trunc,
                token=put(c["token"], tok), logp=put(c["logp"], logp),
                sampler_logp=put(c["sampler_logp"], sampler_logp), count=count, i=c["i"] + 1)

  c = jax.lax.while_loop(cond, body, init)
  pool = paged.scatter_rows(pool, c["work_k"], c["work_v"], rows.tables)
  return pool, {k: c[k] for k in ("token", "logp", "sampler_logp", "count", "stopped",
                                   "truncated")}
