"""Policy, KL, entropy and value losses over padded [B, T] arrays.

Every function here is pure and jittable: inputs are padded arrays with a
boolean `mask` (the RolloutBatch `loss_mask`: model-generated, trained tokens),
string options are static Python values, and nothing loops over T.
Injected feedback tokens (`transparent_mask`) are never in `loss_mask`, so they
are out of every loss here by construction.

Papers, for reading beside the code:
  PPO      Schulman et al. 2017, "Proximal Policy Optimization", eq. 7 (clip), eq. 9 (value).
  DAPO     Yu et al. 2025, eq. 10 (clip-higher eps_low / eps_high, token-mean).
  DualClip Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5.
  LTE      "Learning to Reason from Trial and Error": regularized IS f(r) = r / (r + γ).
  LUFFY    Yan et al. 2025, "Learning to Reason under Off-Policy Guidance", eq. 6
           (policy shaping f(π) = π / (π + γ), behaviour probability taken as 1).
  Dr.GRPO  Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3 (constant normaliser).
  KL est.  Schulman 2020, "Approximating KL Divergence" (k1, k2, k3).
  GSPO     Zheng et al. 2025, "Group Sequence Policy Optimization" (Qwen), eq. 5-7
           (sequence ratio = geometric mean of token ratios; GSPO-token, eq. 13-14).
  CISPO    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with
           Lightning Attention", §3.1 eq. 4-5 (clip the IS weight, not the update).
  Rollout correction (TIS, MIS, IcePop): mars/rl/correction.py.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from mars.models.logprobs import entropy_from_logits

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Per-token surrogate of on-policy rows (rl.loss). "ppo" is the clipped surrogate
# of PPO, GRPO and DAPO (their differences are advantages, clip range, aggregation).
LOSS_TYPES = ("ppo", "gspo", "gspo_token", "cispo")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------
# Masked statistics.
# ----------------------------------------------------------------------------


def masked_sum(x, mask, axis=None):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of `x` over `mask`; 0 where the mask is empty (never NaN)."""
  count = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x, mask, unbiased: bool = True):
  """Variance of `x` over all masked entries (Bessel-corrected by default, as in TRL/verl)."""
  mean = masked_mean(x, mask)
  count = jnp.sum(mask)
  sq = masked_sum(jnp.square(x - mean), mask)
  denom = jnp.maximum(count - 1, 1) if unbiased else jnp.maximum(count, 1)
  return sq / denom


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std over masked entries; 0 outside the mask.

  Masked-out entries take no part in the statistics and come back as zeros, so
  padding, prompt and feedback tokens can never leak into the loss. With
  `shift_mean=False` the mean is added back (scale only), as in TRL/verl.
  """
  x = _f32(x)
  mean = masked_mean(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask, whitened, 0.0)


def masked_max(x, mask):
  """Max over masked entries; 0 when the mask is empty."""
  m = jnp.max(jnp.where(mask, x, -jnp.inf))
  return jnp.where(jnp.any(mask), m, 0.0)


# ----------------------------------------------------------------------------
# Aggregation of per-token losses.
# ----------------------------------------------------------------------------


def aggregate(x, mask, mode: str = "token-mean", max_len_norm: Optional[float] = None,
              denominator=None):
  """Reduce a per-token loss [B, T] to a scalar.

  Modes:
    token-mean               sum over all valid tokens / number of valid tokens
                             (DAPO eq. 10: every token weighs the same).
    seq-mean-token-mean      each sequence's token mean, then the mean over
                             sequences (GRPO eq. 3: every sequence weighs the same).
    seq-mean-token-sum-norm  each sequence's token *sum* divided by the constant
                             `max_len_norm` (default: T, the padded length), then the
                             mean over sequences (Dr.GRPO eq. 3: no length bias).

  Sequence means count only rows with at least one valid token, so batch padding
  rows (all-False mask) do not dilute the loss.

  Args:
    denominator: optional global count that replaces the data-dependent divisor
      (valid tokens for token-mean, valid sequences for the seq modes). Pass the
      full-batch count when accumulating gradients over micro-batches, so that the
      micro-batch losses sum to the full-batch loss.
  """
  x = _f32(x)
  mask = jnp.asarray(mask, bool)
  if mode == "token-mean":
    total = masked_sum(x, mask)
    count = jnp.sum(mask) if denominator is None else denominator
    return total / jnp.maximum(count, 1)
  row_has_tokens = jnp.any(mask, axis=-1)
  if mode == "seq-mean-token-mean":
    per_seq = masked_mean(x, mask, axis=-1)
  elif mode == "seq-mean-token-sum-norm":
    norm = x.shape[-1] if max_len_norm is None else max_len_norm
    per_seq = masked_sum(x, mask, axis=-1) / norm
  else:
    raise ValueError(f"unknown agg_mode {mode!r}; expected one of {AGG_MODES}")
  num_seqs = jnp.sum(row_has_tokens) if denominator is None else denominator
  return jnp.sum(jnp.where(row_has_tokens, per_seq, 0.0)) / jnp.maximum(num_seqs, 1)


# ----------------------------------------------------------------------------
# Policy loss: clipped surrogate (on-policy) + regularized IS (off-policy).
# ----------------------------------------------------------------------------


def clipped_surrogate(ratio, advantages, eps_low: float = 0.2, eps_high: float = 0.2,
                      dual_clip_c: Optional[float] = None):
  """Per-token PPO loss −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (PPO eq. 7, DAPO eq. 10).

  Dual clip (Ye et al. 2020, eq. 5): for A < 0 the loss is further capped at −c·A,
  so a token whose ratio exploded past c stops pushing (c > 1).
  """
  loss_unclipped = -advantages * ratio
  loss_clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(loss_unclipped, loss_clipped)
  if dual_clip_c is not None:
    loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip_c * advantages), loss)
  return loss


def regularized_is_weight(log_ratio, gamma: float = 0.1):
  """f(r) = r / (r + γ) (LTE; LUFFY eq. 6 with r = π), from log r. Bounded in (0, 1), no clip.

  Written as sigmoid(log r − log γ), the same function: its autodiff gradient
  d f / d log r = f·(1 − f) = γ·r / (r + γ)² has no cancellation for large r
  (r/(r+γ) differentiated directly loses ~1e-4 relative in fp32 at r = 40).
  The gradient is large for small r and vanishes for large r, so low-probability
  off-policy tokens still receive signal.
  """
  return jax.nn.sigmoid(log_ratio - jnp.log(gamma))


def gspo_surrogate(log_ratio, advantages, mask, eps_low: float = 3e-4, eps_high: float = 4e-4,
                   token_level: bool = False):
  """Per-token GSPO loss (Zheng et al. 2025) from token log-ratios [B, T].

  The sequence ratio is the geometric mean of the token ratios,
  s_i = exp(mean_t log r_{i,t}) (eq. 7), clipped at the sequence level:
  per token, −min(s_i·A_t, clip(s_i, 1 − ε_low, 1 + ε_high)·A_t). Aggregated with
  seq-mean-token-mean and a sequence-constant A this is eq. 5 exactly; the
  gradient of s_i reaches every token of the row through the mean log-ratio.
  GSPO-token (eq. 13): s_{i,t} = sg(s_i) · π_θ(y_t) / sg(π_θ(y_t)), equal in
  value, but each token's gradient carries its own advantage A_t (for per-token
  advantages, e.g. a critic's). Returns (per-token loss, the ratio used [B, T]).
  """
  mask = jnp.asarray(mask, bool)
  seq_log = masked_mean(log_ratio, mask, axis=-1)[:, None]        # [B, 1]
  if token_level:
    seq_log = jax.lax.stop_gradient(seq_log) + log_ratio - jax.lax.stop_gradient(log_ratio)
  ratio = jnp.exp(jnp.broadcast_to(seq_log, log_ratio.shape))
  return clipped_surrogate(ratio, advantages, eps_low, eps_high), ratio


def cispo_surrogate(logp, log_ratio, advantages, eps_low: float = 1.0, eps_high: float = 5.0):
  """Per-token CISPO loss (MiniMax-M1 §3.1, eq. 4-5): −sg(clip(r, 1 − ε_low, 1 + ε_high))·A·log π_θ.

  The importance weight is clipped and stop-gradient; the update never is, so
  every token keeps the gradient −ŵ·A·∇log π_θ, also where PPO-clip's min picks
  the constant branch. ε_low ≥ 1 leaves no lower bound (the paper's setting).
  Returns (per-token loss, the unclipped ratio).
  """
  ratio = jnp.exp(log_ratio)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
  return -weight * advantages * logp, ratio


def policy_loss(logp, old_logp, advantages, loss_mask, is_off_policy, *,
                eps_low: float = 0.2, eps_high: float = 0.2,
                dual_clip_c: Optional[float] = None,
                offpolicy_gamma: float = 0.1,
                offpolicy_behaviour_one: bool = False,
                agg_mode: str = "token-mean",
                max_len_norm: Optional[float] = None,
                log_ratio_clamp: float = 20.0,
                denominator=None,
                loss_type: str = "ppo",
                gspo_eps_low: float = 3e-4, gspo_eps_high: float = 4e-4,
                cispo_eps_low: float = 1.0, cispo_eps_high: float = 5.0,
                rollout_weight=None):
  """Mixed-policy loss: a clipped surrogate on on-policy rows, f(r)·A on off-policy rows.

  Args:
    logp: [B, T] log π_θ of the taken tokens (current policy; for off-policy rows,
      scored under the *unhinted* prompt).
    old_logp: [B, T] log π_old (on-policy) or the behaviour log-prob under the
      hinted prompt (off-policy rows). Ignored for off-policy rows when
      `offpolicy_behaviour_one` (LUFFY: behaviour prob taken as 1, so r = π_θ).
    advantages: [B, T] per-token advantages (treated as constants).
    loss_mask: [B, T] bool, trained tokens.
    is_off_policy: [B] bool, selects the branch per row.
    eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high] (clip-higher, DAPO).
    dual_clip_c: optional dual-clip constant c > 1 for negative advantages (ppo only).
    offpolicy_gamma: γ of f(r) = r / (r + γ).
    log_ratio_clamp: |log r| is clamped before exp, so a stale token cannot give inf.
    agg_mode, max_len_norm, denominator: see `aggregate`.
    loss_type: on-policy rows' surrogate, one of LOSS_TYPES: "ppo" (clipped
      surrogate), "gspo" / "gspo_token" (`gspo_surrogate`, with gspo_eps_*),
      "cispo" (`cispo_surrogate`, with cispo_eps_*). Off-policy rows keep f(r)·A.
    rollout_weight: optional [B, T] stop-gradient weight of each token's loss
      (mars.rl.correction.rollout_weights: TIS / MIS / IcePop), on both branches.

  Returns:
    (loss, metrics). `approx_kl` is the k3 estimate of KL(π_old ‖ π_θ) on on-policy
    tokens, mean of (r − 1) − log r (≥ 0, unbiased; Schulman 2020); off-policy rows
    are excluded because their ratio is against a different (hinted) prompt.
    `clipfrac*` count tokens whose gradient the clip zeroes (ppo; gspo with the
    sequence ratio), or, for cispo, whose IS weight was clipped.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
  if dual_clip_c is not None and loss_type != "ppo":
    raise ValueError("dual_clip_c applies to the ppo clipped surrogate only.")
  logp, old_logp, advantages = _f32(logp), _f32(old_logp), _f32(advantages)
  loss_mask = jnp.asarray(loss_mask, bool)
  off_rows = jnp.asarray(is_off_policy, bool)[:, None]
  advantages = jax.lax.stop_gradient(advantages)
  on_mask = loss_mask & ~off_rows
  off_mask = loss_mask & off_rows

  log_ratio = jnp.clip(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  # LUFFY: the behaviour probability is 1, so the off-policy "ratio" is π_θ itself.
  off_log_ratio = jnp.clip(logp, -log_ratio_clamp, 0.0) if offpolicy_behaviour_one else log_ratio
  off_ratio = jnp.exp(off_log_ratio)

  clip_low, clip_high = eps_low, eps_high
  if loss_type == "ppo":
    on_loss, clip_ratio = clipped_surrogate(ratio, advantages, eps_low, eps_high,
                                            dual_clip_c), ratio
  elif loss_type in ("gspo", "gspo_token"):
    # The sequence mean runs over the row's on-policy trained tokens only.
    on_loss, clip_ratio = gspo_surrogate(jnp.where(on_mask, log_ratio, 0.0), advantages,
                                         on_mask, gspo_eps_low, gspo_eps_high,
                                         token_level=loss_type == "gspo_token")
    clip_low, clip_high = gspo_eps_low, gspo_eps_high
  else:
    on_loss, clip_ratio = cispo_surrogate(logp, log_ratio, advantages, cispo_eps_low,
                                          cispo_eps_high)
    clip_low, clip_high = cispo_eps_low, cispo_eps_high
  f_r = regularized_is_weight(off_log_ratio, offpolicy_gamma)
  off_loss = -advantages * f_r
  per_token = jnp.where(off_rows, off_loss, on_loss)
  if rollout_weight is not None:
    per_token = per_token * jax.lax.stop_gradient(_f32(rollout_weight))
  loss = aggregate(per_token, loss_mask, agg_mode, max_len_norm, denominator)

  ratio_sg, off_ratio_sg = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(off_ratio)
  clip_sg = jax.lax.stop_gradient(clip_ratio)
  if loss_type == "cispo":  # the weight is clipped whatever the advantage's sign
    clipped_low, clipped_high = clip_sg < 1.0 - clip_low, clip_sg > 1.0 + clip_high
  else:  # a clip "bites" (zero gradient) only where the min picks the clipped term
    clipped_low = (clip_sg < 1.0 - clip_low) & (advantages < 0)
    clipped_high = (clip_sg > 1.0 + clip_high) & (advantages > 0)
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "clipfrac_low": masked_mean(clipped_low, on_mask),
      "clipfrac_high": masked_mean(clipped_high, on_mask),
      "clipfrac": masked_mean(clipped_low | clipped_high, on_mask),
      "approx_kl": masked_mean(ratio_sg - 1.0 - jax.lax.stop_gradient(log_ratio), on_mask),
      "ratio_mean_on": masked_mean(ratio_sg, on_mask),
      "ratio_max_on": masked_max(ratio_sg, on_mask),
      "ratio_mean_off": masked_mean(off_ratio_sg, off_mask),
      "ratio_max_off": masked_max(off_ratio_sg, off_mask),
      "f_r_mean_off": masked_mean(jax.lax.stop_gradient(f_r), off_mask),
      "num_tokens_on": jnp.sum(on_mask),
      "num_tokens_off": jnp.sum(off_mask),
  }
  if loss_type in ("gspo", "gspo_token"):
    metrics["seq_ratio_mean_on"] = masked_mean(clip_sg, on_mask)
  if dual_clip_c is not None:
    metrics["clipfrac_dual"] = masked_mean((ratio_sg > dual_clip_c) & (advantages < 0), on_mask)
  return loss, metrics


