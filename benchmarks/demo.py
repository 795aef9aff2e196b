"""The embedded demo, measured: does multi-attempt RL teach the policy to use feedback?

Trains configs/tiny.py through the real CLI in four variants and evaluates them:
  ma    multi-attempt episodes (the default demo)
  st    the same demo trained single-turn (--config.episode.max_attempts=1)
  grpo  single-turn GRPO                      } all-fail fraction at the same
  lte   single-turn GRPO + LTE hinted rollouts } budget (the LTE paper's key curve)
For ma and st: accuracy with exactly 1..4 attempts on held-out problems
(mars.evaluate, attempts mode, greedy), against the ceiling min(N/k, 1) and
the 1/k of a greedy policy that ignores the feedback (it repeats its answer).
Prints a table and writes JSON.

    python benchmarks/demo.py --out benchmarks/results/demo_cpu.json [--parts ma,st,grpo,lte]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "ma": [],
    "st": ["--config.episode.min_attempts=1", "--config.episode.max_attempts=1"],
    "grpo": ["--config.episode.kind=single_turn"],
    "lte": ["--config.episode.kind=single_turn", "--config.lte.enabled=True"],
}


def train(name, workdir, extra):
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "mars.train", f"--workdir={workdir}", *VARIANTS[name], *extra]
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return rows, time.perf_counter() - t0


def mean_of(rows, key, first=True, n=5):
  vals = [r[key] for r in (rows[:n] if first else rows[-n:]) if isinstance(r.get(key), float)]
  return sum(vals) / len(vals) if vals else float("nan")


def evaluate(workdir, out, limit, max_attempts):
  from mars import evaluate as ev
  cfg = ev.default_config()
  cfg.benchmarks = "candidates"
  cfg.mode = "attempts"
  cfg.max_attempts = max_attempts
  cfg.limit = limit
  res = ev.run_cli(cfg, workdir, out)
  per = res["benchmarks"]["candidates"] if "benchmarks" in res else res["per_benchmark"]["candidates"]
  return [per[f"acc@{k}"] for k in range(1, max_attempts + 1)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None)
  p.add_argument("--parts", default="ma,st,grpo,lte")
  p.add_argument("--limit", type=int, default=300)
  p.add_argument("--workdir", default=None)
  p.add_argument("--extra", default="", help="extra --config.* flags for every run")
  args = p.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="mars_demo_")
  extra = args.extra.split()
  result = json.load(open(args.out)) if args.out and os.path.exists(args.out) else {}
  result.update(device="cpu", cores=os.cpu_count())
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  k = tiny.get_config().data.candidates_k
  for flag in extra:
    if flag.startswith("--config.data.candidates_k="):
      k = int(flag.split("=")[1])
  K = 4
  result["k"] = k
  result["ceiling"] = [min(n / k, 1.0) for n in range(1, K + 1)]
  result["random_with_repeats"] = [1 - (1 - 1 / k) ** n for n in range(1, K + 1)]
  # Evaluation is greedy: a policy that ignores the feedback re-gives its argmax
  # answer every attempt, so it stays at 1/k for every N.
  result["greedy_ignoring_feedback"] = [1 / k] * K
  for name in args.parts.split(","):
    workdir = os.path.join(root, name)
    rows, secs = train(name, workdir, extra)
    entry = {"wall_s": secs, "steps": rows[-1]["step"],
             "reward_first5": mean_of(rows, "reward/mean"),
             "reward_last5": mean_of(rows, "reward/mean", first=False)}
    if name in ("ma", "st"):
      entry["acc_vs_attempts"] = evaluate(workdir, os.path.join(workdir, "eval"), args.limit, K)
      entry["repeat_frac_first5"] = mean_of(rows, "attempts/repeat_frac")
      entry["repeat_frac_last5"] = mean_of(rows, "attempts/repeat_frac", first=False)
    else:
      # The policy's own all-fail rate, before any LTE replacement.
      key = "lte/all_fail_frac" if name == "lte" else "groups/all_fail_frac"
      entry["all_fail_first5"] = mean_of(rows, key)
      entry["all_fail_last5"] = mean_of(rows, key, first=False)
      entry["all_fail_mean"] = mean_of(rows, key, n=len(rows))
    result[name] = entry
    if args.out:
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
  print(f"k = {k}; ceiling min(N/k,1) = {[round(c, 2) for c in result['ceiling']]}; "
        f"greedy, ignoring feedback = {1 / k:.2f} at every N")
  print(f"{'run':6s}{'wall s':>8s}{'reward first5':>15s}{'reward last5':>14s}  acc with N=1..4 attempts")
  for name in ("ma", "st", "grpo", "lte"):
    e = result.get(name)
    if not e:
      continue
    acc = " ".join(f"{a:.2f}" for a in e.get("acc_vs_attempts", []))
    fail = (f"  all-fail first5 {e['all_fail_first5']:.2f} last5 {e['all_fail_last5']:.2f}"
            if "all_fail_first5" in e else "")
    print(f"{name:6s}{e['wall_s']:8.0f}{e['reward_first5']:15.3f}{e['reward_last5']:14.3f}  {acc}{fail}")
  return result


if __name__ == "__main__":
  main()
