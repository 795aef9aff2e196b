"""Policy-update throughput: the mars train step vs an equivalent torch loop.

One update = forward + backward over the whole batch (micro-batched) + global-
norm clip + AdamW. Both sides use the same Qwen2 shape (random init), batch,
micro-batching, precision and optimizer hyper-parameters, in one run:

  mars   mars.rl.step.make_train_step (PPO policy loss, token-mean; old_logp is
         the model's own logprob, so at ratio 1 the gradient is -mean(A·∇logp)).
  torch  HF transformers Qwen2ForCausalLM (sdpa attention), torch.optim.AdamW,
         loss -sum(logp·A·mask) / sum(mask).

cpu-longtail runs mars twice, padded and packed (rl.packing, mars/rl/seq_pack.py),
on rows with rollout-like long-tailed lengths (generate.py's mix: 80% of the
responses stop within 10% of the budget, 15% in between, 5% run to it), and no
torch; there tokens/s counts real tokens only. It also counts the packed rows and
the attention blocks the TPU splash kernel would run, for these rows and for a
grpo_4b-shaped minibatch: padded, packed with micro-batches as given and balanced,
with the causal mask alone and with segments (splash_blocks).

On CPU the run also times the step's weight matmuls alone (gemm_bound: each
projection's forward and both backward GEMMs at the micro-batch's rows, in JAX
and in torch): the update is matmul-bound, so their time ratio is about the
best mars / torch this backend allows.

cpu-small runs mars with model.scan_layers=False (its 4 layers unrolled: no
stacked residual buffers); --scan-layers runs the scanned forward instead.

tokens/s counts every token of the batch (B × T) per update. Compile (mars) and
warm-up (torch) time is excluded from tokens/s and reported separately. On a
GPU, MFU = 6 · params · tokens / (time · peak bf16 dense flops); it ignores
attention flops and remat recompute, as is usual.

    python benchmarks/update.py --preset cpu-small --out benchmarks/results/update_cpu.json
    python benchmarks/update.py --preset cpu-longtail --out benchmarks/results/update_cpu_longtail.json
    python benchmarks/update.py --preset gpu-1.5b --out benchmarks/results/update_h100.json
"""
import argparse
import gc
import json
import os
import platform
import sys
import time

# JAX must not grab 75% of the GPU before the torch half has run.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
QWEN25_15B_DIR = "/work/shared/models/qwen2.5-math-1.5b"

