"""Qwen2 / Qwen2.5 / Qwen3 dense decoder as pure functions over a params pytree.

Params are a plain nested dict; per-layer weights are stacked on a leading
`layers` axis and the decoder runs `lax.scan` over them (one compiled layer,
fast compiles at 36 layers). Numerics follow HF transformers exactly:
- RMSNorm normalizes in fp32, casts back, *then* multiplies by the weight;
- rotate-half RoPE with cos/sin computed in fp32 and cast to the activation dtype;
- softmax in fp32;
- Qwen2 has q/k/v bias, Qwen3 has per-head q/k RMSNorm before RoPE.

Layout of the KV cache (the sampler's contract): all rows share one write
index, so a left-padded prompt batch and every later decode step (sampled or
forced token) write the same cache column. `valid[b, s]` says whether slot s
of row b holds a real token.
"""
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mars import sharding
from mars.models.config import ModelConfig

Params = Any
_NEG_INF = -1e30  # finite so fully-masked (padding) queries stay NaN-free.


class KVCache(NamedTuple):
  k: jax.Array      # [L, B, S, KVH, hd]
  v: jax.Array      # [L, B, S, KVH, hd]
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # [] int32: next slot to write.


# ----------------------------------------------------------------------------
# Parameters.

def param_axes(cfg: ModelConfig) -> dict:
  """Logical axis names of every parameter (same tree as the params)."""
  layers = {
      "input_norm": ("layers", "norm"),
      "q": ("layers", "embed", "heads", "head_dim"),
      "k": ("layers", "embed", "kv_heads", "head_dim"),
      "v": ("layers", "embed", "kv_heads", "head_dim"),
      "o": ("layers", "heads", "head_dim", "embed"),
      "post_norm": ("layers", "norm"),
      "gate": ("layers", "embed", "mlp"),
      "up": ("layers", "embed", "mlp"),
      "down": ("layers", "mlp", "embed"),
  }
  if cfg.qkv_bias:
    layers.update(q_bias=("layers", "heads", "head_dim"),
                  k_bias=("layers", "kv_heads", "head_dim"),
                  v_bias=("layers", "kv_heads", "head_dim"))
  if cfg.qk_norm:
    layers.update(q_norm=("layers", "norm"), k_norm=("layers", "norm"))
  axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
  if not cfg.tie_word_embeddings:
    axes["lm_head"] = ("vocab", "embed")
  return axes


def param_shapes(cfg: ModelConfig) -> dict:
  """Shapes of every parameter (same tree as `param_axes`)."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layers = {
      "input_norm": (L, D), "post_norm": (L, D),
      "q": (L, D, H, hd), "k": (L, D, K, hd), "v": (L, D, K, hd), "o": (L, H, hd, D),
      "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D),
  }
  if cfg.qkv_bias:
    layers.update(q_bias=(L, H, hd), k_bias=(L, K, hd), v_bias=(L, K, hd))
  if cfg.qk_norm:
    layers.update(q_norm=(L, hd), k_norm=(L, hd))
  shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (V, D)
  return shapes


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
  """Random init (tests and the from-scratch demo); norms start at 1, biases at 0."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(key, len(leaves))
  dtype = jnp.dtype(cfg.param_dtype)
  out = []
  for path, shape, k in zip(paths, leaves, keys):
    if "norm" in path:
      out.append(jnp.ones(shape, dtype))
    elif "bias" in path:
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Building blocks.

def rms_norm(x, weight, eps):
  """HF Qwen RMSNorm: fp32 normalize, cast to the input dtype, then scale."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope(x, positions, theta):
  """Rotate-half RoPE (HF layout: first half / second half of head_dim)."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]     # [B, T, 1, hd]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(q, k, v, mask, cfg: ModelConfig):
  """GQA attention. q [B,T,H,hd], k/v [B,S,KVH,hd], mask [B,T,S] bool."""
  B, T, H, hd = q.shape
  q = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) * (hd ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(B, T, H, hd)


def _layer_qkv(cfg, lp, x, positions):
  dt = x.dtype
  q = jnp.einsum("btd,dhk->bthk", x, lp["q"].astype(dt))
  k = jnp.einsum("btd,dhk->bthk", x, lp["k"].astype(dt))
  v = jnp.einsum("btd,dhk->bthk", x, lp["v"].astype(dt))
  if cfg.qkv_bias:
    q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
  q = rope(q, positions, cfg.rope_theta)
  k = rope(k, positions, cfg.rope_theta)
  q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
  k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
  v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
  return q, k, v


def _layer_out(cfg, lp, h, attn_out):
  """Output projection, residual, and the SwiGLU MLP block."""
  dt = h.dtype
  h = h + jnp.einsum("bthk,hkd->btd", attn_out, lp["o"].astype(dt))
  h = sharding.constrain(h, ("batch", "length", "embed"))
  x = rms_norm(h, lp["post_norm"], cfg.rms_norm_eps)
  gate = jnp.einsum("btd,df->btf", x, lp["gate"].astype(dt))
  up = jnp.einsum("btd,df->btf", x, lp["up"].astype(dt))
  act = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
  h = h + jnp.einsum("btf,fd->btd", act, lp["down"].astype(dt))
  return sharding.constrain(h, ("batch", "length", "embed"))


def _embed(cfg, params, tokens):
  h = jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
  return sharding.constrain(h, ("batch", "length", "embed"))


def _final(cfg, params, h, return_hidden):
  h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
  if return_hidden:
    return h
  w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  # Low-precision inputs, fp32 accumulation: exact-enough logprobs for RL.
  logits = jnp.einsum("btd,vd->btv", h, w.astype(h.dtype),
                      preferred_element_type=jnp.dtype(cfg.logits_dtype))
  return sharding.constrain(logits, ("batch", "length", "vocab"))


# ----------------------------------------------------------------------------
# Full-sequence forward (training, logprob recompute).

def forward(cfg: ModelConfig, params: Params, tokens, attention_mask,
            positions=None, *, return_hidden: bool = False):
  """Logits [B, T, V] (or final hidden states [B, T, D]) for a padded batch.

  Works for left-, right- or mixed-padded batches: padding is excluded from
  attention, and `positions` (default: count of real tokens − 1) make RoPE
  ignore it. Logits at padding positions are meaningless.
  """
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), -1) - 1, 0)
  T = tokens.shape[1]
  causal = jnp.tril(jnp.ones((T, T), bool))
  mask = causal[None] & attention_mask[:, None, :]

  def layer(h, lp):
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = _layer_qkv(cfg, lp, x, positions)
    return _layer_out(cfg, lp, h, attention(q, k, v, mask, cfg)), None

  if cfg.remat:
    layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
  h, _ = jax.lax.scan(layer, _embed(cfg, params, tokens), params["layers"])
  return _final(cfg, params, h, return_hidden)


