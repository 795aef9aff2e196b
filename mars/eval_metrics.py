"""Evaluation metrics: the unbiased pass@k estimator and per-benchmark tables.

Pure numpy over per-problem counts, so the estimator can be checked against a
brute-force enumeration and reused by the CLI and the trainer alike.
"""
from typing import Dict, Mapping, Sequence

import numpy as np

AVG = "avg"


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

  Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021),
  which never forms the huge binomials (C(64, 32) overflows float32).
  """
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}.")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}.")
  if n - c < k:  # every k-subset holds a correct sample
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def passk_table(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> Dict[str, float]:
  """{pass@k: mean over problems} from a [problems][n] correctness matrix.

  pass@1 is the mean correctness (the estimator reduces to c/n for k=1).
  """
  correct = np.asarray(correct, bool)
  if correct.ndim != 2 or correct.shape[0] == 0:
    raise ValueError(f"passk_table: need a non-empty [problems, n] matrix, got {correct.shape}.")
  n = correct.shape[1]
  counts = correct.sum(1)
  return {f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks}


def attempts_table(solved: Mapping[int, Sequence[float]]) -> Dict[str, float]:
  """{acc@k: mean over problems} from {k: per-problem solved fraction with k attempts}."""
  return {f"acc@{k}": float(np.mean(solved[k])) for k in sorted(solved)}


def average(per_benchmark: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
  """Unweighted mean over benchmarks (the papers' "Avg." column), per metric.

  Unweighted so that GSM8K's 1319 problems do not drown AIME's 30.
  """
  keys = [k for k in next(iter(per_benchmark.values())) if is_curve_metric(k)]
  return {k: float(np.mean([m[k] for m in per_benchmark.values()])) for k in keys}


def is_curve_metric(name: str) -> bool:
  return name.startswith(("pass@", "acc@"))


def curve(metrics: Mapping[str, float]):
  """(ks, values) of the pass@k / acc@k entries, sorted by k."""
  points = sorted((int(name.split("@")[1]), v) for name, v in metrics.items()
                  if is_curve_metric(name))
  return [k for k, _ in points], [v for _, v in points]
