r"""Evaluation: python -m mars.evaluate --config=configs/eval_math.py --checkpoint=DIR --out=DIR.

    python -m mars.evaluate --config=configs/eval_math.py --checkpoint=runs/ma_1p5b --out=eval/ma \
        [--config.benchmarks=math500,aime24] [--config.mode=attempts|passk] [--compare=eval/st ...]

Two protocols, the two papers' headline numbers:
  passk     n samples per problem at temperature T; Pass@1 = mean correctness,
            Pass@k = the unbiased estimator 1 - C(n-c, k) / C(n, k) (seed 2's tables).
  attempts  for k = 1..K, every problem runs as a multi-attempt episode with
            exactly k attempts and ground-truth feedback (the episode code of
            mars.episodes.multi_attempt, not a copy); Acc@k = solved within k
            attempts (seed 1's Figures 1 and 5).

--checkpoint is a mars run workdir (its latest orbax step, or --step) or an HF
model directory (config.json + safetensors), so base models evaluate too.
Writes results.json, results.md, accuracy_vs_attempts.png and samples.jsonl
to --out. The trainer's periodic eval calls `evaluate_for_trainer`, which
runs the same functions on the live policy.
"""
import dataclasses
import logging
import os
import sys
import time
import zlib
from typing import Callable, Optional

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from mars import eval_metrics, eval_report

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "eval_math.py")

if __name__ == "__main__":
  # A default file (like mars.train's) so `--config.X=...` overrides work without --config.
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Eval config (.py with get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "mars run workdir or HF model directory.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a run workdir (default: latest).")
  flags.DEFINE_multi_string("compare", [], "Other eval output dirs (with results.json) to "
                            "overlay on the plot, e.g. a single-turn baseline.")
  flags.DEFINE_string("label", None, "Name of this run in tables and plots "
                      "(default: the checkpoint directory's name).")

MODES = ("passk", "attempts")
DEMO_BENCHMARK = "candidates"
# The demo task is generated from a seed: evaluate on problems training never sees.
HELD_OUT_SEED_OFFSET = 1_000_003


class EvalError(ValueError):
  """Bad input (benchmark, checkpoint, k vs n): one clear line, before any compile."""


def default_config() -> ml_collections.ConfigDict:
  """Every eval field; configs/eval_math.py documents where the values come from."""
  c = ml_collections.ConfigDict()
  c.benchmarks = "math500,aime24,aime25,amc23,minerva_math,olympiadbench"
  c.mode = "passk"                # passk | attempts
  c.n = 16                        # passk: samples per problem; attempts: episodes per problem if sampled
  c.ks = (1, 2, 4, 8, 16)         # passk: Pass@k columns (each k <= n)
  c.temperature = 0.6
  c.top_p = 0.95
  c.top_k = 0
  c.max_new_tokens = 0            # passk: response budget; 0 = the run's (else 4096)
  c.max_attempts = 7              # attempts: K, the curve is Acc@1..K
  c.greedy = True                 # attempts: greedy decoding (one episode per problem)
  c.budget = 0                    # attempts: tokens shared by an episode's attempts; 0 = the run's (else 3000)
  c.chunk_tokens = 0              # attempts: tokens between host checks for an attempt's end; 0 = the run's (else 64)
  c.attempt_end = "boxed"         # attempts: boxed | chunk | eos (see mars.episodes.attempts)
  c.limit = 0                     # problems per benchmark (seeded subsample); 0 = all
  c.seed = 0
  c.batch_size = 16               # prompts per generate call; passk rows = batch_size x n
  c.grader_workers = 2
  c.grader_timeout_s = 5.0
  c.grader_boxes = ""             # math_verify | last; "" = the run's (else math_verify)
  c.dtype = "bfloat16"            # param dtype for HF checkpoints (a run uses its own)
  c.mesh_shape = (1, -1, 1)       # (data, fsdp, tensor); prompts are padded to data x fsdp
  c.data_dir = ""                 # TFDS dir ("" = $MARS_TFDS_DIR or ~/.cache/mars/tfds)
  c.candidates_k = 0              # demo benchmark: candidates per problem; 0 = the run's (else 3)
  c.candidates_problems = 500
  c.candidates_rule = ""          # demo benchmark: hidden | first; "" = the run's (else hidden)
  return c


# ----------------------------------------------------------------------------
# Validation and inputs.

def benchmark_names(cfg) -> list:
  from mars import data
  names = [b.strip() for b in str(cfg.benchmarks).split(",") if b.strip()]
  valid = tuple(data.EVAL_BENCHMARKS) + (DEMO_BENCHMARK,)
  if not names:
    raise EvalError(f"No benchmarks given; choose from {', '.join(valid)}.")
  for name in names:
    if name not in valid:
      raise EvalError(f"Unknown benchmark {name!r}; choose from {', '.join(valid)}.")
  return names


