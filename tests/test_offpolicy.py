"""Rollout correction (TIS / MIS / IcePop), GSPO and CISPO against plain numpy loops.

Hand-built arrays, one token at a time; gradients by central differences of a
float64 numpy reference; the identities the issue names (ρ ≡ 1 is a no-op,
one-token GSPO is PPO-clip, CISPO keeps gradients PPO-clip zeroes); one-line
config errors.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars import config as mars_config
from mars import config_validation
from mars.rl import correction, losses

CLAMP = 20.0


# ----------------------------------------------------------------------------
# numpy references.

def np_weights(trainer, sampler, mask, method, level="token", seq_ratio="geometric",
               tis_cap=2.0, mis_lo=0.5, mis_hi=2.0, icepop_alpha=0.5, icepop_beta=5.0):
  """(weight, masked, truncated) token by token."""
  B, T = mask.shape
  w = np.zeros((B, T))
  masked = np.zeros((B, T), bool)
  trunc = np.zeros((B, T), bool)
  for b in range(B):
    toks = [t for t in range(T) if mask[b, t]]
    logs = {t: float(np.clip(float(trainer[b, t]) - float(sampler[b, t]), -CLAMP, CLAMP))
            for t in toks}
    if level == "sequence" and toks:
      total = sum(logs.values())
      seq = np.clip(total, -CLAMP, CLAMP) if seq_ratio == "product" else total / len(toks)
      logs = {t: seq for t in toks}
    for t in toks:
      rho = np.exp(logs[t])
      if method == "none":
        w[b, t] = 1.0
      elif method == "tis":
        w[b, t] = min(rho, tis_cap)
        trunc[b, t] = rho > tis_cap
      elif method == "mis":
        w[b, t] = rho if mis_lo <= rho <= mis_hi else 0.0
      else:
        w[b, t] = 1.0 if icepop_alpha <= rho <= icepop_beta else 0.0
      masked[b, t] = w[b, t] == 0.0
  return w, masked, trunc


def np_token_loss(loss_type, logp, old, adv, eps_low, eps_high, seq_log=None, cispo=(1.0, 5.0)):
  """Loss of one on-policy token (the value; gradients come by finite differences)."""
  if loss_type == "ppo":
    r = np.exp(np.clip(logp - old, -CLAMP, CLAMP))
    return max(-adv * r, -adv * min(max(r, 1 - eps_low), 1 + eps_high))
  if loss_type in ("gspo", "gspo_token"):
    s = np.exp(seq_log)
    return max(-adv * s, -adv * min(max(s, 1 - eps_low), 1 + eps_high))
  raise ValueError(loss_type)


def np_policy_loss(logp, old, adv, mask, off, weight, loss_type="ppo", eps_low=0.2, eps_high=0.2,
                   gamma=0.1, agg_mode="token-mean", cispo_w=None, frozen_logp=None):
  """Mixed loss with a per-token weight; `cispo_w` freezes CISPO's stop-gradient weight,
  `frozen_logp` GSPO-token's stop-gradient sequence ratio (s_{i,t} = sg(s_i)·π/sg(π))."""
  B, T = logp.shape
  per = np.zeros((B, T))
  for b in range(B):
    toks = [t for t in range(T) if mask[b, t]]
    src = logp if frozen_logp is None else frozen_logp
    seq_log = (sum(np.clip(src[b, t] - old[b, t], -CLAMP, CLAMP) for t in toks) / len(toks)
               if toks else 0.0)
    for t in toks:
      if off[b]:
        r = np.exp(np.clip(logp[b, t] - old[b, t], -CLAMP, CLAMP))
        per[b, t] = -adv[b, t] * r / (r + gamma)
      elif loss_type == "cispo":
        r = np.exp(np.clip(logp[b, t] - old[b, t], -CLAMP, CLAMP))
        w = min(max(r, 1 - eps_low), 1 + eps_high) if cispo_w is None else cispo_w[b, t]
        per[b, t] = -w * adv[b, t] * logp[b, t]
      else:
        tok_log = seq_log if frozen_logp is None else seq_log + logp[b, t] - frozen_logp[b, t]
        per[b, t] = np_token_loss(loss_type, logp[b, t], old[b, t], adv[b, t], eps_low,
                                  eps_high, tok_log)
      per[b, t] *= weight[b, t]
  if agg_mode == "token-mean":
    return sum(per[b, t] for b in range(B) for t in range(T) if mask[b, t]) / max(mask.sum(), 1)
  seqs = [np.mean([per[b, t] for t in range(T) if mask[b, t]]) for b in range(B) if mask[b].any()]
  return sum(seqs) / max(len(seqs), 1)


