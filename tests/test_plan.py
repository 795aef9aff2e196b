"""mars.plan: memory figures agree with the config's shapes and with a real compiled
step; an oversized config gets a "does not fit" line and a nonzero exit; bad input
gets one error line."""
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars import config as mars_config
from mars import hardware, plan, sharding
from mars.models import qwen

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny():
  return mars_config.load_config_file(str(CONFIGS / "tiny.py"))


def expected_param_bytes(model_cfg, mesh) -> int:
  """fp32 params per device, from the shapes and the logical rules' divisors."""
  total = 0
  axes = jax.tree.leaves(qwen.param_axes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
  shapes = jax.tree.leaves(qwen.param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
  for ax, shape in zip(axes, shapes):
    div = 1
    for a, dim in zip(ax, shape):
      size = sharding.mesh_axis_size(mesh, sharding.LOGICAL_RULES.get(a))
      div *= size if dim % size == 0 else 1
    total += math.prod(shape) * 4 // div
  return total


def test_tpu_plan_memory_matches_shapes():
  if not hardware.has_libtpu():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU topologies to plan.")
  c = tiny()
  c.model.scan_layers = True   # the demo unrolls its 2 layers; scanned, XLA counts one
  # effort=-1: a ~3x faster TPU compile; the figures checked here do not depend on it.
  p = plan.plan_topology(c, "v5p-8", steps=("update",), log=lambda s: None, effort=-1.0)
  assert p["devices"] == 4 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  r = p["steps"][0]
  model_cfg = plan.model_config(c)
  mesh = sharding.make_mesh((1, 4, 1), devices=hardware.get("v5p-8").devices)
  params = expected_param_bytes(model_cfg, mesh)
  assert params < model_cfg.num_params() * 4          # it is sharded
  assert r["params"] == params == p["facts"]["params"]
  # Adam: mu and nu like the params, plus a few replicated int32 step counters.
  assert 0 <= r["optimizer"] - 2 * params <= 64
  # The compiled program's arguments hold the train state and the minibatch; TPU
  # layouts pad minor dims to (8, 128) tiles, which inflates this tiny model's.
  assert r["xla"]["arguments"] >= r["params"] + r["optimizer"]
  assert r["capacity"] == 95 * 2 ** 30 and r["fits"] and r["verdict"].startswith("fits, ")
  assert r["time_s"] > 0 and r["flops_source"] == "analytic"   # the layer scan counted once


def test_local_plan_matches_real_compiled_step():
  from mars.rl import optim, step as step_lib
  from mars.trainer import specs
  c = tiny()
  p = plan.plan_topology(c, "local", steps=("update",), log=lambda s: None)
  r = p["steps"][0]
  assert p["devices"] == jax.device_count()
  # A real state on the same mesh, compiled through the same train step.
  model_cfg = plan.model_config(c)
  mesh = sharding.make_mesh(tuple(c.mesh_shape))
  policy_opt = optim.make_optimizer(specs.optim_config(c.actor_optim, c))
  state_sh = step_lib.train_state_shardings(model_cfg, mesh, policy_opt)
  params = qwen.init_params(model_cfg, jax.random.key(0))
  state = jax.device_put(step_lib.init_train_state(params, policy_opt), state_sh)
  real = sum(x.addressable_shards[0].data.nbytes
             for x in jax.tree.leaves((state.params, state.opt_state)))
  assert real == r["params"] + r["optimizer"]
  mb, T = c.rl.minibatch_size, p["facts"]["geometry"]["train_len"]
  from mars.batch import empty_batch
  batch = jax.device_put(empty_batch(mb, T), step_lib.batch_shardings(mesh))
  zeros = jax.device_put(jnp.zeros((mb, T), jnp.float32), sharding.batch_sharding(mesh, 2))
  train_step = step_lib.make_train_step(model_cfg, specs.rl_step_config(c), policy_opt, None, mesh,
                                        state_sh)
  mem = train_step.jitted.lower(state, batch, zeros, zeros).compile().memory_analysis()
  assert r["xla"]["temps"] == mem.temp_size_in_bytes
  assert r["xla"]["arguments"] == mem.argument_size_in_bytes
  # Donation is effective: every byte of the params and optimizer state is an
  # output aliased to its input (a leaf whose dtype changed would not be).
  assert mem.alias_size_in_bytes >= real
  modeled = r["total"] - r["other"]  # params + optimizer + temps (+ code)
  assert modeled <= mem.argument_size_in_bytes + mem.temp_size_in_bytes + (
      mem.output_size_in_bytes - mem.alias_size_in_bytes) + mem.generated_code_size_in_bytes


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "mars.plan", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=600)


def test_oversized_config_does_not_fit():
  out = _cli(f"--config={CONFIGS / 'tiny.py'}", "--topology=local", "--steps=prefill",
             "--config.data.prompts_per_step=4096", "--config.episode.budget=60000")
  assert out.returncode == 1, out.stderr[-2000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("prefill: ")][-1]
  assert line.startswith("prefill: does not fit: needs ") and "data.prompts_per_step=" in line


def test_unknown_topology_is_one_error_line():
  out = _cli(f"--config={CONFIGS / 'tiny.py'}", "--topology=v5p-7")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("mars.plan: error: unknown topology 'v5p-7'; known: local, ")
  assert "v5p-64" in last and "v6e-8" in last


def test_mesh_that_does_not_divide_names_the_axis():
  c = tiny()
  c.mesh_shape = (1, 3, 1)
  with pytest.raises(plan.PlanError, match=r"axis fsdp=3 does not divide the 8 devices of local"):
    plan.plan_topology(c, "local", log=lambda s: None)
  with pytest.raises(hardware.TopologyError, match="unknown topology 'tpu-8'"):
    hardware.parse_names("v5p-8,tpu-8")


def test_topology_names():
  assert hardware.parse_names("v5p-8, v6e-8") == ["v5p-8", "v6e-8"]
  assert hardware.TOPOLOGIES["v5p-64"] == ("v5p", "2x4x4")
  assert np.isclose(hardware.CHIPS["v6e"].peak_flops, 918e12)


def test_auto_micro_batch_is_the_largest_that_fits():
  """rl.micro_batch_size=auto on this machine's 8 CPU devices: with a capacity
  placed between two candidates' compiled needs, it picks the smaller one; with
  less than the smallest candidate needs, one error line names the fixes."""
  from mars.config_validation import ConfigError
  from mars.trainer import auto_micro_batch
  c = tiny()
  c.rl.micro_batch_size = "auto"
  model_cfg = plan.model_config(c)
  mesh = sharding.make_mesh((1, 8, 1))
  options = auto_micro_batch.candidates(c, mesh)
  assert options == [8, 16, 32, 64]      # divisors of the 64-row minibatch, multiples of 8
  need = {m: auto_micro_batch.update_bytes(c, model_cfg, mesh, 64, m) for m in options}
  assert all(need[a] < need[b] for a, b in zip(options, options[1:]))   # more rows, more bytes
  c.rl.auto_micro_batch_margin = 0.0
  capacity = (need[16] + need[32]) / 2
  assert auto_micro_batch.resolve(c, model_cfg, mesh, capacity, prompt_len=64) == 16
  assert auto_micro_batch.resolve(c, model_cfg, mesh, need[64], prompt_len=64) == 64
  c.rl.auto_micro_batch_margin = 0.5   # the margin is taken off the capacity
  assert auto_micro_batch.resolve(c, model_cfg, mesh, 2 * need[8], prompt_len=64) == 8
  with pytest.raises(ConfigError, match=r"^rl.micro_batch_size=auto: even micro batch 8 needs "
                     r".* GiB per device of .* GiB usable; set model.remat=full, .*fsdp axis"):
    auto_micro_batch.resolve(c, model_cfg, mesh, need[8], prompt_len=64)


def test_micro_batch_size_takes_auto_or_a_count_from_the_command_line():
  """`--config.rl.micro_batch_size=auto` reaches the resolver through the CLI (here
  mars.plan on the local devices: what mars.train would pick); a count still
  works; anything else is one error line."""
  from mars import config_validation
  cmd = [sys.executable, "-m", "mars.plan", f"--config={CONFIGS / 'tiny.py'}",
         "--topology=local", "--steps=update"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd + ["--config.rl.micro_batch_size=auto"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  # Host RAM is far more than the demo's update needs: the whole minibatch (64 rows).
  assert "local: rl.micro_batch_size=auto -> 64" in out.stdout, out.stdout
  assert "micro 64" in out.stdout
  out = subprocess.run(cmd + ["--config.rl.micro_batch_size=16"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 0 and "micro 16" in out.stdout, out.stderr[-2000:]
  c = tiny()
  c.rl.micro_batch_size = "half"
  with pytest.raises(config_validation.ConfigError,
                     match=r'rl.micro_batch_size must be a row count >= 0 .* or "auto", got \'half\''):
    config_validation.validate(c, 1)


def test_update_that_does_not_fit_suggests_the_memory_options():
  """The demo's update planned at 4096 prompts a step on the local devices: over
  the host's memory, the verdict names remat, flash attention (auto) and logits."""
  out = _cli(f"--config={CONFIGS / 'tiny.py'}", "--topology=local", "--steps=update",
             "--config.data.prompts_per_step=4096", "--config.rl.minibatch_size=0",
             "--config.episode.budget=4000")
  assert out.returncode == 1, out.stderr[-2000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("update: ")][-1]
  assert line.startswith("update: does not fit: needs "), line
  for tip in ("model.remat=full", "model.attention=auto", "model.logits_chunk=1024"):
    assert tip in line, line


def test_split_rollout_group_plans_the_sampler_on_its_own_devices():
  """rollout.devices=4 of 8: the update compiles on the trainer's 4 (fsdp), the
  decode on the rollout group's 4 (data), which hold the sampler's params copy and
  the KV pool but none of the train state."""
  c = tiny()
  c.rollout.staleness, c.rl.recompute_old_logp, c.rollout.devices = 1, True, 4
  p = plan.plan_topology(c, "local", steps=("update", "decode"), log=lambda s: None)
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert p["rollout_mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  update, decode = p["steps"]
  model_cfg = plan.model_config(c)
  devices = jax.devices()
  assert update["params"] == expected_param_bytes(model_cfg, sharding.make_mesh((1, 4, 1),
                                                                                devices[:4]))
  # Replicated over the group's data axis: the whole compute copy on each device.
  assert decode["params"] == model_cfg.num_params() * jnp.dtype(model_cfg.dtype).itemsize
  assert decode.get("optimizer", 0) == 0 and decode["kv_cache"] > 0
  assert "rollout group data=4" in plan.format_table(p)
