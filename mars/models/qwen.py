"""Qwen2 / Qwen2.5 / Qwen3 dense decoder as pure functions over a params pytree.

Params are a plain nested dict; per-layer weights are stacked on a leading
`layers` axis and the decoder runs `lax.scan` over them (one compiled layer,
fast compiles at 36 layers). Numerics follow HF transformers exactly:
- RMSNorm normalizes in fp32, casts back, *then* multiplies by the weight;
- rotate-half RoPE with cos/sin computed in fp32 and cast to the activation dtype;
- softmax in fp32;
- Qwen2 has q/k/v bias, Qwen3 has per-head q/k RMSNorm before RoPE.

The KV-cache forward (prefill, extend, decode over a paged pool) is in
paged.py and reuses this file's layer pieces.
"""
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mars import sharding
from mars.models import flash, kernels
from mars.models import rope as rope_lib
from mars.models.config import ATTENTION_KINDS, REMAT_POLICIES, ModelConfig

Params = Any
NEG_INF = -1e30  # finite so fully-masked (padding) queries stay NaN-free.


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


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_floats(params, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def cast_params(params: Params, dtype) -> Params:
  """Floating leaves cast to `dtype` (a compute copy of fp32 masters); the same
  tree when they already are. Elementwise, so each leaf keeps its sharding."""
  dtype = jnp.dtype(dtype)
  if all(x.dtype == dtype for x in jax.tree.leaves(params)
         if jnp.issubdtype(x.dtype, jnp.floating)):
    return params
  return _cast_floats(params, dtype.name)


# ----------------------------------------------------------------------------
# Building blocks.

def rms_norm(x, weight, eps):
  """HF Qwen RMSNorm: fp32 normalize, cast to the input dtype, then scale."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def attention(q, k, v, mask, cfg: ModelConfig, cached=None, cached_layout: str = "bskd"):
  """GQA attention. q [B,T,H,hd], k/v [B,T',KVH,hd], mask [B,T,T'] bool.

  `cached` = (k, v, mask [B,T,S]) adds earlier tokens (a KV cache's gathered
  pages, laid out as `cached_layout`: "bskd" = [B,S,KVH,hd]) to the keys. They
  are scored as a separate block and joined only in the softmax, so a decode
  step reads the cache and never rewrites it.
  """
  B, T, H, hd = q.shape
  q = q.reshape(B, T, cfg.num_kv_heads, cfg.num_groups, hd)

  def scores(keys, block_mask, kv_layout):
    sc = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, keys,
                    preferred_element_type=jnp.float32) * (hd ** -0.5)
    return jnp.where(block_mask[:, None, None, :, :], sc, NEG_INF)

  def mix(probs, values, kv_layout):
    return jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs.astype(values.dtype), values)

  if cached is None:
    out = mix(jax.nn.softmax(scores(k, mask, "bskd"), axis=-1), v, "bskd")
  else:
    cache_k, cache_v, cache_mask = cached
    S = cache_mask.shape[-1]
    probs = jax.nn.softmax(jnp.concatenate(
        [scores(cache_k, cache_mask, cached_layout), scores(k, mask, "bskd")], axis=-1), axis=-1)
    out = mix(probs[..., :S], cache_v, cached_layout) + mix(probs[..., S:], v, "bskd")
  return out.reshape(B, T, H, hd)


def project(x, w, contracted: int = 1, preferred_element_type=None):
  """x[..., *c] · w[*c, *out] (c = w's first `contracted` dims), as one 2-D matmul.

  Why 2-D: the weight gradient of an einsum with the batch and length dims
  kept separate transposes to dot_general(dy, x) over two contracting dims,
  which XLA:CPU lowers as a transposed copy of dy plus a slow generic dot
  (a Qwen-shaped MLP's backward took 1.4x as long; benchmarks/update.py).
  Flattened, both gradients are plain GEMMs on every backend. The merged
  leading dim keeps the batch sharding: batch is its major part and length
  is never sharded (mars/sharding.py).
  """
  lead, c_shape, out_shape = x.shape[:x.ndim - contracted], w.shape[:contracted], w.shape[contracted:]
  c = math.prod(c_shape)
  y = jnp.dot(x.reshape(-1, c), w.reshape(c, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out_shape)


def layer_qkv(cfg, lp, x, positions):
  dt = x.dtype
  q = project(x, lp["q"].astype(dt))
  k = project(x, lp["k"].astype(dt))
  v = project(x, lp["v"].astype(dt))
  if cfg.qkv_bias:
    q, k, v = q + lp["q_bias"].astype(dt), k + lp["k_bias"].astype(dt), v + lp["v_bias"].astype(dt)
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
  q = rope_lib.rope(q, positions, cfg)
  k = rope_lib.rope(k, positions, cfg)
  q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
  k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
  v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
  return q, k, v


def layer_out(cfg, lp, h, attn_out):
  """Output projection, residual, and the SwiGLU MLP block."""
  dt = h.dtype
  h = h + project(attn_out, lp["o"].astype(dt), contracted=2)
  h = sharding.constrain(h, ("batch", "length", "embed"))
  x = rms_norm(h, lp["post_norm"], cfg.rms_norm_eps)
  gate = project(x, lp["gate"].astype(dt))
  up = project(x, lp["up"].astype(dt))
  act = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
  h = h + project(act, lp["down"].astype(dt))
  return sharding.constrain(h, ("batch", "length", "embed"))


def embed(cfg, params, tokens):
  h = jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
  return sharding.constrain(h, ("batch", "length", "embed"))


def lm_logits(cfg: ModelConfig, params: Params, h):
  """Logits [..., T, V] of final-normed hidden states h [..., T, D].

  Low-precision inputs, fp32 accumulation: exact-enough logprobs for RL. One
  2-D matmul against w [V, D] as stored (see `project` for why 2-D).
  """
  w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
  logits = jax.lax.dot_general(h.reshape(-1, h.shape[-1]), w.astype(h.dtype),
                               (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.dtype(cfg.logits_dtype))
  logits = logits.reshape(*h.shape[:-1], w.shape[0])
  return sharding.constrain(logits, ("batch", "length", "vocab"))


def final(cfg, params, h, return_hidden):
  h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
  return h if return_hidden else lm_logits(cfg, params, h)


# ----------------------------------------------------------------------------
# Full-sequence forward (training, logprob recompute).

def remat_layer(layer, policy: str):
  """`layer` under the named rematerialisation policy (ModelConfig.remat)."""
  if policy == "none":
    return layer
  if policy == "full":
    return jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
  if policy == "dots":  # weight matmuls have no batch dims; attention's einsums do
    return jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}.")


def forward(cfg: ModelConfig, params: Params, tokens, attention_mask,
            positions=None, *, return_hidden: bool = False, segment_ids=None):
  """Logits [B, T, V] (or final hidden states [B, T, D]) for a padded batch.

  Works for left-, right- or mixed-padded batches: padding is excluded from
  attention, and `positions` (default: count of real tokens − 1) make RoPE
  ignore it. Logits at padding positions are meaningless.

  Packed rows (mars/rl/seq_pack.py) pass `segment_ids` [B, T] (1, 2, ... per
  sequence, 0 on empty slots) and each sequence's own `positions`: a token
  attends only to earlier tokens of its own segment (block-diagonal causal).
  """
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), -1) - 1, 0)
  T = tokens.shape[1]
  kind = kernels.resolve(cfg.attention)
  if kind in kernels.KERNELS:
    attend = lambda q, k, v: kernels.attend(kind, q, k, v, attention_mask, segment_ids,
                                            block=cfg.attention_block)
  elif kind == "chunked":
    attend = lambda q, k, v: flash.flash_attention(q, k, v, attention_mask, cfg.attention_block,
                                                   segment_ids)
  elif kind == "dense":
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & attention_mask[:, None, :]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    attend = lambda q, k, v: attention(q, k, v, mask, cfg)
  else:
    raise ValueError(f"unknown attention {cfg.attention!r}; choose one of {ATTENTION_KINDS}.")

  def layer(h, lp):
    x = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = layer_qkv(cfg, lp, x, positions)
    return layer_out(cfg, lp, h, attend(q, k, v)), None

  layer = remat_layer(layer, cfg.remat)
  h, _ = jax.lax.scan(layer, embed(cfg, params, tokens), params["layers"],
                      unroll=not cfg.scan_layers)
  return final(cfg, params, h, return_hidden)
