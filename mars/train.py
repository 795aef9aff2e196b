r"""The RL training loop: python -m mars.train --config=configs/lte_4b.py --workdir=DIR.

One loop, several modes (config.algorithm × episode.kind × lte.enabled):
  1. prompts from the seeded, resumable pipeline (TFDS, or the demo task);
  2. rollouts: single-turn groups, LTE (hinted extra rollouts for all-fail
     groups), or multi-attempt episodes (feedback turns as forced tokens);
     grading happens inside, in the worker pool, once per chunk;
  3. old/ref logprobs and critic values, recomputed jitted and sharded
     (rl.recompute_old_logp=False takes old logprobs from the sampler);
  4. advantages: GAE with transparent feedback spans (PPO) or group-relative;
  5. PPO epochs of minibatch updates (jitted, sharded, grad accumulation);
  6. metrics (metrics.jsonl, TensorBoard, console), periodic eval;
  7. orbax checkpoints; the same --workdir resumes exactly.

Step keys are fold_in(seed_key, step), so a resumed run draws the same
randomness as an uninterrupted one.
"""
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Callable, Optional

from absl import app, flags
from ml_collections import config_flags

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT_CONFIG = os.path.join(_REPO_CONFIGS, "tiny.py")

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config (.py with get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (default: a fresh ./runs/<time>). "
                      "An existing workdir with checkpoints is resumed.")
  flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this process "
                       "(testing resume); the config's train.steps is the schedule length.")


def _lazy_imports():
  global jax, jnp, np, mars_config, sharding, checkpoint, metrics_lib, models, sampling
  global packing, step_lib, optim, critic_lib, advantages, losses, distributed, host_metrics
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mars import config as mars_config
  from mars import sharding, checkpoint, distributed, host_metrics
  from mars import metrics as metrics_lib
  from mars import models, sampling
  from mars.episodes import packing
  from mars.rl import step as step_lib, optim, critic as critic_lib, advantages, losses


# ----------------------------------------------------------------------------
# Setup.

@dataclasses.dataclass
class Run:
  config: object
  workdir: str
  mesh: object
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


def load_policy(config, workdir: str, mesh):
  """(tokenizer, model config, params, from_hf) for the configured model."""
  tokenizer, model_cfg, from_hf = describe_policy(config, workdir)
  if from_hf:
    _, params = models.load_hf(config.model.path, dtype=model_cfg.param_dtype, mesh=mesh,
                               compute_dtype=model_cfg.dtype, remat=model_cfg.remat)
  else:  # the demo: a format-only warm start follows (see warm_start)
    from mars import demo_task
    params = demo_task.init_demo_params(model_cfg, jax.random.key(config.seed))
  return tokenizer, model_cfg, params, from_hf


def describe_policy(config, workdir: str):
  """(tokenizer, model config, from_hf) of a run, without loading any weights."""
  from mars import tokenizer as tok_lib
  dtype = config.model.dtype
  compute = config.model.compute_dtype or dtype
  if config.model.path:
    model_dir = models.resolve_model_dir(config.model.path)
    model_cfg = models.load_config(model_dir, param_dtype=dtype, dtype=compute,
                                   remat=config.model.remat)
    return tok_lib.load_tokenizer(config.model.tokenizer_path or model_dir), model_cfg, True
  # The embedded demo: a tokenizer we build and a tiny Qwen3.
  from mars import demo_task
  tok_dir = config.model.tokenizer_path or os.path.join(workdir, "tokenizer")
  tokenizer = tok_lib.load_tokenizer(demo_task.build_tokenizer(tok_dir))
  return tokenizer, demo_model_config(config, workdir, tokenizer), False


def demo_model_config(config, workdir: str, tokenizer):
  """The demo model's shape, saved with the run (HF config.json form) so the
  run stays loadable even if the demo's default shape changes later."""
  path = os.path.join(workdir, "model_config.json")
  if os.path.exists(path):
    model_cfg = models.load_config(path)
  else:
    from mars import demo_task
    model_cfg = demo_task.tiny_model_config(tokenizer.vocab_size)
    if distributed.is_main_process():
      with open(path, "w") as f:
        json.dump(models.to_hf_dict(model_cfg), f, indent=2)
  dtype = config.model.dtype
  return model_cfg.replace(param_dtype=dtype, dtype=config.model.compute_dtype or dtype,
                           remat=config.model.remat)


