"""The rollout phase of a step: prompts -> episodes (single-turn, multi-attempt, LTE) ->
dynamic sampling and overlong shaping, as host rows (an EpisodeResult, not yet packed)."""
import dataclasses
import functools
import math

import jax
import ml_collections
import numpy as np

from mars import config as mars_config
from mars import distributed, host_metrics, sharding
from mars.episodes import lte, multi_attempt, packing, single_turn
from mars.rl import advantages
from mars.rl import step as step_lib
from mars.rl import micro as micro_lib
from mars.trainer.run_state import Run


def rollout(run: Run, problems, key, params):
  """Rollouts of the configured kind -> EpisodeResult. `params`: the sampler's
  compute-dtype copy of the policy (Sampler.rollout_params), made once per step."""
  c = run.config
  common = dict(key=key, grade_fn=run.grade_fn)
  # A split run rescores on its rollout group, with the sampler's copy: the update
  # is consuming (donating) the trainer's params meanwhile.
  on_group = dict(params=params, mesh=run.rollout_mesh) if is_split(run) else {}
  lte_common = dict(group_offset=local_prompts(run, len(problems)).start,
                    rescore_fn=(functools.partial(rescore_responses, run, **on_group)
                                if c.rl.recompute_old_logp else None))
  if c.episode.kind == "multi_attempt":
    cfg = mars_config.multi_attempt_config(c)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    # N is drawn per question (as in the paper), so a group shares one prefill.
    # Drawn for the global batch, then this process's questions: the same N
    # per question however many processes share the step.
    n = multi_attempt.draw_num_attempts(rng, c.data.prompts_per_step, cfg)
    n = n[local_prompts(run, len(problems))] if len(problems) != len(n) else n
    single = c.episode.max_attempts == 1
    if c.lte.enabled:
      return lte.rollout(run.sampler, params, run.tokenizer, problems, cfg=cfg,
                         lte_cfg=lte_cfg(run, "multi_attempt"), num_attempts=list(n),
                         group_size=c.rollout.group_size, single_turn=single, **common,
                         **lte_common)
    return multi_attempt.rollout(run.sampler, params, run.tokenizer, problems,
                                 cfg=cfg, num_attempts=list(n), group_size=c.rollout.group_size,
                                 single_turn=single, **common)
  if c.lte.enabled:
    return lte.rollout(run.sampler, params, run.tokenizer, problems, cfg=c.rollout,
                       lte_cfg=lte_cfg(run, "single_turn"), **common, **lte_common)
  return single_turn.rollout(run.sampler, params, run.tokenizer, problems,
                             cfg=c.rollout, **common)


def is_split(run: Run) -> bool:
  """Whether rollouts run on their own device group (rollout.devices > 0)."""
  return run.rollout_mesh is not run.mesh