PRESETS = {
    # Qwen2-shaped, small enough for 2 CPU cores (vocab 8192 as in benchmarks/generate.py).
    "cpu-small": dict(model=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                 num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_theta=10000.0),  # mars needs it explicit; torch's default
                      param_dtype="float32", compute_dtype="float32", remat="none",
                      batch=8, seq_len=256, micro_batch=8, steps=5, scan_layers=False),
    # The cpu-small model on 32 rows of a 64-token prompt + up to 448 response tokens.
    "cpu-longtail": dict(model=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                    num_hidden_layers=4, num_attention_heads=8,
                                    num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_theta=10000.0),
                         param_dtype="float32", compute_dtype="float32", remat="none",
                         batch=32, seq_len=512, micro_batch=16, steps=5, longtail=True,
                         prompt_len=64, scan_layers=False),
    # Qwen2.5-1.5B shape, fp32 master weights + bf16 compute (both sides), 4k tokens/row.
    "gpu-1.5b": dict(model=QWEN25_15B, param_dtype="float32", compute_dtype="bfloat16",
                     remat="full", batch=8, seq_len=4096, micro_batch=2, steps=5,
                     scan_layers=True),
}
OPT = dict(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
PROMPT_FRACTION = 0.25  # the first quarter of each row is "prompt" (not in the loss).

# Dense bf16 peak flops/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def _model_dict(preset):
  """The preset's HF fields; the 1.5B shape is re-read from the real config.json if present."""
  model = dict(preset["model"])
  if model == QWEN25_15B:
    cfg_file = os.path.join(QWEN25_15B_DIR, "config.json")
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        hf = json.load(f)
      model = {k: hf[k] for k in QWEN25_15B if k in hf}
  return model


def response_lengths(B, budget, rng):
  """generate.py's long-tailed mix: 80% within 10% of the budget, 15% between, 5% full."""
  u = rng.random(B)
  short = rng.integers(1, budget // 10 + 1, B)
  mid = rng.integers(budget // 10, budget, B)
  out = np.where(u < 0.8, short, np.where(u < 0.95, mid, budget))
  out[:max(1, B // 20)] = budget
  return rng.permutation(out)


def make_data(preset, seed=0):
  """(tokens, attention_mask, loss_mask, advantages), [B, T] each."""
  rng = np.random.default_rng(seed)
  B, T, V = preset["batch"], preset["seq_len"], preset["model"]["vocab_size"]
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  attention = np.ones((B, T), bool)
  loss_mask = np.zeros((B, T), bool)
  if preset.get("longtail"):
    P = preset["prompt_len"]
    for r, n in enumerate(response_lengths(B, T - P, rng)):
      attention[r, P + n:] = False
      loss_mask[r, P:P + n] = True
    tokens = np.where(attention, tokens, 0).astype(np.int32)
  else:
    loss_mask[:, int(T * PROMPT_FRACTION):] = True
  adv = np.where(loss_mask, rng.normal(size=(B, 1)), 0.0).astype(np.float32)
  return tokens, attention, loss_mask, adv


def _device_name():
  import jax
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu:{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
  return f"{d.platform}:{d.device_kind}"


def _on_gpu():
  import jax
  return jax.devices()[0].platform != "cpu"


def _peak(device):
  for name, flops in PEAK_FLOPS.items():
    if name in device:
      return flops
  return None


# ----------------------------------------------------------------------------
# torch.

def setup_torch(preset, data, model_dict):
  """(step, info, close) for the HF/torch update."""
  import torch
  import transformers
  on_gpu = torch.cuda.is_available()
  dev = torch.device("cuda" if on_gpu else "cpu")
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(max_position_embeddings=max(4096, preset["seq_len"]),
                                 attn_implementation="sdpa", use_cache=False, **model_dict)
  model = transformers.Qwen2ForCausalLM(cfg).to(dev, dtype=getattr(torch, preset["param_dtype"]))
  if preset["remat"] != "none":  # per-layer recompute, as mars' remat="full"
    enable = (getattr(model, "activation_checkpointing_enable", None) or
              model.gradient_checkpointing_enable)
    enable()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]),
                          eps=OPT["eps"], weight_decay=OPT["weight_decay"],
                          **({"fused": True} if on_gpu else {}))
  tokens, _, loss_mask, adv = (torch.from_numpy(x).to(dev) for x in data)
  tokens = tokens.long()
  mask_f = loss_mask.float()
  num_tokens = mask_f.sum()
  compute_dtype = getattr(torch, preset["compute_dtype"])
  autocast = compute_dtype != getattr(torch, preset["param_dtype"])
  mb = preset["micro_batch"]

  def step():
    for i in range(0, tokens.shape[0], mb):
      tok, m, a = tokens[i:i + mb], mask_f[i:i + mb], adv[i:i + mb]
      with torch.autocast(dev.type, dtype=compute_dtype, enabled=autocast):
        logits = model(input_ids=tok).logits
      logp = torch.log_softmax(logits[:, :-1].float(), -1)
      logp = logp.gather(-1, tok[:, 1:, None])[..., 0]
      loss = -(logp * a[:, 1:] * m[:, 1:]).sum() / num_tokens
      loss.backward()
      del logits, logp
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if on_gpu:
      torch.cuda.synchronize()

  def close():
    nonlocal model, opt
    del model, opt
    gc.collect()
    if on_gpu:
      torch.cuda.empty_cache()

  info = dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
              torch_num_params=sum(p.numel() for p in model.parameters()))
  return step, info, close


# ----------------------------------------------------------------------------
# mars.

def setup_mars(preset, data, model_dict, packing=False):
  """(step, info, close) for the mars train step (padded, or packed rows)."""
  import jax
  from mars import config as mars_config
  from mars import sharding
  from mars.batch import empty_batch, positions_from_mask
  from mars.models import from_hf_dict, init_params
  from mars.rl import optim
  from mars.rl import step as step_lib
  from mars.rl import micro as micro_lib

  hf = dict(model_dict, model_type="qwen2")
  cfg = from_hf_dict(hf, param_dtype=preset["param_dtype"], dtype=preset["compute_dtype"],
                     remat=preset["remat"], scan_layers=preset["scan_layers"])
  mesh = sharding.make_mesh((1, -1, 1))  # all devices on fsdp (one GPU / one CPU: size 1)
  tokens, attention, loss_mask, adv = data
  B, T = tokens.shape
  batch = empty_batch(B, T).replace(
      tokens=tokens, attention_mask=attention,
      positions=np.asarray(positions_from_mask(attention)), loss_mask=loss_mask)
  batch = jax.device_put(batch, step_lib.batch_shardings(mesh))
  adv = jax.device_put(adv, sharding.batch_sharding(mesh))
  rl_cfg = mars_config.rl_config(micro_batch_size=preset["micro_batch"], agg_mode="token-mean",
                                 recompute_old_logp=False, packing=packing)

  opt = optim.make_optimizer(mars_config.optimizer_config(**OPT))
  shardings = step_lib.train_state_shardings(cfg, mesh, opt)
  init = jax.jit(lambda key: step_lib.init_train_state(init_params(cfg, key), opt),
                 out_shardings=shardings)
  state = init(jax.random.key(0))
  # old_logp = the policy's own logprobs: ratio 1, so the first update is exactly
  # -mean(A·∇logp), the torch loss. (Untimed; later steps drift by lr-sized amounts.)
  old = micro_lib.compute_logprobs(cfg, state.params, batch,
                                  micro_batch_size=preset["micro_batch"], mesh=mesh)
  batch = batch.replace(old_logp=old)
  train_step = step_lib.make_train_step(cfg, rl_cfg, opt, None, mesh, shardings)

  holder = {"state": state, "metrics": None}

  def step():
    holder["state"], holder["metrics"] = train_step(holder["state"], batch, adv, adv)
    jax.block_until_ready(holder["metrics"])
    if packing:
      holder["efficiency"] = holder["metrics"]["pack_efficiency"]

  def close():
    assert int(holder["metrics"]["skipped_updates"]) == 0, "an update was skipped (non-finite)"
    holder.clear()
    jax.clear_caches()

  info = dict(jax_version=jax.__version__, mars_num_params=cfg.num_params())
  if packing:
    info["packed_efficiency"] = lambda: holder.get("efficiency")
  return step, info, close


def gemm_bound(preset, model_dict, repeats=5):
  """(jax seconds, torch seconds) of one update's weight matmuls on CPU.

  Per micro-batch of M = micro_batch · seq_len rows, each projection [K, N]
  (q, k, v, o, gate, up, down per layer; the lm_head) runs y = x·W, dx = dy·Wᵀ
  and dW = xᵀ·dy: timed once per distinct shape (median of `repeats`) and
  counted as often as the step runs it. fp32 operands, contiguous, as stored.
  """
  import jax
  import torch
  m = model_dict
  d, f, v, layers = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_hidden_layers"]
  hd = m.get("head_dim") or d // m["num_attention_heads"]
  q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
  rows = preset["micro_batch"] * preset["seq_len"]
  counts = {}
  for shape in [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]:
    counts[shape] = counts.get(shape, 0) + layers
  counts[(d, v)] = counts.get((d, v), 0) + 1
  micro_batches = preset["batch"] // preset["micro_batch"]
  rng = np.random.default_rng(0)

  def median_s(fn):
    fn()
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

  fwd = jax.jit(lambda x, w: x @ w)
  dx = jax.jit(lambda dy, w: jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ()))))
  dw = jax.jit(lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ()))))
  total = {"jax": 0.0, "torch": 0.0}
  for (k, n), count in counts.items():
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((rows, k), (k, n), (rows, n)))
    jx, jw, jdy = (jax.device_put(a) for a in (x, w, dy))
    tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
    jax_s = (median_s(lambda: fwd(jx, jw).block_until_ready())
             + median_s(lambda: dx(jdy, jw).block_until_ready())
             + median_s(lambda: dw(jx, jdy).block_until_ready()))
    torch_s = (median_s(lambda: tx @ tw) + median_s(lambda: tdy @ tw.T)
               + median_s(lambda: tx.T @ tdy))
    total["jax"] += count * micro_batches * jax_s
    total["torch"] += count * micro_batches * torch_s
  return total["jax"], total["torch"]


