"""Grader agreement with plain math-verify, throughput and latency on 2 worker processes.

  python benchmarks/grade.py --out benchmarks/results/grade_cpu.json

Agreement: (ground truth, response) pairs built from the shared eval sets'
ground truths (MATH-500, AIME 24/25, AMC 23, GSM8K, OlympiadBench, Minerva),
each boxed as written and rewritten into equivalent and non-equivalent forms:
fractions vs decimals, integers as n.0 and with a percent sign, thousands
separators, sets in another order or with a part missing, several boxes,
intervals with other brackets, LaTeX variants, another row's answer (wrong),
plus nasty model outputs (tests/adversarial_inputs.py). The reference is plain
math-verify, `verify(parse("$gold$"), parse(response))` with its default
configs and timeouts, run in spawned processes that are killed past
--reference-timeout-s (such pairs are left out and counted). The headline
figure is over boxed responses; two "policy" kinds show where mars differs on
purpose (an answer must be boxed; a "The final answer is $X$" sentence does not
override the box) and are reported apart.

Throughput sets:
  math500_reference   MATH-500 reference solutions vs their answers (all correct).
  math500_mismatched  solution i vs the answer of row i+1 (mostly wrong, so
                      math-verify runs its full comparison instead of matching
                      strings).
  adversarial         tests/adversarial_inputs.py: 240 nasty outputs.

Each set runs on a fresh pool: pass 1 is "cold" (workers still filling sympy
and parser caches), passes 2..N are "warm" (a long-lived trainer pool; as in
GRPO, where each ground truth is graded G times, its parse is cached).
Latency is per answer, from handing it to a worker to its reply (or kill).
Targets: agreement >= 99% (issue 21); >= 200 answers/s and p99 < 1 s (issue 4).
"""
import argparse
import collections
import fractions
import json
import logging
import multiprocessing
import os
import pathlib
import platform
import re
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mars import rewards  # pylint: disable=wrong-import-position
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import adversarial_inputs as adversarial  # pylint: disable=wrong-import-position  # tests/ fixture


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


# ---- agreement pairs