def hand_batch():
  """4 rows × 6 columns; row 2 is an LTE (off-policy) row, row 3 is short."""
  mask = np.array([[0, 1, 1, 1, 1, 0],
                   [0, 1, 1, 1, 1, 1],
                   [0, 0, 1, 1, 1, 0],
                   [0, 1, 0, 0, 0, 0]], bool)
  # log ρ = trainer − sampler, hand-picked on both sides of every threshold.
  log_rho = np.log(np.array([[1, 0.3, 1.0, 2.5, 6.0, 1],
                             [1, 0.9, 1.1, 1.9, 0.45, 1.05],
                             [1, 1, 4.0, 0.6, 1.2, 1],
                             [1, 7.0, 1, 1, 1, 1]]))
  rng = np.random.default_rng(0)
  sampler = rng.uniform(-3, -0.1, mask.shape).astype(np.float32)
  trainer = (sampler + log_rho).astype(np.float32)
  off = np.array([0, 0, 1, 0], bool)
  return trainer, sampler, mask, off


CORR_CASES = [
    dict(method="tis"), dict(method="tis", tis_cap=1.5),
    dict(method="tis", level="sequence"), dict(method="tis", level="sequence", seq_ratio="product"),
    dict(method="mis"), dict(method="mis", level="sequence", mis_lo=0.8, mis_hi=1.25),
    dict(method="mis", level="sequence", seq_ratio="product", mis_lo=0.5, mis_hi=3.0),
    dict(method="icepop"), dict(method="icepop", icepop_alpha=0.8, icepop_beta=2.0),
]


@pytest.mark.parametrize("case", CORR_CASES)
def test_rollout_weights_match_numpy(case):
  trainer, sampler, mask, off = hand_batch()
  w, masked, trunc = jax.jit(functools.partial(correction.rollout_weights, **case))(
      trainer, sampler, mask)
  want_w, want_masked, want_trunc = np_weights(trainer, sampler, mask, **case)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(masked, want_masked)
  np.testing.assert_array_equal(trunc, want_trunc)
  assert not np.any(np.asarray(w)[~mask])  # nothing outside the trained tokens
  if case["method"] == "tis":
    assert want_trunc.any() and not want_masked.any()
  else:
    assert want_masked.any() and want_masked.sum() < mask.sum()  # some kept, some dropped


