"""The end-of-run summary: held-out accuracy before and after training, the all-fail
fraction, and where the logs, checkpoint and curves are, with the next commands."""
import os
import sys

import numpy as np

from mars import distributed, eval_metrics
from mars import metrics as metrics_lib

# Steps averaged at each end of the run for the training-side fractions.
WINDOW = 10


def eval_curve(row: dict) -> dict:
  """{metric: value} of the benchmark average in a metrics.jsonl row (eval/avg/acc@k...)."""
  prefix = f"eval/{eval_metrics.AVG}/"
  return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}


def summary_table(rows: list, workdir: str, total_steps: int) -> str:
  """The summary as text, from the run's metrics.jsonl rows."""
  evals = [(r["step"], eval_curve(r)) for r in rows if eval_curve(r)]
  lines = [f"mars.train: done, {total_steps} steps in {workdir}"]
  if evals:
    (first_step, before), (last_step, after) = evals[0], evals[-1]
    names = sorted(set(before) | set(after), key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    lines.append(f"  {'held-out':<36}{'step ' + str(first_step):>12}{'step ' + str(last_step):>12}")
    for name in names:
      lines.append(f"  {name:<36}{before.get(name, float('nan')):>12.3f}"
                   f"{after.get(name, float('nan')):>12.3f}")
  train_rows = [r for r in rows if r["step"] > 0]
  for key, label in (("groups/all_fail_frac", "all-fail groups"), ("reward/mean", "train reward")):
    values = [r[key] for r in train_rows if isinstance(r.get(key), float)]
    if len(values) >= 2:
      n = min(WINDOW, len(values) // 2)
      lines.append(f"  {label + f' (mean of {n} steps)':<36}{np.mean(values[:n]):>12.3f}"
                   f"{np.mean(values[-n:]):>12.3f}")
  lines += [
      f"  TensorBoard   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
      f"  checkpoint    {os.path.join(workdir, 'checkpoints')}",
      f"  curves        {os.path.join(workdir, 'plots')}/*.png",
      f"  evaluate      python -m mars.evaluate --checkpoint={workdir} "
      f"--out={os.path.join(workdir, 'eval', 'final')}",
      f"  export        python -m mars.export --workdir={workdir} --out=EXPORT_DIR",
  ]
  return "\n".join(lines)


def print_summary(run) -> None:
  if distributed.is_main_process():
    rows = metrics_lib.read_metrics(os.path.join(run.workdir, "metrics.jsonl"))
    print(summary_table(rows, run.workdir, run.config.train.steps), file=sys.stderr, flush=True)