def warm_start(config, model_cfg, params, tokenizer, mesh):
  """Optional supervised format warm start (see mars/sft.py); deterministic."""
  if not config.sft.steps:
    return params
  from mars import demo_task, sft
  task = make_source(config)
  # A single-turn run never sees a feedback turn: its warm start is all single-turn.
  mix = {"single_turn_fraction": 1.0} if config.episode.kind == "single_turn" else {}
  examples = demo_task.format_examples(task, config.sft.steps * config.sft.batch_size,
                                       np.random.default_rng(config.seed),
                                       hint_fraction=config.sft.hint_fraction, **mix)
  params, history = sft.sft_train(model_cfg, params, tokenizer, examples, steps=config.sft.steps,
                                  batch_size=config.sft.batch_size, lr=config.sft.lr,
                                  seed=config.seed, mesh=mesh)
  logging.info("SFT warm start: %d steps, final loss %.3f", config.sft.steps,
               history[-1]["loss"] if history else float("nan"))
  return params


def make_source(config, split: Optional[str] = None, seed_offset: int = 0):
  if config.data.name == "candidates":
    from mars import demo_task
    return demo_task.CandidateTask(k=config.data.candidates_k, seed=config.seed + seed_offset,
                                   rule=config.data.candidates_rule)
  from mars import data
  return data.load_source(config.data.name, split or config.data.split,
                          data_dir=config.data.data_dir or None)


def make_grade_fn(config):
  """Grading in the worker pool (hard timeouts); returns (grade_fn, close)."""
  from mars import rewards
  pool = rewards.GraderPool(num_workers=config.train.grader_workers,
                            timeout_s=config.train.grader_timeout_s,
                            boxes=config.train.grader_boxes)
  return pool.grade_batch, pool.close


