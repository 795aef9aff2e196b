"""Host metrics of local rows reduce to the metrics of all rows (numpy reference)."""
import numpy as np
import pytest

from mars import distributed, host_metrics
from mars.host_metrics import Metrics


def _local(rewards, repeats, later, hinted):
  return (Metrics().mean("reward/mean", rewards).ratio("repeat_frac", repeats, later)
          .total("hinted_groups", hinted))


def test_single_process_is_plain_values():
  m = _local([1.0, -0.5, -1.0], 1, 4, 2)
  m["time/step_s"] = 3.0
  assert host_metrics.reduce(m) == {"reward/mean": pytest.approx(-1 / 6), "repeat_frac": 0.25,
                                    "hinted_groups": 2.0, "time/step_s": 3.0}
  assert Metrics().mean("empty", []).ratio("none", 0, 0) == {"empty": 0.0, "none": 0.0}


def test_merge_keeps_combine_rules_and_later_wins():
  a = Metrics().mean("x", [1, 2]).total("n", 3)
  merged = host_metrics.merge(a, {"x": 7.0}, Metrics().ratio("r", 1, 2))
  assert merged == {"x": 7.0, "n": 3.0, "r": 0.5}
  assert "x" not in merged.weights and merged.weights["r"] == 2 and "n" in merged.weights


def test_two_process_reduction_equals_all_rows(monkeypatch):
  rng = np.random.default_rng(0)
  r0, r1 = rng.normal(size=5), rng.normal(size=11)
  p0, p1 = _local(r0, 1, 3, 2), _local(r1, 2, 7, 1)
  monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
  # Process 0's view of the device all-gather: its own table, then process 1's.
  gather_with = lambda other: (lambda t: np.stack([t, host_metrics.local_table(other)[1]]))
  monkeypatch.setattr(distributed, "allgather_exact", gather_with(p1))
  got = host_metrics.reduce(p0)
  assert got["reward/mean"] == pytest.approx(np.concatenate([r0, r1]).mean(), rel=1e-12)
  assert got["repeat_frac"] == pytest.approx(3 / 10)
  assert got["hinted_groups"] == 3.0
  # Different metric names on the two processes is an error, not a silent mix.
  other = Metrics().mean("other", [1.0]).ratio("repeat_frac", 1, 2).total("hinted_groups", 1)
  monkeypatch.setattr(distributed, "allgather_exact", gather_with(other))
  with pytest.raises(RuntimeError, match="different metric names"):
    host_metrics.reduce(p0)


def test_max_is_the_largest_over_processes(monkeypatch):
  p0 = Metrics().max("gap_max", [0.1, 0.3]).max("none_max", [])
  p1 = Metrics().max("gap_max", [0.7]).max("none_max", [])
  assert p0 == {"gap_max": 0.3, "none_max": 0.0}
  monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
  monkeypatch.setattr(distributed, "allgather_exact",
                      lambda t: np.stack([t, host_metrics.local_table(p1)[1]]))
  assert host_metrics.reduce(p0) == {"gap_max": 0.7, "none_max": 0.0}


def test_float64_allgather_is_bit_exact_in_one_process():
  table = np.array([[0.1, 1 / 3], [np.pi, 1e-300]])
  got = distributed.allgather_exact(table)
  assert got.shape == (1, 2, 2) and (got[0] == table).all()
