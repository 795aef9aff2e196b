"""Evaluation outputs: results.json, results.md, samples.jsonl, accuracy_vs_attempts.png.

The Markdown table follows the papers' layout (rows = benchmarks + Avg.,
columns = Pass@1, Pass@k... or Acc@1..K, percentages with one decimal) so a
run can be compared with them line by line.
"""
import json
import os
from typing import Iterable, Mapping, Sequence

from mars import eval_metrics

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SAMPLES_JSONL = "samples.jsonl"
PLOT_PNG = "accuracy_vs_attempts.png"

DISPLAY_NAMES = {
    "math500": "MATH-500", "aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23",
    "minerva_math": "Minerva", "olympiadbench": "OlympiadBench", "gsm8k": "GSM8K",
    "candidates": "Candidates (demo)", eval_metrics.AVG: "Avg.",
}


def display_name(benchmark: str) -> str:
  return DISPLAY_NAMES.get(benchmark, benchmark)


def write_all(results: dict, samples, out_dir: str, compare: Sequence[str] = (), plot: bool = True):
  """The four outputs; `compare`: other output dirs whose curves join the plot."""
  os.makedirs(out_dir, exist_ok=True)
  write_json(results, out_dir)
  write_markdown(results, out_dir)
  write_samples(samples, out_dir)
  if plot:
    runs = [results] + [read_json(d) for d in compare]
    plot_curves(runs, os.path.join(out_dir, PLOT_PNG))


def write_json(results: dict, out_dir: str) -> str:
  path = os.path.join(out_dir, RESULTS_JSON)
  with open(path, "w") as f:
    json.dump(results, f, indent=2, default=str)
  return path


def read_json(out_dir: str) -> dict:
  path = os.path.join(out_dir, RESULTS_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--compare: {path} does not exist (run mars.evaluate there first).")
  with open(path) as f:
    return json.load(f)


def markdown_table(results: dict) -> str:
  """Rows = benchmarks + Avg., columns = the curve metrics, in percent."""
  rows = dict(results["benchmarks"])
  rows[eval_metrics.AVG] = results["average"]
  metrics = [m for m in rows[eval_metrics.AVG] if eval_metrics.is_curve_metric(m)]
  header = ["Benchmark", "#"] + [m[0].upper() + m[1:] for m in metrics]  # pass@1 -> Pass@1
  lines = [f"<!-- {results['label']}: mode={results['mode']}, step={results['step']} -->",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in rows.items():
    size = str(row.get("num_problems", "")) if name != eval_metrics.AVG else ""
    cells = [display_name(name), size] + [f"{100 * row[m]:.1f}" for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_markdown(results: dict, out_dir: str) -> str:
  path = os.path.join(out_dir, RESULTS_MD)
  with open(path, "w") as f:
    f.write(markdown_table(results))
  return path


def write_samples(samples: Iterable[dict], out_dir: str) -> str:
  path = os.path.join(out_dir, SAMPLES_JSONL)
  with open(path, "w") as f:
    for s in samples:
      f.write(json.dumps(s, default=str, ensure_ascii=False) + "\n")
  return path


def plot_curves(runs: Sequence[Mapping], out_path: str) -> str:
  """One subplot per benchmark plus the average; one line per run.

  x is the number of attempts (acc@k) or of samples (pass@k): with --compare,
  a multi-attempt-trained and a single-turn-trained run share the axes, as in
  the multi-attempt paper's Figure 1.
  """
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on servers
  import matplotlib.pyplot as plt

  names = []
  for run in runs:
    names += [b for b in run["benchmarks"] if b not in names]
  names.append(eval_metrics.AVG)
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    all_ks, top = set(), 0.0
    for i, run in enumerate(runs):
      metrics = run["average"] if name == eval_metrics.AVG else run["benchmarks"].get(name)
      if not metrics:
        continue
      ks, values = eval_metrics.curve(metrics)
      values = [100 * v for v in values]
      # A run keeps its color on every subplot, even where an earlier run has no curve.
      ax.plot(ks, values, marker="o", color=f"C{i}", label=f"{run['label']} ({run['mode']})")
      all_ks.update(ks)
      top = max([top] + values)
    ax.set_xticks(sorted(all_ks))
    ax.set_ylim(0, min(100, max(5.0, 1.15 * top)))
    ax.set_title(display_name(name))
    ax.set_xlabel("attempts k" if all(r["mode"] == "attempts" for r in runs) else "k")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  handles, labels = axes.flat[len(names) - 1].get_legend_handles_labels()  # every run has an avg
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3) or 1, fontsize=8)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path
