"""The run state: mesh, policy, optimizers, shardings, pipeline, checkpoint; built fresh or resumed.

`setup` is the one constructor of a training run's state; `restore_policy`
rebuilds the same layout to read a run's params back (mars.evaluate, mars.export).
"""
import dataclasses
import json
import logging
import os
from typing import Callable, Optional

import jax
import ml_collections

from mars import checkpoint, config_validation, distributed, sampling, sharding
from mars import data as data_lib
from mars import metrics as metrics_lib
from mars.rl import critic as critic_lib
from mars.rl import step as step_lib
from mars.trainer import auto_micro_batch, plan_steps, policy, specs

@dataclasses.dataclass
class Run:
  config: object
  workdir: str
  mesh: object
  rollout_mesh: object          # `mesh` itself unless rollout.devices splits off a group
  tokenizer: object
  model_cfg: object
  sampler: object
  state: object                 # rl.step.TrainState
  ref_params: object
  state_shardings: object
  train_step: Callable
  pipeline: object
  grade_fn: Callable
  base_key: object
  start_step: int
  writer: object
  ckpt: object
  close: Callable


def checkpoint_items(config, model_cfg, state_sh, policy_opt, critic_opt, from_hf: bool) -> dict:
  """The abstract items a checkpoint holds: the train state, and the KL reference
  when it is not the HF checkpoint (the demo's reference is its warm start)."""
  train = checkpoint.abstract_like(
      jax.eval_shape(lambda: specs.abstract_train_state(model_cfg, policy_opt, critic_opt)), state_sh)
  items = {"train": train}
  if config.rl.kl_coef > 0 and not from_hf:
    items["ref"] = checkpoint.abstract_like(
        jax.eval_shape(lambda p: specs.reference_params(model_cfg, p), train.params), state_sh.params)
  return items


def setup(config, workdir: str, grade_fn: Optional[Callable] = None) -> Run:
  """The run's state at its start step: fresh, or resumed from the workdir's latest checkpoint."""
  distributed.maybe_initialize()
  if not distributed.is_main_process():
    # Process 0 alone logs progress (absl and stdlib loggers alike).
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  config_validation.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  if config.rollout.devices and jax.process_count() > 1:
    raise config_validation.ConfigError(
        f"rollout.devices={config.rollout.devices} splits one process's devices; a "
        f"{jax.process_count()}-process run shares every device (rollout.devices=0).")
  mesh, rollout_mesh = specs.make_meshes(config)
  pipeline = data_lib.PromptPipeline(
      policy.make_source(config), config.data.prompts_per_step, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  tokenizer, model_cfg, params, from_hf = policy.load_policy(config, workdir, mesh)
  sharding.check_heads(model_cfg.num_heads, mesh)
  sharding.check_heads(model_cfg.num_heads, rollout_mesh)
  if config.rl.micro_batch_size == "auto":
    # Resolved once, before anything reads it; config.json records the choice.
    capacity, _ = plan_steps.local_capacity(jax.local_devices()[0])
    config.rl.micro_batch_size = auto_micro_batch.resolve(config, model_cfg, mesh, capacity)

  policy_opt, critic_opt = specs.make_optimizers(config)
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  needs_ref = config.rl.kl_coef > 0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep,
                                 async_save=config.train.async_checkpoint)
  base_key = jax.random.key(config.seed)

  start_step = 0
  if ckpt.latest_step() is None:
    params = policy.warm_start(config, model_cfg, params, tokenizer, mesh)
    params = jax.device_put(params, state_sh.params)
    critic = (critic_lib.init_critic(params, model_cfg, jax.random.fold_in(base_key, 1))
              if critic_opt is not None else None)
    ref = specs.reference_params(model_cfg, params) if needs_ref else None
    state = jax.device_put(step_lib.init_train_state(params, policy_opt, critic, critic_opt),
                           state_sh)
  else:
    start_step, restored, meta = ckpt.restore(
        checkpoint_items(config, model_cfg, state_sh, policy_opt, critic_opt, from_hf))
    state, ref = restored["train"], restored.get("ref")
    if needs_ref and from_hf:  # the reference is the HF checkpoint
      ref = specs.reference_params(model_cfg, jax.device_put(params, state_sh.params))
    pipeline.set_state(meta["pipeline"])
    base_key = checkpoint.key_from_json(meta["key"])
    logging.info("Resumed from step %d in %s", start_step, workdir)
  del params

  writer = metrics_lib.MetricsWriter(workdir, config.train.steps,
                                     enabled=distributed.is_main_process())
  writer.truncate_after(start_step)
  if distributed.is_main_process():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  close_grader = lambda: None
  if grade_fn is None:
    grade_fn, close_grader = policy.make_grade_fn(config)
  sampler = specs.make_sampler(config.sampling, model_cfg, tokenizer, rollout_mesh)
  train_step = step_lib.make_train_step(model_cfg, specs.rl_step_config(config), policy_opt, critic_opt,
                                        mesh, state_sh)

  def close():
    ckpt.close()
    writer.close()
    close_grader()

  return Run(config=config, workdir=workdir, mesh=mesh, rollout_mesh=rollout_mesh,
             tokenizer=tokenizer, model_cfg=model_cfg,
             sampler=sampler, state=state, ref_params=ref, state_shardings=state_sh,
             train_step=train_step, pipeline=pipeline, grade_fn=grade_fn, base_key=base_key,
             start_step=start_step, writer=writer, ckpt=ckpt, close=close)


def save_checkpoint(run: Run, step: int, force: bool = False):
  items = {"train": run.state}
  if run.ref_params is not None and not run.config.model.path:
    items["ref"] = run.ref_params
  meta = {"step": step, "key": checkpoint.key_to_json(run.base_key),
          "pipeline": run.pipeline.get_state(),
          "config": json.loads(run.config.to_json_best_effort())}
  run.ckpt.save(step, items, meta, force=force)


def restore_policy(workdir: str, step: Optional[int] = None, mesh=None):
  """(tokenizer, model config, policy params, step) from a run's latest (or given) checkpoint.

  Used by mars.evaluate and mars.export; reads the run's saved config.json.
  """
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{workdir} is not a mars run directory (no config.json).")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = mesh or sharding.make_mesh((1, -1, 1))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep,
                                 async_save=False)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"No checkpoint found in {workdir}/checkpoints.")
  tokenizer, model_cfg, from_hf = policy.describe_policy(config, workdir)
  policy_opt, critic_opt = specs.make_optimizers(config)
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  restored_step, restored, _ = ckpt.restore(
      checkpoint_items(config, model_cfg, state_sh, policy_opt, critic_opt, from_hf), step)
  ckpt.close()
  return tokenizer, model_cfg, restored["train"].params, restored_step