def splash_blocks(attention_mask, num_micro: int, block: int) -> dict:
  """Rows and attention blocks the TPU splash kernel runs for these rows: padded, packed
  with the rows' micro-batches as given (micro-batch i = rows i, i + n, ...), and
  packed with balanced micro-batches (seq_pack.balanced_order, what mars runs),
  counted from the block tables splash would use: causal only (the static mask) vs
  causal and segments (kernels.segment_block_overlap). A count, not a timing: no TPU
  here. Blocks are per head and example, block × block each."""
  import jax.numpy as jnp
  from mars.models import kernels
  from mars.rl import seq_pack

  def count(segments):
    T = segments.shape[1]
    Tp = -(-T // block) * block
    segments = np.pad(segments, ((0, 0), (0, Tp - T)), constant_values=-1)
    n = Tp // block
    causal = np.tril(np.ones((n, n), bool))
    overlap = np.stack([np.asarray(kernels.segment_block_overlap(jnp.asarray(s), block))
                        for s in segments])
    return dict(rows=len(segments), blocks_causal=int(causal.sum()) * len(segments),
                blocks_with_segments=int((overlap & causal).sum()))

  out = dict(block=block, padded=count(np.asarray(attention_mask).astype(np.int32)))
  for name, balance in (("packed_as_given", False), ("packed_balanced", True)):
    index = seq_pack.plan_batch(attention_mask, num_micro, balance=balance)
    out[name] = count(np.asarray(index.segment).reshape(-1, index.segment.shape[-1]))
  out["balanced_with_segments_vs_padded_causal"] = (
      out["packed_balanced"]["blocks_with_segments"] / out["padded"]["blocks_causal"])
  return out


def grpo_4b_like_mask(seed=0):
  """configs/grpo_4b.py's update shape: a 512-row minibatch, micro batch 8, prompts up
  to 1024 tokens (left-padded, 128-1024 real), responses of the long-tailed mix within
  8192: [512, 9216] bool."""
  rng = np.random.default_rng(seed)
  B, P, budget = 512, 1024, 8192
  mask = np.zeros((B, P + budget), bool)
  for r, n in enumerate(response_lengths(B, budget, rng)):
    mask[r, P - rng.integers(128, P + 1):P + n] = True
  return mask


def main_longtail(args, preset, data):
  """mars padded vs mars packed, interleaved, on the long-tailed rows."""
  real = int(data[1].sum())
  sides = {}
  for name, packing in (("padded", False), ("packed", True)):
    step, info, close = setup_mars(preset, data, preset["model"], packing)
    first = _time(step)
    eff = info.pop("packed_efficiency", lambda: None)()
    sides[name] = dict(step=step, close=close, first=first, times=[], info=info, eff=eff)
  for _ in range(preset["steps"]):
    for side in sides.values():
      side["times"].append(_time(side["step"]))
  for side in sides.values():
    side["close"]()
  res = dict(preset=args.preset, device=_device_name(), batch=preset["batch"],
             seq_len=preset["seq_len"], micro_batch=preset["micro_batch"],
             prompt_len=preset["prompt_len"], real_tokens=real,
             padded_efficiency=real / data[1].size, packed_efficiency=sides["packed"]["eff"],
             model=preset["model"], steps=preset["steps"], timing="interleaved, median",
             threads=args.threads or os.cpu_count(), load_avg_1min=os.getloadavg()[0],
             **sides["padded"]["info"])
  for name, side in sides.items():
    res[f"{name}_step_s"] = float(np.median(side["times"]))
    res[f"{name}_compile_s"] = side["first"] - res[f"{name}_step_s"]
    res[f"{name}_step_times_s"] = side["times"]
    res[f"{name}_real_tokens_per_s"] = real / res[f"{name}_step_s"]
  res["packed_vs_padded"] = res["padded_step_s"] / res["packed_step_s"]
  micro = preset["batch"] // preset["micro_batch"]
  res["splash_blocks"] = dict(
      this_batch=splash_blocks(data[1], micro, 128),
      grpo_4b_like=splash_blocks(grpo_4b_like_mask(), 512 // 8, 512))
  print(f"policy update, preset {args.preset} on {res['device']}: {preset['batch']} rows of "
        f"{preset['prompt_len']} + up to {preset['seq_len'] - preset['prompt_len']} tokens "
        f"(long tail), micro-batch {preset['micro_batch']}")
  print(f"  {'':<22}{'padded':>12}{'packed':>12}")
  print(f"  {'real tokens/s':<22}{res['padded_real_tokens_per_s']:>12.1f}"
        f"{res['packed_real_tokens_per_s']:>12.1f}")
  print(f"  {'step s':<22}{res['padded_step_s']:>12.3f}{res['packed_step_s']:>12.3f}")
  print(f"  {'efficiency':<22}{res['padded_efficiency']:>12.1%}{res['packed_efficiency']:>12.1%}")
  print(f"  packed / padded: {res['packed_vs_padded']:.2f}x")
  print("  TPU splash attention blocks run (counted from its block tables, not timed):")
  print(f"  {'':<40}{'rows':>8}{'causal':>12}{'+ segments':>12}")
  for name, b in res["splash_blocks"].items():
    for layout in ("padded", "packed_as_given", "packed_balanced"):
      c = b[layout]
      label = f"{name} (block {b['block']}), {layout}"
      print(f"  {label:<40}{c['rows']:>8}{c['blocks_causal']:>12}{c['blocks_with_segments']:>12}")
  return res


def _time(step):
  t0 = time.perf_counter()
  step()
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
  ap.add_argument("--out", default=None, help="JSON file to write")
  ap.add_argument("--steps", type=int, default=None, help="timed updates per framework")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq-len", type=int, default=None)
  ap.add_argument("--micro-batch", type=int, default=None)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--scan-layers", action="store_true",
                  help="mars scans its layers (model.scan_layers=True) whatever the preset says")
  ap.add_argument("--threads", type=int, default=None,
                  help="CPU only: intra-op threads for both sides (default: all cores)")
  args = ap.parse_args(argv)
  if args.threads:
    # Before JAX starts. 1 thread each makes a fair comparison on a shared, loaded
    # machine, where a preempted OpenMP worker stalls every torch parallel region.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               if args.threads == 1 else os.environ.get("XLA_FLAGS", ""))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)

  preset = dict(PRESETS[args.preset])
  if args.scan_layers:
    preset["scan_layers"] = True
  for key in ("steps", "batch", "seq_len", "micro_batch"):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  model_dict = _model_dict(preset)
  preset["model"] = model_dict
  data = make_data(preset)
  if preset.get("longtail"):
    res = main_longtail(args, preset, data)
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return res
  tokens_per_step = preset["batch"] * preset["seq_len"]

  # CPU: both live at once and timed steps alternate, so load from other processes
  # hits both sides alike (medians). GPU: one after the other, torch first (its
  # caching allocator hands memory back; JAX's does not), as two 1.5B models plus
  # AdamW would not fit together.
  interleave = not args.skip_torch and not _on_gpu()
  times = {"mars": [], "torch": []}
  first = {}
  setups = [] if args.skip_torch else [("torch", setup_torch)]
  setups.append(("mars", setup_mars))
  info, live = {}, []
  for name, setup in setups:
    step, extra, close = setup(preset, data, model_dict)
    info.update(extra)
    first[name] = _time(step)  # mars: compile; torch: allocator / kernel warm-up
    if interleave:
      live.append((name, step, close))
      continue
    times[name] = [_time(step) for _ in range(preset["steps"])]
    close()
  for _ in range(preset["steps"] if interleave else 0):
    for name, step, _ in live:
      times[name].append(_time(step))
  for _, _, close in live:
    close()
  mars_res = dict(info, mars_step_s=float(np.median(times["mars"])),
                  mars_compile_s=first["mars"] - float(np.median(times["mars"])),
                  mars_step_times_s=times["mars"])
  torch_res = {} if args.skip_torch else dict(
      torch_step_s=float(np.median(times["torch"])), torch_warmup_s=first["torch"],
      torch_step_times_s=times["torch"])

  device = _device_name()
  res = dict(preset=args.preset, device=device, batch=preset["batch"],
             seq_len=preset["seq_len"], micro_batch=preset["micro_batch"],
             tokens_per_step=tokens_per_step, param_dtype=preset["param_dtype"],
             compute_dtype=preset["compute_dtype"], remat=preset["remat"],
             scan_layers=preset["scan_layers"], model=model_dict, steps=preset["steps"])
  res.update(mars_res)
  res.update(torch_res)
  res["timing"] = "interleaved, median" if interleave else "sequential, median"
  res["threads"] = args.threads or os.cpu_count()
  # Other processes share this CPU: record how busy it was (1-min load average).
  res["load_avg_1min"] = os.getloadavg()[0]
  res["mars_tokens_per_s"] = tokens_per_step / mars_res["mars_step_s"]
  res["torch_tokens_per_s"] = (tokens_per_step / torch_res["torch_step_s"]) if torch_res else None
  res["ratio_vs_torch"] = (res["mars_tokens_per_s"] / res["torch_tokens_per_s"]
                           if torch_res else None)
  peak = _peak(device)
  if peak:
    flops = 6 * mars_res["mars_num_params"] * tokens_per_step
    res["mfu"] = flops / (mars_res["mars_step_s"] * peak)
    if torch_res:
      res["torch_mfu"] = flops / (torch_res["torch_step_s"] * peak)
    res["peak_flops"] = peak

  rows = [("", "mars", "torch"),
          ("tokens/s", f"{res['mars_tokens_per_s']:.1f}",
           f"{res['torch_tokens_per_s']:.1f}" if torch_res else "-"),
          ("step s", f"{mars_res['mars_step_s']:.3f}",
           f"{torch_res['torch_step_s']:.3f}" if torch_res else "-"),
          ("compile/warmup s", f"{mars_res['mars_compile_s']:.1f}",
           f"{torch_res['torch_warmup_s']:.1f}" if torch_res else "-")]
  if torch_res and not _on_gpu():
    res["gemm_jax_s"], res["gemm_torch_s"] = gemm_bound(preset, model_dict)
    res["gemm_ratio"] = res["gemm_torch_s"] / res["gemm_jax_s"]
    rows.append(("weight GEMMs s", f"{res['gemm_jax_s']:.3f}", f"{res['gemm_torch_s']:.3f}"))
  if "mfu" in res:
    rows.append(("MFU", f"{res['mfu']:.1%}",
                 f"{res['torch_mfu']:.1%}" if "torch_mfu" in res else "-"))
  print(f"policy update, preset {args.preset} on {device}: {preset['batch']} x "
        f"{preset['seq_len']} tokens, micro-batch {preset['micro_batch']}, "
        f"{preset['param_dtype']} params / {preset['compute_dtype']} compute")
  for r in rows:
    print(f"  {r[0]:<18}{r[1]:>12}{r[2]:>12}")
  if res["ratio_vs_torch"]:
    print(f"  mars / torch: {res['ratio_vs_torch']:.2f}x")
  if "gemm_ratio" in res:
    print(f"  the step's weight GEMMs alone, JAX (XLA:CPU) vs torch: {res['gemm_ratio']:.2f}x "
          f"the speed; the rest of the step takes {res['mars_step_s'] - res['gemm_jax_s']:.3f} s "
          f"vs {torch_res['torch_step_s'] - res['gemm_torch_s']:.3f} s")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == "__main__":
  main()