def test_mismatch_metrics_match_numpy():
  trainer, sampler, mask, off = hand_batch()
  _, masked, trunc = np_weights(trainer, sampler, mask, "tis", tis_cap=2.0)
  got = correction.mismatch_metrics(trainer, sampler, mask, off, masked=masked, truncated=trunc)
  rho_on, rho_h = [], []
  for b in range(4):
    for t in range(6):
      if mask[b, t]:
        (rho_h if off[b] else rho_on).append(np.exp(float(trainer[b, t]) - float(sampler[b, t])))
  rho_all = np.array(rho_on + rho_h)
  want = {
      "rho_mean_on": np.mean(rho_on), "rho_max_on": np.max(rho_on),
      "rho_mean_hinted": np.mean(rho_h), "rho_max_hinted": np.max(rho_h),
      "log_rho_mean_on": np.mean(np.log(rho_on)), "log_rho_absmax_on": np.max(np.abs(np.log(rho_on))),
      "log_rho_mean_hinted": np.mean(np.log(rho_h)),
      "kl_k1": np.mean(-np.log(rho_all)), "kl_k3": np.mean(rho_all - 1 - np.log(rho_all)),
      "token_truncated_frac": trunc.sum() / mask.sum(),
      "seq_truncated_frac": np.mean([trunc[b].any() for b in range(4)]),
      "token_masked_frac": 0.0, "seq_masked_frac": 0.0,
  }
  for k, v in want.items():
    np.testing.assert_allclose(got["rollout_corr/" + k], v, rtol=1e-4, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------
# Losses with a correction, GSPO, CISPO.

def _loss(logp, old, adv, mask, off, weight=None, **kw):
  return losses.policy_loss(logp, old, adv, mask, off, rollout_weight=weight, **kw)


def _case_arrays(seed=1, B=5, T=7):
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, T), bool)
  for b in range(B):
    mask[b, 1:rng.integers(2, T + 1)] = True
  logp = rng.uniform(-2.5, -0.05, (B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
  adv = np.where(mask, rng.normal(size=(B, T)), 0).astype(np.float32)
  off = np.array([0, 1, 0, 0, 0][:B], bool)
  return logp, old, adv, mask, off


LOSS_CASES = [
    dict(loss_type="ppo", agg_mode="token-mean"),
    dict(loss_type="gspo", agg_mode="seq-mean-token-mean", eps=(0.05, 0.08)),
    dict(loss_type="gspo_token", agg_mode="seq-mean-token-mean", eps=(0.05, 0.08)),
    dict(loss_type="cispo", agg_mode="token-mean", eps=(1.0, 0.3)),
]


def _kw(case):
  lt, eps = case["loss_type"], case.get("eps", (0.2, 0.2))
  kw = dict(loss_type=lt, agg_mode=case["agg_mode"])
  if lt == "ppo":
    kw.update(eps_low=eps[0], eps_high=eps[1])
  elif lt.startswith("gspo"):
    kw.update(gspo_eps_low=eps[0], gspo_eps_high=eps[1])
  else:
    kw.update(cispo_eps_low=eps[0], cispo_eps_high=eps[1])
  return kw, eps


@pytest.mark.parametrize("method", ["none", "tis", "mis", "icepop"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["loss_type"])
def test_corrected_loss_matches_numpy(case, method):
  logp, old, adv, mask, off = _case_arrays()
  sampler = (old + np.random.default_rng(2).normal(0, 0.6, old.shape)).astype(np.float32)
  level = "sequence" if case["loss_type"] == "gspo" and method != "icepop" else "token"
  w, _, _ = correction.rollout_weights(old, sampler, mask, method=method, level=level)
  kw, eps = _kw(case)
  loss, metrics = jax.jit(functools.partial(_loss, **kw))(logp, old, adv, mask, off, w)
  want = np_policy_loss(logp, old, adv, mask, off, np.asarray(w), case["loss_type"], eps[0],
                        eps[1], agg_mode=case["agg_mode"])
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["loss_type"])
def test_corrected_loss_grad_matches_finite_differences(case):
  """d loss / d logp (TIS weights on) vs central differences of the float64 numpy loop."""
  logp, old, adv, mask, off = _case_arrays(seed=5, B=4, T=5)
  sampler = (old + np.random.default_rng(6).normal(0, 0.6, old.shape)).astype(np.float32)
  level = "sequence" if case["loss_type"] == "gspo" else "token"
  w = np.asarray(correction.rollout_weights(old, sampler, mask, method="tis", level=level,
                                            tis_cap=1.3)[0])
  kw, eps = _kw(case)
  grad = jax.grad(lambda lp: _loss(lp, old, adv, mask, off, w, **kw)[0])(jnp.asarray(logp))
  cispo_w = None
  if case["loss_type"] == "cispo":  # the weight is stop-gradient: frozen at the base point
    cispo_w = np.clip(np.exp(logp.astype(np.float64) - old), 1 - eps[0], 1 + eps[1])
  h = 1e-5
  base = logp.astype(np.float64)
  fd = np.zeros(logp.shape)
  for idx in np.ndindex(*logp.shape):
    plus, minus = base.copy(), base.copy()
    plus[idx] += h
    minus[idx] -= h
    frozen = base if case["loss_type"] == "gspo_token" else None
    f = lambda x: np_policy_loss(x, old, adv, mask, off, w, case["loss_type"], eps[0], eps[1],
                                 agg_mode=case["agg_mode"], cispo_w=cispo_w, frozen_logp=frozen)
    fd[idx] = (f(plus) - f(minus)) / (2 * h)
  assert np.abs(fd).max() > 0.01
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("method", ["tis", "mis", "icepop"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["loss_type"])
def test_rho_one_is_the_uncorrected_loss_exactly(case, method, level):
  if method == "icepop" and level == "sequence":
    pytest.skip("IcePop is token-level")
  logp, old, adv, mask, off = _case_arrays(seed=7)
  w, masked, trunc = correction.rollout_weights(old, old, mask, method=method, level=level)
  assert not np.any(masked) and not np.any(trunc)
  kw, _ = _kw(case)
  f = lambda lp, wt: _loss(lp, old, adv, mask, off, wt, **kw)[0]
  base, corrected = f(logp, None), f(logp, w)
  assert float(base) == float(corrected)
  g0 = jax.grad(f)(jnp.asarray(logp), None)
  g1 = jax.grad(f)(jnp.asarray(logp), w)
  np.testing.assert_array_equal(g0, g1)


def test_gspo_on_one_token_sequences_is_ppo_clip():
  rng = np.random.default_rng(8)
  n = 64
  mask = np.zeros((n, 3), bool)
  mask[:, 1] = True
  logp = rng.uniform(-2, -0.1, (n, 3)).astype(np.float32)
  # Ratios across both clip edges of the (tight) GSPO range.
  old = (logp - rng.uniform(-1e-3, 1e-3, (n, 3))).astype(np.float32)
  adv = np.where(mask, rng.choice([-1.0, 1.0], (n, 3)) * rng.uniform(0.5, 2, (n, 3)),
                 0).astype(np.float32)
  off = np.zeros(n, bool)
  agg = dict(agg_mode="seq-mean-token-mean")
  ppo = lambda lp: _loss(lp, old, adv, mask, off, eps_low=3e-4, eps_high=4e-4, **agg)
  for lt in ("gspo", "gspo_token"):
    gspo = lambda lp: _loss(lp, old, adv, mask, off, loss_type=lt, **agg)
    (l0, m0), (l1, m1) = ppo(logp), gspo(logp)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert 0 < float(m0["clipfrac"]) < 1
    np.testing.assert_allclose(m1["clipfrac"], m0["clipfrac"])
    np.testing.assert_allclose(jax.grad(lambda x: gspo(x)[0])(jnp.asarray(logp)),
                               jax.grad(lambda x: ppo(x)[0])(jnp.asarray(logp)), rtol=1e-5,
                               atol=1e-9)


def test_gspo_token_equals_gspo_with_sequence_advantages_and_differs_per_token():
  logp, old, adv, mask, off = _case_arrays(seed=9)
  off = np.zeros_like(off)
  old = (logp + np.random.default_rng(1).normal(0, 0.02, logp.shape)).astype(np.float32)
  kw = dict(agg_mode="seq-mean-token-mean", gspo_eps_low=0.05, gspo_eps_high=0.05)
  seq_adv = np.where(mask, np.random.default_rng(3).normal(size=(mask.shape[0], 1)), 0)
  seq_adv = seq_adv.astype(np.float32)
  grads = {}
  for lt in ("gspo", "gspo_token"):
    for name, a in (("seq", seq_adv), ("tok", adv)):
      f = lambda lp: _loss(lp, old, a, mask, off, loss_type=lt, **kw)[0]
      grads[lt, name] = (float(f(logp)), np.asarray(jax.grad(f)(jnp.asarray(logp))))
  for name in ("seq", "tok"):  # same value either way
    np.testing.assert_allclose(grads["gspo", name][0], grads["gspo_token", name][0], rtol=1e-6)
  np.testing.assert_allclose(grads["gspo", "seq"][1], grads["gspo_token", "seq"][1], rtol=1e-4,
                             atol=1e-7)
  assert np.abs(grads["gspo", "tok"][1] - grads["gspo_token", "tok"][1]).max() > 1e-3


def test_cispo_keeps_gradients_that_ppo_clip_zeroes():
  # One-token rows; ratios 1.5 (A > 0) and 0.5 (A < 0) are outside PPO's [0.8, 1.2]
  # on the side where its min picks the constant: zero gradient there.
  ratios = np.array([1.5, 0.5, 1.0, 9.0], np.float32)
  adv = np.array([1.0, -1.0, 1.0, 1.0], np.float32)[:, None]
  logp = np.full((4, 1), -1.0, np.float32)
  old = (logp - np.log(ratios)[:, None]).astype(np.float32)
  mask, off = np.ones((4, 1), bool), np.zeros(4, bool)
  g_ppo = jax.grad(lambda lp: _loss(lp, old, adv, mask, off)[0])(jnp.asarray(logp))
  g_cis = jax.grad(lambda lp: _loss(lp, old, adv, mask, off, loss_type="cispo",
                                    cispo_eps_low=1.0, cispo_eps_high=2.0)[0])(jnp.asarray(logp))
  assert g_ppo[0, 0] == 0 and g_ppo[1, 0] == 0
  # CISPO: d/dlogp of −sg(ŵ)·A·logp, over 4 tokens (token-mean): −ŵ·A/4, ŵ = min(r, 3).
  np.testing.assert_allclose(np.asarray(g_cis)[:, 0], -np.minimum(ratios, 3.0) * adv[:, 0] / 4,
                             rtol=1e-6)
  assert np.all(np.asarray(g_cis) != 0)


def test_unknown_loss_type_and_dual_clip_with_gspo_raise():
  logp, old, adv, mask, off = _case_arrays()
  with pytest.raises(ValueError, match="unknown loss_type"):
    _loss(logp, old, adv, mask, off, loss_type="gpo")
  with pytest.raises(ValueError, match="dual_clip_c"):
    _loss(logp, old, adv, mask, off, loss_type="gspo", dual_clip_c=3.0)


# ----------------------------------------------------------------------------
# Config errors: one line each.

def _cfg(**rl):
  c = mars_config.default_config()
  for k, v in rl.items():
    section, key = k.split("__") if "__" in k else ("rl", k)
    c[section][key] = v
  return c


@pytest.mark.parametrize("overrides, match", [
    (dict(loss="gpo"), "Unknown rl.loss"),
    (dict(rollout_correction="tiss"), "Unknown rl.rollout_correction"),
    (dict(rollout_correction="tis", tis_cap=0.0), "tis_cap must be > 0"),
    (dict(rollout_correction="tis", tis_cap=-1.0), "tis_cap must be > 0"),
    (dict(rollout_correction="mis", mis_lo=2.0, mis_hi=2.0), "mis_lo"),
    (dict(rollout_correction="icepop", icepop_alpha=5.0, icepop_beta=0.5), "icepop_alpha"),
    (dict(rollout_correction="tis", recompute_old_logp=False), "recompute_old_logp=True"),
    (dict(rollout_correction="icepop", rollout_correction_level="sequence"), "masks tokens"),
    (dict(loss="gspo", agg_mode="token-mean"), "seq-mean-token-mean"),
    (dict(loss="gspo", agg_mode="seq-mean-token-mean", rollout_correction="tis"), "one ratio"),
    (dict(loss="cispo", dual_clip_c=3.0), "dual_clip_c"),
    (dict(rollout__staleness=2), "partial-rollout"),
    (dict(rollout__staleness=1, recompute_old_logp=False), "recompute_old_logp=True"),
    (dict(rollout_correction="tis", offpolicy_behaviour_one=True, lte__enabled=True), "LUFFY"),
])
def test_bad_offpolicy_config_is_one_error_line(overrides, match):
  c = _cfg(**overrides)
  with pytest.raises(config_validation.ConfigError, match=match) as e:
    config_validation.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, match", [
    (dict(rollout__devices=4), "set rollout.staleness=1"),
    (dict(rollout__devices=-1, rollout__staleness=1), "device count >= 0"),
    (dict(rollout__devices=8, rollout__staleness=1), "leaves no device for the update"),
    (dict(rollout__devices=4, rollout__staleness=1, rollout__mesh_shape=(2, 1, 1)),
     r"rollout.mesh_shape \(2, 1, 1\) needs 2 devices; 4 are available"),
    (dict(rollout__devices=3, rollout__staleness=1), "data×fsdp mesh size 5"),
])
def test_bad_device_split_is_one_error_line(overrides, match):
  """rollout.devices (a split rollout group) on 8 devices."""
  c = _cfg(recompute_old_logp=True, **overrides)
  with pytest.raises(config_validation.ConfigError, match=match) as e:
    config_validation.validate(c, num_devices=8)
  assert "\n" not in str(e.value)


def test_meaningful_combinations_validate():
  for rl in (dict(rollout_correction="tis"), dict(rollout_correction="mis",
                                                   rollout_correction_level="sequence"),
             dict(rollout_correction="icepop", lte__enabled=True),
             dict(loss="gspo", agg_mode="seq-mean-token-mean", rollout_correction="mis",
                  rollout_correction_level="sequence"),
             dict(loss="gspo_token", agg_mode="seq-mean-token-mean", rollout_correction="icepop"),
             dict(loss="cispo", rollout_correction="tis"),
             dict(rollout__staleness=1, rollout_correction="tis")):
    config_validation.validate(_cfg(**rl))
  config_validation.validate(_cfg(rollout__staleness=1, rollout__devices=4,
                                  rollout_correction="tis"), num_devices=8)


# ----------------------------------------------------------------------------
# The jitted step: wiring, metrics, and ρ ≡ 1 leaving the update bit for bit.

def _step_setup(rows=8, T=12):
  from mars.batch import empty_batch, positions_from_mask
  from mars.models import init_params, tiny_config, token_logprobs
  cfg = tiny_config("qwen2", vocab_size=48, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 48, (rows, T)).astype(np.int32)
  attn = np.ones((rows, T), bool)
  loss = np.zeros((rows, T), bool)
  loss[:, 4:] = True
  old = np.asarray(token_logprobs(cfg, params, jnp.asarray(tokens), jnp.asarray(attn),
                                  positions_from_mask(attn)))
  b = empty_batch(rows, T).replace(
      tokens=tokens, attention_mask=attn, positions=np.asarray(positions_from_mask(attn)),
      loss_mask=loss, old_logp=old, behaviour_logp=old, sampler_logp=old,
      is_off_policy=np.arange(rows) % 4 == 3)
  adv = np.where(loss, rng.normal(size=(rows, T)), 0).astype(np.float32)
  return cfg, params, jax.tree.map(jnp.asarray, b), jnp.asarray(adv), rng


def test_step_with_correction_logs_and_rho_one_is_bit_exact():
  from mars.rl import optim, step as step_lib
  cfg, params, batch, adv, rng = _step_setup()
  opt = optim.make_optimizer(mars_config.optimizer_config(lr=1e-2))
  base = mars_config.rl_config(eps_low=0.2, eps_high=0.2, micro_batch_size=4, recompute_old_logp=True)
  out = {}
  for name, extra in (("none", {}), ("tis", dict(rollout_correction="tis")),
                      ("icepop", dict(rollout_correction="icepop"))):
    fn = step_lib.make_train_step(cfg, dict(base, **extra), opt)
    state = step_lib.init_train_state(jax.tree.map(jnp.copy, params), opt)
    state, metrics = fn(state, batch, adv, jnp.zeros_like(adv))
    out[name] = (jax.device_get(state.params), jax.device_get(metrics))
  for name in ("tis", "icepop"):  # sampler_logp == old_logp: ρ ≡ 1
    for a, b in zip(jax.tree.leaves(out["none"][0]), jax.tree.leaves(out[name][0])):
      np.testing.assert_array_equal(a, b)
    m = out[name][1]
    assert m["rollout_corr/rho_max_on"] == 1.0 and m["rollout_corr/kl_k3"] == 0.0
    assert m["rollout_corr/token_masked_frac"] == 0.0
  assert "rollout_corr/token_masked_frac" not in out["none"][1]
  assert "rollout_corr/kl_k1" in out["none"][1]  # ρ is logged without a correction too

  # A mismatch: the sampler's logp shifted on some tokens; IcePop masks exactly those.
  shift = np.zeros(batch.old_logp.shape, np.float32)
  shift[0, 5], shift[1, 6], shift[3, 7] = 2.0, -1.0, 3.0   # ρ = e^-2, e^1, e^-3
  skewed = batch.replace(sampler_logp=batch.old_logp + shift)
  fn = step_lib.make_train_step(cfg, dict(base, rollout_correction="icepop"), opt)
  state = step_lib.init_train_state(jax.tree.map(jnp.copy, params), opt)
  _, m = fn(state, skewed, adv, jnp.zeros_like(adv))
  trained = int(np.sum(np.asarray(batch.loss_mask)))
  np.testing.assert_allclose(m["rollout_corr/token_masked_frac"], 2 / trained, rtol=1e-6)
  np.testing.assert_allclose(m["rollout_corr/seq_masked_frac"], 2 / 8, rtol=1e-6)
  np.testing.assert_allclose(m["rollout_corr/rho_max_on"], np.e, rtol=1e-5)
  np.testing.assert_allclose(m["rollout_corr/rho_max_hinted"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["rollout_corr/log_rho_absmax_hinted"], 3.0, rtol=1e-5)


def test_rollout_thread_keeps_the_grader_workers_it_spawns():
  """A split run's rollouts share one long-lived thread: grader workers started in
  one rollout (a replaced or recycled worker) die with the thread that started them
  (PR_SET_PDEATHSIG), so they must still serve the next rollout. With a thread per
  rollout they were killed between steps, and the pool failed with "keep exiting
  during startup"."""
  import threading, time
  from mars import rewards
  from mars.trainer import async_loop
  thread = async_loop.RolloutThread()
  try:
    pool = thread.submit(lambda: rewards.GraderPool(num_workers=1, spare_workers=0))()
    first = thread.submit(lambda: pool.grade_batch([r"\boxed{2}"], ["2"]))()
    time.sleep(0.5)  # a per-call thread would have exited by now, killing the worker
    second = thread.submit(lambda: pool.grade_batch([r"\boxed{3}"], ["2"]))()
    assert [g.status for g in first + second] == ["correct", "wrong"]
    assert pool.num_killed == 0 and all(w.proc.poll() is None for w in pool._workers)
    # What the thread raises reaches the waiter.
    with pytest.raises(ZeroDivisionError):
      thread.submit(lambda: 1 / 0)()
  finally:
    thread.close()
    pool.close()
  # The contrast: a worker started by a short-lived thread dies when it ends.
  box = {}

  def short_lived():  # starts a worker and grades once (the worker is up), then ends
    box["pool"] = rewards.GraderPool(num_workers=1, spare_workers=0)
    box["pool"].grade_batch([r"\boxed{2}"], ["2"])

  t = threading.Thread(target=short_lived)
  t.start(); t.join()
  worker = box["pool"]._workers[0]
  deadline = time.time() + 10
  while worker.proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert worker.proc.poll() is not None
  box["pool"].close()


def test_split_refuses_a_multi_process_run(monkeypatch, tmp_path):
  """The rollout group splits one process's devices: a multi-host run with
  rollout.devices > 0 stops with one line before anything is built."""
  import pathlib
  from mars.trainer import run_state
  c = mars_config.load_config_file(
      str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
  c.rollout.staleness, c.rollout.devices, c.rl.recompute_old_logp = 1, 4, True
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(config_validation.ConfigError, match="splits one process's devices") as e:
    run_state.setup(c, str(tmp_path / "run"))
  assert "\n" not in str(e.value)