_INT = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:,|,\\!|,\\! |\{,\})\d{3})+")
_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_DEC = re.compile(r"-?\d*\.\d+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
WRAPPERS = ("The answer is $\\boxed{{{}}}$.", "Therefore, the final answer is \\boxed{{{}}}",
            "So we get\n\\[\n\\boxed{{{}}}\n\\]")


def _rows(data_dir: str, relpath: str) -> list:
  with open(os.path.join(data_dir, "eval", relpath), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _split_top(text: str) -> list[str]:
  """Parts of a comma-separated answer, not splitting inside brackets."""
  parts, depth, start, i = [], 0, 0, 0
  while i < len(text):
    if text.startswith(("\\{", "\\}"), i):
      depth += 1 if text[i + 1] == "{" else -1
      i += 2
      continue
    char = text[i]
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
    i += 1
  return parts + [text[start:].strip()]


def _latex_variant(answer: str) -> str:
  """The same answer with its LaTeX styling changed (as in tests/test_rewards.py)."""
  variant = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  variant = variant.replace("\\left", "").replace("\\right", "")
  variant = re.sub(r"\\! ?", "", variant).replace("\\,", "")
  variant = variant.replace("^\\circ", "").replace("^{\\circ}", "")
  return re.sub(r"\\frac\{(\d)\}\{(\d)\}", r"\\frac\1\2", variant)


def _decimal(p: int, q: int) -> str:
  """p/q as a decimal: exact when it terminates, else 8 places (math-verify rounds to 6)."""
  value = fractions.Fraction(p, q)
  q = value.denominator
  while q % 2 == 0:
    q //= 2
  while q % 5 == 0:
    q //= 5
  if q == 1:
    text = f"{float(value):.12f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
  return f"{float(value):.8f}"


def _rewrites(gold: str, other: str, multi: bool, i: int) -> list:
  """(kind, answer, intended verdict) for one ground truth; `i` alternates the
  right and wrong forms between rows, to keep the set small.

  An answer is a string (one box) or (style, parts): several boxes, "joined"
  by ", ", " and " or " or " (one answer, which math-verify reads as a set),
  "separate" (an earlier box, with no separator before the last: only the
  last one is the answer) or "separate_envs" (boxes in separate $...$ with
  more than ", and/or" between them: math-verify reads the last one only).
  """
  same = gold.strip() == other.strip()
  out = [("same", gold, True), ("wrong_other", other, same)]
  plain = gold.replace("\\! ", "").replace("\\!", "").replace("{,}", "").replace(",", "")
  plain = gold if multi else plain
  if _INT.fullmatch(plain):
    n = int(plain)
    out += [("integer", f"{n}.0", True) if i % 2 else ("integer", str(n + 1), False)]
    # math-verify lets a bare number stand for a percent of it only for
    # non-negative integers: 50 == 50%, but -50 != -50% (-0.5).
    if n >= 0:
      out += [("percent", f"{n}\\%", True) if i % 2 == 0 else ("percent", f"{n + 1}\\%", False)]
    if abs(n) >= 1000:
      out += [("thousands", f"{n:,}", True), ("thousands", f"{n:,}".replace(",", "{,}"), True),
              ("thousands", f"{n + 10:,}", False)]
  elif (m := _FRAC.fullmatch(gold.strip())) and int(m.group(3)):
    sign, p, q = m.group(1), int(m.group(2)), int(m.group(3))
    out += [("frac_decimal", sign + _decimal(p, q), True), ("frac_decimal", f"{sign}{p}/{q}", True),
            ("frac_decimal", f"{sign}\\frac{{{p + 1}}}{{{q}}}", False)]
  elif _DEC.fullmatch(gold.strip()):
    value = fractions.Fraction(gold.strip())
    out += [("frac_decimal", f"\\frac{{{value.numerator}}}{{{value.denominator}}}", True),
            ("percent", f"{float(value * 100):g}\\%", True)]
  parts = _split_top(gold)
  if multi and len(parts) > 1:
    # Sets: a repeated part ("-2,-2") is one element.
    partial = len(set(parts[:-1])) == len(set(parts))
    out += [("set_order", ", ".join(reversed(parts)), True),
            ("set_order", ", ".join(parts[:-1]), partial),
            ("multi_box", ("joined", parts[::-1] if i % 2 else parts), True),
            ("multi_box", ("joined", parts[:-1]), partial)]
  else:
    # A hedge between two answers is wrong; an earlier, separate box is not
    # part of the answer.
    out += [(("multi_box", ("joined", [other, gold]), same),
             ("multi_box", ("separate", [other, gold]), True),
             ("multi_box", ("separate_envs", [other, gold]), True))[i % 3]]
  stripped = gold.strip()
  if stripped[:1] in "([" and stripped[-1:] in ")]" and "," in stripped and not multi:
    # Flip the bracket of a finite end (at an infinite one it does not matter).
    flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
    if not re.match(r"[(\[]\s*-\s*\\infty", stripped):
      out += [("interval", flip[stripped[0]] + stripped[1:], False)]
    elif not re.search(r"\\infty\s*[)\]]$", stripped):
      out += [("interval", stripped[:-1] + flip[stripped[-1]], False)]
    out += [("interval", "\\left" + stripped[0] + stripped[1:-1] + "\\right" + stripped[-1], True)]
    if "\\cup" in stripped:
      out += [("interval", " \\cup ".join(reversed(stripped.split("\\cup"))), True)]
  variant = _latex_variant(gold)
  if variant.replace(" ", "") != gold.replace(" ", ""):
    out += [("latex_variant", variant, True)]
  return out


def _response(answer, k: int) -> str:
  """A response that boxes `answer` (see `_rewrites`)."""
  if isinstance(answer, tuple):
    style, parts = answer
    if style == "separate":
      return (f"First I get $\\boxed{{{parts[0]}}}$. Checking it fails so I redo it: "
              f"\\boxed{{{parts[1]}}}")
    if style == "separate_envs":
      return f"Either $\\boxed{{{parts[0]}}}$ \\quad \\text{{or}} \\quad $\\boxed{{{parts[1]}}}$."
    joiner = (", ", " and ", " or ")[k % 3]
    return "The solutions are " + joiner.join(f"$\\boxed{{{a}}}$" for a in parts) + "."
  return WRAPPERS[k % len(WRAPPERS)].format(answer)


def agreement_pairs(data_dir: str) -> list[dict]:
  """Pairs with their kind and intended verdict (None: not labelled)."""
  golds = []  # (source, gold as given, multi-part?)
  golds += [("math500", r["answer"], len(_split_top(r["answer"])) > 1
             and r["answer"].strip()[:1] not in "([\\" and not _THOUSANDS.fullmatch(r["answer"]))
            for r in _rows(data_dir, "math500/test.jsonl")]
  golds += [(name, str(r["answer"]), False) for name in ("aime24", "aime25", "amc23")
            for r in _rows(data_dir, f"{name}/test.jsonl")]
  golds += [("gsm8k", r["answer"].split("####")[-1].strip(), False)
            for r in _rows(data_dir, "gsm8k/test.jsonl")[::6]]
  golds += [("olympiadbench", r["final_answer"], bool(r["is_multiple_answer"]))
            for r in _rows(data_dir, "olympiadbench/test.jsonl")]
  golds += [("minerva", rewards.extract_boxed(r["solution"]), False)
            for r in _rows(data_dir, "minerva_math/test.jsonl")]
  pairs = []
  for i, (source, gold, multi) in enumerate(golds):
    text = rewards.gold_text(gold)
    other = rewards.gold_text(golds[(i + 1) % len(golds)][1])
    for k, (kind, answer, intended) in enumerate(_rewrites(text, other, multi, i)):
      pairs.append(dict(kind=kind, source=source, gold=gold, response=_response(answer, i + k),
                        intended=intended))
  # Where mars differs from plain math-verify on purpose (reported apart).
  for i, (source, gold, _) in enumerate(golds[:600:30]):
    text = rewards.gold_text(gold)
    pairs.append(dict(kind="policy_no_box", source=source, gold=gold, intended=None,
                      response=f"Adding them up, the total is {text}."))
    pairs.append(dict(kind="policy_final_answer_sentence", source=source, gold=gold,
                      intended=None, response=f"So \\boxed{{{text}1}}. Final Answer: The final "
                                              f"answer is ${text}$. I hope it is correct."))
  for response, gold in adversarial.adversarial_cases(n=120, seed=7):
    pairs.append(dict(kind="nasty", source="adversarial", gold=gold, response=response,
                      intended=None))
  return pairs


def _reference_gold(gold) -> str:
  """A ground truth as math-verify expects it: its own $...$, else wrapped in $...$."""
  if isinstance(gold, (list, tuple)):
    gold = ", ".join(str(g) for g in gold)
  gold = str(gold)
  return gold if _UNESCAPED_DOLLAR.search(gold) else "$" + gold.replace("\n", " ") + "$"


def _reference_one(gold: str, response: str) -> bool | None:
  logging.disable(logging.WARNING)  # math-verify logs every timeout it hits
  import math_verify  # pylint: disable=import-outside-toplevel
  try:
    return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(response)))
  except Exception:  # pylint: disable=broad-except
    return None  # left out, like a reference timeout


