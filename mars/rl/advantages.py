"""Advantage estimators over padded arrays: GAE with transparent spans, GRPO/RLOO, DAPO helpers.

Device functions are pure and jittable (static Python options, no loop over T
except a reverse `lax.scan` for GAE). The DAPO dynamic-sampling helpers run on
the host, between rollouts, with numpy.

Papers:
  GAE      Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16.
  GRPO     Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision).
  Dr.GRPO  Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3 (no std scaling).
  RLOO     Ahmadian et al. 2024, "Back to Basics", eq. 6 (leave-one-out baseline);
           `attempt_rloo` takes it per attempt of a multi-attempt episode (mars).
  DAPO     Yu et al. 2025, eq. 11 (dynamic sampling), eq. 13 (overlong reward shaping).
"""


import jax
import jax.numpy as jnp
import numpy as np

from mars.rl.losses import masked_whiten


# ----------------------------------------------------------------------------
# Token-level rewards.
# ----------------------------------------------------------------------------


def last_token_one_hot(mask):
  """[B, T] one-hot of the last True in each row of `mask`; all-False rows stay all False."""
  mask = jnp.asarray(mask, bool)
  length = mask.shape[-1]
  last = length - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
  return (jnp.arange(length)[None, :] == last[:, None]) & jnp.any(mask, axis=-1, keepdims=True)


def place_terminal_reward(reward, loss_mask):
  """Scalar episode reward [B] placed on the last `loss_mask` token of each row -> [B, T].

  Rows with no trained token get no reward (there is nothing to credit).
  """
  return jnp.where(last_token_one_hot(loss_mask), jnp.asarray(reward, jnp.float32)[:, None], 0.0)


def token_rewards(reward, loss_mask, kl=None, kl_coef: float = 0.0):
  """r_t = terminal reward on the last model token − kl_coef · KL_t on every model token.

  `kl` is a per-token estimate from `losses.kl_penalty` (the "KL in the reward"
  variant of InstructGPT/PPO-RLHF); pass None to use KL as a loss term instead.
  """
  rewards = place_terminal_reward(reward, loss_mask)
  if kl is not None:
    rewards = rewards - kl_coef * jnp.where(loss_mask, jnp.asarray(kl, jnp.float32), 0.0)
  return rewards


# ----------------------------------------------------------------------------
# GAE with transparent spans.
# ----------------------------------------------------------------------------


def gae(rewards_tok, values, loss_mask, transparent_mask=None, gamma: float = 1.0,
        lam: float = 1.0):
  """GAE(γ, λ) over model tokens only (Schulman et al. 2016, eq. 16).

    δ_t = r_t + γ V_{next(t)} − V_t,   Â_t = δ_t + γλ Â_{next(t)},   R_t = Â_t + V_t,

  where next(t) is the next *model* token after t (V = Â = 0 past the last one).
  Every non-model token — injected feedback (`transparent_mask`), prompt and
  padding alike — is skipped as if absent: it gets Â = R = 0, and the recursion
  carries (V, Â) straight across it. This equals γ = λ = 1 across transparent spans
  with the next model token's value as bootstrap, and makes GAE over
  [model, feedback, model] identical to GAE over the model tokens concatenated.

  Rewards sitting on non-model tokens are ignored; `place_terminal_reward` puts
  the episode reward on the last model token.

  Args:
    rewards_tok: [B, T] f32 per-token rewards (terminal reward + optional KL penalties).
    values: [B, T] f32 critic values V(s_t) at each token.
    loss_mask: [B, T] bool, model-generated tokens.
    transparent_mask: [B, T] bool, injected tokens. Only documents intent: they are
      skipped because they are outside `loss_mask` (a token in both is an error and
      is treated as transparent).
  Returns:
    (advantages, returns), both [B, T] f32, zero outside the model tokens.
  """
  is_model = jnp.asarray(loss_mask, bool)
  if transparent_mask is not None:
    is_model = is_model & ~jnp.asarray(transparent_mask, bool)
  rewards_tok = jnp.asarray(rewards_tok, jnp.float32)
  values = jax.lax.stop_gradient(jnp.asarray(values, jnp.float32))

  def step(carry, xs):
    next_value, next_adv = carry
    reward, value, model = xs
    delta = reward + gamma * next_value - value
    adv = delta + gamma * lam * next_adv
    # Non-model tokens leave the carry untouched: the recursion passes through them.
    carry = (jnp.where(model, value, next_value), jnp.where(model, adv, next_adv))
    return carry, jnp.where(model, adv, 0.0)

  batch = rewards_tok.shape[0]
  init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
  xs = (rewards_tok.T, values.T, is_model.T)  # scan over T, vectorised over B
  _, adv_t = jax.lax.scan(step, init, xs, reverse=True)
  advantages = adv_t.T
  returns = jnp.where(is_model, advantages + values, 0.0)
  return advantages, returns


