"""Generation throughput: the mars rollout engine vs HF `generate` vs the static engine it replaced.

Same random Qwen2-shaped weights, prompts, lengths and sampling (temperature 1),
side by side in one run. The static engine (a dense cache of prompt + budget
slots per row, every row decoded until the longest ends) is run from a git
worktree of the commit before the paged engine (`--baseline_rev`), in a
subprocess of this script, on the same weights.

Presets:
- cpu-small: 16 rows, 64-token prompts, 64 new tokens each (vs HF and the static engine).
- cpu-longtail: 64 rows, budget 2048, lengths from a long tail (80% stop within
  10% of the budget, 15% in between, 5% run to it); tokens/s and KV bytes vs the
  static engine, the paged pool sized to 40% of the static cache.
- cpu-flat: 16 rows × (64 prompt + 64 new) live tokens, in a row capacity of 512 vs
  8192 tokens, the paged pool fixed at 10,240 tokens: decode time per token should not
  grow with the capacity.
- gpu-1.5b: Qwen2.5-1.5B shape, bf16, 128 rows, 512 + 1024 tokens; HBM roofline fraction.

Tokens/s counts generated tokens; the first call of each shape (the compile) is
not timed.

    python benchmarks/generate.py --preset cpu-small --out benchmarks/results/generate_cpu.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
PRESETS = {
    "cpu-small": dict(model=SMALL, dtype="float32", batch=16, prompt_len=64, new_tokens=64,
                      engines=("mars", "static", "hf")),
    "cpu-longtail": dict(model=SMALL, dtype="float32", batch=64, prompt_len=64, new_tokens=2048,
                         longtail=True, kv_fraction=0.4, engines=("mars", "static")),
    "cpu-flat": dict(model=SMALL, dtype="float32", batch=16, prompt_len=64, new_tokens=64,
                     capacities=(512, 8192), kv_tokens=16 * 640, engines=("mars", "static")),
    "gpu-1.5b": dict(model=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                tie_word_embeddings=True),
                     dtype="bfloat16", batch=128, prompt_len=512, new_tokens=1024,
                     engines=("mars", "hf")),
}
BASELINE_REV = "3a411fb"  # the last commit with the static engine

# Peak HBM bandwidth, bytes/s.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def lengths(preset, rng):
  """Per-row new-token budgets (all rows run to their budget: no stop tokens)."""
  B, budget = preset["batch"], preset["new_tokens"]
  if not preset.get("longtail"):
    return np.full((B,), budget, np.int32)
  u = rng.random(B)
  short = rng.integers(1, budget // 10 + 1, B)
  mid = rng.integers(budget // 10, budget, B)
  out = np.where(u < 0.8, short, np.where(u < 0.95, mid, budget))
  out[:max(1, B // 20)] = budget  # at least 5% run to the budget, whatever the draw
  return rng.permutation(out).astype(np.int32)


def run_engine(spec: dict) -> dict:
  """One engine (this process's `mars`) on the saved model: median of timed calls."""
  import jax
  import mars.models as mm
  from mars.sampling import Sampler, SamplingParams
  cfg, params = mm.load_hf(spec["path"], dtype=spec["dtype"])
  prompts, mask = np.asarray(spec["prompts"], np.int32), np.asarray(spec["mask"], bool)
  budgets = np.asarray(spec["budgets"], np.int32)
  kw = dict(spec.get("engine_kw") or {})
  sampler = Sampler(cfg, stop_ids=[], pad_id=0, **kw)
  sampling = SamplingParams(temperature=1.0)
  runs = []
  for r in range(spec["repeats"] + 1):  # call 0 compiles
    t0 = time.perf_counter()
    out = sampler.generate(params, prompts, mask, key=jax.random.key(r),
                           max_new_tokens=budgets, cache_len=spec["cache_len"], sampling=sampling)
    runs.append(time.perf_counter() - t0)
  assert (out.lengths == budgets).all(), (out.lengths, budgets)
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(
      "float16" if spec["dtype"] == "bfloat16" else spec["dtype"]).itemsize
  stats = getattr(sampler, "last_stats", None)
  if stats is not None:  # paged: the pool as allocated, and its peak use
    pages = sampler.pages_per_group(prompts.shape[0], spec["cache_len"]) - 1
    kv_alloc = pages * sampler.page_size * per_token
    kv_peak = stats["peak_pages"] * sampler.page_size * per_token
  else:  # static: one dense cache of B × cache_len slots (rounded up as it rounds)
    S = -(-spec["cache_len"] // 128) * 128 if spec.get("round_cache") else spec["cache_len"]
    kv_alloc = kv_peak = prompts.shape[0] * S * per_token
  seconds = float(np.median(runs[1:]))
  generated = int(budgets.sum())
  return dict(seconds=seconds, compile_s=runs[0] - seconds, generated=generated,
              tokens_per_s=generated / seconds, kv_bytes_allocated=int(kv_alloc),
              kv_bytes_peak=int(kv_peak), stats=stats,
              param_bytes=int(cfg.num_params() * (2 if spec["dtype"] == "bfloat16" else 4)))


def run_static(spec: dict, rev: str) -> dict:
  """run_engine in a subprocess whose `mars` is a worktree of `rev`."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", tree, rev], check=True,
                   capture_output=True)
    try:
      spec_path = os.path.join(tmp, "spec.json")
      with open(spec_path, "w") as f:
        json.dump(dict(spec, engine_kw={}, round_cache=False), f)
      env = dict(os.environ, PYTHONPATH=tree)
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                           check=True, capture_output=True, text=True, env=env, cwd=tmp)
      return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
      subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree],
                     capture_output=True)


def run_hf(model, preset, prompts, mask, repeats, device):
  import torch
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[preset["dtype"]]
  model = model.to(device=device, dtype=dtype).eval()
  ids = torch.tensor(prompts, device=device)
  am = torch.tensor(mask.astype(np.int64), device=device)
  new = preset["new_tokens"]
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new,
                           min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, pad_token_id=0)
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  assert out.shape[1] == prompts.shape[1] + new
  seconds = float(np.median(times[1:]))
  return dict(seconds=seconds, tokens_per_s=prompts.shape[0] * new / seconds)


def _device_name():
  import jax
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}".strip(":") or platform.processor()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
  parser.add_argument("--out", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--engines", default=None, help="comma list (default: the preset's)")
  parser.add_argument("--baseline_rev", default=BASELINE_REV)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:  # a run_static subprocess
    with open(args.worker) as f:
      print(json.dumps(run_engine(json.load(f))))
    return True
  preset = PRESETS[args.preset]
  engines = args.engines.split(",") if args.engines else preset["engines"]
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  rng = np.random.default_rng(0)
  B, P, new = preset["batch"], preset["prompt_len"], preset["new_tokens"]
  prompts = rng.integers(1, preset["model"]["vocab_size"], (B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  for b in range(B):  # ragged, left-padded prompts
    pad = int(rng.integers(0, P // 4))
    mask[b, :pad] = False
    prompts[b, :pad] = 0
  budgets = lengths(preset, rng)
  result = dict(preset=args.preset, device=_device_name(), batch=B, prompt_len=P,
                new_tokens=new, dtype=preset["dtype"], generated=int(budgets.sum()),
                baseline_rev=args.baseline_rev, engines={})
  with tempfile.TemporaryDirectory() as path:
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(max_position_embeddings=16384, **preset["model"]))
    model.save_pretrained(path)
    spec = dict(path=path, dtype=preset["dtype"], prompts=prompts.tolist(), mask=mask.tolist(),
                budgets=budgets.tolist(), repeats=args.repeats)
    for capacity in preset.get("capacities", (None,)):
      cache_len = P + (capacity or new) + 1
      tag = "" if capacity is None else f"@{capacity}"
      s = dict(spec, cache_len=cache_len)
      if preset.get("kv_fraction"):
        s["engine_kw"] = dict(kv_tokens=int(preset["kv_fraction"] * B * cache_len))
      if preset.get("kv_tokens"):  # the same pool at every capacity: a fixed live-token budget
        s["engine_kw"] = dict(kv_tokens=preset["kv_tokens"])
      for eng in engines:
        if eng == "mars":
          result["engines"]["mars" + tag] = run_engine(s)
        elif eng == "static":
          result["engines"]["static" + tag] = run_static(s, args.baseline_rev)
        elif eng == "hf" and capacity is None:
          result["engines"]["hf"] = run_hf(model, preset, prompts, mask, args.repeats, device)
  rows = result["engines"]
  print(f"{'engine':14s}{'tokens/s':>12s}{'seconds':>10s}{'compile s':>11s}{'KV MiB':>10s}"
        f"{'KV peak':>10s}")
  for name, r in rows.items():
    print(f"{name:14s}{r['tokens_per_s']:12.1f}{r['seconds']:10.3f}"
          f"{r.get('compile_s', float('nan')):11.1f}{r.get('kv_bytes_allocated', 0) / 2**20:10.1f}"
          f"{r.get('kv_bytes_peak', 0) / 2**20:10.1f}")
  ratios = {}
  for other in ("hf", "static"):
    if "mars" in rows and other in rows:
      ratios[f"mars/{other} tokens/s"] = rows["mars"]["tokens_per_s"] / rows[other]["tokens_per_s"]
  if "mars" in rows and "static" in rows:
    ratios["mars/static KV bytes"] = rows["mars"]["kv_bytes_allocated"] / rows["static"][
        "kv_bytes_allocated"]
  caps = preset.get("capacities")
  if caps:
    for eng in engines:
      lo, hi = rows[f"{eng}@{caps[0]}"], rows[f"{eng}@{caps[-1]}"]
      ratios[f"{eng} time {caps[-1]}/{caps[0]}"] = hi["seconds"] / lo["seconds"]
  bw = next((v for k, v in HBM_BANDWIDTH.items() if k in result["device"]), None)
  if bw and "mars" in rows:
    m = rows["mars"]
    kv_token = m["kv_bytes_allocated"] / max(1, B * (P + new + 1))
    step_bytes = m["param_bytes"] + B * (P + new / 2) * kv_token
    ratios["mars HBM roofline fraction"] = step_bytes / bw / (m["seconds"] / new)
  result["ratios"] = ratios
  for k, v in ratios.items():
    print(f"{k}: {v:.2f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