def reference_verdicts(pairs, workers: int, timeout_s: float) -> list:
  """Plain math-verify per pair (None: killed past timeout_s), in spawned processes."""
  ctx = multiprocessing.get_context("spawn")
  results, pending = [None] * len(pairs), list(range(len(pairs)))
  while pending:
    pool = ctx.Pool(workers)
    jobs = [(i, pool.apply_async(_reference_one, (_reference_gold(pairs[i]["gold"]),
                                                  pairs[i]["response"]))) for i in pending]
    pending = []
    for n, (i, job) in enumerate(jobs):
      try:
        results[i] = job.get(timeout=timeout_s)
      except multiprocessing.TimeoutError:
        # Hung in a C call math-verify's own signal timeout cannot stop: drop
        # this pair, restart the pool for the ones not finished yet.
        pending = [j for j, later in jobs[n + 1:] if not later.ready()]
        for j, later in jobs[n + 1:]:
          if later.ready():
            results[j] = later.get()
        break
    pool.terminate()
    pool.join()
  return results


def run_agreement(pairs, workers: int, timeout_s: float, reference_timeout_s: float) -> dict:
  start = time.perf_counter()
  reference = reference_verdicts(pairs, workers, reference_timeout_s)
  reference_s = time.perf_counter() - start
  with rewards.GraderPool(num_workers=workers, timeout_s=timeout_s) as pool:
    pool.grade_batch(["\\boxed{1}"] * workers, ["1"] * workers)  # workers up
    start = time.perf_counter()
    grades = pool.grade_batch([p["response"] for p in pairs], [p["gold"] for p in pairs])
    grade_s = time.perf_counter() - start
    latencies = np.asarray(pool.last_latencies_s)
    killed = pool.num_killed
  kinds = collections.defaultdict(collections.Counter)
  disagreements = []
  for pair, ref, grade in zip(pairs, reference, grades):
    row = kinds[pair["kind"]]
    row["n"] += 1
    if ref is None:
      row["reference_timeout"] += 1
      continue
    row["compared"] += 1
    row["mars_correct"] += grade.correct
    row["reference_correct"] += ref
    row["agree"] += grade.correct == ref
    if pair["intended"] is not None:
      row["mars_as_intended"] += grade.correct == pair["intended"]
    if grade.correct != ref:
      disagreements.append(dict(
          kind=pair["kind"], source=pair["source"], gold=pair["gold"],
          response=pair["response"][:300], mars=grade.status, extracted=grade.extracted,
          math_verify=ref))
  def total(names):
    agree = sum(kinds[k]["agree"] for k in names)
    compared = sum(kinds[k]["compared"] for k in names)
    return {"n": compared, "agree": agree, "agreement_pct": round(100 * agree / max(compared, 1), 2)}
  boxed = [k for k in kinds if not k.startswith("policy_")]
  return {
      "n_pairs": len(pairs),
      "reference_timeouts": sum(r is None for r in reference),
      "boxed_responses": total(boxed),
      "all_pairs": total(list(kinds)),
      "kinds": {k: dict(v) for k, v in sorted(kinds.items())},
      "mars_statuses": dict(collections.Counter(g.status for g in grades)),
      "mars_answers_per_s": round(len(pairs) / grade_s, 1),
      "reference_answers_per_s": round(len(pairs) / reference_s, 1),
      "mars_max_latency_ms": round(1000 * float(latencies.max()), 1),
      "mars_p99_latency_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
      "mars_within_timeout": bool(latencies.max() <= timeout_s + 0.5),
      "workers_killed": killed,
      "disagreements": disagreements,
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
  parser.add_argument("--reference-timeout-s", type=float, default=30.0,
                      help="plain math-verify's verdict on a pair is dropped past this")
  parser.add_argument("--skip-throughput", action="store_true",
                      help="only the agreement check")
  args = parser.parse_args()
  if not os.path.isdir(os.path.join(args.data_dir, "eval")):
    parser.error(f"no eval/ under --data-dir {args.data_dir} (set MARS_DATA_DIR to shared/data)")

  load_before = os.getloadavg()
  pairs = agreement_pairs(args.data_dir)
  agreement = run_agreement(pairs, args.workers, args.timeout_s, args.reference_timeout_s)
  print_agreement(agreement, args.timeout_s)
  results = {} if args.skip_throughput else {
      name: run_set(*pair, args.workers, args.timeout_s, args.passes)
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
      "target": {"agreement_pct": 99, "answers_per_s": 200, "p99_latency_ms": 1000},
      "agreement_with_math_verify": agreement,
      "sets": results,
  }

  if not results:
    _write(report, args.out)
    return
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
  _write(report, args.out)


def _write(report: dict, out: str | None) -> None:
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
      f.write("\n")


def print_agreement(r: dict, timeout_s: float) -> None:
  header = (f"{'kind':<30}{'n':>6}{'agree':>7}{'%':>8}{'mars ok':>9}{'mv ok':>7}"
            f"{'as meant':>10}{'ref t/o':>8}")
  print(header)
  print("-" * len(header))
  for kind, row in r["kinds"].items():
    compared = row.get("compared", 0)
    meant = row.get("mars_as_intended")
    print(f"{kind:<30}{row['n']:>6}{row.get('agree', 0):>7}"
          f"{100 * row.get('agree', 0) / max(compared, 1):>8.2f}{row.get('mars_correct', 0):>9}"
          f"{row.get('reference_correct', 0):>7}{'-' if meant is None else meant:>10}"
          f"{row.get('reference_timeout', 0):>8}")
  boxed, everything = r["boxed_responses"], r["all_pairs"]
  print(f"agreement with plain math-verify: {boxed['agree']}/{boxed['n']} = "
        f"{boxed['agreement_pct']}% on boxed responses; {everything['agree']}/{everything['n']} = "
        f"{everything['agreement_pct']}% with the policy_* kinds (mars needs a box; "
        "math-verify reads prose)")
  print(f"mars: statuses {r['mars_statuses']}, max latency {r['mars_max_latency_ms']} ms "
        f"(timeout {timeout_s} s, within: {r['mars_within_timeout']}), "
        f"{r['workers_killed']} workers killed; reference timeouts: {r['reference_timeouts']}")
  for d in r["disagreements"]:
    if not d["kind"].startswith("policy_"):
      print(f"  disagree [{d['kind']}/{d['source']}] gold={d['gold']!r} mars={d['mars']} "
            f"(read {d['extracted']!r}) math-verify={d['math_verify']}: {d['response'][:120]!r}")


if __name__ == "__main__":
  main()
