"""A run's optimizers, update-step settings and abstract train state, derived from its
config alone: shared by the trainer (run_state) and the planner (plan_steps)."""
import logging

import jax
import jax.numpy as jnp

from mars import models, sharding
from mars.rl import critic as critic_lib
from mars.rl import optim
from mars.rl import step as step_lib

# Forced tokens a row can queue at once (a multi-attempt feedback turn is ~30 tokens).
SAMPLER_QUEUE_LEN = 128


SAMPLER_FIELDS = ("kv_tokens", "page_size", "max_slots", "decode_chunk", "prefill_chunk")


def sampler_kwargs(sampling) -> dict:
  """A run config's `sampling` section as Sampler keyword arguments."""
  out = {k: int(sampling[k]) for k in SAMPLER_FIELDS}
  out["decode_attention"] = str(sampling.decode_attention)
  return out


def make_meshes(config, devices=None) -> tuple:
  """(trainer mesh, rollout mesh): one mesh over every device, or with
  rollout.devices > 0 the last that many as the rollout group (its own mesh of
  rollout.mesh_shape) and the rest as the trainer's."""
  devices = list(devices if devices is not None else jax.devices())
  split = config.rollout.devices
  if not split:
    mesh = sharding.make_mesh(tuple(config.mesh_shape), devices)
    return mesh, mesh
  return (sharding.make_mesh(tuple(config.mesh_shape), devices[:-split]),
          sharding.make_mesh(tuple(config.rollout.mesh_shape), devices[-split:]))


def make_sampler(sampling_section, model_cfg, tokenizer, mesh, **overrides):
  """The rollout engine of a run (its config.sampling) or of an eval, whose config
  has no sampling section (None: the Sampler's own defaults; `overrides`: the
  Sampler arguments an eval config sets)."""
  from mars import sampling  # pylint: disable=g-import-not-at-top
  kwargs = sampler_kwargs(sampling_section) if sampling_section is not None else {}
  return sampling.Sampler(model_cfg, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                          mesh=mesh, queue_len=SAMPLER_QUEUE_LEN, **dict(kwargs, **overrides))


def updates_per_step(config) -> int:
  rows = config.data.prompts_per_step * config.rollout.group_size
  return config.rl.ppo_epochs * (rows // (config.rl.minibatch_size or rows))


def optim_config(opt_cfg, config) -> dict:
  """An optimizer section as a dict, with total_steps derived from the run's length if unset."""
  o = opt_cfg.to_dict()
  if o["total_steps"]:
    return o
  # Derived from the run's length: a run shortened on the command line (a
  # smoke test of a cosine config) keeps a decay by shortening the warmup to
  # half the updates, rather than failing. An explicit total_steps is kept as
  # set, and one not above the warmup stays an error.
  o["total_steps"] = config.train.steps * updates_per_step(config)
  busy = o["total_steps"] - o["delay_steps"]
  if o["schedule"] == "cosine" and busy <= o["warmup_steps"]:
    logging.warning("cosine schedule: %d updates after the delay do not exceed warmup_steps=%d; "
                    "warming up for %d.", busy, o["warmup_steps"], busy // 2)
    o["warmup_steps"] = max(busy // 2, 0)
  return o


def rl_step_config(config) -> dict:
  """config.rl as the update step reads it."""
  r = config.rl.to_dict()
  r["micro_batch_size"] = r["micro_batch_size"] or None
  if config.rl.kl_in_reward:
    r["kl_coef"] = 0.0  # the KL enters the reward, not the loss
  return r


def make_optimizers(config):
  """(policy optimizer, critic optimizer or None)."""
  policy_opt = optim.make_optimizer(optim_config(config.actor_optim, config))
  critic_opt = (optim.make_optimizer(optim_config(config.critic_optim, config))
                if config.algorithm == "ppo" else None)
  return policy_opt, critic_opt


def reference_params(model_cfg, params):
  """The frozen KL reference: a copy in the compute dtype. It only feeds a
  forward pass, which casts to that dtype anyway, so fp32 storage would buy
  nothing and cost twice the memory (verl keeps its reference in bf16 too)."""
  ref = models.cast_params(params, model_cfg.dtype)
  return jax.tree.map(jnp.copy, ref) if ref is params else ref  # params are donated later


def abstract_train_state(model_cfg, policy_opt, critic_opt):
  """Call under jax.eval_shape: the train state's tree, without allocating it."""
  params = models.init_params(model_cfg, jax.random.key(0))
  critic = critic_lib.init_critic(params, model_cfg, jax.random.key(0)) if critic_opt else None
  return step_lib.init_train_state(params, policy_opt, critic, critic_opt)


