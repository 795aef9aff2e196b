r"""Export a trained policy as an HF checkpoint: python -m mars.export --workdir=RUN --out=HF_DIR.

Writes config.json + safetensors (mars.models.save_hf) and copies the run's
tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`
and vLLM serve it directly.
"""
import os
import shutil
import sys

from absl import app, flags

from mars import models
from mars.trainer import run_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "chat_template.jinja")

if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "mars run directory (config.json + checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
  flags.DEFINE_string("out", None, "Output HF directory.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                    "Weight dtype written (the hub files' bf16 by default; the run's "
                    "checkpoint keeps fp32 masters).")


def export(workdir: str, out: str, step=None, dtype: str = "bfloat16") -> int:
  """Exports the policy at `step` (latest by default) in `dtype`; returns the step exported.

  bf16 by default, as Qwen's hub files are: the fp32 masters stay in the run's
  checkpoints, and a served model computes in bf16 anyway."""
  tokenizer, model_cfg, params, restored_step = run_state.restore_policy(workdir, step)
  models.save_hf(model_cfg, params, out, dtype=dtype)
  tokenizer.hf.save_pretrained(out)
  # Keep the original files too where the tokenizer came from a directory (exact bytes).
  source = getattr(tokenizer.hf, "name_or_path", "")
  if source and os.path.isdir(source):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(source, name)) and name not in ("tokenizer_config.json",):
        shutil.copy(os.path.join(source, name), os.path.join(out, name))
  return restored_step


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.out:
    print("mars.export: error: --workdir and --out are required.", file=sys.stderr)
    sys.exit(2)
  try:
    step = export(f.workdir, f.out, f.step, f.dtype)
  except Exception as e:  # one clear line for input errors; real bugs keep their traceback
    if not isinstance(e, (FileNotFoundError, models.CheckpointError, models.UnsupportedConfigError)):
      raise
    print(f"mars.export: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"mars.export: step {step} of {f.workdir} -> {f.out}")


if __name__ == "__main__":
  app.run(main)