def validate(cfg) -> list:
  """Checks the config; returns the benchmark names. Raises EvalError."""
  names = benchmark_names(cfg)
  if cfg.mode not in MODES:
    raise EvalError(f"Unknown mode {cfg.mode!r}; choose one of {MODES}.")
  if cfg.n < 1:
    raise EvalError(f"n must be >= 1, got {cfg.n}.")
  if cfg.mode == "passk":
    ks = list(cfg.ks)
    if not ks or min(ks) < 1:
      raise EvalError(f"ks must be positive integers, got {tuple(cfg.ks)}.")
    if max(ks) > cfg.n:
      raise EvalError(f"Pass@{max(ks)} needs k <= n samples per problem, but n={cfg.n}; "
                      f"raise --config.n or drop k from --config.ks.")
    if cfg.temperature == 0 and cfg.n > 1:
      logging.warning("passk with temperature 0: all %d samples are identical.", cfg.n)
  elif cfg.max_attempts < 1:
    raise EvalError(f"max_attempts must be >= 1, got {cfg.max_attempts}.")
  for field in ("budget", "chunk_tokens", "max_new_tokens"):
    if cfg[field] < 0:
      raise EvalError(f"{field} must be >= 0 (0 = the run's own), got {cfg[field]}.")
  if cfg.limit < 0 or cfg.batch_size < 1:
    raise EvalError(f"limit must be >= 0 and batch_size >= 1, got {cfg.limit}, {cfg.batch_size}.")
  from mars.rewards import BOXES
  if cfg.grader_boxes and cfg.grader_boxes not in BOXES:
    raise EvalError(f"Unknown grader_boxes {cfg.grader_boxes!r}; choose one of {BOXES}.")
  from mars.demo_task import RULES
  if cfg.candidates_rule and cfg.candidates_rule not in RULES:
    raise EvalError(f"Unknown candidates_rule {cfg.candidates_rule!r}; choose one of {RULES}.")
  return names


def load_problems(name: str, cfg) -> list:
  """Rows {id, problem, answer, ...} of a benchmark, subsampled to cfg.limit with a seed."""
  import numpy as np
  if name == DEMO_BENCHMARK:
    from mars import demo_task
    source = demo_task.CandidateTask(k=cfg.candidates_k or 3, num_problems=cfg.candidates_problems,
                                     seed=cfg.seed + HELD_OUT_SEED_OFFSET,
                                     rule=cfg.candidates_rule or "hidden")
  else:
    from mars import data
    source = data.load_source(name, "test", data_dir=cfg.data_dir or None)
  indices = np.arange(len(source))
  if cfg.limit and cfg.limit < len(source):
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    indices = np.sort(rng.choice(len(source), cfg.limit, replace=False))
  return [source[int(i)] for i in indices]


def checkpoint_kind(path: str) -> str:
  """'run' (mars workdir) or 'hf' (HF model dir); EvalError otherwise."""
  if not path:
    raise EvalError("--checkpoint is required (a mars run workdir or an HF model directory).")
  if not os.path.isdir(path):
    raise EvalError(f"--checkpoint {path} is not a directory.")
  files = os.listdir(path)
  if not files:
    raise EvalError(f"--checkpoint {path} is empty: expected a mars run workdir (config.json + "
                    f"checkpoints/) or an HF model directory (config.json + *.safetensors).")
  if "checkpoints" in files:
    return "run"
  if "config.json" in files and any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
                                    for f in files):
    return "hf"
  raise EvalError(f"--checkpoint {path} is neither a mars run workdir (no checkpoints/) nor an "
                  f"HF model directory (no config.json + *.safetensors).")


# Fields whose 0/"" means "what the evaluated run trained with": a demo run's
# 6-token attempts evaluated with a 3,000-token budget and 64-token chunks ran
# ~10x slower for nothing (measured). Fallbacks apply to HF checkpoints.
RUN_DEFAULTS = {  # eval field: (path in the run's config.json, fallback)
    "candidates_k": (("data", "candidates_k"), 3),
    "candidates_rule": (("data", "candidates_rule"), "hidden"),
    "max_new_tokens": (("rollout", "max_new_tokens"), 4096),
    "budget": (("episode", "budget"), 3000),
    "chunk_tokens": (("episode", "chunk_tokens"), 64),
    "grader_boxes": (("train", "grader_boxes"), "math_verify"),
}


def run_settings(workdir: str) -> dict:
  """RUN_DEFAULTS' fields as a run trained them (its config.json); {} if unreadable."""
  import json
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      run = json.load(f)
  except (OSError, ValueError):  # not a run, or not a readable config
    return {}
  out = {}
  for field, ((section, key), _) in RUN_DEFAULTS.items():
    part = run.get(section)
    value = part.get(key) if isinstance(part, dict) else None
    if value:
      out[field] = value
  return out


def fill_run_defaults(cfg, checkpoint: str) -> None:
  """Unset (0/"") RUN_DEFAULTS fields <- the run's values (a run workdir), else the fallback."""
  run = run_settings(checkpoint) if checkpoint_kind(checkpoint) == "run" else {}
  for field, (_, fallback) in RUN_DEFAULTS.items():
    if not cfg[field]:
      cfg[field] = type(fallback)(run.get(field, fallback))


