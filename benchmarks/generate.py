"""Generation throughput: the mars rollout engine vs HF `generate`, tunix's vanilla sampler and the static engine it replaced.

Same random weights, prompts, lengths and sampling, side by side in one run.
The static engine (a dense cache of prompt + budget slots per row, every row
decoded until the longest ends) is run from a git worktree of the commit
before the paged engine (`--baseline_rev`), in a subprocess of this script, on
the same weights. tunix (google-tunix, `tunix.generate.sampler.Sampler`: a
static JAX sampler, dense cache, prefill then a jitted while-loop of decode
steps) also runs in a subprocess, with `--tunix_path` prepended to its
PYTHONPATH: tunix pins its own dependencies, so it is installed apart from
mars (`pip install --no-deps --target DIR google-tunix` and the few packages
it imports; the JSON records its version). It loads the same safetensors
through its own loader (tunix.models.qwen2/qwen3.params).

Presets:
- cpu-small: 16 rows, 64-token prompts, 64 new tokens each (vs HF and the static engine).
- cpu-longtail: 64 rows, budget 2048, lengths from a long tail (80% stop within
  10% of the budget, 15% in between, 5% run to it); tokens/s and KV bytes vs the
  static engine, the paged pool sized to 40% of the static cache.
- cpu-flat: 16 rows × (64 prompt + 64 new) live tokens, in a row capacity of 512 vs
  8192 tokens, the paged pool fixed at 10,240 tokens: decode time per token should not
  grow with the capacity.
- cpu-qwen3 / cpu-qwen3-b64: the cpu-small sizes as a Qwen3 (q/k norm), greedy, 16 / 64
  rows: mars vs HF vs tunix's vanilla sampler (the comparison issue #24 asks for;
  tunix samples with top-p only, so greedy is the like-for-like mode). Also reports
  how many greedy tokens mars and tunix agree on (fp32, the same weights).
- gpu-1.5b: Qwen2.5-1.5B shape, bf16, 128 rows, 512 + 1024 tokens; HBM roofline fraction.

Tokens/s counts generated tokens; the first call of each shape (the compile) is
not timed.

    python benchmarks/generate.py --preset cpu-small --out benchmarks/results/generate_cpu.json
    python benchmarks/generate.py --preset cpu-qwen3 --tunix_path /tmp/tunix_pkgs \
        --out benchmarks/results/generate_cpu_qwen3.json
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
    # rope_theta 1e6 as real Qwen3: tunix's Qwen3 (0.1.7) rotates with 1e6 whatever the
    # config says (apply_rope is called without the config's theta).
    "cpu-qwen3": dict(model=dict(SMALL, head_dim=64, rope_theta=1e6), kind="qwen3", greedy=True,
                      dtype="float32", batch=16, prompt_len=64, new_tokens=64,
                      engines=("mars", "hf", "tunix")),
    "cpu-qwen3-b64": dict(model=dict(SMALL, head_dim=64, rope_theta=1e6), kind="qwen3",
                          greedy=True,
                          dtype="float32", batch=64, prompt_len=64, new_tokens=64,
                          engines=("mars", "hf", "tunix")),
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
  sampling = SamplingParams(temperature=0.0 if spec.get("greedy") else 1.0)
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
              param_bytes=int(cfg.num_params() * (2 if spec["dtype"] == "bfloat16" else 4)),
              tokens=[list(map(int, out.response_tokens(b))) for b in range(len(budgets))]
              if hasattr(out, "response_tokens") else None)


class IdTokenizer:
  """tunix's sampler takes strings: a prompt is its token ids, space-separated. No BOS."""

  def __init__(self, eos_id):
    self._eos = eos_id

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(map(str, ids))

  def bos_id(self):
    return None

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return 0