def rescore_responses(run: Run, rows, params=None, mesh=None) -> list:
  """The trainer's logp of each row's response under the row's own prompt.

  Used for LTE's behaviour logp: the same forward (fp32 masters, compute
  dtype, micro-batches) as the old-logp recompute, so the off-policy ratio's
  numerator and denominator share their numerics. Collective in a multi-host
  run: every process calls it with its own rows (possibly none); the rows are
  padded to one shape and a row count that the micro-batch and mesh divide.
  params, mesh: the trainer's by default; a split run passes the sampler's
  compute-dtype copy on the rollout group, which scores as the masters do (the
  forward casts every weight to the compute dtype before using it).
  """
  c = run.config
  params = run.state.params if params is None else params
  mesh = run.mesh if mesh is None else mesh
  n_local, P, R = distributed.agree_max(len(rows), max([len(r.prompt) for r in rows] or [1]),
                                        max([len(r.response) for r in rows] or [1]))
  if n_local == 0:
    return []
  processes = run.pipeline.process_count
  micro = c.rl.micro_batch_size or None
  if micro:  # whole mesh shards per micro-batch (the trainer's mesh always divides it)
    micro = math.lcm(micro, sharding.batch_shards(mesh))
  shard = max(micro or 1, sharding.batch_shards(mesh))
  shard = -(-shard // processes)  # rows per process in one micro-batch (or mesh shard)
  padded = -(-n_local // shard) * shard
  filler = packing.Row(prompt=[run.tokenizer.pad_id], response=[run.tokenizer.pad_id],
                       is_model=[False], behaviour_logp=[0.0])
  host = packing.pack(list(rows) + [filler] * (padded - len(rows)), run.tokenizer.pad_id,
                      prompt_len=P, total_len=packing.total_length(P, R))
  batch = jax.tree.map(distributed.global_array_from_local, host,
                       step_lib.batch_shardings(mesh))
  micro = micro if micro and batch.tokens.shape[0] % micro == 0 else None
  pack = (micro_lib.plan_packing(batch.attention_mask, micro, mesh, c.rl.pack_length)[0]
          if c.rl.packing else None)
  logp = micro_lib.compute_logprobs(run.model_cfg, params, batch,
                                   micro_batch_size=micro, mesh=mesh, pack=pack)
  local = distributed.host_local(logp)
  return [local[i, P:P + len(r.response)] for i, r in enumerate(rows)]


def local_prompts(run: Run, count: int) -> slice:
  """This process's questions in the global batch (the pipeline's split)."""
  start = run.pipeline.process_index * count
  return slice(start, start + count)


def lte_cfg(run: Run, episode: str):
  """LTE settings; the episode kind follows config.episode.kind, and hinted
  batches are padded to the data-parallel size so they divide the mesh."""
  cfg = ml_collections.ConfigDict(run.config.lte.to_dict())
  cfg.episode = episode
  # Hinted rows are sampled (and rescored) on the rollout mesh, and trained on the
  # trainer's: a batch both divide.
  rows_axis = math.lcm(sharding.batch_shards(run.mesh), sharding.batch_shards(run.rollout_mesh))
  cfg.hinted_min_prompts = max(cfg.hinted_min_prompts,
                               rows_axis // run.pipeline.process_count)  # per process
  return cfg


def sample_rollout(run: Run, step: int, rollout_params=None):
  """Step `step`'s rollouts (prompts, episodes, dynamic sampling, shaping),
  sampled with the current params (or `rollout_params`, the sampler's copy of
  them made by the caller): an EpisodeResult on the host."""
  k_roll, _ = jax.random.split(jax.random.fold_in(run.base_key, step))
  problems = run.pipeline.next_batch()
  if rollout_params is None:
    rollout_params = run.sampler.rollout_params(run.state.params)
  result = rollout(run, problems, k_roll, rollout_params)
  result = maybe_dynamic_sampling(run, result, k_roll, rollout_params)
  del rollout_params  # the bf16 copy is not kept through the update
  return maybe_overlong_shaping(run, result)


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
    informative = advantages.dapo_filter_groups([r.reward for r in res.rows],
                                                [r.group_id for r in res.rows])
    for g in range(len(res.rows) // G):
      (kept if informative[g * G] else dropped).append(
          (res.rows[g * G:(g + 1) * G], res.meta[g * G:(g + 1) * G]))

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
  return packing.EpisodeResult(rows=rows, meta=meta, metrics=metrics, pad_id=run.tokenizer.pad_id)


def maybe_overlong_shaping(run: Run, result):
  """DAPO soft overlong punishment added to each row's reward (rl.overlong_buffer > 0)."""
  c = run.config
  if not c.rl.overlong_buffer:
    return result
  max_len = c.episode.budget if c.episode.kind == "multi_attempt" else c.rollout.max_new_tokens
  lengths = np.asarray([r.is_model.sum() for r in result.rows])  # the loss mask's tokens
  shaped = np.asarray(advantages.overlong_reward_shaping(lengths, max_len, c.rl.overlong_buffer))
  rows = [dataclasses.replace(r, reward=float(r.reward + s)) for r, s in zip(result.rows, shaped)]
  metrics = host_metrics.merge(
      result.metrics, host_metrics.Metrics().mean("dapo/overlong_penalty_mean", shaped))
  return dataclasses.replace(result, rows=rows, metrics=metrics)
