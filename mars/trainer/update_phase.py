"""The update phase of a step: pack and shard the rows, recompute old/ref logprobs and
values, advantages, then the PPO epochs of minibatch updates; returns the step's metrics."""
import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mars import distributed, host_metrics, sampling
from mars.episodes import lte, packing
from mars.rl import advantages, losses
from mars.rl import step as step_lib
from mars.rl import micro as micro_lib
from mars.trainer.rollout_phase import local_prompts
from mars.trainer.run_state import Run


def to_device_batch(run: Run, result):
  """The host rows of every process -> one global RolloutBatch on the mesh.

  The step's one packing: each process packs its rows to the widest process's
  lengths (group ids made global in a multi-host run), and the fields are
  stitched into global arrays (make_array_from_process_local_data).
  """
  rows = result.rows
  if distributed.is_multiprocess():
    offset = local_prompts(run, len(rows) // run.config.rollout.group_size).start
    rows = [dataclasses.replace(r, group_id=r.group_id + offset) for r in rows]
  P, R = distributed.agree_max(max(len(r.prompt) for r in rows), max(len(r.response) for r in rows))
  host = packing.pack(rows, run.tokenizer.pad_id, prompt_len=P, total_len=packing.total_length(P, R))
  shardings = step_lib.batch_shardings(run.mesh)
  return jax.tree.map(distributed.global_array_from_local, host, shardings)


def make_advantages_fn(rl_cfg: dict, num_groups: int):
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

  Returns (batch, recomputed, pack stats): `recomputed` is the trainer's logprob
  of the rollout under the current params, or None when rl.recompute_old_logp is
  off and the sampler's logprob serves as old_logp; with rl.packing the stats
  are the packed and padded efficiencies (real tokens / slots).
  """
  c = run.config
  batch = host_batch if isinstance(host_batch.tokens, jax.Array) else jax.device_put(
      host_batch, step_lib.batch_shardings(run.mesh))
  micro = c.rl.micro_batch_size or None
  # One packing plan for the three recomputes (old, ref, values).
  pack, efficiency = (micro_lib.plan_packing(batch.attention_mask, micro, run.mesh,
                                             c.rl.pack_length)
                      if c.rl.packing else (None, None))
  if c.rl.recompute_old_logp:
    recomputed = micro_lib.compute_logprobs(run.model_cfg, run.state.params, batch,
                                           micro_batch_size=micro, mesh=run.mesh, pack=pack)
    # Off-policy (LTE) rows keep the behaviour logprob under the hinted prompt.
    old_logp = lte.old_logp_for_loss(batch, recomputed)
  else:
    # The sampler's policy logprob (temperature 1, unfiltered) of the same
    # params: equal to a recompute up to kernel numerics.
    recomputed, old_logp = None, batch.behaviour_logp
  zeros = jnp.zeros_like(batch.behaviour_logp)
  ref_logp = (micro_lib.compute_logprobs(run.model_cfg, run.ref_params, batch,
                                        micro_batch_size=micro, mesh=run.mesh, pack=pack)
              if run.ref_params is not None else zeros)
  values = (micro_lib.compute_values(run.model_cfg, run.state.critic_params, batch,
                                    micro_batch_size=micro, mesh=run.mesh, pack=pack)
            if run.state.critic_params is not None else zeros)
  stats = {} if efficiency is None else {
      "pack/recompute_efficiency": efficiency,
      "pack/padded_efficiency": float(jnp.mean(batch.attention_mask))}
  return (batch.replace(old_logp=old_logp, ref_logp=ref_logp, values=values), recomputed,
          stats)


def update_on_rollout(run: Run, step: int, adv_fn, result, rollout_s: float,
                      version: Optional[int] = None,
                      before_update: Optional[Callable] = None) -> dict:
  """Logprobs, advantages and the PPO epochs of step `step` on `result`; its metrics.

  version: the policy version (train step) whose params sampled `result`
    (None: this step's, the synchronous loop); recorded in batch.policy_version.
  before_update: called after the batch is prepared and before the update
    consumes the params (mars.trainer.async_loop samples the next step there);
    its time is reported as time/rollout_s in place of `rollout_s`. If it
    returns a callable (a split run's rollout, started on its own devices),
    that is called after the update to wait for the rollout, and returns its
    seconds: time/step_s is then the wall time of both, overlapped.
  """
  c = run.config
  _, k_ppo = jax.random.split(jax.random.fold_in(run.base_key, step))
  t1 = time.perf_counter()
  batch, recomputed, pack_stats = prepare_batch(run, to_device_batch(run, result))
  if version is not None:
    batch = batch.replace(policy_version=batch.group_id * 0 + version)
  adv, ret = adv_fn(batch)
  jax.block_until_ready(adv)
  t2 = time.perf_counter()
  wait_rollout = None
  if before_update is not None:
    wait_rollout = before_update()
    rollout_s = time.perf_counter() - t2
  t2b = time.perf_counter()
  rows = batch.tokens.shape[0]
  run.state, update_metrics = step_lib.ppo_epochs(
      run.train_step, run.state, batch, adv, ret, c.rl.ppo_epochs,
      c.rl.minibatch_size or rows, k_ppo)
  t3 = time.perf_counter()
  update_s = t3 - t2b
  if callable(wait_rollout):
    rollout_s = wait_rollout()
    t3 = time.perf_counter()
  rewards = np.asarray([r.reward for r in result.rows], np.float32)
  # Host metrics cover this process's rows; reduce() makes them global.
  m = host_metrics.reduce(host_metrics.merge(
      result.metrics,
      group_outcomes(rewards, [r.group_id for r in result.rows], c.rollout.group_size),
      host_metrics.Metrics().mean("reward/mean", rewards)
      .mean("response_length/mean", [r.is_model.sum() for r in result.rows])))
  m.update({f"loss/{k}" if k in ("loss", "pg_loss", "vf_loss") else
            "pack/update_efficiency" if k == "pack_efficiency" else k: v
            for k, v in update_metrics.items()})
  m.update(pack_stats)
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
      "time/rollout_s": rollout_s, "time/logprob_s": t2 - t1, "time/update_s": update_s,
      "time/step_s": (t3 - t1) if before_update is not None else rollout_s + (t3 - t1),
      "compile_count/sampler": sampling.compile_count(),
      **{f"sampler/{k}": float(v) for k, v in run.sampler.take_stats().items()},
      # Equal unless some batch shape compiled twice (the state changed dtype,
      # tree or layout between steps); tests/test_train.py asserts they match.
      "compile_count/train_step": len(run.train_step.traces),
      "compile_count/train_step_shapes": len(set(run.train_step.traces)),
  })
  if "time/grade_s" in result.metrics and before_update is None:
    m["time/generate_s"] = m["time/rollout_s"] - result.metrics["time/grade_s"]
  if version is not None:
    m["async/version_lag"] = float(step - version)
  return m


def group_outcomes(reward, group_id, group_size: int) -> dict:
  """Fractions of all-fail / some-pass / all-pass groups among the trained rows
  (a row passes when its reward is > 0). For LTE runs this is after
  replacement; lte/* metrics hold the pre-replacement fractions."""
  if group_size < 2:
    return {}
  reward, gid = np.asarray(reward), np.asarray(group_id)
  groups = np.unique(gid)
  passed = np.array([(reward[gid == g] > 0).mean() for g in groups])
  return (host_metrics.Metrics()
          .mean("groups/all_fail_frac", passed == 0)
          .mean("groups/some_pass_frac", (passed > 0) & (passed < 1))
          .mean("groups/all_pass_frac", passed == 1))
