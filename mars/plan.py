r"""Will a config fit a TPU slice, and how long will a step take? Compiles, allocates nothing.

    python -m mars.plan --config=configs/lte_8b.py --topology=v5p-64
    python -m mars.plan --config=configs/grpo_4b.py --topology=v5p-8,v6e-8 --json=plan.json
    python -m mars.plan --config=configs/tiny.py --topology=local

For each topology the update step (actor, and critic when the config has one),
the logprob recompute, and the sampler's prefill and one decode step are
lowered with abstract inputs through the trainer's own functions and sharding
rules (mars/trainer/plan_steps.py), compiled for the topology's devices (TPU names
need libtpu: pip install -e ".[tpu]"), and reported per device: HBM by
category against the chip's capacity, FLOPs and bytes, a modeled time, and a
verdict. docs/plan.md explains every figure. Exit status: 0 when every step
fits, 1 when one does not, 2 on bad input.
"""
import copy
import json
import math
import os
import re
import sys
import time

from absl import app, flags
import jax
from ml_collections import config_flags

from mars import config_validation
from mars import demo, hardware, models, sharding
from mars.config_validation import ConfigError
from mars.models import UnsupportedConfigError
from mars.sharding import ShardingError
from mars.trainer import auto_micro_batch, plan_steps, policy, specs

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "tiny.py"),
                                  "Experiment config (.py with get_config()).", lock_config=True)
  flags.DEFINE_string("topology", None, "Comma-separated slices (v5p-8, v6e-8, ...) or 'local'; "
                      "default v5p-8 with libtpu, else local.")
  flags.DEFINE_string("json", None, "Also write the plan as JSON to this path.")
  flags.DEFINE_integer("prompt_len", None, "Prompt columns the sampler and packer see "
                       "(default 1024; 64 for the demo model).")
  flags.DEFINE_list("steps", None, "Plan only these steps (update, logprob, values, prefill, "
                    "decode); default all.")
  flags.DEFINE_float("effort", 0.0, "XLA exec_time_optimization_effort in [-1, 1]; 0 = what "
                     "mars.train compiles, -1 = ~3x faster TPU compiles, temps over-estimated.")
  flags.DEFINE_string("model_dir", None, "Directory with the model's config.json "
                      "(default: model.path, ../shared/models/<name>, or the HF hub).")

DEMO_VOCAB = 512          # mars.demo.build_tokenizer's vocab cap (the real one is a little smaller)
GIB = 2 ** 30


class PlanError(ValueError):
  """Bad input for the planner (a config that cannot be laid out on a topology)."""


def find_model_dir(path: str, override: str = None) -> str:
  """A directory holding `path`'s config.json; no weights are needed."""
  if override:
    return override
  if os.path.isdir(path):
    return path
  name = path.rstrip("/").split("/")[-1].lower()
  shared = os.environ.get("MARS_SHARED_DIR",
                          os.path.join(os.path.dirname(_CONFIGS), "..", "shared"))
  for base in (os.path.join(shared, "models"),):
    if os.path.exists(os.path.join(base, name, "config.json")):
      return os.path.join(base, name)
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    return os.path.dirname(hf_hub_download(path, "config.json"))
  except Exception:  # pylint: disable=broad-except
    raise FileNotFoundError(f"no config.json for model {path!r}: pass --model_dir=DIR "
                            f"(a directory with the model's config.json).") from None


def model_config(c, model_dir: str = None, platform: str = "tpu"):
  """The model's config as a run on `platform` ("tpu", or the local devices') builds it."""
  dtype, compute = c.model.dtype, c.model.compute_dtype or c.model.dtype
  if c.model.path:
    return models.load_config(find_model_dir(c.model.path, model_dir), param_dtype=dtype,
                              dtype=compute, **policy.compute_options(c, platform))
  return demo.tiny_model_config(DEMO_VOCAB).replace(param_dtype=dtype, dtype=compute,
                                                    **policy.compute_options(c, platform))


def check_mesh(c, topo) -> tuple:
  """The config's (trainer) mesh on the topology's devices (less a split run's
  rollout group), or a PlanError naming the axis."""
  shape, n = list(c.mesh_shape), len(topo.devices) - c.rollout.devices
  names = ("data", "fsdp", "tensor")
  for axis, size in zip(names, shape):
    if size != -1 and n % size:
      raise PlanError(f"mesh_shape {tuple(shape)}: axis {axis}={size} does not divide the "
                      f"{n} devices of {topo.name}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise PlanError(f"mesh_shape {tuple(c.mesh_shape)} uses {math.prod(shape)} devices; "
                    f"{topo.name} has {n}.")
  return tuple(shape)


