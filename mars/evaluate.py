r"""Evaluation: python -m mars.evaluate --config=configs/eval_math.py --checkpoint=DIR --out=DIR.

    python -m mars.evaluate --config=configs/eval_math.py --checkpoint=runs/ma_1p5b --out=eval/ma \
        [--config.benchmarks=math500,aime24] [--config.mode=attempts|passk] [--compare=eval/st ...]

Modes: passk (Pass@k of n samples) and attempts (Acc@k with k = 1..K attempts and
feedback); mars/trainer/evaluation.py defines both.

--checkpoint is a mars run workdir (its latest orbax step, or --step) or an HF
model directory (config.json + safetensors), so base models evaluate too.
Writes results.json, results.md, accuracy_vs_attempts.png and samples.jsonl
to --out. This module parses flags; the protocols live in mars.trainer.evaluation,
which the trainer's periodic eval runs on the live policy.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mars import config as mars_config
from mars import models, sharding
from mars.trainer import evaluation
from mars.trainer.eval_settings import EvalError

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


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  F = flags.FLAGS
  cfg = F.config if F.config is not None else mars_config.default_eval_config()
  try:
    evaluation.run_cli(cfg, F.checkpoint, F.out, step=F.step, compare=F.compare, label=F.label)
  except Exception as e:  # one clear line for input errors; real bugs keep their traceback
    if isinstance(e, (EvalError, FileNotFoundError, models.CheckpointError,
                      sharding.ShardingError, models.UnsupportedConfigError)):
      print(f"mars.evaluate: error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  app.run(main)
