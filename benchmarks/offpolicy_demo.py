"""The off-policy options on the demo: one run per option, one figure.

Every run is configs/tiny.py (the CPU demo) with bf16 compute and the trainer's
recomputed old logprobs, so the sampler (paged decode, bf16) and the trainer
(full forward, bf16) really disagree a little, as in a real run; then one option:

  none     PPO-clip, no correction (the mismatch is still logged)
  tis      rl.rollout_correction=tis      (Yao et al. 2025; weight min(ρ, 2))
  mis      rl.rollout_correction=mis      (drop tokens with ρ outside [0.5, 2])
  icepop   rl.rollout_correction=icepop   (Ring-1T; drop ρ outside [0.5, 5])
  gspo     rl.loss=gspo                   (sequence-level ratio and clip)
  cispo    rl.loss=cispo                  (clipped stop-gradient IS weight)
  async    rollout.staleness=1            (one-step-off rollouts)

Writes one PNG (reward per step, smoothed, per option; the correction's masked or
truncated token fraction and the sampler/trainer KL per step) and a JSON of
per-option summaries (first/last-10-step reward, mean masked fraction, KL, wall
time).

    python benchmarks/offpolicy_demo.py --steps 40 --out benchmarks/results/offpolicy_demo_cpu.json \
        --png docs/figures/offpolicy_demo.png
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config.model.compute_dtype=bfloat16", "--config.rl.recompute_old_logp=True",
          "--config.train.eval_before=False"]   # the options' curves, not a before/after table
OPTIONS = {
    "none": [],
    "tis": ["--config.rl.rollout_correction=tis"],
    "mis": ["--config.rl.rollout_correction=mis"],
    "icepop": ["--config.rl.rollout_correction=icepop"],
    "gspo": ["--config.rl.loss=gspo"],
    "cispo": ["--config.rl.loss=cispo"],
    "async": ["--config.rollout.staleness=1"],
}


def run(name, workdir, steps):
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "mars.train", f"--workdir={workdir}", *COMMON, *OPTIONS[name],
         f"--config.train.steps={steps}", f"--config.train.eval_every={steps}"]
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  return rows, time.perf_counter() - t0


def _series(rows, key):
  return [(r["step"], r[key]) for r in rows if key in r]


def _masked(rows):
  """Per step: the fraction of trained tokens the correction dropped or capped."""
  out = []
  for r in rows:
    v = [r.get(f"rollout_corr/token_{k}_frac") for k in ("masked", "truncated")]
    v = [x for x in v if x is not None]
    if v:
      out.append((r["step"], sum(v)))
  return out


def summarize(rows, wall):
  reward = [r["reward/mean"] for r in rows if "reward/mean" in r]
  first, last = reward[:10], reward[-10:]
  masked = [v for _, v in _masked(rows)]
  kl = [v for _, v in _series(rows, "rollout_corr/kl_k3")]
  final = rows[-1]
  return dict(reward_first10=sum(first) / len(first), reward_last10=sum(last) / len(last),
              masked_frac_mean=(sum(masked) / len(masked)) if masked else None,
              kl_k3_mean=(sum(kl) / len(kl)) if kl else None,
              version_lag=final.get("async/version_lag"),
              eval={k: v for k, v in final.items() if k.startswith("eval/")},
              wall_s=wall, steps=len(reward))


def plot(results, png):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name, res in results.items():
    steps, reward = zip(*_series(res["rows"], "reward/mean"))
    k = 5
    smooth = [sum(reward[max(0, i - k + 1):i + 1]) / len(reward[max(0, i - k + 1):i + 1])
              for i in range(len(reward))]
    axes[0].plot(steps, smooth, label=name)
    masked = _masked(res["rows"])
    if masked:
      axes[1].plot(*zip(*masked), label=name)
    kl = _series(res["rows"], "rollout_corr/kl_k3")
    if kl:
      axes[2].plot(*zip(*kl), label=name)
  axes[0].set(title="train reward (5-step mean)", xlabel="step")
  axes[1].set(title="tokens masked or truncated by the correction", xlabel="step")
  axes[2].set(title="sampler/trainer KL (k3)", xlabel="step", yscale="log")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  fig.savefig(png, dpi=90)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--options", default=",".join(OPTIONS))
  ap.add_argument("--out", default=None)
  ap.add_argument("--png", default=None)
  ap.add_argument("--workdir", default=None)
  args = ap.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="mars_offpolicy_")
  results = {}
  for name in args.options.split(","):
    rows, wall = run(name, os.path.join(root, name), args.steps)
    results[name] = dict(rows=rows, **summarize(rows, wall))
    s = results[name]
    print(f"{name:<8} reward {s['reward_first10']:+.3f} -> {s['reward_last10']:+.3f}  "
          f"masked {s['masked_frac_mean'] if s['masked_frac_mean'] is not None else '-'}  "
          f"kl_k3 {s['kl_k3_mean']}  {wall:.0f} s", flush=True)
  print(f"{'option':<8}{'reward first10':>16}{'last10':>10}{'masked frac':>14}{'KL k3':>12}")
  for name, s in results.items():
    m = "-" if s["masked_frac_mean"] is None else f"{s['masked_frac_mean']:.2e}"
    kl = "-" if s["kl_k3_mean"] is None else f"{s['kl_k3_mean']:.2e}"
    print(f"{name:<8}{s['reward_first10']:>16.3f}{s['reward_last10']:>10.3f}{m:>14}{kl:>12}")
  if args.png:
    plot(results, args.png)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(steps=args.steps, common=COMMON,
                     options={k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                              for k, v in results.items()}), f, indent=2)
  return results


if __name__ == "__main__":
  main()