def _capacity(topo):
  if topo.chip is not None:
    return topo.per_device(topo.chip.hbm_bytes), "HBM"
  return plan_steps.local_capacity(topo.devices[0])


def analyze(step, topo, capacity) -> dict:
  """Compiles one step; its per-device memory, cost and modeled time."""
  t0 = time.perf_counter()
  try:
    compiled, xla, _ = plan_steps.compile_footprint(step)
    cost = compiled.cost_analysis() or {}
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program over HBM; its message still says how much it needed.
    xla, cost = _oom_figures(str(e), step), {}
  compile_s = time.perf_counter() - t0
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla.update(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)))
  total = plan_steps.total_bytes(step, xla)
  named = sum(step.named.values())
  r = dict(step=step.name, shape=step.shape, compile_s=compile_s, **step.named,
           temps=xla["temps"], other=max(total - named - xla["temps"], 0),
           total=total, capacity=capacity[0], capacity_source=capacity[1],
           fits=total <= capacity[0] and not xla.get("refused"), xla=xla,
           analytic_flops=step.flops, analytic_bytes=step.hbm_bytes, loop_trips=step.loop_trips)
  ratio = r["xla"]["flops"] / step.flops if step.flops else 1.0
  # XLA's cost analysis visits a loop body once (layer scan, micro-batch scan):
  # when its count disagrees with the analytic one, the analytic one is used.
  r["flops_ratio"] = ratio
  r["flops"], r["flops_source"] = ((r["xla"]["flops"], "xla") if 0.8 <= ratio <= 1.25
                                   else (step.flops, "analytic"))
  r["bytes"], r["bytes_source"] = max((r["xla"]["bytes"], "xla"), (step.hbm_bytes, "analytic"))
  if step.ideal_bytes:
    r["bytes_per_ideal"] = r["bytes"] / step.ideal_bytes
    r["xla_bytes_per_ideal"] = r["xla"]["bytes"] / step.ideal_bytes
    # XLA visits the layer loop once; ×layers over-counts what lies outside it.
    r["xla_bytes_per_ideal_scaled"] = r["xla"]["bytes"] * step.loop_trips / step.ideal_bytes
  if topo.chip is not None:
    t_flops = r["flops"] / topo.per_device(topo.chip.peak_flops)
    t_bytes = r["bytes"] / topo.per_device(topo.chip.hbm_bandwidth)
    r["time_s"], r["bound"] = max((t_flops, "compute"), (t_bytes, "memory"))
  return r


_UNITS = dict(K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)


def _oom_figures(message: str, step) -> dict:
  """Memory figures of a program the compiler refused (RESOURCE_EXHAUSTED on HBM).

  Its message gives the program's whole footprint ("... HLO temporaries
  (353.40G) exceeds available HBM (95.74G)": measured on a program that fits
  one chip and not another, that figure is arguments + outputs + temporaries,
  not temporaries alone) or ("Used 120.5G of 95.74G hbm"); the arguments and
  outputs come from the abstract shapes, the temporaries are the rest.
  """
  if "RESOURCE_EXHAUSTED" not in message:
    raise PlanError(f"{step.name}: compile failed: {message.splitlines()[0][:300]}")
  num = lambda m: float(m.group(1)) * _UNITS[m.group(2)]
  args = plan_steps.device_bytes(step.args)
  needed = (re.search(r"HLO temporaries \(([\d.]+)([KMGT])", message)
            or re.search(r"Used ([\d.]+)([KMGT]) of", message))
  if not needed:
    raise PlanError(f"{step.name}: compile failed: {message.splitlines()[0][:300]}")
  temps = max(num(needed) - args - step.out_bytes, 0)
  return dict(arguments=args, outputs=step.out_bytes, alias=0, temps=temps, code=0,
              refused=message.splitlines()[0][:300])


