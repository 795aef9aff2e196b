"""Host-side metrics over this process's rows, and their cross-process reduction.

Episode code computes metrics on the rows it played (all rows in one process,
its own rows in a multi-host run). Each value records how it combines:

    m = Metrics()
    m.mean("reward/mean", rewards)             # weighted by len(rewards)
    m.ratio("attempts/repeat_frac", rep, later)  # sum(num) / sum(den)
    m.total("lte/hinted_groups", 3)             # summed over processes
    m.max("logp_mismatch/hinted_max", gaps)     # largest over processes (0 if none)

`reduce(m)` gives the global values: one all-gather of (weighted value,
weight) pairs per step, then exact float64 sums. Plain entries (timings,
compile counts, values already reduced on device) stay as they are, and a
single process returns everything untouched, so one-process runs are
bit-identical with or without this layer.

Metrics is a dict of floats, so tests and callers read it like one; merge()
keeps the combine rules when dicts are joined.
"""
import zlib

import numpy as np

from mars import distributed

_TOTAL = -1.0  # weight marker: summed, not averaged
_MAX = -2.0    # weight marker: the largest value over processes


class Metrics(dict):
  """{name: float} plus {name: weight} for the values that reduce across processes."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.weights = {}

  def mean(self, name: str, values) -> "Metrics":
    values = np.asarray(values, np.float64).ravel()
    self[name] = float(values.mean()) if values.size else 0.0
    self.weights[name] = float(values.size)
    return self

  def ratio(self, name: str, numerator, denominator) -> "Metrics":
    self[name] = float(numerator / denominator) if denominator else 0.0
    self.weights[name] = float(denominator)
    return self

  def total(self, name: str, value) -> "Metrics":
    self[name] = float(value)
    self.weights[name] = _TOTAL
    return self

  def max(self, name: str, values) -> "Metrics":
    values = np.asarray(values, np.float64).ravel()
    self[name] = float(values.max()) if values.size else 0.0
    self.weights[name] = _MAX
    return self


def merge(*dicts) -> Metrics:
  """Later dicts win, as in {**a, **b}; combine rules travel with their values."""
  out = Metrics()
  for d in dicts:
    for name, value in d.items():
      out[name] = value
      out.weights.pop(name, None)
      if name in getattr(d, "weights", {}):
        out.weights[name] = d.weights[name]
  return out


def local_table(metrics: Metrics):
  """(names, [1 + M, 2] float64 table) this process sends: a checksum row of
  the sorted names, then (value x weight, weight) per name (value and a marker
weight for totals and maxima)."""
  names = sorted(metrics.weights)
  check = float(zlib.crc32("\n".join(names).encode()))
  rows = [[check, float(len(names))]]
  for n in names:
    w = metrics.weights[n]
    rows.append([metrics[n] * (1.0 if w in (_TOTAL, _MAX) else w), w])
  return names, np.array(rows, np.float64)


def reduce(metrics) -> dict:
  """Global metrics: means weighted over processes, totals summed (see module doc)."""
  if not distributed.is_multiprocess() or not isinstance(metrics, Metrics):
    return dict(metrics)
  names, table = local_table(metrics)
  # float64 travels as int32 pairs: jax's x64-off all-gather would round it.
  gathered = distributed.allgather_exact(table)  # [P, 1 + M, 2]
  # Every process must reduce the same names in the same order: the checksum
  # row turns a mismatch into an error instead of silently mixed values.
  if not (gathered[:, 0] == gathered[0, 0]).all():
    raise RuntimeError("host_metrics.reduce: processes logged different metric names "
                       f"(this process: {names}).")
  out = dict(metrics)
  for i, name in enumerate(names, start=1):
    value, weight = gathered[:, i, 0], gathered[:, i, 1]
    if metrics.weights[name] == _TOTAL:
      out[name] = float(value.sum())
    elif metrics.weights[name] == _MAX:
      out[name] = float(value.max())
    else:
      den = weight.sum()
      out[name] = float(value.sum() / den) if den else 0.0
  return out
