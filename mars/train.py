r"""Training CLI: python -m mars.train --config=configs/lte_4b.py --workdir=DIR.

Parses flags and calls mars.trainer.loop.train. With no flags it runs the
embedded CPU demo (configs/tiny.py). An existing workdir resumes exactly.
"""
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from mars import config_validation, demo, distributed, models, sharding
from mars.trainer import loop

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")
# Bad input: one "mars.train: error: ..." line and exit code 2, never a traceback.
INPUT_ERRORS = (config_validation.ConfigError, sharding.ShardingError, FileNotFoundError,
                distributed.DistributedEnvError, demo.TokenizerDirError,
                models.UnsupportedConfigError, models.CheckpointError)

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config (.py with get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (default: a fresh ./runs/<time>). "
                      "An existing workdir with checkpoints is resumed.")
  flags.DEFINE_integer("max_steps", None, "Stop after this many steps in this process "
                       "(testing resume); the config's train.steps is the schedule length.")


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
    loop.train(flags.FLAGS.config, workdir, max_steps=flags.FLAGS.max_steps)
  except INPUT_ERRORS as e:
    print(f"mars.train: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
