"""PPO critic: a Qwen backbone plus a scalar value head.

    critic_params = init_critic(policy_params, cfg, key)
    values = critic_values(cfg, critic_params, tokens, attention_mask, positions)  # [B, T] f32

The backbone has the policy's params tree (minus `lm_head`, which a value model
never reads) and starts as a copy of the policy weights. The head is a linear
map of the final (normed) hidden state to one scalar, initialised small (see
`init_critic`).

Alignment: `values[:, t]` is V(s_t), the value of the prefix `tokens[:, :t]`
*before* token t is emitted, read from the hidden state at t − 1. It is aligned
like `logprobs_from_logits` (column 0 is 0), so GAE's δ_t = r_t + γV_{t+1} − V_t
credits token t as the action taken in state s_t.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mars import sharding
from mars.models import qwen
from mars.models.config import ModelConfig

Params = Any


def value_head_axes() -> dict:
  return {"kernel": ("embed",), "bias": ()}


def critic_axes(cfg: ModelConfig) -> dict:
  """Logical axes of the critic params: the policy's rules, so both share one layout."""
  backbone = qwen.param_axes(cfg)
  backbone.pop("lm_head", None)
  return {"backbone": backbone, "value_head": value_head_axes()}


def critic_shapes(cfg: ModelConfig) -> dict:
  backbone = qwen.param_shapes(cfg)
  backbone.pop("lm_head", None)
  return {"backbone": backbone, "value_head": {"kernel": (cfg.hidden_size,), "bias": ()}}


def critic_shardings(cfg: ModelConfig, mesh) -> dict:
  return sharding.tree_shardings(mesh, critic_axes(cfg), critic_shapes(cfg))


def init_critic(policy_params: Params, cfg: ModelConfig, key: jax.Array,
                head_std: Optional[float] = None) -> Params:
  """Critic params initialised from the policy weights.

  The backbone is a *copy* (not an alias) of the policy arrays: the train step
  donates its state, and one buffer donated twice is an error.

  The head is N(0, head_std²), by default head_std = 0.02/√hidden: initial
  values are about ±0.02 for a unit-RMS hidden state, small beside rewards of
  ±1, but not zero. A zero head (as mars had) gives the backbone an exactly
  zero gradient on the first update, so none of its matrices move then;
  OpenRLHF and verl init their value heads randomly too (std 0.02, larger).
  """
  backbone = {k: v for k, v in policy_params.items() if k != "lm_head"}
  backbone = jax.tree.map(jnp.copy, backbone)
  dtype = jnp.dtype(cfg.param_dtype)
  if head_std is None:
    head_std = 0.02 / cfg.hidden_size ** 0.5
  kernel = (head_std * jax.random.normal(key, (cfg.hidden_size,), jnp.float32)).astype(dtype)
  return {"backbone": backbone,
          "value_head": {"kernel": kernel, "bias": jnp.zeros((), dtype)}}


def critic_values(cfg: ModelConfig, critic_params: Params, tokens, attention_mask,
                  positions=None, segment_ids=None):
  """V(s_t) for every column: [B, T] f32, column 0 is 0 (see module docstring);
  `segment_ids` for packed rows (qwen.forward)."""
  hidden = qwen.forward(cfg, critic_params["backbone"], tokens, attention_mask, positions,
                        return_hidden=True, segment_ids=segment_ids)
  head = critic_params["value_head"]
  # fp32 head: values feed GAE and a squared loss; bf16 rounding would bias both.
  v = jnp.einsum("btd,d->bt", hidden[:, :-1].astype(jnp.float32),
                 head["kernel"].astype(jnp.float32)) + head["bias"].astype(jnp.float32)
  return jnp.pad(v, ((0, 0), (1, 0)))
