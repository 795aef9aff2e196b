"""Grader throughput and latency on 2 worker processes.

  python benchmarks/grade.py --out benchmarks/results/grade_cpu.json

Sets:
  math500_reference   MATH-500 reference solutions vs their answers (all correct).
  math500_mismatched  solution i vs the answer of row i+1 (mostly wrong, so
                      math-verify runs its full comparison instead of matching
                      strings).
  adversarial         mars.rewards.adversarial: 240 nasty outputs.

Each set runs on a fresh pool: pass 1 is "cold" (workers still filling sympy
and parser caches), passes 2..N are "warm" (a long-lived trainer pool; as in
GRPO, where each ground truth is graded G times, its parse is cached).
Latency is per answer, from handing it to a worker to its reply (or kill).
Target (issue 4): >= 200 answers/s and p99 < 1 s.
"""
import argparse
import collections
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mars import rewards  # pylint: disable=wrong-import-position
from mars.rewards import adversarial  # pylint: disable=wrong-import-position


def default_data_dir() -> str:
  repo = pathlib.Path(__file__).resolve().parents[1]
  return os.environ.get("MARS_DATA_DIR", str(repo.parent / "shared" / "data"))


def load_sets(data_dir: str) -> dict:
  with open(os.path.join(data_dir, "eval/math500/test.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  solutions = [r["solution"] for r in rows]
  answers = [r["answer"] for r in rows]
  cases = adversarial.adversarial_cases(n=240)
  return {
      "math500_reference": (solutions, answers),
      "math500_mismatched": (solutions, answers[1:] + answers[:1]),
      "adversarial": ([r for r, _ in cases], [a for _, a in cases]),
  }


def _cpu_s(pids) -> float:
  """User + system CPU seconds of live processes (Linux /proc)."""
  total = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
      pass
  return total / os.sysconf("SC_CLK_TCK")


def run_set(responses, answers, workers: int, timeout_s: float, passes: int) -> dict:
  with rewards.GraderPool(num_workers=workers, timeout_s=timeout_s) as pool:
    pool.grade_batch(["\\boxed{1}"] * workers, ["1"] * workers)  # workers up
    rates, latencies, statuses, cpu_per_answer = [], [], collections.Counter(), []
    for i in range(passes):
      pids = [w.proc.pid for w in pool._workers]  # pylint: disable=protected-access
      cpu_before = _cpu_s(pids)
      start = time.perf_counter()
      grades = pool.grade_batch(responses, answers)
      rates.append(len(responses) / (time.perf_counter() - start))
      cpu_per_answer.append((_cpu_s(pids) - cpu_before) / len(responses))
      if i > 0 or passes == 1:
        latencies.extend(pool.last_latencies_s)
      if i == 0:
        statuses.update(g.status for g in grades)
        cold_lat = np.asarray(pool.last_latencies_s)
    lat = np.asarray(latencies)
    warm_cpu = float(np.median(cpu_per_answer[1:] or cpu_per_answer))
    return {
        "n": len(responses),
        "cold_answers_per_s": round(rates[0], 1),
        "warm_answers_per_s": round(float(np.median(rates[1:] or rates)), 1),
        # Load-independent: worker CPU per answer, and what `workers` idle
        # cores would give at that cost (the machine we ran on is shared).
        "cold_worker_cpu_ms_per_answer": round(1000 * cpu_per_answer[0], 2),
        "warm_worker_cpu_ms_per_answer": round(1000 * warm_cpu, 2),
        "cold_answers_per_s_idle_cores_estimate": round(workers / max(cpu_per_answer[0], 1e-9), 1),
        "warm_answers_per_s_idle_cores_estimate": round(workers / max(warm_cpu, 1e-9), 1),
        "cold_p99_latency_ms": round(1000 * float(np.percentile(cold_lat, 99)), 2),
        "cold_max_latency_ms": round(1000 * float(cold_lat.max()), 2),
        "p50_latency_ms": round(1000 * float(np.percentile(lat, 50)), 2),
        "p99_latency_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        "max_latency_ms": round(1000 * float(lat.max()), 2),
        "statuses": dict(statuses),
        "workers_killed": pool.num_killed,
    }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--data-dir", default=default_data_dir())
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--timeout-s", type=float, default=2.0)
  parser.add_argument("--passes", type=int, default=4)
  args = parser.parse_args()

  load_before = os.getloadavg()
  results = {name: run_set(*pair, args.workers, args.timeout_s, args.passes)
             for name, pair in load_sets(args.data_dir).items()}
  report = {
      "benchmark": "grade",
      "workers": args.workers,
      "timeout_s": args.timeout_s,
      "passes": args.passes,
      "cpu_count": os.cpu_count(),
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()],
      "python": platform.python_version(),
      "machine": platform.machine(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "target": {"answers_per_s": 200, "p99_latency_ms": 1000},
      "sets": results,
  }

  header = (f"{'set':<20}{'n':>5}{'cold/s':>9}{'warm/s':>9}{'cpu ms':>8}{'idle/s':>9}"
            f"{'p99 cold':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}  statuses")
  print(header)
  print("-" * len(header))
  for name, r in results.items():
    print(f"{name:<20}{r['n']:>5}{r['cold_answers_per_s']:>9.1f}{r['warm_answers_per_s']:>9.1f}"
          f"{r['cold_worker_cpu_ms_per_answer']:>8.2f}"
          f"{r['cold_answers_per_s_idle_cores_estimate']:>9.1f}{r['cold_p99_latency_ms']:>9.1f}"
          f"{r['p50_latency_ms']:>8.2f}{r['p99_latency_ms']:>8.1f}{r['max_latency_ms']:>8.1f}  "
          f"{r['statuses']}")
  print("cold/s, warm/s: measured answers/s (pass 1, median of passes 2..N); cpu ms: worker\n"
        "CPU per answer in pass 1; idle/s: workers / (cpu per answer), the cold rate on\n"
        "otherwise idle cores; p99 cold: ms in pass 1; p50/p99/max ms over the warm passes.")
  print(f"({args.workers} workers, timeout {args.timeout_s} s, {os.cpu_count()} CPUs, "
        f"load average {report['load_average_before'][0]} -> {report['load_average_after'][0]})")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