def run_tunix(spec: dict) -> dict:
  """tunix's vanilla Sampler on the saved model (runs in a --worker subprocess)."""
  import importlib
  import importlib.metadata
  import jax
  import jax.numpy as jnp
  from tunix.generate import sampler as tunix_sampler
  with open(os.path.join(spec["path"], "config.json")) as f:
    hf = json.load(f)
  kind = hf["model_type"]
  model_lib = importlib.import_module(f"tunix.models.{kind}.model")
  params_lib = importlib.import_module(f"tunix.models.{kind}.params")
  dtype = jnp.dtype(spec["dtype"])
  fields = dict(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
                num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                rope_theta=int(hf["rope_theta"] if "rope_theta" in hf
                               else hf["rope_parameters"]["rope_theta"]),
                norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"],
                dtype=dtype, param_dtype=dtype)
  known = {f.name for f in __import__("dataclasses").fields(model_lib.ModelConfig)}
  config = model_lib.ModelConfig(**{k: v for k, v in fields.items() if k in known})
  model = params_lib.create_model_from_safe_tensors(spec["path"], config, dtype=dtype)
  prompts, mask = np.asarray(spec["prompts"], np.int32), np.asarray(spec["mask"], bool)
  budgets = np.asarray(spec["budgets"], np.int32)
  new, P = int(budgets.max()), prompts.shape[1]
  assert (budgets == new).all(), "tunix's sampler gives every row the same budget"
  eos = hf["vocab_size"]  # never sampled: every row runs to its budget, as in the other engines
  cache = tunix_sampler.CacheConfig(cache_size=P + new, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
  sampler = tunix_sampler.Sampler(model, IdTokenizer(eos), cache)
  texts = [" ".join(map(str, p[m])) for p, m in zip(prompts, mask)]
  kw = dict(temperature=0.0) if spec.get("greedy") else dict(temperature=1.0, top_p=1.0)
  runs = []
  for r in range(spec["repeats"] + 1):  # call 0 compiles
    t0 = time.perf_counter()
    out = sampler(texts, max_generation_steps=new, max_prompt_length=P, eos_tokens=[eos],
                  seed=r, pad_output=True, **kw)
    jax.block_until_ready(out.tokens)
    runs.append(time.perf_counter() - t0)
  tokens = [list(map(int, t))[:new] for t in out.tokens]
  assert all(len(t) == new for t in tokens), [len(t) for t in tokens]
  seconds = float(np.median(runs[1:]))
  return dict(seconds=seconds, compile_s=runs[0] - seconds, generated=int(budgets.sum()),
              tokens_per_s=int(budgets.sum()) / seconds, tokens=tokens,
              version=importlib.metadata.version("google-tunix"),
              kv_bytes_allocated=int(2 * config.num_layers * prompts.shape[0] * (P + new)
                                     * config.num_kv_heads * config.head_dim * dtype.itemsize))


def run_worker(kind: str, spec: dict, pythonpath: str) -> dict:
  """run_engine / run_tunix in a subprocess of this script with `pythonpath` first."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--worker={kind}",
                           f"--spec={spec_path}"], capture_output=True, text=True, env=env,
                          cwd=tmp)
    if proc.returncode:
      raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_static(spec: dict, rev: str) -> dict:
  """run_engine in a subprocess whose `mars` is a worktree of `rev`."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", tree, rev], check=True,
                   capture_output=True)
    try:
      return run_worker("mars", dict(spec, engine_kw={}, round_cache=False), tree)
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
      sample = {} if preset.get("greedy") else dict(do_sample=True, temperature=1.0, top_k=0,
                                                    top_p=1.0)
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0, **sample)
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  assert out.shape[1] == prompts.shape[1] + new
  seconds = float(np.median(times[1:]))
  return dict(seconds=seconds, tokens_per_s=prompts.shape[0] * new / seconds,
              tokens=out[:, prompts.shape[1]:].cpu().numpy().tolist())


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
  parser.add_argument("--tunix_path", default=os.environ.get("TUNIX_PATH", ""),
                      help="a directory with google-tunix and its imports (pip --target)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:  # a run_worker subprocess
    with open(args.spec) as f:
      spec = json.load(f)
    print(json.dumps({"mars": run_engine, "tunix": run_tunix}[args.worker](spec)))
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
    kind = preset.get("kind", "qwen2")
    model_cls, config_cls = {
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)}[kind]
    model = model_cls(config_cls(max_position_embeddings=16384, **preset["model"]))
    model.save_pretrained(path)
    spec = dict(path=path, dtype=preset["dtype"], prompts=prompts.tolist(), mask=mask.tolist(),
                budgets=budgets.tolist(), repeats=args.repeats, greedy=preset.get("greedy", False))
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
        elif eng == "tunix" and capacity is None:
          result["engines"]["tunix"] = run_worker("tunix", s, args.tunix_path)
  rows = result["engines"]
  if preset.get("greedy"):  # greedy tokens each engine shares with mars (fp32 near-ties may flip)
    ref = np.asarray(rows["mars"]["tokens"])
    result["greedy_agreement_with_mars"] = {
        name: float((np.asarray(r["tokens"])[:, :ref.shape[1]] == ref).mean())
        for name, r in rows.items() if name != "mars" and "tokens" in r}
  for r in rows.values():
    r.pop("tokens", None)
  print(f"{'engine':14s}{'tokens/s':>12s}{'seconds':>10s}{'compile s':>11s}{'KV MiB':>10s}"
        f"{'KV peak':>10s}")
  for name, r in rows.items():
    print(f"{name:14s}{r['tokens_per_s']:12.1f}{r['seconds']:10.3f}"
          f"{r.get('compile_s', float('nan')):11.1f}{r.get('kv_bytes_allocated', 0) / 2**20:10.1f}"
          f"{r.get('kv_bytes_peak', 0) / 2**20:10.1f}")
  ratios = {}
  for other in ("hf", "static", "tunix"):
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
  for k, v in result.get("greedy_agreement_with_mars", {}).items():
    print(f"greedy tokens {k} == mars: {v:.3f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
