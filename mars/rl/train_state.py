"""The train state (policy, critic, their optimizer states) and the shardings of it and of
a RolloutBatch, from the logical rules in mars/sharding.py."""
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mars import sharding
from mars.batch import RolloutBatch
from mars.models import qwen
from mars.models.config import ModelConfig
from mars.rl import critic as critic_lib

Params = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # [] int32: train_step calls, skipped ones included.
  params: Params               # policy
  opt_state: Any
  critic_params: Optional[Params]
  critic_opt_state: Any
  skipped_updates: jax.Array   # [] int32: steps dropped by the non-finite guard.


def init_train_state(params, policy_opt, critic_params=None, critic_opt=None) -> TrainState:
  """Fresh state. The train step donates it: `params` are consumed by the first step."""
  has_critic = critic_params is not None
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=policy_opt.init(params),
      critic_params=critic_params,
      critic_opt_state=critic_opt.init(critic_params) if has_critic else None,
      skipped_updates=jnp.zeros((), jnp.int32))


def opt_state_shardings(opt, abstract_params, param_shardings, mesh):
  """Moments follow their param's sharding; counters are replicated."""
  abstract_state = jax.eval_shape(opt.init, abstract_params)
  return optax.tree_map_params(opt, lambda _, s: s, abstract_state, param_shardings,
                               transform_non_params=lambda _: sharding.replicated(mesh))


def train_state_shardings(cfg: ModelConfig, mesh, policy_opt, critic_opt=None) -> TrainState:
  """NamedShardings for every TrainState leaf, from the logical rules."""
  sharding.check_heads(cfg.num_heads, mesh)
  rep = sharding.replicated(mesh)
  p_sh = sharding.tree_shardings(mesh, qwen.param_axes(cfg), qwen.param_shapes(cfg))
  p_abs = jax.eval_shape(lambda: qwen.init_params(cfg, jax.random.key(0)))
  c_sh = c_opt_sh = None
  if critic_opt is not None:
    c_sh = critic_lib.critic_shardings(cfg, mesh)
    c_abs = jax.eval_shape(lambda p: critic_lib.init_critic(p, cfg, jax.random.key(0)), p_abs)
    c_opt_sh = opt_state_shardings(critic_opt, c_abs, c_sh, mesh)
  return TrainState(step=rep, params=p_sh,
                    opt_state=opt_state_shardings(policy_opt, p_abs, p_sh, mesh),
                    critic_params=c_sh, critic_opt_state=c_opt_sh, skipped_updates=rep)


def batch_shardings(mesh) -> RolloutBatch:
  """Rows of every RolloutBatch field over data×fsdp."""
  two, one = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
  return RolloutBatch(
      tokens=two, attention_mask=two, positions=two, loss_mask=two, transparent_mask=two,
      behaviour_logp=two, old_logp=two, ref_logp=two, values=two,
      reward=one, group_id=one, is_off_policy=one, truncated=one, sampler_logp=two,
      policy_version=one)
