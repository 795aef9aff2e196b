"""Eval settings: benchmark names, validation, problems, checkpoint kinds, and the run's own
sampling settings as defaults (for mars.evaluate and the trainer's periodic eval)."""
import json
import logging
import os
import zlib

import ml_collections
import numpy as np

from mars import config as mars_config
from mars import data as data_lib
from mars import demo, rewards

MODES = ("passk", "attempts")
DEMO_BENCHMARK = demo.SOURCE
# The demo task is generated from a seed: evaluate on problems training never sees.
HELD_OUT_SEED_OFFSET = 1_000_003


class EvalError(ValueError):
  """Bad input (benchmark, checkpoint, k vs n): one clear line, before any compile."""


def benchmark_names(cfg) -> list:
  names = [b.strip() for b in str(cfg.benchmarks).split(",") if b.strip()]
  valid = tuple(data_lib.EVAL_BENCHMARKS) + (DEMO_BENCHMARK,)
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
  for field in ("budget", "chunk_tokens", "max_new_tokens", "kv_tokens"):
    if cfg[field] < 0:
      raise EvalError(f"{field} must be >= 0 (0 = the run's own), got {cfg[field]}.")
  if cfg.limit < 0 or cfg.batch_size < 1:
    raise EvalError(f"limit must be >= 0 and batch_size >= 1, got {cfg.limit}, {cfg.batch_size}.")
  if cfg.grader_boxes and cfg.grader_boxes not in rewards.BOXES:
    raise EvalError(f"Unknown grader_boxes {cfg.grader_boxes!r}; choose one of {rewards.BOXES}.")
  if cfg.candidates_rule and cfg.candidates_rule not in demo.RULES:
    raise EvalError(f"Unknown candidates_rule {cfg.candidates_rule!r}; choose one of {demo.RULES}.")
  return names


def load_problems(name: str, cfg) -> list:
  """Rows {id, problem, answer, ...} of a benchmark, subsampled to cfg.limit with a seed."""
  if name == DEMO_BENCHMARK:
    source = demo.CandidateTask(k=cfg.candidates_k or 3, num_problems=cfg.candidates_problems,
                                seed=cfg.seed + HELD_OUT_SEED_OFFSET,
                                rule=cfg.candidates_rule or "hidden")
  else:
    source = data_lib.load_source(name, "test", data_dir=cfg.data_dir or None)
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
    "kv_tokens": (("sampling", "kv_tokens"), 0),
}


def run_settings(workdir: str) -> dict:
  """RUN_DEFAULTS' fields as a run trained them (its config.json); {} if unreadable."""
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


def trainer_eval_config(run_config) -> ml_collections.ConfigDict:
  """Eval settings for a training run: defaults, then the run's sampling and
  episode settings, then whatever config.eval overrides (benchmarks, mode,
  max_attempts, limit, n, or any mars.config.default_eval_config() field)."""
  cfg = mars_config.default_eval_config()
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
