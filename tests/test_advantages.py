"""mars.rl.advantages against numpy references (explicit loops) and hand-worked cases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars.rl import advantages as adv_lib

jax.config.update("jax_enable_x64", False)


# ----------------------------------------------------------------------------
# Terminal reward placement.
# ----------------------------------------------------------------------------


def test_place_terminal_reward_on_last_model_token():
  loss_mask = np.array([
      [0, 1, 1, 0, 1, 1, 0],  # model, feedback, model, padding
      [0, 0, 1, 1, 1, 1, 1],  # response runs to the end
      [0, 0, 0, 0, 0, 0, 0],  # no model token
      [1, 0, 0, 0, 0, 0, 0],
  ], bool)
  reward = np.array([1.0, -0.5, 7.0, 2.0], np.float32)
  got = np.asarray(jax.jit(adv_lib.place_terminal_reward)(reward, loss_mask))
  want = np.zeros(loss_mask.shape, np.float32)
  for b in range(4):
    model = [t for t in range(7) if loss_mask[b, t]]
    if model:
      want[b, model[-1]] = reward[b]
  np.testing.assert_array_equal(got, want)


def test_token_rewards_subtract_kl_on_model_tokens_only():
  mask = np.array([[0, 1, 1, 1]], bool)
  kl = np.array([[5.0, 0.1, 0.2, 0.3]], np.float32)
  got = adv_lib.token_rewards(np.array([1.0]), mask, kl, kl_coef=0.5)
  np.testing.assert_allclose(got, [[0.0, -0.05, -0.1, 1.0 - 0.15]], rtol=1e-6)


# ----------------------------------------------------------------------------
# GAE.
# ----------------------------------------------------------------------------


def np_gae_contiguous(rewards, values, gamma, lam):
  """Textbook GAE over one uninterrupted episode (V after the last step is 0)."""
  n = len(rewards)
  advs = np.zeros(n)
  last = 0.0
  for t in reversed(range(n)):
    next_value = values[t + 1] if t + 1 < n else 0.0
    delta = rewards[t] + gamma * next_value - values[t]
    last = delta + gamma * lam * last
    advs[t] = last
  return advs, advs + values


def np_gae_transparent(rewards, values, loss_mask, gamma, lam):
  """Reference for spans: drop every non-model token, run textbook GAE, scatter back."""
  advs = np.zeros(rewards.shape)
  rets = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    idx = [t for t in range(rewards.shape[1]) if loss_mask[b, t]]
    a, r = np_gae_contiguous(rewards[b, idx].astype(np.float64),
                             values[b, idx].astype(np.float64), gamma, lam)
    advs[b, idx], rets[b, idx] = a, r
  return advs, rets


def random_episode_batch(rng, B=5, T=24):
  """Left-padded prompt, then alternating model / feedback spans, then right padding."""
  loss_mask = np.zeros((B, T), bool)
  transparent = np.zeros((B, T), bool)
  for b in range(B):
    t = rng.integers(1, 5)  # prompt (+ left padding)
    model_span = True
    while t < T - rng.integers(0, 4):
      span = rng.integers(1, 5)
      (loss_mask if model_span else transparent)[b, t:t + span] = True
      t += span
      model_span = not model_span
    transparent[b] &= ~loss_mask[b]
  reward = rng.normal(size=B).astype(np.float32)
  rewards = np.asarray(adv_lib.place_terminal_reward(reward, loss_mask))
  rewards = rewards - 0.01 * rng.random((B, T)).astype(np.float32) * loss_mask  # KL penalties
  values = rng.normal(size=(B, T)).astype(np.float32)
  return rewards, values, loss_mask, transparent


def test_gae_matches_textbook_on_contiguous_episode():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(1, 9)).astype(np.float32)
  values = rng.normal(size=(1, 9)).astype(np.float32)
  mask = np.ones((1, 9), bool)
  got_a, got_r = adv_lib.gae(rewards, values, mask, None, gamma=0.9, lam=0.8)
  want_a, want_r = np_gae_contiguous(rewards[0], values[0], 0.9, 0.8)
  np.testing.assert_allclose(got_a[0], want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_r[0], want_r, rtol=1e-5, atol=1e-6)


def test_gae_gamma_lambda_one_is_monte_carlo_return_minus_value():
  rewards = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]], np.float32)
  values = np.array([[9.0, 0.2, 0.4, 0.5, 0.7, 9.0]], np.float32)
  mask = np.array([[0, 1, 1, 1, 1, 0]], bool)
  a, r = adv_lib.gae(rewards, values, mask, None, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(a, [[0.0, 0.8, 0.6, 0.5, 0.3, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(r, [[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.99), (0.9, 0.95), (0.7, 0.0)])
def test_gae_with_transparent_spans_matches_numpy(gamma, lam):
  rng = np.random.default_rng(1)
  rewards, values, loss_mask, transparent = random_episode_batch(rng)
  assert transparent.any(axis=1).all()  # every row has a feedback span
  fn = jax.jit(functools.partial(adv_lib.gae, gamma=gamma, lam=lam))
  got_a, got_r = fn(rewards, values, loss_mask, transparent)
  want_a, want_r = np_gae_transparent(rewards, values, loss_mask, gamma, lam)
  np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_r, want_r, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got_a)[~loss_mask] == 0) and np.all(np.asarray(got_r)[~loss_mask] == 0)


def test_gae_telescopes_across_feedback_span():
  """GAE over [prompt, model, feedback, model, pad] == GAE over the model tokens alone."""
  rng = np.random.default_rng(2)
  gamma, lam = 0.95, 0.9
  # Layout: 2 prompt | 3 model | 4 feedback | 2 model | 1 pad  (T = 12)
  loss_mask = np.array([[0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0]], bool)
  transparent = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]], bool)
  values = rng.normal(size=(1, 12)).astype(np.float32)
  rewards = np.zeros((1, 12), np.float32)
  rewards[0, 10] = 1.0
  rewards[0, 3] = -0.2  # a per-token penalty inside the first attempt
  a, r = adv_lib.gae(rewards, values, loss_mask, transparent, gamma=gamma, lam=lam)

  model = loss_mask[0]
  a_cat, r_cat = adv_lib.gae(rewards[:, model], values[:, model], np.ones((1, 5), bool), None,
                             gamma=gamma, lam=lam)
  np.testing.assert_allclose(np.asarray(a)[0, model], a_cat[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(r)[0, model], r_cat[0], rtol=1e-6)
  assert np.all(np.asarray(a)[0, ~model] == 0) and np.all(np.asarray(r)[0, ~model] == 0)

  # Values and rewards sitting on feedback / prompt / padding change nothing.
  noisy_values = np.where(model, values, 100.0).astype(np.float32)
  noisy_rewards = np.where(model, rewards, -50.0).astype(np.float32)
  a2, r2 = adv_lib.gae(noisy_rewards, noisy_values, loss_mask, transparent, gamma=gamma, lam=lam)
  np.testing.assert_allclose(a2, a, rtol=1e-6)
  np.testing.assert_allclose(r2, r, rtol=1e-6)

  # The boundary token of attempt 1 bootstraps from the first token of attempt 2.
  delta = rewards[0, 4] + gamma * values[0, 9] - values[0, 4]
  np.testing.assert_allclose(a[0, 4], delta + gamma * lam * a[0, 9], rtol=1e-5)


def test_gae_transparent_mask_overrides_loss_mask():
  rewards = np.array([[0.0, 0.0, 1.0]], np.float32)
  values = np.array([[0.1, 0.2, 0.3]], np.float32)
  loss_mask = np.ones((1, 3), bool)
  transparent = np.array([[0, 1, 0]], bool)  # inconsistent input: treated as feedback
  a, _ = adv_lib.gae(rewards, values, loss_mask, transparent, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(a, [[0.9, 0.0, 0.7]], rtol=1e-6)


# ----------------------------------------------------------------------------
# GRPO / Dr.GRPO / RLOO.
# ----------------------------------------------------------------------------


def np_group_advantages(reward, group_id, scale, estimator, eps=1e-6, ddof=1, row_mask=None):
  B = len(reward)
  row_mask = np.ones(B, bool) if row_mask is None else row_mask
  out = np.zeros(B)
  for i in range(B):
    if not row_mask[i]:
      continue
    group = [j for j in range(B) if group_id[j] == group_id[i] and row_mask[j]]
    n = len(group)
    if n == 1:
      continue
    rs = [float(reward[j]) for j in group]
    mean = sum(rs) / n
    if estimator == "grpo":
      a = reward[i] - mean
    else:
      a = reward[i] - (sum(rs) - reward[i]) / (n - 1)
    if scale == "std":
      std = (sum((x - mean) ** 2 for x in rs) / (n - ddof)) ** 0.5
      a = a / (std + eps)
    out[i] = a
  return out


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_match_numpy(estimator, scale):
  rng = np.random.default_rng(3)
  B, num_groups = 23, 9
  group_id = rng.integers(0, num_groups, B).astype(np.int32)  # arbitrary, unsorted, gaps
  group_id[0] = 8
  group_id[1:] = np.where(group_id[1:] == 8, 7, group_id[1:])  # group 8 has size 1
  reward = rng.choice([0.0, 1.0, -0.5], B).astype(np.float32)
  reward[group_id == 5] = 1.0  # an all-equal group
  fn = jax.jit(functools.partial(adv_lib.grpo_advantages, num_groups=num_groups, scale=scale,
                                 estimator=estimator))
  got = np.asarray(fn(reward, group_id))
  want = np_group_advantages(reward, group_id, scale, estimator)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got[0] == 0.0  # group of one
  assert np.all(got[group_id == 5] == 0.0)
  assert np.abs(got).max() > 0.1


def test_group_advantages_hand_worked():
  reward = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  gid = np.zeros(4, np.int32)
  a = adv_lib.grpo_advantages(reward, gid, 1, scale="none")
  np.testing.assert_allclose(a, [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
  a = adv_lib.grpo_advantages(reward, gid, 1, scale="none", estimator="rloo")
  np.testing.assert_allclose(a, [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
  std = np.std(reward, ddof=1)
  a = adv_lib.grpo_advantages(reward, gid, 1, scale="std")
  np.testing.assert_allclose(a, (reward - 0.25) / (std + 1e-6), rtol=1e-5)


def test_group_advantages_row_mask_excludes_padding_rows():
  reward = np.array([1.0, 0.0, 123.0, 1.0, 0.0], np.float32)
  gid = np.array([0, 0, 0, 1, 1], np.int32)
  row_mask = np.array([1, 1, 0, 1, 1], bool)
  got = adv_lib.grpo_advantages(reward, gid, 2, row_mask=row_mask)
  want = np_group_advantages(reward, gid, "std", "grpo", row_mask=row_mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[2] == 0.0 and got[0] > 0


def np_attempt_rloo(reward, group_id, rows, scale):
  """Plain loop: rows[i] = list of (kind, length) spans, kind in {"p", "m", "f"} (prompt,
  model, feedback). Baseline per (group, attempt): mean reward of the group's *other*
  episodes that reached the attempt, else of all its other episodes."""
  B = len(reward)
  attempts = []
  for spans in rows:
    idx, j = [], 1
    for kind, n in spans:
      if kind == "f":
        j += 1
      idx += [j if kind == "m" else 0] * n
    attempts.append(idx)
  out = np.zeros((B, len(attempts[0])), np.float32)
  for i in range(B):
    group = [m for m in range(B) if group_id[m] == group_id[i]]
    if len(group) == 1:
      continue
    rs = [reward[m] for m in group]
    std = (sum((x - np.mean(rs)) ** 2 for x in rs) / (len(rs) - 1)) ** 0.5
    for t, j in enumerate(attempts[i]):
      if j == 0:
        continue
      peers = [m for m in group if m != i and max(attempts[m]) >= j]
      peers = peers or [m for m in group if m != i]
      a = reward[i] - np.mean([reward[m] for m in peers])
      out[i, t] = a / (std + 1e-6) if scale == "std" else a
  return np.asarray(attempts), out


def _spans_to_masks(rows, T):
  loss = np.zeros((len(rows), T), bool)
  transparent = np.zeros((len(rows), T), bool)
  for b, spans in enumerate(rows):
    t = 0
    for kind, n in spans:
      loss[b, t:t + n] = kind == "m"
      transparent[b, t:t + n] = kind == "f"
      t += n
  return loss, transparent


@pytest.mark.parametrize("scale", ["std", "none"])
def test_attempt_rloo_matches_numpy_loop(scale):
  rng = np.random.default_rng(0)
  B, num_groups, A, T = 14, 4, 4, 40
  group_id = rng.integers(0, num_groups - 1, B).astype(np.int32)
  group_id[0] = num_groups - 1  # a group of one: no baseline, advantage 0
  rows, reward = [], []
  for b in range(B):
    used = int(rng.integers(1, A + 1))
    spans = [("p", int(rng.integers(1, 4)))]
    for j in range(used):
      spans += [("f", int(rng.integers(1, 3)))] if j else []
      spans += [("m", int(rng.integers(1, 4)))]
    spans += [("p", T - sum(n for _, n in spans))]  # padding
    rows.append(spans)
    reward.append(1.0 if rng.random() < 0.5 else (-0.5 if used > 1 else -1.0))
  reward = np.asarray(reward, np.float32)
  loss, transparent = _spans_to_masks(rows, T)
  want_idx, want = np_attempt_rloo(reward, group_id, rows, scale)
  idx = adv_lib.attempt_index(loss, transparent)
  np.testing.assert_array_equal(idx, want_idx)
  got = jax.jit(functools.partial(adv_lib.attempt_rloo_advantages, num_groups=num_groups,
                                  max_attempts=A, scale=scale))(reward, group_id, idx)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[0] == 0.0) and np.abs(got).max() > 0.1


def test_attempt_rloo_hand_worked_second_attempt_credit():
  """Group of 4, N = 2: e0 right at attempt 1; e1 right at attempt 2; e2, e3 wrong twice.
  Plain RLOO gives every e2 token -0.5 - 0.5 = -1. Per attempt, second answers are compared
  only with the episodes that also reached attempt 2 (e1, e2, e3): e1's gets +1.5, e2's -0.75."""
  reward = np.array([1.0, 1.0, -0.5, -0.5], np.float32)
  gid = np.zeros(4, np.int32)
  rows = [[("m", 2), ("p", 4)]] + [[("m", 2), ("f", 2), ("m", 2)]] * 3
  loss, transparent = _spans_to_masks(rows, 6)
  adv = np.asarray(adv_lib.attempt_rloo_advantages(
      reward, gid, adv_lib.attempt_index(loss, transparent), 1, 2, scale="none"))
  np.testing.assert_allclose(adv[1, :2], 1.0 - 0.0)       # attempt 1: RLOO over all others
  np.testing.assert_allclose(adv[1, 4:], 1.0 - (-0.5))    # attempt 2: others that reached it
  np.testing.assert_allclose(adv[2, 4:], -0.5 - 0.25)     # (1 - 0.5) / 2
  np.testing.assert_allclose(adv[0, :2], 1.0 - 0.0)       # (1 - 0.5 - 0.5) / 3
  assert np.all(adv[:, 2:4][transparent[:, 2:4]] == 0)    # feedback tokens: no advantage
  rloo = np.asarray(adv_lib.grpo_advantages(reward, gid, 1, scale="none", estimator="rloo"))
  np.testing.assert_allclose(adv[:, 0], rloo)             # attempt 1 alone is RLOO


def test_broadcast_to_tokens():
  mask = np.array([[0, 1, 1], [1, 0, 0]], bool)
  got = adv_lib.broadcast_to_tokens(np.array([2.0, -1.0]), mask)
  np.testing.assert_array_equal(got, [[0, 2, 2], [-1, 0, 0]])


# ----------------------------------------------------------------------------
# Whitening.
# ----------------------------------------------------------------------------


def test_whiten_advantages_uses_only_valid_tokens():
  rng = np.random.default_rng(4)
  adv = rng.normal(3.0, 2.0, (4, 10)).astype(np.float32)
  mask = rng.random((4, 10)) < 0.6
  got = np.asarray(jax.jit(adv_lib.whiten_advantages)(adv, mask))
  valid = adv[mask].astype(np.float64)
  want = np.zeros_like(adv)
  for b, t in np.ndindex(*adv.shape):
    if mask[b, t]:
      want[b, t] = (adv[b, t] - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[mask].mean(), 0.0, atol=1e-5)
  # Huge values on masked tokens (feedback, padding) do not move the statistics.
  polluted = np.where(mask, adv, 1e5).astype(np.float32)
  np.testing.assert_allclose(adv_lib.whiten_advantages(polluted, mask), got, rtol=1e-6)
  no_shift = np.asarray(adv_lib.whiten_advantages(adv, mask, shift_mean=False))
  np.testing.assert_allclose(no_shift[mask], got[mask] + valid.mean(), rtol=1e-4)


# ----------------------------------------------------------------------------
# DAPO helpers.
# ----------------------------------------------------------------------------


def test_overlong_reward_shaping_eq13():
  max_len, cache_len = 100, 20
  lengths = np.array([10, 80, 81, 90, 100, 101, 500])
  got = np.asarray(adv_lib.overlong_reward_shaping(lengths, max_len, cache_len))
  want = []
  for y in lengths:
    if y <= max_len - cache_len:
      want.append(0.0)
    elif y <= max_len:
      want.append(((max_len - cache_len) - y) / cache_len)
    else:
      want.append(-1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got[3], -0.5)
  np.testing.assert_allclose(
      adv_lib.overlong_reward_shaping(lengths, max_len, cache_len, penalty=0.5), 0.5 * got)


def test_dapo_filter_groups_drops_all_equal_groups():
  reward = np.array([1, 1, 0, 1, 0, 0, 1, 0.5], np.float32)
  gid = np.array([3, 3, 7, 7, 0, 0, 9, 2])
  keep = adv_lib.dapo_filter_groups(reward, gid)
  np.testing.assert_array_equal(keep, [False, False, True, True, False, False, False, False])