# ----------------------------------------------------------------------------
# Group-relative advantages (GRPO / Dr.GRPO / RLOO).
# ----------------------------------------------------------------------------


def _group_std(centered, valid, count, group_sum, ddof: int):
  """[B] std of each row's group from its centered rewards (`ddof` as torch.std's correction)."""
  sq_dev = jnp.where(valid, jnp.square(centered), 0.0)
  return jnp.sqrt(group_sum(sq_dev) / jnp.maximum(count - ddof, 1.0))


def grpo_advantages(reward, group_id, num_groups: int, *, scale: str = "std",
                    estimator: str = "grpo", eps: float = 1e-6, ddof: int = 1,
                    row_mask=None):
  """Per-sequence group-relative advantage [B].

    grpo:  A_i = r_i − mean_g(r)                               (DeepSeekMath §4.1.2)
    rloo:  A_i = r_i − mean_{j≠i, j∈g}(r_j) = n/(n−1)·(r_i − mean_g)   (RLOO eq. 6)
  With scale="std" the result is divided by (std_g + eps) (GRPO); scale="none"
  keeps the raw difference (Dr.GRPO eq. 3). std_g uses `ddof` (1 = unbiased, as
  torch.std in the reference GRPO implementations).

  Groups are arbitrary int ids in [0, num_groups) (segment ops, any order). Groups
  of size 1 get advantage 0: there is no baseline to compare to. Rows with
  `row_mask` False (batch padding) take no part in any group and get 0.
  """
  reward = jnp.asarray(reward, jnp.float32)
  group_id = jnp.asarray(group_id, jnp.int32)
  valid = jnp.ones_like(reward, bool) if row_mask is None else jnp.asarray(row_mask, bool)
  reward = jnp.where(valid, reward, 0.0)

  def group_sum(x):  # [B] -> [B]: sum over each row's group
    return jax.ops.segment_sum(x, group_id, num_segments=num_groups)[group_id]

  count = group_sum(valid.astype(jnp.float32))
  mean = group_sum(reward) / jnp.maximum(count, 1.0)
  centered = reward - mean
  if estimator == "grpo":
    adv = centered
  elif estimator == "rloo":
    adv = centered * count / jnp.maximum(count - 1.0, 1.0)
  else:
    raise ValueError(f"unknown estimator {estimator!r}; expected 'grpo' or 'rloo'")

  if scale == "std":
    adv = adv / (_group_std(centered, valid, count, group_sum, ddof) + eps)
  elif scale != "none":
    raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
  return jnp.where(valid & (count > 1), adv, 0.0)


def attempt_index(loss_mask, transparent_mask):
  """[B, T] int32: 1 + the number of injected (feedback) spans before each token.

  In a multi-attempt row [prompt | attempt 1 | feedback | attempt 2 | ...] the
  model tokens of attempt j get j; prompt and padding tokens get 0.
  """
  injected = jnp.asarray(transparent_mask, bool)
  starts = injected & ~jnp.pad(injected, ((0, 0), (1, 0)))[:, :-1]
  index = 1 + jnp.cumsum(starts, axis=-1, dtype=jnp.int32)
  return jnp.where(jnp.asarray(loss_mask, bool) & ~injected, index, 0)


