"""The state a rollout carries on device (KV cache, token buffers, per-row flags, forced-token
queue) and the decode loop that advances it one sampled or forced token per step."""
import flax.struct
import jax
import jax.numpy as jnp

from mars.models import qwen
from mars.models.config import ModelConfig
from mars.sampling.select import select_tokens


@flax.struct.dataclass
class DecodeState:
  cache: qwen.KVCache
  tokens: jax.Array         # [B, S] int32, aligned with cache slots
  gen_mask: jax.Array       # [B, S] bool: sampled by the model
  forced_mask: jax.Array    # [B, S] bool: injected from the force queue
  logp: jax.Array           # [B, S] f32: policy logprob (T=1, unfiltered) of sampled tokens
  sampler_logp: jax.Array   # [B, S] f32: logprob under the sampling distribution
  last_logits: jax.Array    # [B, V] f32: logits for each row's next token
  position: jax.Array       # [B] int32: RoPE position of each row's next token
  num_generated: jax.Array  # [B] int32: sampled tokens so far
  max_new: jax.Array        # [B] int32: per-row budget of sampled tokens
  done: jax.Array           # [B] bool
  stopped: jax.Array        # [B] bool: ended on a stop token
  truncated: jax.Array      # [B] bool: ended on the budget or the cache end
  force_queue: jax.Array    # [B, Q] int32
  force_len: jax.Array      # [B] int32
  force_ptr: jax.Array      # [B] int32
  key: jax.Array
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def batch_size(self):
    return self.tokens.shape[0]

  @property
  def cache_len(self):
    return self.tokens.shape[1]

def _decode_step(cfg: ModelConfig, params, state: DecodeState, stop_ids, pad_id,
                 temperature, top_p, top_k) -> DecodeState:
  key, sub = jax.random.split(state.key)
  B, S = state.tokens.shape
  col = state.cache.index
  active = ~state.done
  has_forced = state.force_ptr < state.force_len
  forced_tok = jnp.take_along_axis(
      state.force_queue, jnp.minimum(state.force_ptr, state.force_queue.shape[1] - 1)[:, None], 1)[:, 0]
  sampled_tok, sampler_logp = select_tokens(state.last_logits, sub, temperature, top_p, top_k)
  tok = jnp.where(has_forced, forced_tok, sampled_tok)
  tok = jnp.where(active, tok, pad_id).astype(jnp.int32)
  is_gen = active & ~has_forced
  is_forced = active & has_forced
  policy_logp = jnp.take_along_axis(jax.nn.log_softmax(state.last_logits, -1), tok[:, None], -1)[:, 0]

  def put(buf, value):
    return jax.lax.dynamic_update_slice(buf, value[:, None].astype(buf.dtype), (0, col))

  num_generated = state.num_generated + is_gen
  hit_stop = is_gen & jnp.isin(tok, stop_ids)
  out_of_budget = is_gen & (num_generated >= state.max_new) & ~hit_stop
  cache_full = active & (col + 1 >= S) & ~hit_stop
  logits, cache = qwen.extend(cfg, params, tok[:, None], state.position[:, None], active[:, None],
                              state.cache)
  return state.replace(
      cache=cache,
      tokens=put(state.tokens, tok),
      gen_mask=put(state.gen_mask, is_gen),
      forced_mask=put(state.forced_mask, is_forced),
      logp=put(state.logp, jnp.where(is_gen, policy_logp, 0.0)),
      sampler_logp=put(state.sampler_logp, jnp.where(is_gen, sampler_logp, 0.0)),
      last_logits=logits[:, 0].astype(jnp.float32),
      position=state.position + active,
      num_generated=num_generated,
      done=state.done | hit_stop | out_of_budget | cache_full,
      stopped=state.stopped | hit_stop,
      truncated=state.truncated | out_of_budget | cache_full,
      force_ptr=state.force_ptr + is_forced,
      key=key)


def decode_loop(cfg, params, state, num_steps, stop_ids, pad_id, temperature, top_p, top_k):
  """Up to `num_steps` decode steps, exiting early once every row is done."""
  def cond(carry):
    s, i = carry
    return (i < num_steps) & ~jnp.all(s.done) & (s.cache.index < s.cache_len)

  def body(carry):
    s, i = carry
    return _decode_step(cfg, params, s, stop_ids, pad_id, temperature, top_p, top_k), i + 1

  state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
  return state


def state_axes(state_like: DecodeState):
  """Logical axes for every DecodeState leaf: rows over the batch axes."""
  def axes(x):
    return ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
  tree = jax.tree.map(axes, state_like)
  return tree.replace(cache=qwen.cache_axes(), key=())
