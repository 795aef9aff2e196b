"""mars.rl.losses against plain numpy references (explicit loops) and hand-worked cases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars.models import logprobs
from mars.rl import losses

jax.config.update("jax_enable_x64", False)

AGG_MODES = losses.AGG_MODES


# ----------------------------------------------------------------------------
# numpy references: one token at a time, no vectorisation tricks.
# ----------------------------------------------------------------------------


def np_aggregate(x, mask, mode, max_len_norm=None):
  B, T = x.shape
  if mode == "token-mean":
    total, count = 0.0, 0
    for b in range(B):
      for t in range(T):
        if mask[b, t]:
          total += x[b, t]
          count += 1
    return total / max(count, 1)
  per_seq = []
  for b in range(B):
    vals = [x[b, t] for t in range(T) if mask[b, t]]
    if not vals:
      continue  # rows with no valid token do not count
    if mode == "seq-mean-token-mean":
      per_seq.append(sum(vals) / len(vals))
    else:
      per_seq.append(sum(vals) / (T if max_len_norm is None else max_len_norm))
  return sum(per_seq) / max(len(per_seq), 1)


def np_token_policy_loss(logp, old, adv, off, eps_low, eps_high, dual_c, gamma, luffy,
                         clamp=20.0):
  """Loss of a single token; returns (loss, ratio used)."""
  if off:
    log_r = min(logp, 0.0) if luffy else logp - old
    r = np.exp(np.clip(log_r, -clamp, clamp))
    return -adv * r / (r + gamma), r
  r = np.exp(np.clip(logp - old, -clamp, clamp))
  loss = max(-adv * r, -adv * min(max(r, 1 - eps_low), 1 + eps_high))
  if dual_c is not None and adv < 0:
    loss = min(loss, -dual_c * adv)
  return loss, r


def np_policy_loss(logp, old, adv, mask, off_rows, *, eps_low=0.2, eps_high=0.2,
                   dual_c=None, gamma=0.1, luffy=False, agg_mode="token-mean",
                   max_len_norm=None):
  B, T = logp.shape
  per_token = np.zeros((B, T), np.float64)
  ratios = np.zeros((B, T), np.float64)
  for b in range(B):
    for t in range(T):
      per_token[b, t], ratios[b, t] = np_token_policy_loss(
          logp[b, t], old[b, t], adv[b, t], off_rows[b], eps_low, eps_high, dual_c, gamma,
          luffy)
  return np_aggregate(per_token, mask, agg_mode, max_len_norm), ratios


def ragged_batch(rng, B=6, T=11, empty_row=True):
  """Random logp/old/adv with left-padded prompts and right-padded ragged responses."""
  mask = np.zeros((B, T), bool)
  for b in range(B):
    start = rng.integers(0, 4)
    end = rng.integers(start + 1, T + 1)
    mask[b, start:end] = True
  if empty_row:
    mask[-1] = False  # a batch-padding row
  logp = -rng.gamma(1.0, 1.0, (B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, (B, T))).astype(np.float32)
  adv = rng.normal(0, 1, (B, T)).astype(np.float32)
  return logp, old, adv, mask


# ----------------------------------------------------------------------------
# Aggregation and masked statistics.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("max_len_norm", [None, 32.0])
def test_aggregate_matches_numpy(mode, max_len_norm):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 9)).astype(np.float32)
  _, _, _, mask = ragged_batch(rng, 5, 9)
  got = losses.aggregate(x, mask, mode, max_len_norm)
  np.testing.assert_allclose(got, np_aggregate(x, mask, mode, max_len_norm), rtol=1e-5,
                             atol=1e-6)


def test_aggregate_modes_differ_on_ragged_lengths():
  # One long row of 1s, one short row of 3s: the modes weigh them differently.
  x = np.array([[1, 1, 1, 1], [3, 0, 0, 0]], np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
  assert losses.aggregate(x, mask, "token-mean") == pytest.approx(7 / 5)
  assert losses.aggregate(x, mask, "seq-mean-token-mean") == pytest.approx(2.0)
  assert losses.aggregate(x, mask, "seq-mean-token-sum-norm", 8.0) == pytest.approx(
      (4 / 8 + 3 / 8) / 2)
  assert losses.aggregate(x, mask, "seq-mean-token-sum-norm") == pytest.approx(
      (4 / 4 + 3 / 4) / 2)  # default constant: the padded length T
  with pytest.raises(ValueError):
    losses.aggregate(x, mask, "sum")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_denominator_makes_microbatches_sum_to_full_batch(mode):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 7)).astype(np.float32)
  _, _, _, mask = ragged_batch(rng, 6, 7)
  full = losses.aggregate(x, mask, mode)
  denom = mask.sum() if mode == "token-mean" else mask.any(-1).sum()
  parts = [losses.aggregate(x[i:i + 2], mask[i:i + 2], mode, denominator=denom)
           for i in range(0, 6, 2)]
  np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_masked_mean_var_whiten_ignore_masked_entries():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 8)).astype(np.float32)
  _, _, _, mask = ragged_batch(rng, 4, 8)
  valid = x[mask].astype(np.float64)
  np.testing.assert_allclose(losses.masked_mean(x, mask), valid.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_var(x, mask), valid.var(ddof=1), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_var(x, mask, unbiased=False), valid.var(), rtol=1e-5)
  w = np.asarray(losses.masked_whiten(x, mask))
  np.testing.assert_allclose(w[mask], (valid - valid.mean()) / valid.std(ddof=1), rtol=1e-4,
                             atol=1e-5)
  assert np.all(w[~mask] == 0)
  # Garbage in the masked-out entries changes nothing.
  x_garbage = np.where(mask, x, 1e6).astype(np.float32)
  np.testing.assert_allclose(losses.masked_whiten(x_garbage, mask), w, rtol=1e-6)
  # shift_mean=False keeps the mean, rescales only.
  w_scale = np.asarray(losses.masked_whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(w_scale[mask], w[mask] + valid.mean(), rtol=1e-4, atol=1e-5)
  assert losses.masked_max(x, np.zeros_like(mask)) == 0.0


# ----------------------------------------------------------------------------
# Policy loss.
# ----------------------------------------------------------------------------

POLICY_CASES = [
    dict(),
    dict(eps_low=0.2, eps_high=0.28),
    dict(dual_c=3.0),
    dict(luffy=True, gamma=0.1),
    dict(gamma=0.5, agg_mode="seq-mean-token-mean"),
    dict(eps_high=0.28, agg_mode="seq-mean-token-sum-norm", max_len_norm=16.0),
]


def _call_policy_loss(logp, old, adv, mask, off, eps_low=0.2, eps_high=0.2, dual_c=None,
                      gamma=0.1, luffy=False, agg_mode="token-mean", max_len_norm=None):
  fn = jax.jit(functools.partial(
      losses.policy_loss, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_c,
      offpolicy_gamma=gamma, offpolicy_behaviour_one=luffy, agg_mode=agg_mode,
      max_len_norm=max_len_norm))
  return fn(logp, old, adv, mask, off)


@pytest.mark.parametrize("case", POLICY_CASES)
def test_policy_loss_matches_numpy(case):
  rng = np.random.default_rng(3)
  logp, old, adv, mask = ragged_batch(rng, B=8, T=11)
  # Widen the ratio spread so every clip region is populated.
  old = (logp + rng.normal(0, 0.8, logp.shape)).astype(np.float32)
  off = np.array([0, 1, 0, 1, 0, 1, 0, 0], bool)
  loss, metrics = _call_policy_loss(logp, old, adv, mask, off, **case)
  want, ratios = np_policy_loss(logp, old, adv, mask, off, **case)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)

  # Metrics, counted token by token.
  eps_low, eps_high = case.get("eps_low", 0.2), case.get("eps_high", 0.2)
  on_r, off_r, low, high, kl = [], [], 0, 0, []
  for b in range(8):
    for t in range(11):
      if not mask[b, t]:
        continue
      r = ratios[b, t]
      if off[b]:
        off_r.append(r)
        continue
      on_r.append(r)
      low += r < 1 - eps_low and adv[b, t] < 0
      high += r > 1 + eps_high and adv[b, t] > 0
      kl.append(r - 1 - np.log(r))
  assert metrics["num_tokens_on"] == len(on_r) and metrics["num_tokens_off"] == len(off_r)
  np.testing.assert_allclose(metrics["clipfrac_low"], low / len(on_r), rtol=1e-6)
  np.testing.assert_allclose(metrics["clipfrac_high"], high / len(on_r), rtol=1e-6)
  assert low > 0 and high > 0  # the test exercises both clip regions
  np.testing.assert_allclose(metrics["approx_kl"], np.mean(kl), rtol=1e-4)
  np.testing.assert_allclose(metrics["ratio_mean_on"], np.mean(on_r), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max_on"], np.max(on_r), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_mean_off"], np.mean(off_r), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max_off"], np.max(off_r), rtol=1e-5)
  gamma = case.get("gamma", 0.1)
  np.testing.assert_allclose(metrics["f_r_mean_off"],
                             np.mean([r / (r + gamma) for r in off_r]), rtol=1e-5)


@pytest.mark.parametrize("case", POLICY_CASES)
def test_policy_loss_grad_matches_finite_differences(case):
  """jax.grad w.r.t. logp vs central differences of the float64 numpy reference."""
  rng = np.random.default_rng(4)
  logp, old, adv, mask = ragged_batch(rng, B=3, T=4, empty_row=False)
  old = (logp + rng.normal(0, 0.8, logp.shape)).astype(np.float32)
  off = np.array([0, 1, 0], bool)
  grad = jax.grad(lambda lp: _call_policy_loss(lp, old, adv, mask, off, **case)[0])(logp)
  h = 1e-4
  fd = np.zeros(logp.shape)
  base = logp.astype(np.float64)
  for idx in np.ndindex(*logp.shape):
    plus, minus = base.copy(), base.copy()
    plus[idx] += h
    minus[idx] -= h
    fd[idx] = (np_policy_loss(plus, old, adv, mask, off, **case)[0]
               - np_policy_loss(minus, old, adv, mask, off, **case)[0]) / (2 * h)
  assert np.abs(fd).max() > 0.01
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


def _per_token_grads(ratios, advs, off=False, **kw):
  """d loss / d logp of N independent one-token rows with ratios r (old_logp = 0).

  Each row is its own sequence; token-mean over N tokens scales each gradient by
  1/N, undone here, so entry i is the gradient of token i's own loss.
  """
  n = len(ratios)
  logp = jnp.log(jnp.asarray(ratios, jnp.float32))[:, None]
  fn = lambda lp: losses.policy_loss(lp, jnp.zeros((n, 1)), jnp.asarray(advs, jnp.float32)[:, None],
                                     jnp.ones((n, 1), bool), jnp.full((n,), off), **kw)[0]
  return np.asarray(jax.jit(jax.grad(fn))(logp))[:, 0] * n


CLIP_HIGHER_CASES = [  # (ratio, advantage, gradient flows?) with eps_low=0.2, eps_high=0.28
    # Positive advantage: only the upper bound 1 + eps_high = 1.28 clips.
    (0.5, 1.0, True), (0.79, 1.0, True), (1.1, 1.0, True), (1.25, 1.0, True),
    (1.27, 1.0, True), (1.29, 1.0, False), (3.0, 1.0, False),
    # Negative advantage: only the lower bound 1 - eps_low = 0.8 clips.
    (0.5, -1.0, False), (0.79, -1.0, False), (0.81, -1.0, True), (1.5, -1.0, True),
    (5.0, -1.0, True),
]


def test_clip_higher_turns_gradient_off_exactly_at_the_boundaries():
  ratios, advs, grad_on = (np.array(c) for c in zip(*CLIP_HIGHER_CASES))
  g = _per_token_grads(ratios, advs, eps_low=0.2, eps_high=0.28)
  # Unclipped: d(-A r)/d log r = -A r. Clipped: exactly 0.
  np.testing.assert_allclose(g, np.where(grad_on, -advs * ratios, 0.0), rtol=1e-5, atol=1e-7)
  # With a symmetric eps the 1.25 token (positive advantage) would be clipped.
  assert _per_token_grads([1.25], [1.0], eps_low=0.2, eps_high=0.2)[0] == 0.0


def test_dual_clip_caps_negative_advantages_beyond_c():
  ratios = np.array([1.5, 2.9, 3.1, 10.0])
  grad_on = np.array([True, True, False, False])
  g = _per_token_grads(ratios, [-2.0] * 4, dual_clip_c=3.0)
  np.testing.assert_allclose(g, np.where(grad_on, 2.0 * ratios, 0.0), rtol=1e-5, atol=1e-7)
  # The dual clip never touches positive advantages (ratio above 1 + eps: clipped anyway).
  np.testing.assert_array_equal(_per_token_grads(ratios, [2.0] * 4, dual_clip_c=3.0), 0.0)
  # Without the dual clip the negative-advantage gradient stays on.
  np.testing.assert_allclose(_per_token_grads(ratios, [-2.0] * 4), 2.0 * ratios, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_regularized_is_gradient_wrt_log_ratio(gamma):
  # f(r) = r/(r+γ): d f / d log r = γ r / (r+γ)², and no clip however large r is.
  ratios = np.array([0.01, 0.3, 1.0, 2.5, 40.0])
  want = gamma * ratios / (ratios + gamma) ** 2
  g = _per_token_grads(ratios, [1.0] * 5, off=True, offpolicy_gamma=gamma)
  # fp32: at r = 40, 1 − f ≈ 2.5e-3 carries ~1e-5 relative rounding.
  np.testing.assert_allclose(g, -want, rtol=3e-5)
  log_r = jnp.log(jnp.asarray(ratios, jnp.float32))
  direct = jax.grad(lambda lr: losses.regularized_is_weight(lr, gamma).sum())(log_r)
  np.testing.assert_allclose(direct, want, rtol=3e-5)
  np.testing.assert_allclose(losses.regularized_is_weight(log_r, gamma),
                             ratios / (ratios + gamma), rtol=1e-6)


def test_luffy_variant_uses_policy_probability_and_ignores_behaviour():
  pi, gamma = 0.2, 0.1
  logp = jnp.full((1, 1), np.log(pi), jnp.float32)
  for old in (-3.0, 0.0, 1.0):  # any behaviour logp: taken as log 1 = 0
    fn = lambda lp: losses.policy_loss(
        lp, jnp.full((1, 1), old), jnp.ones((1, 1)), jnp.ones((1, 1), bool),
        jnp.array([True]), offpolicy_gamma=gamma, offpolicy_behaviour_one=True)
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(logp)
    np.testing.assert_allclose(loss, -pi / (pi + gamma), rtol=1e-5)
    np.testing.assert_allclose(g[0, 0], -gamma * pi / (pi + gamma) ** 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_mean_off"], pi, rtol=1e-5)


def test_mixed_batch_selects_branch_per_row():
  # Same tokens in both rows, ratio 2 and positive advantage: the on-policy row is
  # clipped (no gradient), the off-policy row gets f'(r) (never clipped).
  r, gamma = 2.0, 0.1
  logp = jnp.full((2, 3), np.log(r), jnp.float32)
  old = jnp.zeros((2, 3))
  adv = jnp.ones((2, 3))
  mask = jnp.array([[1, 1, 0], [1, 1, 0]], bool)
  off = jnp.array([False, True])
  fn = lambda lp: losses.policy_loss(lp, old, adv, mask, off, offpolicy_gamma=gamma)
  (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(logp)
  np.testing.assert_allclose(g[0], 0.0)
  np.testing.assert_allclose(g[1, :2], -gamma * r / (r + gamma) ** 2 / 4, rtol=1e-5)
  assert g[1, 2] == 0.0  # masked token
  np.testing.assert_allclose(loss, (-1.2 * 2 - r / (r + gamma) * 2) / 4, rtol=1e-5)
  assert metrics["clipfrac_high"] == 1.0 and metrics["num_tokens_off"] == 2
  # Swapping the flags swaps the rows.
  g_swapped = jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, off[::-1])[0])(logp)
  np.testing.assert_allclose(g_swapped[::-1], g, rtol=1e-6)


def test_log_ratio_clamp_keeps_loss_finite():
  logp = jnp.array([[0.0]])
  old = jnp.array([[-500.0]])  # stale token: exp(500) would overflow
  loss, metrics = losses.policy_loss(logp, old, -jnp.ones((1, 1)), jnp.ones((1, 1), bool),
                                     jnp.array([False]))
  assert np.isfinite(loss) and np.isfinite(metrics["ratio_max_on"])
  np.testing.assert_allclose(metrics["ratio_max_on"], np.exp(20.0), rtol=1e-5)


# ----------------------------------------------------------------------------
# KL.
# ----------------------------------------------------------------------------


def test_kl_estimators_match_numpy_and_k3_is_nonnegative():
  rng = np.random.default_rng(5)
  logp = -rng.gamma(1.0, 1.0, (4, 9)).astype(np.float32)
  ref = (logp + rng.normal(0, 1.0, logp.shape)).astype(np.float32)
  k1, k2, k3 = (np.asarray(losses.kl_penalty(logp, ref, k)) for k in ("k1", "k2", "k3"))
  for b, t in np.ndindex(*logp.shape):
    d = float(ref[b, t]) - float(logp[b, t])
    np.testing.assert_allclose(k1[b, t], -d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k2[b, t], 0.5 * d * d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k3[b, t], np.exp(d) - d - 1, rtol=1e-4, atol=1e-6)
  assert np.all(k3 >= 0) and np.any(k1 < 0)
  np.testing.assert_array_equal(losses.kl_penalty(logp, logp, "k3"), 0.0)
  with pytest.raises(ValueError):
    losses.kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_loss_matches_numpy(kind, mode):
  rng = np.random.default_rng(6)
  logp, ref, _, mask = ragged_batch(rng)
  per_tok = np.asarray(losses.kl_penalty(logp, ref, kind), np.float64)
  np.testing.assert_allclose(losses.kl_loss(logp, ref, mask, kind, mode),
                             np_aggregate(per_tok, mask, mode), rtol=1e-5, atol=1e-7)


def test_k1_and_k3_are_unbiased_kl_estimates():
  # Samples from π_θ: E[k1] = E[k3] = KL(π_θ ‖ π_ref); k3 has lower variance.
  rng = np.random.default_rng(7)
  p = np.array([0.5, 0.3, 0.15, 0.05])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  true_kl = np.sum(p * np.log(p / q))
  x = rng.choice(4, size=(1, 200_000), p=p)
  logp, ref = np.log(p)[x].astype(np.float32), np.log(q)[x].astype(np.float32)
  k1 = np.asarray(losses.kl_penalty(logp, ref, "k1"))
  k3 = np.asarray(losses.kl_penalty(logp, ref, "k3"))
  np.testing.assert_allclose(k1.mean(), true_kl, rtol=0.03)
  np.testing.assert_allclose(k3.mean(), true_kl, rtol=0.03)
  assert k3.var() < k1.var()


# ----------------------------------------------------------------------------
# Entropy.
# ----------------------------------------------------------------------------


def test_entropy_from_logits_matches_numpy_and_is_stable():
  rng = np.random.default_rng(8)
  logits = (rng.normal(0, 3, (2, 3, 7))).astype(np.float32)
  logits[0, 0, :3] = -np.inf  # masked vocab entries
  logits[1, 2] = 1e4 * rng.normal(size=7)  # huge logits: near one-hot
  got = np.asarray(logprobs.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16)
                                              .astype(jnp.float32)))
  got_f32 = np.asarray(logprobs.entropy_from_logits(logits))
  for b, t in np.ndindex(2, 3):
    z = logits[b, t].astype(np.float64)
    z = z - z.max()
    p = np.exp(z) / np.exp(z).sum()
    want = -sum(pi * np.log(pi) for pi in p if pi > 0)
    np.testing.assert_allclose(got_f32[b, t], want, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(got))
  assert logprobs.entropy_from_logits(jnp.ones((5,), jnp.bfloat16)).dtype == jnp.float32
  np.testing.assert_allclose(logprobs.entropy_from_logits(jnp.zeros((5,))), np.log(5), rtol=1e-6)


def test_masked_entropy_mean_ignores_masked_tokens():
  logits = jnp.zeros((2, 3, 4)).at[0, 1].set(jnp.array([100.0, 0, 0, 0]))
  mask = jnp.array([[1, 0, 1], [1, 1, 0]], bool)  # the near-zero-entropy token is masked
  np.testing.assert_allclose(losses.masked_entropy_mean(logits, mask), np.log(4), rtol=1e-6)
  g = jax.grad(lambda z: losses.masked_entropy_mean(z, mask))(logits)
  assert np.all(g[0, 1] == 0)


# ----------------------------------------------------------------------------
# Value loss.
# ----------------------------------------------------------------------------


def np_value_loss(values, old, returns, mask, clip_eps, mode):
  per_tok = np.zeros(values.shape)
  clipped = []
  for b, t in np.ndindex(*values.shape):
    unclipped = (values[b, t] - returns[b, t]) ** 2
    if clip_eps is None:
      per_tok[b, t] = unclipped
      continue
    v_clip = min(max(values[b, t], old[b, t] - clip_eps), old[b, t] + clip_eps)
    c = (v_clip - returns[b, t]) ** 2
    per_tok[b, t] = max(unclipped, c)
    if mask[b, t]:
      clipped.append(c > unclipped)
  return 0.5 * np_aggregate(per_tok, mask, mode), (np.mean(clipped) if clipped else 0.0)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_matches_numpy(clip_eps, mode):
  rng = np.random.default_rng(9)
  _, _, _, mask = ragged_batch(rng)
  returns = rng.normal(0, 1, mask.shape).astype(np.float32)
  old = (returns + rng.normal(0, 0.5, mask.shape)).astype(np.float32)
  values = (old + rng.normal(0, 0.4, mask.shape)).astype(np.float32)
  loss, metrics = jax.jit(functools.partial(losses.value_loss, clip_eps=clip_eps,
                                            agg_mode=mode))(values, old, returns, mask)
  want, clipfrac = np_value_loss(values, old, returns, mask, clip_eps, mode)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["vf_clipfrac"], clipfrac, rtol=1e-6)
  if clip_eps is not None:
    assert 0 < clipfrac < 1
  r, v = returns[mask].astype(np.float64), values[mask].astype(np.float64)
  np.testing.assert_allclose(metrics["vf_explained_variance"], 1 - np.var(r - v) / np.var(r),
                             rtol=1e-4)


def test_value_loss_clip_gradient_and_explained_variance_edge_cases():
  # V moved beyond V_old + ε away from R: the clipped term dominates, gradient 0.
  # Token 0 moved past V_old + ε toward R: the clipped term is larger, gradient 0.
  # Token 1 is inside the range. Token 2 moved past the range *away* from R: the
  # pessimistic max keeps the unclipped term, so the gradient pulls it back.
  v_old, ret = jnp.zeros((1, 3)), jnp.array([[1.0, -1.0, -1.0]])
  values = jnp.array([[0.5, 0.1, 0.5]])
  g = jax.grad(lambda v: losses.value_loss(v, v_old, ret, jnp.ones((1, 3), bool))[0])(values)
  np.testing.assert_allclose(g, [[0.0, 1.1 / 3, 1.5 / 3]], rtol=1e-6)
  ret, values, v_old = jnp.array([[-1.0, 1.0]]), jnp.array([[0.5, 0.1]]), jnp.zeros((1, 2))
  # Perfect critic: explained variance 1; constant returns: defined as 0, never NaN.
  _, m = losses.value_loss(ret, ret, ret, jnp.ones((1, 2), bool))
  np.testing.assert_allclose(m["vf_explained_variance"], 1.0)
  _, m = losses.value_loss(values, v_old, jnp.ones((1, 2)), jnp.ones((1, 2), bool))
  assert m["vf_explained_variance"] == 0.0
