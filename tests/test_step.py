"""The jitted update step on a tiny random Qwen: learning direction, accumulation,
non-finite guard, sharding (8 virtual devices, in a subprocess), critic, recompute."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars import config as mars_config
from mars.batch import empty_batch, positions_from_mask
from mars.models import init_params, tiny_config, token_logprobs
from mars.rl import critic as critic_lib
from mars.rl import optim
from mars.rl import step as step_lib
from mars.rl import micro as micro_lib

TINY = tiny_config("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
T = 16
RL_CFG = mars_config.rl_config(eps_low=0.2, eps_high=0.28, kl_coef=0.01, kl_kind="k3",
                               entropy_coef=0.01, agg_mode="token-mean", value_clip=0.2,
                               vf_coef=1.0)
# eps=1e-4: a smooth Adam step, so reduction-order noise can't flip near-zero gradients.
OPT = mars_config.optimizer_config(lr=1e-2, eps=1e-4, weight_decay=0.01, grad_clip=1.0)


def make_batch(rows: int, seed: int = 0, params=None):
  """Ragged rows: left-padded prompt, response with an injected feedback span, right padding.

  Returns (RolloutBatch, advantages [B, T], returns [B, T]); old/ref logp are the
  logprobs under `params` (or small noise without params).
  """
  rng = np.random.default_rng(seed)
  b = empty_batch(rows, T)
  tokens = rng.integers(0, TINY.vocab_size, (rows, T)).astype(np.int32)
  attn = np.zeros((rows, T), bool)
  loss = np.zeros((rows, T), bool)
  transparent = np.zeros((rows, T), bool)
  prompt_end = 5
  for r in range(rows):
    start = rng.integers(0, 3)              # left padding
    end = T - rng.integers(0, 3)            # right padding
    attn[r, start:end] = True
    loss[r, prompt_end:end] = True
    if r % 2:                               # feedback turn inside the response
      transparent[r, 8:10] = True
      loss[r, 8:10] = False
  tokens = np.where(attn, tokens, 0)
  old = np.zeros((rows, T), np.float32)
  if params is not None:
    old = np.asarray(token_logprobs(TINY, params, jnp.asarray(tokens), jnp.asarray(attn),
                                    positions_from_mask(attn)))
  ref = old + rng.normal(0, 0.05, (rows, T)).astype(np.float32)
  b = b.replace(tokens=tokens, attention_mask=attn, positions=np.asarray(positions_from_mask(attn)),
                loss_mask=loss, transparent_mask=transparent, old_logp=old, ref_logp=ref,
                behaviour_logp=old, values=np.where(loss, rng.normal(0, 0.1, (rows, T)), 0).astype(np.float32),
                reward=rng.normal(size=rows).astype(np.float32),
                is_off_policy=(np.arange(rows) % 4 == 3))
  adv = np.where(loss, rng.normal(size=(rows, T)), 0).astype(np.float32)
  ret = np.where(loss, rng.uniform(-0.5, 0.5, (rows, T)), 0).astype(np.float32)
  return jax.tree.map(jnp.asarray, (b, adv, ret))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _mean_logp(params, batch):
  logp = token_logprobs(TINY, params, batch.tokens, batch.attention_mask, batch.positions)
  return float(jnp.sum(jnp.where(batch.loss_mask, logp, 0)) / jnp.sum(batch.loss_mask))


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """Tiny programs: XLA's optimisation passes cost more than they save (~2x faster tests)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module", autouse=True)
def sharded_check():
  """The 8-virtual-device comparison (tests/sharded_step_worker.py) in a fresh process.

  The device count is fixed when JAX starts, hence the subprocess. It starts with
  the module: XLA compiles are single-threaded, so it overlaps with the tests
  below on the second core; test_sharded_step_matches_unsharded collects it.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, os.path.join(root, "tests", "sharded_step_worker.py")],
                          cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  yield proc
  if proc.poll() is None:  # test deselected or failed early: don't leave it running.
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def params():
  return init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def opt():
  return optim.make_optimizer(OPT)


@pytest.fixture(scope="module")
def policy_step(opt):
  """Policy-only step, 2 micro-batches of 4 (compiled once, shared by several tests)."""
  return step_lib.make_train_step(TINY, dict(RL_CFG, micro_batch_size=4), opt)


@pytest.fixture(scope="module")
def batch(params):
  return make_batch(8, seed=1, params=params)


def _run(train_step, params, opt, batch, adv, ret, steps, critic=None, critic_opt=None):
  state = step_lib.init_train_state(_copy(params), opt, _copy(critic) if critic else None,
                                    critic_opt)
  history = []
  for _ in range(steps):
    state, metrics = train_step(state, batch, adv, ret)
    history.append(jax.device_get(metrics))
  return state, history


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_moves_logprob(policy_step, params, opt, batch, sign):
  b, _, ret = batch
  adv = jnp.where(b.loss_mask, sign, 0.0)
  state, history = _run(policy_step, params, opt, b, adv, ret, steps=4)
  before, after = _mean_logp(params, b), _mean_logp(state.params, b)
  assert sign * (after - before) > 0.05, (before, after)
  assert all(h["skipped"] == 0 for h in history)


def test_grad_accumulation_matches_one_batch(policy_step, params, opt, batch):
  b, adv, ret = batch
  one = step_lib.make_train_step(TINY, dict(RL_CFG, micro_batch_size=None), opt)
  s2, m2 = _run(policy_step, params, opt, b, adv, ret, steps=1)
  s1, m1 = _run(one, params, opt, b, adv, ret, steps=1)
  for key in ("loss", "grad_norm", "pg_loss", "kl_loss", "entropy", "num_loss_tokens"):
    np.testing.assert_allclose(m2[0][key], m1[0][key], atol=1e-5, err_msg=key)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, c: jnp.max(jnp.abs(a - c)), s1.params, s2.params))
  assert max(float(d) for d in diffs) < 1e-5


def test_non_finite_skips_update(policy_step, params, opt, batch):
  b, adv, ret = batch
  state = step_lib.init_train_state(_copy(params), opt)
  before = jax.device_get((state.params, state.opt_state))
  bad_adv = adv.at[0, 6].set(jnp.nan)                       # inside loss_mask
  state, m = policy_step(state, b, bad_adv, ret)
  after = jax.device_get((state.params, state.opt_state))
  assert int(m["skipped"]) == 1 and int(m["skipped_updates"]) == 1
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # bit-exact
  bad_batch = b.replace(old_logp=b.old_logp.at[1, 7].set(jnp.nan))  # (inf is clamped: finite)
  state, m = policy_step(state, bad_batch, adv, ret)
  assert int(state.skipped_updates) == 2 and int(state.step) == 2
  assert jax.tree.all(jax.tree.map(lambda x: bool(np.isfinite(x).all()), state.params))
  # Garbage *outside* the loss mask (padding / feedback tokens) must not leak in.
  outside = ~b.loss_mask
  noisy = b.replace(old_logp=jnp.where(outside, -jnp.inf, b.old_logp),
                    ref_logp=jnp.where(outside, jnp.nan, b.ref_logp))
  state, m = policy_step(state, noisy, jnp.where(outside, jnp.nan, adv), ret)
  assert int(m["skipped"]) == 0 and int(state.skipped_updates) == 2
  assert np.isfinite(float(m["loss"]))


def test_feedback_tokens_excluded(policy_step, params, opt, batch):
  b, adv, ret = batch
  assert int(jnp.sum(b.transparent_mask)) > 0
  assert not bool(jnp.any(b.transparent_mask & b.loss_mask))
  # Advantages on feedback tokens are irrelevant to the update.
  loud = jnp.where(b.transparent_mask, 1e6, adv)
  s1, m1 = _run(policy_step, params, opt, b, adv, ret, steps=1)
  s2, m2 = _run(policy_step, params, opt, b, loud, ret, steps=1)
  assert m1[0]["loss"] == m2[0]["loss"] and m1[0]["transparent_in_loss_mask"] == 0
  assert jax.tree.all(jax.tree.map(lambda a, c: bool(jnp.array_equal(a, c)), s1.params, s2.params))


def test_critic_value_loss_decreases(params, opt, batch):
  b, adv, ret = batch
  copt = optim.make_optimizer(mars_config.optimizer_config(lr=3e-3, grad_clip=1.0))
  critic = critic_lib.init_critic(params, TINY, jax.random.key(1))
  train_step = step_lib.make_train_step(TINY, dict(RL_CFG, value_clip=None), opt, copt)
  state, history = _run(train_step, params, opt, b, adv, ret, steps=6, critic=critic,
                        critic_opt=copt)
  vf = [h["vf_loss"] for h in history]
  assert vf[-1] < 0.5 * vf[0], vf
  assert int(state.skipped_updates) == 0
  # The value recompute matches the critic's forward, micro-batched.
  values = micro_lib.compute_values(TINY, state.critic_params, b, micro_batch_size=2)
  direct = critic_lib.critic_values(TINY, state.critic_params, b.tokens, b.attention_mask,
                                    b.positions)
  np.testing.assert_allclose(values, direct, atol=1e-5)


def test_logprob_recompute_matches_token_logprobs(params, batch):
  b, _, _ = batch
  got = micro_lib.compute_logprobs(TINY, params, b, micro_batch_size=2)
  want = token_logprobs(TINY, params, b.tokens, b.attention_mask, b.positions)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_schedule_warmup_cosine():
  sched = optim.make_schedule(mars_config.optimizer_config(
      lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1))
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  # delay: lr 0 first (the PPO actor waits for the critic), then the same
  # warmup + cosine, still ending at total_steps.
  delayed = optim.make_schedule(mars_config.optimizer_config(
      lr=1.0, warmup_steps=10, total_steps=110, delay_steps=20, schedule="cosine",
      min_lr_ratio=0.1))
  np.testing.assert_allclose([delayed(0), delayed(19), delayed(25), delayed(30), delayed(110)],
                             [0.0, 0.0, 0.5, 1.0, 0.1], atol=1e-6)
  const = optim.make_schedule(mars_config.optimizer_config(lr=2.0))
  assert float(const(0)) == float(const(1000)) == 2.0
  mask = optim.decay_mask({"embed": 0, "layers": {"q": 0, "q_bias": 0, "input_norm": 0}})
  assert mask == {"embed": True, "layers": {"q": True, "q_bias": False, "input_norm": False}}


def test_sharded_step_matches_unsharded(sharded_check):
  out, err = sharded_check.communicate(timeout=300)
  assert sharded_check.returncode == 0, err[-4000:]
  out = json.loads(out.strip().splitlines()[-1])
  assert out["devices"] == 8
  for name in ("fsdp2_tensor4", "data8", "data4_fsdp2_packed"):
    r = out[name]
    assert r["max_param_diff"] < 1e-5, (name, r)
    assert r["loss_diff"] < 1e-5 and r["grad_norm_diff"] < 1e-5, (name, r)
    assert r["num_updates"] == 2 and r["skipped_updates"] == 0
  assert out["data4_fsdp2_packed"]["pack_efficiency"] > 0   # it really ran packed
  # q [layers, embed, heads, head_dim]: embed over fsdp=2, heads over tensor=4.
  fsdp_tensor = out["fsdp2_tensor4"]
  assert fsdp_tensor["q_shard_shape"] == [TINY.num_layers, TINY.hidden_size // 2,
                                          TINY.num_heads // 4, TINY.head_dim], fsdp_tensor
  assert "fsdp" in fsdp_tensor["critic_kernel_spec"]