def suggest(r, c, facts, topo, mesh_shape) -> str:
  """What to change when a step does not fit (each a config override or a bigger slice)."""
  over, tips = r["total"] - r["capacity"], []
  batch_axis = mesh_shape[0] * mesh_shape[1]
  if r["step"].startswith(("update", "logprob", "values")):
    if c.model.remat != "full":
      tips.append("model.remat=full")
    if c.model.attention == "dense":  # chunked, splash and auto keep no [T, T] scores
      tips.append("model.attention=auto")
    if not c.model.logits_chunk and r["step"] != "values":
      tips.append("model.logits_chunk=1024")
    micro = c.rl.micro_batch_size or c.rl.minibatch_size or facts["geometry"]["rows"]
    if micro > batch_axis and r["temps"] > over:
      tips.append(f"rl.micro_batch_size={max(batch_axis, micro // 2)}")
  else:
    # The page pool (and the decode call's gathered pages, capped at 2x the pool)
    # scale with sampling.kv_tokens: shrink it to fit, with a 10% margin.
    pooled = r["kv_cache"] + r["temps"]
    room = 0.9 * r["capacity"] - (r["total"] - pooled)
    if room > 0 and pooled > 0:
      tokens = int(facts["kv_tokens"] * room / pooled) // 1024 * 1024
      if tokens >= 1024:
        tips.append(f"sampling.kv_tokens={tokens} (now {facts['kv_tokens']}; fewer live tokens, "
                    "more preemption)")
    rows = facts["geometry"]["rows"]
    # Everything but the params and the optimizer state scales with the rollout rows.
    fixed = r["params"] + r["optimizer"]
    if r["total"] - fixed > over and c.data.prompts_per_step > 1:
      scale = max((r["capacity"] - fixed) / (r["total"] - fixed), 0.0)
      p = c.data.prompts_per_step
      while p > 1 and p / c.data.prompts_per_step > scale:
        p //= 2
      if p / c.data.prompts_per_step <= scale and p * c.rollout.group_size % batch_axis == 0:
        tips.append(f"data.prompts_per_step={p} "
                    f"(rollout rows {rows} -> {p * c.rollout.group_size})")
  if topo.chip is not None:
    need = topo.num_chips * r["total"] / (0.9 * r["capacity"])
    gen = topo.name.split("-")[0]
    bigger = [n for n in hardware.known_names() if n.startswith(gen + "-")
              and hardware.TOPOLOGIES[n] and _chips(n) >= need and _chips(n) > topo.num_chips]
    if bigger:
      tips.append(f"a bigger slice, about {bigger[0]} (estimate: memory / chips; re-plan it)")
  return ", or ".join(tips) if tips else "no config change found; a bigger slice"


def _chips(name) -> int:
  return math.prod(int(x) for x in hardware.TOPOLOGIES[name][1].split("x"))


def verdict(r) -> str:
  pct = 100 * r["total"] / r["capacity"]
  if r["fits"]:
    return f"fits, {pct:.0f}% of {'HBM' if r['capacity_source'] == 'HBM' else 'memory'}"
  return (f"does not fit: needs {r['total'] / GIB:.1f} GiB of {r['capacity'] / GIB:.1f} GiB; "
          f"try {r['suggestion']}")


def plan_topology(c, name: str, prompt_len: int = None, model_dir: str = None,
                  steps=None, log=print, effort: float = 0.0) -> dict:
  """Plans config `c` on topology `name`; returns the JSON-able result."""
  before = jax.config.jax_exec_time_optimization_effort
  jax.config.update("jax_exec_time_optimization_effort", effort)
  try:
    return _plan_topology(c, name, prompt_len, model_dir, steps, log)
  finally:
    jax.config.update("jax_exec_time_optimization_effort", before)


def _plan_topology(c, name, prompt_len, model_dir, steps, log) -> dict:
  # SimpleRL prompts bucket to 1024 columns in a 128-prompt batch; the demo's are short.
  prompt_len = prompt_len or (1024 if c.model.path else 64)
  topo = hardware.get(name)
  mesh_shape = check_mesh(c, topo)
  try:
    config_validation.validate(c, len(topo.devices), platform=topo.devices[0].platform)
  except ConfigError as e:
    rows = mesh_shape[0] * mesh_shape[1]
    if "divisible by the data×fsdp mesh size" in str(e) and c.rl.micro_batch_size:
      # The usual case: a micro-batch sized for a smaller slice.
      raise ConfigError(
          f"{e} On {topo.name}: try --config.rl.micro_batch_size={rows}, or put devices on "
          f"the tensor axis: "
          f"--config.mesh_shape=\"(1,{math.gcd(rows, c.rl.micro_batch_size)},-1)\"."
      ) from None
    raise
  model_cfg = model_config(c, model_dir, topo.devices[0].platform)
  mesh, rollout_mesh = specs.make_meshes(c, topo.devices)
  capacity, cap_what = cap = _capacity(topo)
  if c.rl.micro_batch_size == "auto":   # what mars.train would choose on this slice
    c = copy.deepcopy(c)
    c.rl.micro_batch_size = auto_micro_batch.resolve(c, model_cfg, mesh, capacity, prompt_len)
    log(f"{topo.name}: rl.micro_batch_size=auto -> {c.rl.micro_batch_size}")
  built, facts = plan_steps.build(c, model_cfg, mesh, prompt_len, rollout_mesh=rollout_mesh)
  unknown = set(steps or ()) - {s.name.split("+")[0] for s in built} - {"values"}
  if unknown:
    raise PlanError(f"unknown step(s) {sorted(unknown)}; steps: update, logprob, values, "
                    f"prefill, decode.")
  built = [s for s in built if not steps or s.name.split("+")[0] in steps]
  results = []
  for step in built:
    r = analyze(step, topo, cap)
    if not r["fits"]:
      r["suggestion"] = suggest(r, c, facts, topo, mesh_shape)
    r["verdict"] = verdict(r)
    results.append(r)
  out = dict(topology=topo.name, effort=jax.config.jax_exec_time_optimization_effort,
             devices=len(topo.devices), chips=topo.num_chips,
             hosts=topo.num_hosts, mesh=dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
             rollout_mesh=(dict(rollout_mesh.shape) if rollout_mesh is not mesh else None),
             chip=(topo.chip.__dict__ if topo.chip else None), capacity=capacity,
             capacity_source=cap_what, facts=facts, steps=results)
  log(format_table(out))
  return out


