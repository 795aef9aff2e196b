"""Rollout correction: the sampler-vs-trainer ratio ρ and what the loss does with it.

The sampler (bf16 decode, other kernels, a stale copy of the weights in a
one-step-off run) and the trainer never compute the same probabilities. With
rl.recompute_old_logp=True the batch holds both for every trained token:

    ρ_t = π_trainer(y_t) / π_sampler(y_t) = exp(old_logp_t − sampler_logp_t)

where both are taken under the context the token was *sampled* in: the
unhinted prompt for on-policy rows, the hinted prompt for LTE's replacements
(their `old_logp` is the trainer's rescore under the hinted prompt; see
`mars.episodes.lte.old_logp_for_loss`). A sequence's ρ is the product of its
token ratios or their geometric mean (`seq_ratio`).

Each method turns ρ into a per-token, stop-gradient weight that multiplies the
per-token policy loss (PPO-clip, GSPO, CISPO, or LTE's f(r)·A). Masked tokens
get weight 0 and keep their place in the loss normaliser, so the loss scale does
not depend on how many tokens were masked (IcePop's eq. as written; verl
instead renormalises over the kept tokens).

  TIS     w = min(ρ, C).  Yao et al. 2025, "Your Efficient RL Framework Secretly
          Brings You Off-Policy RL Training" (C = 2).
  MIS     w = ρ · 1[lo ≤ ρ ≤ hi]: the IS weight kept inside the band, dropped (0)
          outside it, per token or per sequence. Liu, Li et al. 2025, "When Speed
          Kills Stability: Demystifying RL Collapse from the Training-Inference
          Mismatch" (masked IS / rejection sampling).
  IcePop  w = 1[α ≤ ρ ≤ β] per token: tokens outside the band are masked from
          the gradient, the rest train unweighted. Ling Team 2025, the Ring-1T
          report ("Every Step Evolves", IcePop; α = 0.5, β = 5).

Every function is pure and jittable; options are static Python values.
"""
import jax
import jax.numpy as jnp

METHODS = ("none", "tis", "mis", "icepop")
LEVELS = ("token", "sequence")
SEQ_RATIOS = ("geometric", "product")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def token_log_rho(trainer_logp, sampler_logp, mask, clamp: float = 20.0):
  """log ρ per token, [B, T]; 0 outside `mask`, |log ρ| clamped so exp stays finite."""
  d = jnp.clip(_f32(trainer_logp) - _f32(sampler_logp), -clamp, clamp)
  return jnp.where(mask, d, 0.0)


def sequence_log_rho(log_rho, mask, seq_ratio: str = "geometric", clamp: float = 20.0):
  """log ρ of each sequence, [B]: Σ_t log ρ_t (product) or its mean (geometric mean)."""
  mask = jnp.asarray(mask, bool)
  total = jnp.sum(jnp.where(mask, log_rho, 0.0), axis=-1)
  if seq_ratio == "product":
    return jnp.clip(total, -clamp, clamp)
  if seq_ratio == "geometric":
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1)
  raise ValueError(f"unknown seq_ratio {seq_ratio!r}; expected one of {SEQ_RATIOS}")


def tis_weight(rho, cap: float):
  """Truncated IS (Yao et al. 2025): min(ρ, C)."""
  return jnp.minimum(rho, cap)


def mis_weight(rho, lo: float, hi: float):
  """Masked IS: ρ inside [lo, hi], 0 outside (the sample is dropped, not truncated)."""
  return jnp.where((rho >= lo) & (rho <= hi), rho, 0.0)


def icepop_weight(rho, alpha: float, beta: float):
  """IcePop (Ring-1T report): 1 inside [α, β], 0 outside (masked from the gradient)."""
  return jnp.where((rho >= alpha) & (rho <= beta), 1.0, 0.0)