# ----------------------------------------------------------------------------
# KL to the reference policy.
# ----------------------------------------------------------------------------


def kl_penalty(logp, ref_logp, kind: str = "k3", log_ratio_clamp: float = 20.0):
  """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman 2020).

  With d = log π_ref − log π_θ:
    k1 = −d                 unbiased, can be negative;
    k2 = ½ d²               biased, ≥ 0;
    k3 = exp(d) − d − 1     unbiased, ≥ 0, low variance; 0 iff the policies agree.
  Usable as a loss term (`kl_loss`) or, times a coefficient, as a per-token reward
  penalty for GAE. Returns [B, T]; mask it yourself.
  """
  d = _f32(ref_logp) - _f32(logp)
  if kind == "k1":
    return -d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  if kind == "k3":
    d = jnp.clip(d, -log_ratio_clamp, log_ratio_clamp)
    return jnp.exp(d) - d - 1.0
  raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def kl_loss(logp, ref_logp, loss_mask, kind: str = "k3", agg_mode: str = "token-mean",
            max_len_norm: Optional[float] = None, denominator=None):
  """Aggregated KL(π_θ ‖ π_ref) estimate, for use as `kl_coef · kl_loss` in the objective."""
  return aggregate(kl_penalty(logp, ref_logp, kind), loss_mask, agg_mode, max_len_norm,
                   denominator)


