"""Rotary position embeddings as HF computes them: inverse frequencies from the
config (default, linear and yarn scaling) and the rotate-half application."""
import math

import jax.numpy as jnp

from mars.models.config import ModelConfig


def rope_frequencies(cfg: ModelConfig):
  """(inv_freq [hd/2] fp32, attention scaling) of cfg's RoPE.

  Follows transformers' modeling_rope_utils step by step (same fp32 ops in
  the same order) so the tables match HF's to rounding: "linear" divides the
  frequencies by `factor`; "yarn" blends interpolated and original
  frequencies over a ramp of dimensions and scales cos/sin.
  """
  hd = cfg.head_dim
  pos_freqs = cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  inv_freq = 1.0 / pos_freqs
  s = dict(cfg.rope_scaling)
  if cfg.rope_type == "default":
    return inv_freq, 1.0
  if cfg.rope_type == "linear":
    return inv_freq / s["factor"], 1.0
  if cfg.rope_type != "yarn":
    raise ValueError(f"rope_type {cfg.rope_type!r} is not implemented.")
  factor, original = s["factor"], s["original_max_position_embeddings"]

  def get_mscale(scale, mscale=1):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

  attention_factor = s.get("attention_factor")
  if attention_factor is None:
    if s.get("mscale") and s.get("mscale_all_dim"):
      attention_factor = get_mscale(factor, s["mscale"]) / get_mscale(factor, s["mscale_all_dim"])
    else:
      attention_factor = get_mscale(factor)

  def correction_dim(num_rotations):
    return hd * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, hd - 1)
  if low == high:
    high += 0.001  # as HF: avoids a zero-width ramp
  ramp = jnp.clip((jnp.arange(hd // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp  # 1 where a dimension keeps its original frequency
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation
  return inv_freq, float(attention_factor)


def rope(x, positions, cfg: ModelConfig):
  """Rotate-half RoPE (HF layout: first half / second half of head_dim)."""
  inv_freq, scaling = rope_frequencies(cfg)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]     # [B, T, 1, hd]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scaling != 1.0:  # yarn: HF scales cos/sin in fp32, before the cast
    cos, sin = cos * scaling, sin * scaling
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