def attempt_rloo_advantages(reward, group_id, attempt_idx, num_groups: int, max_attempts: int, *,
                            scale: str = "std", eps: float = 1e-6, ddof: int = 1):
  """Token advantages [B, T] with a leave-one-out baseline per (group, attempt).

  A token of attempt j in episode i gets

    Â = (r_i − mean{ r_m : m ≠ i in i's group, episode m reached attempt j }) / (std_g + eps)

  falling back to the whole group's leave-one-out mean (RLOO) when no other
  episode reached attempt j. Reaching attempt j is a function of the history
  before it, so this is a valid state-dependent baseline (unbiased). Why:
  with one outcome baseline for the whole episode, getting to a second attempt
  means the first one failed, so a fresh *and* a repeated second answer both
  got negative advantages (measured −0.15 vs −0.42 on the demo); compared with
  the group's other episodes that also reached attempt 2, the fresh answer is
  above its baseline and the repeat below. With one attempt it is RLOO
  (scaled by the group std like GRPO if scale="std"; "none": unscaled).

  Args:
    reward: [B] episode rewards. group_id: [B] ints in [0, num_groups).
    attempt_idx: [B, T] from `attempt_index` (0 = not a trained token).
    max_attempts: A, the largest attempt index (a static int).
  """
  reward = jnp.asarray(reward, jnp.float32)
  group_id = jnp.asarray(group_id, jnp.int32)
  attempt_idx = jnp.asarray(attempt_idx, jnp.int32)
  group_sum = lambda x: jax.ops.segment_sum(x, group_id, num_segments=num_groups)[group_id]
  last = jnp.max(attempt_idx, axis=-1)                                       # [B]
  reached = (jnp.arange(1, max_attempts + 1)[None, :] <= last[:, None]).astype(jnp.float32)
  others = group_sum(reached) - reached                                      # [B, A]
  others_sum = group_sum(reached * reward[:, None]) - reached * reward[:, None]
  count = group_sum(jnp.ones_like(reward))
  loo_group = (group_sum(reward) - reward) / jnp.maximum(count - 1.0, 1.0)   # RLOO
  baseline = jnp.where(others > 0, others_sum / jnp.maximum(others, 1.0), loo_group[:, None])
  per_token = jnp.take_along_axis(baseline, jnp.clip(attempt_idx - 1, 0, max_attempts - 1), -1)
  adv = reward[:, None] - per_token
  if scale == "std":
    centered = reward - group_sum(reward) / count
    std = _group_std(centered, jnp.ones_like(reward, bool), count, group_sum, ddof)
    adv = adv / (std[:, None] + eps)
  elif scale != "none":
    raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
  return jnp.where((attempt_idx > 0) & (count[:, None] > 1), adv, 0.0)


def broadcast_to_tokens(seq_advantages, loss_mask):
  """[B] per-sequence advantage -> [B, T] on trained tokens, 0 elsewhere."""
  return jnp.where(loss_mask, jnp.asarray(seq_advantages, jnp.float32)[:, None], 0.0)


def whiten_advantages(advantages, mask, shift_mean: bool = True, eps: float = 1e-8):
  """Batch whitening of token advantages over valid tokens (PPO in the multi-attempt reference).

  Statistics use only `mask` tokens; other tokens come back as 0.
  """
  return masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)


# ----------------------------------------------------------------------------
# DAPO helpers.
# ----------------------------------------------------------------------------


def overlong_reward_shaping(lengths, max_len: int, cache_len: int, penalty: float = 1.0):
  """Soft overlong punishment R_length(y) [B] (DAPO eq. 13), scaled by `penalty`.

    0                                     if |y| ≤ L_max − L_cache
    ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
    −1                                    if |y| > L_max
  Added to the task reward by the caller.
  """
  lengths = jnp.asarray(lengths, jnp.float32)
  soft_start = max_len - cache_len
  ramp = (soft_start - lengths) / cache_len
  shaped = jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))
  return penalty * shaped


def dapo_filter_groups(reward, group_id):
  """Host-side keep mask [B] for dynamic sampling (DAPO eq. 11).

  Drops every row of a group whose rewards are all equal (all correct, all
  wrong, or a group of one): such groups have zero advantage and only dilute
  the batch.
  """
  reward = np.asarray(reward, np.float32)
  group_id = np.asarray(group_id)
  keep = np.zeros(reward.shape, bool)
  for g in np.unique(group_id):
    rows = group_id == g
    keep[rows] = np.ptp(reward[rows]) > 0
  return keep
