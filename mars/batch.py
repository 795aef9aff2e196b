"""The RolloutBatch contract shared by episodes, LTE, losses and the trainer.

Every array is padded to [B, T] (or [B]); fields that don't apply to an
algorithm are zeros. Losses read these arrays and never know which algorithm
(single-turn GRPO, LTE, multi-attempt PPO) produced them.

Layout: prompt left-padded so that all prompts end at the same column
(`prompt_len`), response (model tokens plus injected feedback) right-padded
after it. `positions` counts real tokens, so padding never shifts RoPE.
"""
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RolloutBatch:
  tokens: Any            # [B, T] int32
  attention_mask: Any    # [B, T] bool   real tokens
  positions: Any         # [B, T] int32  cumsum(attention_mask) - 1 (0 on padding)
  loss_mask: Any         # [B, T] bool   model-generated tokens that are trained
  transparent_mask: Any  # [B, T] bool   injected tokens (feedback turns): in context, out of every loss
  behaviour_logp: Any    # [B, T] f32    logp at sampling time (hinted prompt for LTE rows)
  old_logp: Any          # [B, T] f32    recomputed under the training layout
  ref_logp: Any          # [B, T] f32    reference policy
  values: Any            # [B, T] f32    critic values (PPO only)
  reward: Any            # [B] f32       scalar episode reward
  group_id: Any          # [B] int32     question a row belongs to
  is_off_policy: Any     # [B] bool      LTE replacements: f(r) shaping, no clip
  truncated: Any         # [B] bool      hit the length / budget limit
  # The sampler's own logp of each model token, under the context it was
  # sampled in. Equal to behaviour_logp except on LTE rows whose behaviour logp
  # the trainer rescored (rl.recompute_old_logp): ρ = exp(old_logp − sampler_logp)
  # is the sampler-vs-trainer ratio of mars.rl.correction.
  sampler_logp: Any = None  # [B, T] f32
  policy_version: Any = None  # [B] int32  train step whose params sampled the row

  @property
  def shape(self):
    return self.tokens.shape

  def replace_arrays(self, **kw) -> "RolloutBatch":
    return self.replace(**kw)


def positions_from_mask(attention_mask):
  """Position ids that skip padding: cumulative count of real tokens − 1."""
  m = jnp.asarray(attention_mask).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def empty_batch(batch_size: int, length: int, xp=np) -> RolloutBatch:
  """All-zeros batch of the given shape (host numpy by default)."""
  z = lambda dt: xp.zeros((batch_size, length), dt)
  zb = lambda dt: xp.zeros((batch_size,), dt)
  return RolloutBatch(
      tokens=z(np.int32), attention_mask=z(bool), positions=z(np.int32),
      loss_mask=z(bool), transparent_mask=z(bool),
      behaviour_logp=z(np.float32), old_logp=z(np.float32),
      ref_logp=z(np.float32), values=z(np.float32),
      reward=zb(np.float32), group_id=zb(np.int32),
      is_off_policy=zb(bool), truncated=zb(bool),
      sampler_logp=z(np.float32), policy_version=zb(np.int32))