def make_mesh(shape):
  """The mesh; a shape without -1 uses the first prod(shape) devices (e.g. (1, 1, 1))."""
  import math
  import jax
  from mars import sharding
  devices = jax.devices()
  if -1 not in tuple(shape):
    devices = devices[:math.prod(shape)]
  return sharding.make_mesh(tuple(shape), devices)


def load_checkpoint(path: str, cfg, mesh, step: Optional[int] = None):
  """(tokenizer, model_cfg, params, step); step is None for an HF directory."""
  kind = checkpoint_kind(path)
  if kind == "run":
    from mars import train
    try:
      return train.load_params_from_workdir(path, step=step, mesh=mesh)
    except FileNotFoundError as e:
      raise EvalError(str(e)) from None
  from mars import models
  from mars import tokenizer as tok_lib
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
  import jax
  from mars.episodes import single_turn
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
  """Multi-attempt episode settings: the episode code's defaults + this eval's knobs."""
  from mars.episodes import multi_attempt
  ep = multi_attempt.default_config()
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
  import jax
  from mars.episodes import multi_attempt
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
  import jax
  from tqdm import tqdm
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


# ----------------------------------------------------------------------------
# Trainer reuse.

def trainer_eval_config(run_config) -> ml_collections.ConfigDict:
  """Eval settings for a training run: defaults, then the run's sampling and
  episode settings, then whatever config.eval overrides (benchmarks, mode,
  max_attempts, limit, n, or any default_config() field)."""
  cfg = default_config()
  cfg.seed = run_config.seed
  for field, ((section, key), _) in RUN_DEFAULTS.items():
    cfg[field] = run_config[section][key]
  cfg.attempt_end = run_config.episode.attempt_end
  cfg.grader_workers = run_config.train.grader_workers
  cfg.grader_timeout_s = run_config.train.grader_timeout_s
  overrides = run_config.eval.to_dict()
  cfg.update({k: v for k, v in overrides.items() if k in cfg})
  if "greedy" not in overrides:
    cfg.greedy = cfg.n == 1  # one episode per problem: make it the deterministic one
  if "ks" not in overrides:
    cfg.ks = tuple(k for k in (1, 2, 4, 8, 16, 32, 64) if k <= cfg.n)
  return cfg


def evaluate_for_trainer(run, step: int) -> dict:
  """Periodic eval of the live policy -> flat {"eval/<bench>/<metric>": value}.

  Also writes results.json / results.md / samples.jsonl under
  WORKDIR/eval/step_<step> on the main process.
  """
  import jax
  from mars import distributed, sharding
  cfg = trainer_eval_config(run.config)
  names = validate(cfg)
  policy = Policy(sampler=run.sampler, params=run.sampler.rollout_params(run.state.params),
                  tokenizer=run.tokenizer,
                  grade_fn=run.grade_fn,
                  # Per process: in a multi-host run every process evaluates the
                  # whole set as its own rows (redundant, not yet split).
                  pad_multiple=max(1, sharding.mesh_axis_size(run.mesh, ("data", "fsdp"))
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


# ----------------------------------------------------------------------------
# CLI.

def run_cli(cfg, checkpoint: str, out_dir: str, *, step: Optional[int] = None, compare=(),
            label: Optional[str] = None, grade_fn: Optional[Callable] = None) -> dict:
  """Validates, loads, evaluates and writes the four outputs; returns results.json's dict."""
  names = validate(cfg)
  if not out_dir:
    raise EvalError("--out is required.")
  fill_run_defaults(cfg, checkpoint)
  for d in compare:  # fail now, not after hours of sampling
    eval_report.read_json(d)
  import jax
  from mars import rewards, sampling, sharding
  mesh = make_mesh(cfg.mesh_shape)
  tokenizer, model_cfg, params, step = load_checkpoint(checkpoint, cfg, mesh, step)
  close = lambda: None
  if grade_fn is None:
    pool = rewards.GraderPool(num_workers=cfg.grader_workers, timeout_s=cfg.grader_timeout_s,
                              boxes=cfg.grader_boxes)
    grade_fn, close = pool.grade_batch, pool.close
  sampler = sampling.Sampler(model_cfg, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                             mesh=mesh, queue_len=128)
  # A run's checkpoint holds fp32 masters: sample from one compute-dtype copy.
  policy = Policy(sampler, sampler.rollout_params(params), tokenizer, grade_fn,
                  pad_multiple=sharding.mesh_axis_size(mesh, ("data", "fsdp")))
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


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  F = flags.FLAGS
  cfg = F.config if F.config is not None else default_config()
  try:
    run_cli(cfg, F.checkpoint, F.out, step=F.step, compare=F.compare, label=F.label)
  except Exception as e:  # one clear line for input errors; real bugs keep their traceback
    from mars.models import CheckpointError, UnsupportedConfigError
    from mars.sharding import ShardingError
    if isinstance(e, (EvalError, FileNotFoundError, CheckpointError, ShardingError,
                      UnsupportedConfigError)):
      print(f"mars.evaluate: error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  app.run(main)
