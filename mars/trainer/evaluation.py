"""Evaluation of a policy on benchmarks: the passk and attempts protocols, shared by the
mars.evaluate CLI (a checkpoint) and the trainer's periodic eval (the live policy).

Two protocols, the two papers' headline numbers:
  passk     n samples per problem at temperature T; Pass@1 = mean correctness,
            Pass@k = the unbiased estimator 1 - C(n-c, k) / C(n, k) (seed 2's tables).
  attempts  for k = 1..K, every problem runs as a multi-attempt episode with
            exactly k attempts and ground-truth feedback (the episode code of
            mars.episodes.multi_attempt, not a copy); Acc@k = solved within k
            attempts (seed 1's Figures 1 and 5).
"""
import dataclasses
import logging
import math
import os
import sys
import time
import zlib
from typing import Callable, Optional

import jax
import ml_collections
from tqdm import tqdm

from mars import config as mars_config
from mars import distributed, eval_metrics, eval_report, models, rewards, sampling, sharding
from mars import tokenizer as tok_lib
from mars.episodes import multi_attempt, single_turn
from mars.trainer import run_state, specs
from mars.trainer.eval_settings import (EvalError, checkpoint_kind, fill_run_defaults,
                                        load_problems, trainer_eval_config, validate)

def make_mesh(shape):
  """The mesh; a shape without -1 uses the first prod(shape) devices (e.g. (1, 1, 1))."""
  devices = jax.devices()
  if -1 not in tuple(shape):
    devices = devices[:math.prod(shape)]
  return sharding.make_mesh(tuple(shape), devices)


def load_checkpoint(path: str, cfg, mesh, step: Optional[int] = None):
  """(tokenizer, model_cfg, params, step); step is None for an HF directory."""
  kind = checkpoint_kind(path)
  if kind == "run":
    try:
      return run_state.restore_policy(path, step=step, mesh=mesh)
    except FileNotFoundError as e:
      raise EvalError(str(e)) from None
  model_cfg, params = models.load_hf(path, dtype=cfg.dtype, mesh=mesh)
  return tok_lib.load_tokenizer(path), model_cfg, params, None


# ----------------------------------------------------------------------------
# The two protocols, shared by the CLI and the trainer.

@dataclasses.dataclass
class Policy:
  """What generation needs: the trainer's Run and the CLI both provide it."""
  sampler: object
  params: object
  tokenizer: object
  grade_fn: Callable
  pad_multiple: int = 1   # prompt batches padded to this (the mesh's data x fsdp size)