def rollout_weights(trainer_logp, sampler_logp, mask, *, method: str = "none",
                    level: str = "token", seq_ratio: str = "geometric",
                    tis_cap: float = 2.0, mis_lo: float = 0.5, mis_hi: float = 2.0,
                    icepop_alpha: float = 0.5, icepop_beta: float = 5.0,
                    clamp: float = 20.0):
  """Per-token loss weights of a correction method, and what it did.

  Returns (weight, masked, truncated), all [B, T] and stop-gradient:
    weight     f32 multiplier of each token's loss (1 for method "none"; 0 outside `mask`);
    masked     bool, trained tokens the method dropped (weight 0);
    truncated  bool, trained tokens whose weight TIS capped at C.
  `level="sequence"` computes one ρ per row (see `sequence_log_rho`) and
  broadcasts the row's decision to its tokens; IcePop is token-level only.
  """
  mask = jnp.asarray(mask, bool)
  none = jnp.zeros(mask.shape, bool)
  if method == "none":
    return jnp.where(mask, 1.0, 0.0), none, none
  if method not in METHODS:
    raise ValueError(f"unknown rollout correction {method!r}; expected one of {METHODS}")
  if level not in LEVELS:
    raise ValueError(f"unknown correction level {level!r}; expected one of {LEVELS}")
  log_rho = token_log_rho(trainer_logp, sampler_logp, mask, clamp)
  if level == "sequence":
    if method == "icepop":
      raise ValueError("IcePop masks tokens: level must be 'token'.")
    log_rho = jnp.broadcast_to(sequence_log_rho(log_rho, mask, seq_ratio, clamp)[:, None],
                               mask.shape)
  rho = jnp.exp(log_rho)
  if method == "tis":
    weight = tis_weight(rho, tis_cap)
    truncated = mask & (rho > tis_cap)
  elif method == "mis":
    weight, truncated = mis_weight(rho, mis_lo, mis_hi), none
  else:
    weight, truncated = icepop_weight(rho, icepop_alpha, icepop_beta), none
  weight = jax.lax.stop_gradient(jnp.where(mask, weight, 0.0))
  masked = mask & (weight == 0.0)
  return weight, masked, truncated


def mismatch_metrics(trainer_logp, sampler_logp, mask, is_off_policy, masked=None,
                     truncated=None, clamp: float = 20.0, prefix: str = "rollout_corr/") -> dict:
  """Scalars of the sampler/trainer mismatch over one batch (all stop-gradient).

  rho_{mean,max}_{on,hinted}, log_rho_{mean,absmax}_{on,hinted}: token ρ on
    on-policy rows and on LTE's hinted replacements;
  kl_k1, kl_k3: KL(π_sampler ‖ π_trainer) from the sampled tokens, mean of
    −log ρ (k1, unbiased) and ρ − 1 − log ρ (k3, unbiased and ≥ 0; Schulman 2020);
  token_{masked,truncated}_frac: trained tokens the correction dropped / capped;
  seq_{masked,truncated}_frac: rows with at least one such token (for a
    sequence-level method: rows dropped / capped whole).
  """
  mask = jnp.asarray(mask, bool)
  off = jnp.asarray(is_off_policy, bool)[:, None]
  log_rho = jax.lax.stop_gradient(token_log_rho(trainer_logp, sampler_logp, mask, clamp))
  rho = jnp.exp(log_rho)
  count = lambda m: jnp.maximum(jnp.sum(m), 1)
  mean = lambda x, m: jnp.sum(jnp.where(m, x, 0.0)) / count(m)
  mx = lambda x, m: jnp.where(jnp.any(m), jnp.max(jnp.where(m, x, -jnp.inf)), 0.0)
  out = {}
  for name, m in (("on", mask & ~off), ("hinted", mask & off)):
    out[f"rho_mean_{name}"] = mean(rho, m)
    out[f"rho_max_{name}"] = mx(rho, m)
    out[f"log_rho_mean_{name}"] = mean(log_rho, m)
    out[f"log_rho_absmax_{name}"] = mx(jnp.abs(log_rho), m)
  out["kl_k1"] = mean(-log_rho, mask)
  out["kl_k3"] = mean(rho - 1.0 - log_rho, mask)
  rows = jnp.any(mask, axis=-1)
  for name, flags in (("masked", masked), ("truncated", truncated)):
    if flags is None:
      continue
    flags = jnp.asarray(flags, bool) & mask
    out[f"token_{name}_frac"] = mean(flags.astype(jnp.float32), mask)
    out[f"seq_{name}_frac"] = (jnp.sum(jnp.any(flags, axis=-1) & rows) / count(rows))
  return {prefix + k: v for k, v in out.items()}


def options(rl_cfg) -> dict:
  """The correction options of an rl config (dict or ConfigDict, every field required)."""
  return dict(method=str(rl_cfg["rollout_correction"]),
              level=str(rl_cfg["rollout_correction_level"]),
              seq_ratio=str(rl_cfg["rollout_seq_ratio"]),
              tis_cap=float(rl_cfg["tis_cap"]),
              mis_lo=float(rl_cfg["mis_lo"]), mis_hi=float(rl_cfg["mis_hi"]),
              icepop_alpha=float(rl_cfg["icepop_alpha"]),
              icepop_beta=float(rl_cfg["icepop_beta"]))

