"""Run metrics: metrics.jsonl, TensorBoard events, a console line, end-of-run plots.

Only the main process writes. On resume, metrics.jsonl is cut back to the
restored step so that a killed-and-resumed run's file equals an
uninterrupted one's.
"""
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

# Keys plotted at the end of a run, when present.
PLOT_KEYS = ("reward/mean", "success@1", "success@2", "success@3", "success@4",
             "lte/all_fail_frac", "lte/all_pass_frac", "attempts_used/mean",
             "response_length/mean", "loss/pg_loss", "approx_kl", "time/step_s")


def _scalar(v):
  if isinstance(v, (bool, np.bool_)):
    return float(v)
  if isinstance(v, (int, float, np.integer, np.floating)):
    return float(v)
  if hasattr(v, "shape") and getattr(v, "size", 2) == 1:
    return float(np.asarray(v).reshape(()))
  return None


class MetricsWriter:

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True,
               tensorboard: bool = True):
    self.workdir = workdir
    self.total_steps = total_steps
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._t0 = time.time()
    self._first_step = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard is optional
        self._tb = None

  def truncate_after(self, step: int):
    """Drops lines for steps > `step` (written before a kill, redone after resume)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError):
        pass  # a line torn by the kill
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in sorted(metrics.items()):
      s = _scalar(v)
      if s is not None and math.isfinite(s):
        row[k] = s
      elif s is not None:
        row[k] = str(s)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          # TensorBoard tag names allow [A-Za-z0-9_./-]: success@2 -> success_at_2.
          self._tb.add_scalar(k.replace("@", "_at_"), v, step)
      self._tb.flush()
    self._console(step, row)

  def _console(self, step, row):
    if self._first_step is None:
      self._first_step, self._t0 = step, time.time()
    done = step - self._first_step + 1
    rate = (time.time() - self._t0) / max(done, 1)
    eta = rate * max(self.total_steps - step, 0)
    width = 20
    filled = int(width * step / max(self.total_steps, 1))
    bar = "#" * filled + "." * (width - filled)
    keys = [k for k in ("reward/mean", "success@1", "lte/all_fail_frac", "attempts_used/mean",
                        "loss/pg_loss", "time/step_s") if k in row]
    parts = " ".join(f"{k}={row[k]:.3f}" for k in keys)
    print(f"[{bar}] step {step}/{self.total_steps} {parts} eta {eta:.0f}s", file=sys.stderr,
          flush=True)

  def read(self):
    return read_metrics(self.path)

  def plot(self, keys=PLOT_KEYS) -> list:
    """Writes WORKDIR/plots/<key>.png for each logged key; returns the paths."""
    if not self.enabled:
      return []
    return plot_metrics(self.read(), os.path.join(self.workdir, "plots"), keys)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def plot_metrics(rows: list, out_dir: str, keys=PLOT_KEYS) -> list:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for key in keys:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
    if not pts:
      continue
    steps, values = zip(*pts)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, values, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, key.replace("/", "_").replace("@", "_at_") + ".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths
