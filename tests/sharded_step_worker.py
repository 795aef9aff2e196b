"""Sharded vs unsharded train step on 8 virtual CPU devices (run by tests/test_step.py).

Runs in its own process because the device count is fixed when JAX starts:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_worker.py
Prints one JSON line: max |Δparams| per mesh, whether params are really split.
"""
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mars import config as mars_config  # noqa: E402
from mars import sharding  # noqa: E402
from mars.rl import critic as critic_lib  # noqa: E402
from mars.rl import optim  # noqa: E402
from mars.rl import step as step_lib  # noqa: E402

def _load_test_module():
  # By path: a stray top-level `tests` package in site-packages must not shadow ours.
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_step.py")
  spec = importlib.util.spec_from_file_location("mars_test_step", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_t = _load_test_module()
RL_CFG, TINY, make_batch = _t.RL_CFG, _t.TINY, _t.make_batch

ROWS, MINIBATCH, MICRO = 32, 16, 8
# Large Adam eps keeps the update a smooth function of the gradient, so the
# (legitimately) different reduction order of a sharded matmul can't flip the
# sign of a near-zero gradient into a ±lr difference.
OPT = mars_config.optimizer_config(lr=1e-2, eps=1e-4, weight_decay=0.01, grad_clip=1.0)


def run(mesh, packing=False):
  params = jax.tree.map(jnp.asarray, PARAMS_HOST)
  opt, copt = optim.make_optimizer(OPT), optim.make_optimizer(OPT)
  critic = critic_lib.init_critic(params, TINY, jax.random.key(1), head_std=0.02)
  state = step_lib.init_train_state(params, opt, critic, copt)
  shardings = None
  if mesh is not None:
    shardings = step_lib.train_state_shardings(TINY, mesh, opt, copt)
    state = jax.device_put(state, shardings)
  cfg = dict(RL_CFG, micro_batch_size=MICRO, packing=packing)
  train_step = step_lib.make_train_step(TINY, cfg, opt, copt, mesh, shardings)
  batch, adv, ret = BATCH
  state, metrics = step_lib.ppo_epochs(train_step, state, batch, adv, ret, num_epochs=1,
                                       minibatch_size=MINIBATCH, key=jax.random.key(7))
  return state, metrics


def main():
  global PARAMS_HOST, BATCH
  from mars.models import init_params
  PARAMS_HOST = jax.device_get(init_params(TINY, jax.random.key(0)))
  BATCH = make_batch(ROWS, seed=3)
  ref_state, ref_metrics = run(None)
  ref = jax.device_get((ref_state.params, ref_state.critic_params))
  out = {"devices": jax.device_count(), "ref_loss": ref_metrics["loss"]}
  runs = {"fsdp2_tensor4": ((1, 2, 4), False), "data8": ((8, 1, 1), False),
          # Sequence packing (mars/rl/seq_pack.py): packed rows over data×fsdp.
          "data4_fsdp2_packed": ((4, 2, 1), True)}
  for name, (shape, packing) in runs.items():
    mesh = sharding.make_mesh(shape)
    state, metrics = run(mesh, packing)
    got = jax.device_get((state.params, state.critic_params))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got, ref))
    q = state.params["layers"]["q"]
    out[name] = {
        "max_param_diff": max(diffs),
        "loss_diff": abs(metrics["loss"] - ref_metrics["loss"]),
        "grad_norm_diff": abs(metrics["grad_norm"] - ref_metrics["grad_norm"]),
        "q_spec": str(q.sharding.spec),
        "q_global_shape": list(q.shape),
        "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "critic_kernel_spec": str(state.critic_params["value_head"]["kernel"].sharding.spec),
        "num_updates": metrics["num_updates"],
        "skipped_updates": metrics["skipped_updates"],
        "pack_efficiency": metrics.get("pack_efficiency"),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
