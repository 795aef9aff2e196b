"""GSPO on Qwen3-4B-Base (Zheng et al. 2025, "Group Sequence Policy Optimization", Qwen).

Where each value comes from:
  rl.loss = "gspo": the sequence-level ratio s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|)
      (the geometric mean of the token ratios, paper eq. 7), clipped per sequence (eq. 5).
  rl.gspo_eps_low = 3e-4, rl.gspo_eps_high = 4e-4: the paper's §5.1 ("we set the left
      and right clipping ranges in Eq. (5) to 3e-4 and 4e-4"). Two orders of magnitude
      below PPO's 0.2 because s_i is a per-token geometric mean.
  rl.agg_mode = "seq-mean-token-mean": eq. 5 averages over the G sequences of a group,
      each sequence once (mars refuses other modes with gspo).
  Group advantages (GRPO's normalised rewards, eq. 6 of GSPO) and everything else:
      configs/grpo_4b.py (the LTE paper's GRPO baseline: G = 8, lr 1e-6, 128 prompts,
      8192 tokens, no KL). With a critic, use rl.loss = "gspo_token" (per-token
      advantages in the gradient, the paper's eq. 13) and algorithm = "ppo".
  rl.recompute_old_logp = True (default) and rl.rollout_correction = "none": the
      sampler/trainer ratio is logged (rollout_corr/*). GSPO's sequence ratio itself
      tolerates token-level mismatch (the paper's MoE argument); to correct it, use
      --config.rl.rollout_correction=mis --config.rl.rollout_correction_level=sequence
      (a sequence-level correction; token-level ones are refused with rl.loss=gspo).
Assumptions: 2 minibatch updates per step (grpo_4b's 512-row minibatches); GSPO
trains each rollout batch in several minibatches (the paper's Figure 1 setup), so
the ratio departs from 1 and the clip bites; with one update per step s_i = 1 exactly.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, "grpo_4b.py")
  c.rl.loss = "gspo"
  c.rl.gspo_eps_low = 3e-4
  c.rl.gspo_eps_high = 4e-4
  c.rl.agg_mode = "seq-mean-token-mean"
  c.rl.recompute_old_logp = True
  return c