def _pad_to(num: int, cfg, policy: Policy) -> int:
  m = policy.pad_multiple
  return -(-min(cfg.batch_size, num) // m) * m


def _batches(problems, cfg):
  for start in range(0, len(problems), cfg.batch_size):
    yield start, problems[start:start + cfg.batch_size]


def _sample_record(name, problem, meta, policy, row, **extra) -> dict:
  record = {"benchmark": name, "problem_id": problem["id"], "answer": problem["answer"],
            "prompt": policy.tokenizer.decode(row.prompt.tolist())}
  record.update(extra)
  record.update({k: v for k, v in meta.items() if k not in ("problem_id",)})
  return record


def run_passk(name, problems, cfg, policy: Policy, key, samples: list, progress) -> dict:
  """Pass@k over n samples per problem (single-turn prompt)."""
  st_cfg = ml_collections.ConfigDict(dict(
      group_size=cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
      top_p=cfg.top_p, top_k=cfg.top_k, reward_correct=1.0, reward_wrong=0.0))
  correct = []
  for start, batch in _batches(problems, cfg):
    result = single_turn.rollout(policy.sampler, policy.params, policy.tokenizer, batch,
                                 key=jax.random.fold_in(key, start), grade_fn=policy.grade_fn,
                                 cfg=st_cfg, pad_prompts_to=_pad_to(len(batch), cfg, policy))
    for i, problem in enumerate(batch):
      rows = range(i * cfg.n, (i + 1) * cfg.n)
      correct.append([result.meta[r]["status"] == "correct" for r in rows])
      for j, r in enumerate(rows):
        samples.append(_sample_record(name, problem, result.meta[r], policy, result.rows[r],
                                      mode="passk", sample=j, correct=correct[-1][j],
                                      truncated=result.rows[r].truncated))
    progress.update(len(batch))
  return eval_metrics.passk_table(correct, cfg.ks)


def episode_config(cfg, num_samples: int) -> ml_collections.ConfigDict:
  """Multi-attempt episode settings: the defaults + this eval's knobs."""
  ep = mars_config.multi_attempt_config(mars_config.default_config())
  ep.budget, ep.chunk_tokens, ep.attempt_end = cfg.budget, cfg.chunk_tokens, cfg.attempt_end
  ep.group_size = num_samples
  if cfg.greedy:  # top-p/top-k would not change the argmax, but cost a vocab sort per token
    ep.temperature, ep.top_p, ep.top_k = 0.0, 1.0, 0
  else:
    ep.temperature, ep.top_p, ep.top_k = cfg.temperature, cfg.top_p, cfg.top_k
  return ep


def run_attempts(name, problems, cfg, policy: Policy, key, samples: list, progress) -> dict:
  """Acc@k for k = 1..K: episodes with exactly k attempts and ground-truth feedback.

  Each k is its own run (the prompt announces k attempts, as in the paper),
  not a prefix of one K-attempt episode.
  """
  G = 1 if cfg.greedy else cfg.n
  ep = episode_config(cfg, G)
  solved = {}
  for k in range(1, cfg.max_attempts + 1):
    per_problem = []
    for start, batch in _batches(problems, cfg):
      # Pad with copies of the last problem (dropped below): fixed shapes, mesh-divisible.
      padded = batch + [batch[-1]] * (_pad_to(len(batch), cfg, policy) - len(batch))
      result = multi_attempt.rollout(
          policy.sampler, policy.params, policy.tokenizer, padded,
          key=jax.random.fold_in(jax.random.fold_in(key, k), start), grade_fn=policy.grade_fn,
          cfg=ep, num_attempts=k, group_size=G)
      for i, problem in enumerate(batch):
        rows = range(i * G, (i + 1) * G)
        ok = [result.meta[r]["status"] == "correct" for r in rows]
        per_problem.append(sum(ok) / G)
        for j, r in enumerate(rows):
          samples.append(_sample_record(name, problem, result.meta[r], policy, result.rows[r],
                                        mode="attempts", sample=j, correct=ok[j]))
      progress.update(len(batch))
    solved[k] = per_problem
  return eval_metrics.attempts_table(solved)


def evaluate(cfg, policy: Policy, names, key, *, show_progress: bool = True):
  """Runs every benchmark -> (per-benchmark metrics, average, samples)."""
  runner = run_passk if cfg.mode == "passk" else run_attempts
  per_benchmark, samples = {}, []
  for name in names:
    problems = load_problems(name, cfg)
    if not problems:
      raise EvalError(f"Benchmark {name} has no problems.")
    total = len(problems) * (cfg.max_attempts if cfg.mode == "attempts" else 1)
    t0 = time.perf_counter()
    with tqdm(total=total, desc=name, unit="problem", file=sys.stderr, dynamic_ncols=True,
              disable=not show_progress) as progress:
      metrics = runner(name, problems, cfg, policy,
                       jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31)),
                       samples, progress)
    per_benchmark[name] = dict(num_problems=len(problems), time_s=time.perf_counter() - t0,
                               **metrics)
    logging.info("%s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
  return per_benchmark, eval_metrics.average(per_benchmark), samples


def results_dict(cfg, per_benchmark, average, *, label, checkpoint, step) -> dict:
  return {"label": label, "checkpoint": checkpoint, "step": step, "mode": cfg.mode,
          "config": cfg.to_dict(), "benchmarks": per_benchmark, "average": average}


def evaluate_for_trainer(run, step: int) -> dict:
  """Periodic eval of the live policy -> flat {"eval/<bench>/<metric>": value}.

  Also writes results.json / results.md / samples.jsonl under
  WORKDIR/eval/step_<step> on the main process.
  """
  cfg = trainer_eval_config(run.config)
  names = validate(cfg)
  policy = Policy(sampler=run.sampler, params=run.sampler.rollout_params(run.state.params),
                  tokenizer=run.tokenizer,
                  grade_fn=run.grade_fn,
                  # Per process: in a multi-host run every process evaluates the
                  # whole set as its own rows (redundant, not yet split).
                  pad_multiple=max(1, sharding.batch_shards(run.mesh)
                                   // jax.process_count()))
  key = jax.random.fold_in(jax.random.key(cfg.seed), step)
  per_benchmark, average, samples = evaluate(cfg, policy, names, key, show_progress=False)
  if distributed.is_main_process():
    results = results_dict(cfg, per_benchmark, average, label=os.path.basename(run.workdir),
                           checkpoint=run.workdir, step=step)
    eval_report.write_all(results, samples, os.path.join(run.workdir, "eval", f"step_{step}"),
                          plot=False)
  return flat_metrics(per_benchmark, average)


def flat_metrics(per_benchmark, average) -> dict:
  flat = {}
  for name, metrics in list(per_benchmark.items()) + [(eval_metrics.AVG, average)]:
    flat.update({f"eval/{name}/{k}": v for k, v in metrics.items()
                 if eval_metrics.is_curve_metric(k)})
  return flat


def run_cli(cfg, checkpoint: str, out_dir: str, *, step: Optional[int] = None, compare=(),
            label: Optional[str] = None, grade_fn: Optional[Callable] = None) -> dict:
  """Validates, loads, evaluates and writes the four outputs; returns results.json's dict."""
  names = validate(cfg)
  if not out_dir:
    raise EvalError("--out is required.")
  fill_run_defaults(cfg, checkpoint)
  for d in compare:  # fail now, not after hours of sampling
    eval_report.read_json(d)
  mesh = make_mesh(cfg.mesh_shape)
  tokenizer, model_cfg, params, step = load_checkpoint(checkpoint, cfg, mesh, step)
  close = lambda: None
  if grade_fn is None:
    pool = rewards.GraderPool(num_workers=cfg.grader_workers, timeout_s=cfg.grader_timeout_s,
                              boxes=cfg.grader_boxes)
    grade_fn, close = pool.grade_batch, pool.close
  sampler = specs.make_sampler(None, model_cfg, tokenizer, mesh, kv_tokens=cfg.kv_tokens)
  # A run's checkpoint holds fp32 masters: sample from one compute-dtype copy.
  policy = Policy(sampler, sampler.rollout_params(params), tokenizer, grade_fn,
                  pad_multiple=sharding.batch_shards(mesh))
  t0 = time.perf_counter()
  try:
    per_benchmark, average, samples = evaluate(cfg, policy, names, jax.random.key(cfg.seed))
  finally:
    close()
  label = label or os.path.basename(os.path.normpath(checkpoint))
  results = results_dict(cfg, per_benchmark, average, label=label,
                         checkpoint=os.path.abspath(checkpoint), step=step)
  results["time_s"] = time.perf_counter() - t0
  eval_report.write_all(results, samples, out_dir, compare=compare)
  print(eval_report.markdown_table(results))
  return results