def format_table(p) -> str:
  chip = p["chip"]
  head = (f"{chip['name']}: {chip['hbm_bytes'] / GIB:.0f} GiB HBM, "
          f"{chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bandwidth'] / 1e9:.0f} GB/s "
          f"per chip" if chip else
          f"{p['capacity_source']} {p['capacity'] / GIB:.1f} GiB per device")
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  if p.get("rollout_mesh"):  # a split run: prefill and decode are on the rollout group's devices
    mesh += " + rollout group " + " ".join(f"{k}={v}" for k, v in p["rollout_mesh"].items())
  lines = [f"== {p['topology']}: {p['devices']} devices on {p['chips']} chips, {p['hosts']} "
           f"host(s), mesh {mesh} ({head})",
           "per device, GiB:                 params  optim  kv  temps other  total  %cap | "
           "TFLOP(src)    GB(src)  time_ms bound   compile_s"]
  for r in p["steps"]:
    g = lambda k: r.get(k, 0) / GIB
    t = f"{r['time_s'] * 1e3:8.1f} {r['bound']:7s}" if "time_s" in r else f"{'-':>8s} {'':7s}"
    lines.append(
        f"{r['step']:15s} {g('params'):6.1f} {g('optimizer'):6.1f} {g('kv_cache'):5.1f} "
        f"{g('temps'):6.1f} {g('other'):5.1f} {g('total'):6.1f} "
        f"{100 * r['total'] / r['capacity']:4.0f}% | "
        f"{r['flops'] / 1e12:8.2f}({r['flops_source'][0]}) "
        f"{r['bytes'] / 1e9:8.2f}({r['bytes_source'][0]}) "
        f"{t} {r['compile_s']:6.1f}")
  for r in p["steps"]:
    lines.append(f"  {r['step']}: {r['shape']}; XLA flops/analytic {r['flops_ratio']:.2g} "
                 f"(loop trips {r['loop_trips']})"
                 + (f"; decode bytes/ideal {r['bytes_per_ideal']:.2f}" if "bytes_per_ideal" in r
                    else "")
                 + (f" (XLA's count {r['xla_bytes_per_ideal']:.2f}, × layers "
                    f"{r['xla_bytes_per_ideal_scaled']:.2f})"
                    if "bytes_per_ideal" in r and r["xla"]["bytes"] else ""))
  lines += [f"{r['step']}: {r['verdict']}" for r in p["steps"]]
  return "\n".join(lines)


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  spec = FLAGS.topology or ("v5p-8" if hardware.has_libtpu() else hardware.LOCAL)
  plans, t0 = [], time.perf_counter()
  try:
    names = hardware.parse_names(spec)
    if not hardware.has_libtpu() and names == [hardware.LOCAL]:
      print("mars.plan: planning for the local devices; for TPU slices "
            "pip install -e \".[tpu]\" and pass --topology=v5p-8,...", file=sys.stderr)
    for name in names:
      plans.append(plan_topology(FLAGS.config, name, FLAGS.prompt_len, FLAGS.model_dir,
                                 FLAGS.steps, effort=FLAGS.effort))
  except (hardware.TopologyError, PlanError, ConfigError, ShardingError, FileNotFoundError,
          UnsupportedConfigError, ValueError) as e:
    print(f"mars.plan: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"plan took {time.perf_counter() - t0:.0f} s")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(plans, f, indent=1, default=str)
  if not all(r["fits"] for p in plans for r in p["steps"]):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
