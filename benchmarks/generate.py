"""Generation throughput: mars rollout engine vs HF transformers `generate`.

Same model shape (random weights), batch, prompt length and new-token count,
side by side in one run. Compile time is reported separately; tokens/s counts
generated tokens only. On a GPU, also the fraction of the HBM-bandwidth
roofline: each decode step must read all params plus the KV cache so far.

    python benchmarks/generate.py --preset cpu-small --out benchmarks/results/generate_cpu.json
    python benchmarks/generate.py --preset gpu-1.5b --out benchmarks/results/generate_h100.json
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

PRESETS = {
    # Qwen2-shaped, small enough for 2 CPU cores.
    "cpu-small": dict(model=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
                      dtype="float32", batch=16, prompt_len=64, new_tokens=64),
    # Qwen2.5-1.5B shape (28 layers, hidden 1536, 12/2 heads, vocab 151936), bf16.
    "gpu-1.5b": dict(model=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                tie_word_embeddings=True),
                     dtype="bfloat16", batch=128, prompt_len=512, new_tokens=1024),
}

# Peak HBM bandwidth, bytes/s.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _device_name():
  import jax
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}".strip(":") or platform.processor()


def _bandwidth(device: str):
  for name, bw in HBM_BANDWIDTH.items():
    if name in device:
      return bw
  return None


def make_model(preset, path):
  import torch
  import transformers
  cfg = transformers.Qwen2Config(max_position_embeddings=4096, **preset["model"])
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(cfg)
  model.save_pretrained(path)
  return model


def bench_mars(path, preset, prompts, mask, repeats):
  import jax
  import mars.models as mm
  from mars.sampling import Sampler, SamplingParams
  cfg, params = mm.load_hf(path, dtype=preset["dtype"])
  sampler = Sampler(cfg, stop_ids=[], pad_id=0)
  sampling = SamplingParams(temperature=1.0)
  new = preset["new_tokens"]
  kw = dict(max_new_tokens=new, sampling=sampling)
  t0 = time.perf_counter()
  state = sampler.start(params, prompts, mask, key=jax.random.key(0), **kw)
  state = sampler.run(params, state, new, sampling)
  jax.block_until_ready(state.tokens)
  compile_s = time.perf_counter() - t0
  prefill_s, decode_s = [], []
  for r in range(repeats):
    t0 = time.perf_counter()
    state = sampler.start(params, prompts, mask, key=jax.random.key(r + 1), **kw)
    jax.block_until_ready(state.last_logits)
    t1 = time.perf_counter()
    state = sampler.run(params, state, new, sampling)
    jax.block_until_ready(state.tokens)
    t2 = time.perf_counter()
    prefill_s.append(t1 - t0)
    decode_s.append(t2 - t1)
  generated = int(np.asarray(state.num_generated).sum())
  assert generated == prompts.shape[0] * new, generated
  param_bytes = cfg.num_params() * np.dtype(preset["dtype"] if preset["dtype"] != "bfloat16" else np.float16).itemsize
  return dict(prefill_s=float(np.median(prefill_s)), decode_s=float(np.median(decode_s)),
              compile_s=compile_s, generated=generated, param_bytes=param_bytes, cfg=cfg)


def bench_hf(model, preset, prompts, mask, repeats, device):
  import torch
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[preset["dtype"]]
  model = model.to(device=device, dtype=dtype).eval()
  ids = torch.tensor(prompts, device=device)
  am = torch.tensor(mask.astype(np.int64), device=device)
  new = preset["new_tokens"]

  def run(n):
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  run(2)  # warm up
  prefill_s, total_s = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    out = run(new)
    t2 = time.perf_counter()
    prefill_s.append(t1 - t0)
    total_s.append(t2 - t1)
  assert out.shape[1] == prompts.shape[1] + new
  prefill = float(np.median(prefill_s))
  return dict(prefill_s=prefill, decode_s=float(np.median(total_s)) - prefill,
              total_s=float(np.median(total_s)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
  parser.add_argument("--out", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_hf", action="store_true")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  B, P = preset["batch"], preset["prompt_len"]
  prompts = rng.integers(1, preset["model"]["vocab_size"], (B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  for b in range(B):  # ragged, left-padded prompts
    pad = int(rng.integers(0, P // 4))
    mask[b, :pad] = False
    prompts[b, :pad] = 0

  with tempfile.TemporaryDirectory() as path:
    model = make_model(preset, path)
    mars_r = bench_mars(path, preset, prompts, mask, args.repeats)
  hf_r = None if args.skip_hf else bench_hf(model, preset, prompts, mask, args.repeats, device)

  dev = _device_name()
  generated = mars_r["generated"]
  mars_total = mars_r["prefill_s"] + mars_r["decode_s"]
  result = {
      "preset": args.preset, "device": dev, "batch": B, "prompt_len": P,
      "new_tokens": preset["new_tokens"], "dtype": preset["dtype"],
      "mars_tokens_per_s": generated / mars_total,
      "mars_decode_tokens_per_s": generated / mars_r["decode_s"],
      "mars_prefill_s": mars_r["prefill_s"], "mars_decode_s": mars_r["decode_s"],
      "mars_compile_s": mars_r["compile_s"],
  }
  if hf_r:
    result.update(hf_tokens_per_s=generated / hf_r["total_s"], hf_prefill_s=hf_r["prefill_s"],
                  hf_decode_s=hf_r["decode_s"],
                  ratio_vs_hf=(generated / mars_total) / (generated / hf_r["total_s"]))
  bw = _bandwidth(dev)
  if bw:
    cfg = mars_r["cfg"]
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 K and V
    mean_ctx = P + preset["new_tokens"] / 2
    bytes_per_step = mars_r["param_bytes"] + B * mean_ctx * kv_per_token
    ideal_step_s = bytes_per_step / bw
    actual_step_s = mars_r["decode_s"] / preset["new_tokens"]
    result["roofline_fraction"] = ideal_step_s / actual_step_s
  print(f"{'':24s}{'mars':>12s}{'HF':>12s}")
  print(f"{'tokens/s':24s}{result['mars_tokens_per_s']:12.1f}{result.get('hf_tokens_per_s', float('nan')):12.1f}")
  print(f"{'prefill s':24s}{mars_r['prefill_s']:12.3f}{(hf_r or {}).get('prefill_s', float('nan')):12.3f}")
  print(f"{'decode s':24s}{mars_r['decode_s']:12.3f}{(hf_r or {}).get('decode_s', float('nan')):12.3f}")
  print(f"{'compile s':24s}{mars_r['compile_s']:12.1f}{'-':>12s}")
  if "ratio_vs_hf" in result:
    print(f"ratio mars/HF: {result['ratio_vs_hf']:.2f}x   device: {dev}")
  if "roofline_fraction" in result:
    print(f"HBM roofline fraction: {100 * result['roofline_fraction']:.1f}%")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