# ----------------------------------------------------------------------------
# KV-cache interface (prefill and decode share one function).

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def cache_axes():
  """Logical axes of the cache: batch over data/fsdp, kv_heads over tensor."""
  kv = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
  return KVCache(k=kv, v=kv, valid=("batch", "cache_length"), index=())


def extend(cfg: ModelConfig, params: Params, tokens, positions, token_mask,
           cache: KVCache, *, return_hidden: bool = False, last_only: bool = False):
  """Runs T new tokens per row through the model on top of `cache`.

  Writes their K/V at cache columns [index, index+T) for every row, marks
  `valid` from `token_mask`, and returns (logits [B, T, V], new cache).
  Prefill is `extend` of the left-padded prompt on an empty cache; decode is
  `extend` with T = 1 (a sampled or a forced token: the cache can't tell).
  """
  B, T = tokens.shape
  S = cache.k.shape[2]
  start = cache.index
  valid = jax.lax.dynamic_update_slice(cache.valid, token_mask.astype(bool), (0, start))
  slots = jnp.arange(S)
  causal = slots[None, :] <= (start + jnp.arange(T))[:, None]          # [T, S]
  mask = causal[None] & valid[:, None, :]                               # [B, T, S]

  def layer(carry, xs):
    h, ck, cv = carry
    lp, i = xs
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = _layer_qkv(cfg, lp, x, positions)
    layer_k = jax.lax.dynamic_update_slice(ck[i], k.astype(ck.dtype), (0, start, 0, 0))
    layer_v = jax.lax.dynamic_update_slice(cv[i], v.astype(cv.dtype), (0, start, 0, 0))
    ck = jax.lax.dynamic_update_index_in_dim(ck, layer_k, i, 0)
    cv = jax.lax.dynamic_update_index_in_dim(cv, layer_v, i, 0)
    out = attention(q, layer_k.astype(q.dtype), layer_v.astype(q.dtype), mask, cfg)
    return (_layer_out(cfg, lp, h, out), ck, cv), None

  h0 = _embed(cfg, params, tokens)
  xs = (params["layers"], jnp.arange(cfg.num_layers))
  (h, ck, cv), _ = jax.lax.scan(layer, (h0, cache.k, cache.v), xs)
  new_cache = KVCache(k=ck, v=cv, valid=valid, index=start + T)
  if last_only:  # a prefill only needs the next-token logits: skip [B, T, V]
    h = h[:, -1:]
  return _final(cfg, params, h, return_hidden), new_cache


def prefill(cfg, params, tokens, attention_mask, max_len: int, last_only: bool = False):
  """Left-padded prompt batch → (logits [B, T or 1, V], cache of length `max_len`)."""
  attention_mask = attention_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), -1) - 1, 0)
  cache = init_cache(cfg, tokens.shape[0], max_len)
  return extend(cfg, params, tokens, positions, attention_mask, cache, last_only=last_only)


def decode_step(cfg, params, token, position, cache: KVCache):
  """One token per row ([B] ids at [B] positions) → (logits [B, V], cache)."""
  logits, cache = extend(cfg, params, token[:, None], position[:, None],
                         jnp.ones_like(token, bool)[:, None], cache)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(cfg: ModelConfig, params: Params, tokens, attention_mask, positions=None):
  """log p(tokens[:, t] | tokens[:, :t]) aligned to t ([B, T]; 0 at t = 0)."""
  logits = forward(cfg, params, tokens, attention_mask, positions)
  return logprobs_from_logits(logits, tokens)


def logprobs_from_logits(logits, tokens):
  """Next-token logprobs aligned to the token they score (column 0 is 0)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))
