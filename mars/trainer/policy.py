"""What a run trains on: its tokenizer, model config, initial params, prompts and grader.

The one place that resolves config names to things: a Hugging Face model path
or the embedded demo model (empty model.path), a TFDS dataset or the demo's
task (data.name="candidates"). The library below knows nothing of the demo.
"""
import json
import logging
import os
from typing import Optional

import jax
import numpy as np

from mars import data as data_lib
from mars import demo, distributed, models, rewards, sft
from mars.models import kernels
from mars import tokenizer as tok_lib
from mars.config_validation import ConfigError


def compute_options(config, platform: Optional[str] = None) -> dict:
  """The ModelConfig fields a run's config chooses besides dtypes: how the
  full-sequence forward is computed (remat policy, layer scan, attention kind
  and block, logits chunk). model.attention="auto" is resolved here, for `platform` (the
  run's devices by default; mars.plan passes the topology's)."""
  platform = platform or jax.devices()[0].platform
  return dict(remat=config.model.remat, scan_layers=config.model.scan_layers,
              attention=kernels.resolve(config.model.attention, platform),
              attention_block=config.model.attention_block,
              logits_chunk=config.model.logits_chunk)


def describe_policy(config, workdir: str):
  """(tokenizer, model config, from_hf) of a run, without loading any weights."""
  dtype = config.model.dtype
  compute = config.model.compute_dtype or dtype
  if config.model.path:
    model_dir = models.resolve_model_dir(config.model.path)
    model_cfg = models.load_config(model_dir, param_dtype=dtype, dtype=compute,
                                   **compute_options(config))
    return tok_lib.load_tokenizer(config.model.tokenizer_path or model_dir), model_cfg, True
  # The embedded demo: a tokenizer we build and a tiny Qwen3.
  tok_dir = config.model.tokenizer_path or os.path.join(workdir, "tokenizer")
  tokenizer = tok_lib.load_tokenizer(demo.build_tokenizer(tok_dir))
  return tokenizer, demo_model_config(config, workdir, tokenizer), False


def load_policy(config, workdir: str, mesh):
  """(tokenizer, model config, params, from_hf) for the configured model."""
  tokenizer, model_cfg, from_hf = describe_policy(config, workdir)
  if from_hf:
    _, params = models.load_hf(config.model.path, dtype=model_cfg.param_dtype, mesh=mesh,
                               compute_dtype=model_cfg.dtype, **compute_options(config))
  else:  # the demo: a format-only warm start follows (see warm_start)
    params = demo.init_demo_params(model_cfg, jax.random.key(config.seed))
  return tokenizer, model_cfg, params, from_hf


def demo_model_config(config, workdir: str, tokenizer):
  """The demo model's shape, saved with the run (HF config.json form) so the
  run stays loadable even if the demo's default shape changes later."""
  path = os.path.join(workdir, "model_config.json")
  if os.path.exists(path):
    model_cfg = models.load_config(path)
  else:
    model_cfg = demo.tiny_model_config(tokenizer.vocab_size)
    if distributed.is_main_process():
      with open(path, "w") as f:
        json.dump(models.to_hf_dict(model_cfg), f, indent=2)
  dtype = config.model.dtype
  return model_cfg.replace(param_dtype=dtype, dtype=config.model.compute_dtype or dtype,
                           **compute_options(config))


def warm_start(config, model_cfg, params, tokenizer, mesh):
  """Optional supervised format warm start of the demo model (mars/sft.py); deterministic."""
  if not config.sft.steps:
    return params
  task = make_source(config)
  # A single-turn run never sees a feedback turn: its warm start is all single-turn.
  mix = {"single_turn_fraction": 1.0} if config.episode.kind == "single_turn" else {}
  examples = demo.format_examples(task, config.sft.steps * config.sft.batch_size,
                                  np.random.default_rng(config.seed),
                                  hint_fraction=config.sft.hint_fraction, **mix)
  params, history = sft.sft_train(model_cfg, params, tokenizer, examples, steps=config.sft.steps,
                                  batch_size=config.sft.batch_size, lr=config.sft.lr,
                                  seed=config.seed, mesh=mesh)
  logging.info("SFT warm start: %d steps, final loss %.3f", config.sft.steps,
               history[-1]["loss"] if history else float("nan"))
  return params


def make_source(config, split: Optional[str] = None, seed_offset: int = 0):
  """The prompt source named by config.data (a random-access sequence of problems)."""
  if config.data.name == demo.SOURCE:
    if config.data.candidates_rule not in demo.RULES:
      raise ConfigError(f"Unknown data.candidates_rule {config.data.candidates_rule!r}; choose "
                        f"one of {demo.RULES}.")
    return demo.CandidateTask(k=config.data.candidates_k, seed=config.seed + seed_offset,
                              rule=config.data.candidates_rule)
  return data_lib.load_source(config.data.name, split or config.data.split,
                              data_dir=config.data.data_dir or None)


def make_grade_fn(config):
  """Grading in the worker pool (hard timeouts); returns (grade_fn, close)."""
  pool = rewards.GraderPool(num_workers=config.train.grader_workers,
                            timeout_s=config.train.grader_timeout_s,
                            boxes=config.train.grader_boxes)
  return pool.grade_batch, pool.close