def _updates_per_step(config) -> int:
  rows = config.data.prompts_per_step * config.rollout.group_size
  return config.rl.ppo_epochs * (rows // (config.rl.minibatch_size or rows))


def _optim_cfg(opt_cfg, config):
  o = opt_cfg.to_dict() if hasattr(opt_cfg, "to_dict") else dict(opt_cfg)
  if o.get("total_steps"):
    return o
  # Derived from the run's length: a run shortened on the command line (a
  # smoke test of a cosine config) keeps a decay by shortening the warmup to
  # half the updates, rather than failing. An explicit total_steps is kept as
  # set, and one not above the warmup stays an error.
  o["total_steps"] = config.train.steps * _updates_per_step(config)
  busy = o["total_steps"] - o.get("delay_steps", 0)
  if o.get("schedule") == "cosine" and busy <= o.get("warmup_steps", 0):
    logging.warning("cosine schedule: %d updates after the delay do not exceed warmup_steps=%d; "
                    "warming up for %d.", busy, o["warmup_steps"], busy // 2)
    o["warmup_steps"] = max(busy // 2, 0)
  return o


def _rl_cfg(config) -> dict:
  r = config.rl.to_dict()
  r["micro_batch_size"] = r.get("micro_batch_size") or None
  if config.rl.kl_in_reward:
    r["kl_coef"] = 0.0  # the KL enters the reward, not the loss
  return r


def setup(config, workdir: str, grade_fn: Optional[Callable] = None) -> Run:
  _lazy_imports()
  distributed.maybe_initialize()
  if not distributed.is_main_process():
    # Process 0 alone logs progress (absl and stdlib loggers alike).
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  mars_config.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(tuple(config.mesh_shape))
  tokenizer, model_cfg, params, from_hf = load_policy(config, workdir, mesh)
  sharding.check_heads(model_cfg.num_heads, mesh)

  policy_opt = optim.make_optimizer(_optim_cfg(config.actor_optim, config))
  critic_opt = (optim.make_optimizer(_optim_cfg(config.critic_optim, config))
                if config.algorithm == "ppo" else None)
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  needs_ref = config.rl.kl_coef > 0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep,
                                 async_save=config.train.async_checkpoint)
  base_key = jax.random.key(config.seed)

  def fresh_state(params):
    params = warm_start(config, model_cfg, params, tokenizer, mesh)
    params = jax.device_put(params, state_sh.params)
    critic = (critic_lib.init_critic(params, model_cfg, jax.random.fold_in(base_key, 1))
              if critic_opt is not None else None)
    ref = reference_params(model_cfg, params) if needs_ref else None
    state = step_lib.init_train_state(params, policy_opt, critic, critic_opt)
    return jax.device_put(state, state_sh), ref

  pipeline_source = make_source(config)
  from mars import data as data_lib
  pipeline = data_lib.PromptPipeline(
      pipeline_source, config.data.prompts_per_step, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())

  start_step = 0
  latest = ckpt.latest_step()
  if latest is None:
    state, ref = fresh_state(params)
  else:
    abstract = {"train": jax.eval_shape(lambda: fresh_state_abstract(model_cfg, policy_opt, critic_opt))}
    abstract["train"] = checkpoint.abstract_like(abstract["train"], state_sh)
    if needs_ref and not from_hf:
      abstract["ref"] = checkpoint.abstract_like(
          jax.eval_shape(lambda p: reference_params(model_cfg, p), abstract["train"].params),
          state_sh.params)
    start_step, restored, meta = ckpt.restore(abstract)
    state = restored["train"]
    ref = restored.get("ref")
    if needs_ref and from_hf:
      # The reference is the HF checkpoint.
      ref = reference_params(model_cfg, jax.device_put(params, state_sh.params))
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
    grade_fn, close_grader = make_grade_fn(config)
  sampler = sampling.Sampler(model_cfg, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                             mesh=mesh, queue_len=128)
  train_step = step_lib.make_train_step(model_cfg, _rl_cfg(config), policy_opt, critic_opt, mesh,
                                        state_sh)

  def close():
    ckpt.close()
    writer.close()
    close_grader()

  return Run(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer, model_cfg=model_cfg,
             sampler=sampler, state=state, ref_params=ref, state_shardings=state_sh,
             train_step=train_step, pipeline=pipeline, grade_fn=grade_fn, base_key=base_key,
             start_step=start_step, writer=writer, ckpt=ckpt, close=close)


def reference_params(model_cfg, params):
  """The frozen KL reference: a copy in the compute dtype. It only feeds a
  forward pass, which casts to that dtype anyway, so fp32 storage would buy
  nothing and cost twice the memory (verl keeps its reference in bf16 too)."""
  ref = models.cast_params(params, model_cfg.dtype)
  return jax.tree.map(jnp.copy, ref) if ref is params else ref  # params are donated later


def fresh_state_abstract(model_cfg, policy_opt, critic_opt):
  params = models.init_params(model_cfg, jax.random.key(0))
  critic = critic_lib.init_critic(params, model_cfg, jax.random.key(0)) if critic_opt else None
  return step_lib.init_train_state(params, policy_opt, critic, critic_opt)


def load_params_from_workdir(workdir: str, step: Optional[int] = None, mesh=None):
  """(tokenizer, model config, policy params, step) from a run's latest (or given) checkpoint.

  Used by mars.evaluate and mars.export; reads the run's saved config.json.
  """
  _lazy_imports()
  import ml_collections
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
  tokenizer, model_cfg, from_hf = describe_policy(config, workdir)
  policy_opt = optim.make_optimizer(_optim_cfg(config.actor_optim, config))
  critic_opt = (optim.make_optimizer(_optim_cfg(config.critic_optim, config))
                if config.algorithm == "ppo" else None)
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  abstract = {"train": checkpoint.abstract_like(
      jax.eval_shape(lambda: fresh_state_abstract(model_cfg, policy_opt, critic_opt)), state_sh)}
  if config.rl.kl_coef > 0 and not from_hf:
    abstract["ref"] = checkpoint.abstract_like(
        jax.eval_shape(lambda p: reference_params(model_cfg, p), abstract["train"].params),
        state_sh.params)
  restored_step, restored, _ = ckpt.restore(abstract, step)
  ckpt.close()
  return tokenizer, model_cfg, restored["train"].params, restored_step


# ----------------------------------------------------------------------------
# One step.

def rollout(run: Run, problems, key, params):
  """Rollouts of the configured kind -> EpisodeResult. `params`: the sampler's
  compute-dtype copy of the policy (Sampler.rollout_params), made once per step."""
  c = run.config
  common = dict(key=key, grade_fn=run.grade_fn)
  lte_common = dict(group_offset=_local_prompts(run, len(problems)).start,
                    rescore_fn=(functools.partial(rescore_responses, run)
                                if c.rl.recompute_old_logp else None))
  if c.episode.kind == "multi_attempt":
    from mars.episodes import multi_attempt
    cfg = episode_cfg(c)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    # N is drawn per question (as in the paper), so a group shares one prefill.
    # Drawn for the global batch, then this process's questions: the same N
    # per question however many processes share the step.
    n = multi_attempt.draw_num_attempts(rng, c.data.prompts_per_step, cfg)
    n = n[_local_prompts(run, len(problems))] if len(problems) != len(n) else n
    single = c.episode.max_attempts == 1
    if c.lte.enabled:
      from mars.episodes import lte
      return lte.rollout(run.sampler, params, run.tokenizer, problems, cfg=cfg,
                         lte_cfg=lte_cfg(run, "multi_attempt"), num_attempts=list(n),
                         group_size=c.rollout.group_size, single_turn=single, **common,
                         **lte_common)
    return multi_attempt.rollout(run.sampler, params, run.tokenizer, problems,
                                 cfg=cfg, num_attempts=list(n), group_size=c.rollout.group_size,
                                 single_turn=single, **common)
  if c.lte.enabled:
    from mars.episodes import lte
    return lte.rollout(run.sampler, params, run.tokenizer, problems, cfg=c.rollout,
                       lte_cfg=lte_cfg(run, "single_turn"), **common, **lte_common)
  from mars.episodes import single_turn
  return single_turn.rollout(run.sampler, params, run.tokenizer, problems,
                             cfg=c.rollout, **common)


def rescore_responses(run: Run, rows) -> list:
  """The trainer's logp of each row's response under the row's own prompt.

  Used for LTE's behaviour logp: the same forward (fp32 masters, compute
  dtype, micro-batches) as the old-logp recompute, so the off-policy ratio's
  numerator and denominator share their numerics. Collective in a multi-host
  run: every process calls it with its own rows (possibly none); the rows are
  padded to one shape and a row count that the micro-batch and mesh divide.
  """
  c = run.config
  n_local, P, R = distributed.agree_max(len(rows), max([len(r.prompt) for r in rows] or [1]),
                                        max([len(r.response) for r in rows] or [1]))
  if n_local == 0:
    return []
  processes = run.pipeline.process_count
  shard = max(c.rl.micro_batch_size or 1,
              sharding.mesh_axis_size(run.mesh, sharding.LOGICAL_RULES["batch"]))
  shard = -(-shard // processes)  # rows per process in one micro-batch (or mesh shard)
  padded = -(-n_local // shard) * shard
  filler = packing.Row(prompt=[run.tokenizer.pad_id], response=[run.tokenizer.pad_id],
                       is_model=[False], behaviour_logp=[0.0])
  host = packing.pack(list(rows) + [filler] * (padded - len(rows)), run.tokenizer.pad_id,
                      prompt_len=P, total_len=packing.total_length(P, R))
  batch = jax.tree.map(distributed.global_array_from_local, host,
                       step_lib.batch_shardings(run.mesh))
  micro = c.rl.micro_batch_size or None
  logp = step_lib.compute_logprobs(run.model_cfg, run.state.params, batch,
                                   micro_batch_size=micro if micro and
                                   batch.tokens.shape[0] % micro == 0 else None, mesh=run.mesh)
  local = distributed.host_local(logp)
  return [local[i, P:P + len(r.response)] for i, r in enumerate(rows)]


def _local_prompts(run: Run, count: int) -> slice:
  """This process's questions in the global batch (the pipeline's split)."""
  start = run.pipeline.process_index * count
  return slice(start, start + count)


def to_device_batch(run: Run, result):
  """The host rows of every process -> one global RolloutBatch on the mesh.

  Each process packed its own rows; in a multi-host run they are re-packed to
  the widest process's lengths, group ids become global, and the fields are
  stitched into global arrays (make_array_from_process_local_data).
  """
  host = result.batch
  if distributed.is_multiprocess():
    P, R = distributed.agree_max(max(len(r.prompt) for r in result.rows),
                                 max(len(r.response) for r in result.rows))
    offset = _local_prompts(run, len(result.rows) // run.config.rollout.group_size).start
    rows = [dataclasses.replace(r, group_id=r.group_id + offset) for r in result.rows]
    host = packing.pack(rows, run.tokenizer.pad_id, prompt_len=P,
                        total_len=packing.total_length(P, R))
  shardings = step_lib.batch_shardings(run.mesh)
  return jax.tree.map(distributed.global_array_from_local, host, shardings)


def lte_cfg(run: Run, episode: str):
  """LTE settings; the episode kind follows config.episode.kind, and hinted
  batches are padded to the data-parallel size so they divide the mesh."""
  import ml_collections
  cfg = ml_collections.ConfigDict(run.config.lte.to_dict())
  cfg.episode = episode
  rows_axis = sharding.mesh_axis_size(run.mesh, sharding.LOGICAL_RULES["batch"])
  cfg.hinted_min_prompts = max(cfg.get("hinted_min_prompts", 1),
                               rows_axis // run.pipeline.process_count)  # per process
  return cfg


def episode_cfg(c):
  """Multi-attempt episode settings: config.episode plus the sampling knobs."""
  import ml_collections
  cfg = ml_collections.ConfigDict(c.episode.to_dict())
  for k in ("temperature", "top_p", "top_k", "group_size"):
    cfg[k] = c.rollout[k]
  return cfg


def _advantages_fn(rl_cfg: dict, num_groups: int):
  est = rl_cfg["adv_estimator"]

  def fn(batch):
    if est == "gae":
      kl = None
      if rl_cfg["kl_in_reward"] and rl_cfg["kl_coef"] > 0:
        kl = losses.kl_penalty(batch.old_logp, batch.ref_logp, rl_cfg["kl_kind"])
      rewards_tok = advantages.token_rewards(batch.reward, batch.loss_mask, kl,
                                             rl_cfg["kl_coef"] if kl is not None else 0.0)
      adv, ret = advantages.gae(rewards_tok, batch.values, batch.loss_mask,
                                batch.transparent_mask, rl_cfg["gamma"], rl_cfg["lam"])
    elif est == "attempt_rloo":
      adv = advantages.attempt_rloo_advantages(
          batch.reward, batch.group_id,
          advantages.attempt_index(batch.loss_mask, batch.transparent_mask),
          num_groups, rl_cfg["max_attempts"])
      ret = jnp.zeros_like(adv)
    else:
      seq = advantages.grpo_advantages(
          batch.reward, batch.group_id, num_groups,
          scale="none" if est == "drgrpo" else "std",
          estimator="rloo" if est == "rloo" else "grpo")
      adv = advantages.broadcast_to_tokens(seq, batch.loss_mask)
      ret = jnp.zeros_like(adv)
    if rl_cfg["whiten"]:
      adv = advantages.whiten_advantages(adv, batch.loss_mask)
    return adv, ret

  return jax.jit(fn)


def prepare_batch(run: Run, host_batch):
  """Device batch with old/ref logprobs and values filled in.

  Returns (batch, recomputed): `recomputed` is the trainer's logprob of the
  rollout under the current params, or None when rl.recompute_old_logp is off
  and the sampler's logprob serves as old_logp.
  """
  from mars.episodes import lte
  c = run.config
  batch = host_batch if isinstance(host_batch.tokens, jax.Array) else jax.device_put(
      host_batch, step_lib.batch_shardings(run.mesh))
  micro = c.rl.micro_batch_size or None
  if c.rl.recompute_old_logp:
    recomputed = step_lib.compute_logprobs(run.model_cfg, run.state.params, batch,
                                           micro_batch_size=micro, mesh=run.mesh)
    # Off-policy (LTE) rows keep the behaviour logprob under the hinted prompt.
    old_logp = lte.old_logp_for_loss(batch, recomputed)
  else:
    # The sampler's policy logprob (temperature 1, unfiltered) of the same
    # params: equal to a recompute up to kernel numerics.
    recomputed, old_logp = None, batch.behaviour_logp
  zeros = jnp.zeros_like(batch.behaviour_logp)
  ref_logp = (step_lib.compute_logprobs(run.model_cfg, run.ref_params, batch,
                                        micro_batch_size=micro, mesh=run.mesh)
              if run.ref_params is not None else zeros)
  values = (step_lib.compute_values(run.model_cfg, run.state.critic_params, batch,
                                    micro_batch_size=micro, mesh=run.mesh)
            if run.state.critic_params is not None else zeros)
  return batch.replace(old_logp=old_logp, ref_logp=ref_logp, values=values), recomputed


def sample_rollout(run: Run, step: int):
  """Step `step`'s rollouts (prompts, episodes, dynamic sampling, shaping),
  sampled with the current params: an EpisodeResult on the host."""
  k_roll, _ = jax.random.split(jax.random.fold_in(run.base_key, step))
  problems = run.pipeline.next_batch()
  rollout_params = run.sampler.rollout_params(run.state.params)
  result = rollout(run, problems, k_roll, rollout_params)
  result = maybe_dynamic_sampling(run, result, k_roll, rollout_params)
  del rollout_params  # the bf16 copy is not kept through the update
  return maybe_overlong_shaping(run, result)


def train_one_step(run: Run, step: int, adv_fn) -> dict:
  t0 = time.perf_counter()
  result = sample_rollout(run, step)
  return update_on_rollout(run, step, adv_fn, result, rollout_s=time.perf_counter() - t0)


def update_on_rollout(run: Run, step: int, adv_fn, result, rollout_s: float,
                      version: Optional[int] = None,
                      before_update: Optional[Callable] = None) -> dict:
  """Logprobs, advantages and the PPO epochs of step `step` on `result`; its metrics.

  version: the policy version (train step) whose params sampled `result`
    (None: this step's, the synchronous loop); recorded in batch.policy_version.
  before_update: called after the batch is prepared and before the update
    consumes the params (mars.async_rollout samples the next step there);
    its time is reported as time/rollout_s in place of `rollout_s`.
  """
  c = run.config
  _, k_ppo = jax.random.split(jax.random.fold_in(run.base_key, step))
  t1 = time.perf_counter()
  batch, recomputed = prepare_batch(run, to_device_batch(run, result))
  if version is not None:
    batch = batch.replace(policy_version=batch.group_id * 0 + version)
  adv, ret = adv_fn(batch)
  jax.block_until_ready(adv)
  t2 = time.perf_counter()
  if before_update is not None:
    before_update()
    rollout_s = time.perf_counter() - t2
  t2b = time.perf_counter()
  rows = batch.tokens.shape[0]
  run.state, update_metrics = step_lib.ppo_epochs(
      run.train_step, run.state, batch, adv, ret, c.rl.ppo_epochs,
      c.rl.minibatch_size or rows, k_ppo)
  t3 = time.perf_counter()
  lm = np.asarray(result.batch.loss_mask, bool)
  # Host metrics cover this process's rows; reduce() makes them global.
  m = host_metrics.reduce(host_metrics.merge(
      result.metrics, group_outcomes(result.batch, c.rollout.group_size),
      host_metrics.Metrics().mean("reward/mean", result.batch.reward)
      .mean("response_length/mean", lm.sum(-1))))
  m.update({f"loss/{k}" if k in ("loss", "pg_loss", "vf_loss") else k: v
            for k, v in update_metrics.items()})
  # The rewards the update saw (device batch), beside reward/mean (host rows):
  # equal unless a step between the two (shaping, re-packing) lost something.
  m["reward/trained_mean"] = float(jnp.mean(batch.reward))
  # The rollout/training mismatch: |sampler − trainer| logp on on-policy tokens
  # (bf16 decode vs the update's forward), reduced on device: two scalars cross
  # to the host. LTE's hinted rows log theirs as logp_mismatch/hinted_*.
  if recomputed is not None:
    on = batch.loss_mask & ~batch.is_off_policy[:, None]
    gap = jnp.where(on, jnp.abs(recomputed - batch.behaviour_logp), 0.0)
    m["logp_mismatch/on_policy_max"] = float(jnp.max(gap))
    m["logp_mismatch/on_policy_mean"] = float(jnp.sum(gap) / jnp.maximum(jnp.sum(on), 1))
  m.update({
      "time/rollout_s": rollout_s, "time/logprob_s": t2 - t1, "time/update_s": t3 - t2b,
      "time/step_s": (t3 - t1) if before_update is not None else rollout_s + (t3 - t1),
      "compile_count/sampler": sampling.compile_count(),
  })
  if "time/grade_s" in result.metrics and before_update is None:
    m["time/generate_s"] = m["time/rollout_s"] - result.metrics["time/grade_s"]
  if version is not None:
    m["async/version_lag"] = float(step - version)
  return m


def group_outcomes(batch, group_size: int) -> dict:
  """Fractions of all-fail / some-pass / all-pass groups in the trained batch
  (a row passes when its reward is > 0). For LTE runs this is after
  replacement; lte/* metrics hold the pre-replacement fractions."""
  if group_size < 2:
    return {}
  reward, gid = np.asarray(batch.reward), np.asarray(batch.group_id)
  groups = np.unique(gid)
  passed = np.array([(reward[gid == g] > 0).mean() for g in groups])
  return (host_metrics.Metrics()
          .mean("groups/all_fail_frac", passed == 0)
          .mean("groups/some_pass_frac", (passed > 0) & (passed < 1))
          .mean("groups/all_pass_frac", passed == 1))


def maybe_dynamic_sampling(run: Run, result, key, params):
  """DAPO dynamic sampling: drop groups whose rewards are all equal, draw more
  prompts until the step has `prompts_per_step` informative groups (or the
  round limit is hit; then dropped groups refill the batch, contributing zero
  advantage)."""
  c = run.config
  if not c.rl.dynamic_sampling:
    return result
  G, target = c.rollout.group_size, c.data.prompts_per_step // run.pipeline.process_count
  kept, dropped = [], []

  def split_groups(res):
    rewards = np.asarray(res.batch.reward)
    for g in range(len(res.rows) // G):
      rows = res.rows[g * G:(g + 1) * G]
      (kept if np.ptp(rewards[g * G:(g + 1) * G]) > 0 else dropped).append(
          (rows, res.meta[g * G:(g + 1) * G]))

  split_groups(result)
  rounds = 0
  # Every process draws again while any one lacks groups (rollouts are collective).
  while distributed.any_process(len(kept) < target) and rounds < c.rl.max_resample_rounds:
    rounds += 1
    more = rollout(run, run.pipeline.next_batch(), jax.random.fold_in(key, 1000 + rounds), params)
    split_groups(more)
  groups = (kept + dropped)[:target]
  rows, meta = [], []
  for g, (group_rows, group_meta) in enumerate(groups):
    for r in group_rows:
      rows.append(dataclasses.replace(r, group_id=g))
    meta.extend(group_meta)
  metrics = host_metrics.merge(result.metrics, {"dapo/resample_rounds": rounds},
                               host_metrics.Metrics().total("dapo/kept_groups", len(kept)))
  return packing.EpisodeResult(rows=rows, batch=packing.pack(rows, run.tokenizer.pad_id),
                               meta=meta, metrics=metrics)


def maybe_overlong_shaping(run: Run, result):
  """DAPO soft overlong punishment added to each row's reward (rl.overlong_buffer > 0)."""
  c = run.config
  if not c.rl.overlong_buffer:
    return result
  max_len = c.episode.budget if c.episode.kind == "multi_attempt" else c.rollout.max_new_tokens
  lengths = np.asarray(result.batch.loss_mask).sum(-1)
  shaped = np.asarray(advantages.overlong_reward_shaping(lengths, max_len, c.rl.overlong_buffer))
  # The rows are shaped too: a multi-host step re-packs them (to_device_batch),
  # and a penalty only in the packed batch was lost there.
  rows = [dataclasses.replace(r, reward=float(r.reward + s)) for r, s in zip(result.rows, shaped)]
  batch = result.batch.replace(reward=np.asarray(result.batch.reward) + shaped)
  metrics = host_metrics.merge(
      result.metrics, host_metrics.Metrics().mean("dapo/overlong_penalty_mean", shaped))
  return dataclasses.replace(result, rows=rows, batch=batch, metrics=metrics)


def save_checkpoint(run: Run, step: int, force: bool = False):
  items = {"train": run.state}
  if run.ref_params is not None and not run.config.model.path:
    items["ref"] = run.ref_params
  meta = {"step": step, "key": checkpoint.key_to_json(run.base_key),
          "pipeline": run.pipeline.get_state(),
          "config": json.loads(run.config.to_json_best_effort())}
  run.ckpt.save(step, items, meta, force=force)


def maybe_eval(run: Run, step: int) -> dict:
  c = run.config
  if not c.train.eval_every or (step % c.train.eval_every and step != c.train.steps):
    return {}
  from mars import evaluate
  return evaluate.evaluate_for_trainer(run, step)


def train(config, workdir: str, grade_fn: Optional[Callable] = None,
          max_steps: Optional[int] = None) -> dict:
  """Runs (or resumes) training; returns the last step's metrics."""
  run = setup(config, workdir, grade_fn)
  adv_fn = _advantages_fn(dict(config.rl.to_dict(), max_attempts=config.episode.max_attempts),
                          config.data.prompts_per_step)
  last = {}
  try:
    end = config.train.steps if max_steps is None else min(config.train.steps,
                                                            run.start_step + max_steps)
    if config.rollout.get("staleness", 0):  # one-step-off-policy rollouts
      from mars import async_rollout
      # This module, also when it runs as __main__ (python -m mars.train).
      last = async_rollout.train_loop(run, adv_fn, end, trainer=sys.modules[__name__])
    else:
      for step in range(run.start_step, end):
        metrics = train_one_step(run, step, adv_fn)
        metrics.update(maybe_eval(run, step + 1))
        run.writer.write(step + 1, metrics)
        last = metrics
        if (step + 1) % config.train.ckpt_every == 0 or step + 1 == config.train.steps:
          save_checkpoint(run, step + 1)
    run.ckpt.wait()
    if end == config.train.steps:
      run.writer.plot()
  finally:
    run.close()
  return last


def default_workdir() -> str:
  return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


class _QuietLibraries(logging.Filter):
  """Orbax logs every save at INFO; keep the console to mars's own lines."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs():
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  logging.getLogger("absl").addFilter(_QuietLibraries())


def main(argv):
  del argv
  quiet_library_logs()
  workdir = flags.FLAGS.workdir or default_workdir()
  print(f"mars.train: workdir {workdir}", file=sys.stderr)
  try:
    train(flags.FLAGS.config, workdir, max_steps=flags.FLAGS.max_steps)
  except Exception as e:  # one clear line for config / input errors
    from mars.config import ConfigError
    from mars.demo_task import TokenizerDirError
    from mars.distributed import DistributedEnvError
    from mars.models import CheckpointError, UnsupportedConfigError
    from mars.sharding import ShardingError
    if isinstance(e, (ConfigError, ShardingError, FileNotFoundError, DistributedEnvError,
                      TokenizerDirError, UnsupportedConfigError, CheckpointError)):
      print(f"mars.train: error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  app.run(main)
