"""Step time of synchronous vs one-step-off rollouts, on one mesh and on split devices.

Three runs of the CPU demo (configs/tiny.py, no eval), side by side in one invocation:

  sync         rollout.staleness=0, 1 device: rollout, then update
  async        rollout.staleness=1, 1 device: the same work one step apart, in turn
  async_split  rollout.staleness=1, 2 devices, rollout.devices=1: the rollout samples on
               its own device in a host thread while the update runs on the other

Per run: medians over the steps after the first two (compiles) of time/step_s,
time/rollout_s, time/update_s and time/logprob_s, and the overlap model's
prediction for a split, L + max(R, U), from the synchronous run's medians.
On a CPU the two "devices" share the same cores, so the split overlaps the
host-side work of one phase (the rollout's scheduling and grading, the update's
dispatch) with the other's compute; on an accelerator each group has its own chips.

    python benchmarks/async_split.py --steps 20 --out benchmarks/results/async_split_cpu.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config.rl.recompute_old_logp=True", "--config.train.eval_before=False",
          "--config.train.eval_every=0"]
RUNS = {
    "sync": (1, []),
    "async": (1, ["--config.rollout.staleness=1"]),
    "async_split": (2, ["--config.rollout.staleness=1", "--config.rollout.devices=1"]),
}
KEYS = ("step_s", "rollout_s", "update_s", "logprob_s")


def run(name, workdir, steps):
  devices, extra = RUNS[name]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "mars.train", f"--workdir={workdir}", *COMMON, *extra,
         f"--config.train.steps={steps}", f"--config.train.ckpt_every={steps}"]
  out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  if out.returncode:
    raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stdout[-4000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def summarize(rows):
  timed = [r for r in rows if r["step"] > 2 and "time/step_s" in r]
  out = {k: statistics.median(r[f"time/{k}"] for r in timed) for k in KEYS}
  reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
  out["reward_first5"] = sum(reward[:5]) / len(reward[:5])
  out["reward_last5"] = sum(reward[-5:]) / len(reward[-5:])
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=20, help="training steps per run")
  ap.add_argument("--out", default="", help="JSON path for the results")
  args = ap.parse_args()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in RUNS:
      results[name] = summarize(run(name, os.path.join(tmp, name), args.steps))
  sync = results["sync"]
  model = sync["logprob_s"] + max(sync["rollout_s"], sync["update_s"])
  print(f"{'run':<12} {'step_s':>8} {'rollout_s':>10} {'update_s':>9} {'logprob_s':>10} "
        f"{'vs sync':>8}  reward first5 -> last5")
  for name, r in results.items():
    print(f"{name:<12} {r['step_s']:8.3f} {r['rollout_s']:10.3f} {r['update_s']:9.3f} "
          f"{r['logprob_s']:10.3f} {sync['step_s'] / r['step_s']:7.2f}x  "
          f"{r['reward_first5']:.3f} -> {r['reward_last5']:.3f}")
  print(f"overlap model from the sync run: L + max(R, U) = {model:.3f} s "
        f"({sync['step_s'] / model:.2f}x)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(machine=f"{platform.machine()} CPU, {os.cpu_count()} cores",
                     steps=args.steps, runs=results, overlap_model_step_s=model), f, indent=2)


if __name__ == "__main__":
  main()