# ----------------------------------------------------------------------------
# Entropy.
# ----------------------------------------------------------------------------


def masked_entropy_mean(logits, mask, agg_mode: str = "token-mean",
                        max_len_norm: Optional[float] = None, denominator=None):
  """Aggregated policy entropy over trained tokens (the entropy bonus term)."""
  return aggregate(entropy_from_logits(logits), mask, agg_mode, max_len_norm, denominator)


# ----------------------------------------------------------------------------
# Value loss.
# ----------------------------------------------------------------------------


def explained_variance(values, returns, mask):
  """1 − Var[R − V] / Var[R] over masked tokens; 0 when Var[R] is 0."""
  var_returns = masked_var(returns, mask)
  ev = 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-12)
  return jnp.where(var_returns > 0, ev, 0.0)


def value_loss(values, old_values, returns, mask, clip_eps: Optional[float] = 0.2,
               agg_mode: str = "token-mean", max_len_norm: Optional[float] = None,
               denominator=None):
  """Clipped value loss ½·max((V − R)², (clip(V, V_old ± ε) − R)²) (PPO2 / OpenAI baselines).

  `clip_eps=None` gives the plain ½(V − R)². Returns (loss, metrics).
  """
  values, old_values = _f32(values), _f32(old_values)
  returns = jax.lax.stop_gradient(_f32(returns))
  mask = jnp.asarray(mask, bool)
  loss_unclipped = jnp.square(values - returns)
  if clip_eps is None:
    per_token = loss_unclipped
    clipped = jnp.zeros_like(mask)
  else:
    values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    loss_clipped = jnp.square(values_clipped - returns)
    per_token = jnp.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
  loss = 0.5 * aggregate(per_token, mask, agg_mode, max_len_norm, denominator)
  values_sg = jax.lax.stop_gradient(values)
  metrics = {
      "vf_loss": jax.lax.stop_gradient(loss),
      "vf_clipfrac": masked_mean(clipped, mask),
      "vf_explained_variance": explained_variance(values_sg, returns, mask),
      "value_mean": masked_mean(values_sg, mask),
      "return_mean": masked_mean(returns, mask),
  }
  return loss, metrics
