"""CISPO on Qwen3-4B-Base (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute
Efficiently with Lightning Attention", §3.1).

Where each value comes from:
  rl.loss = "cispo": J = E[1/Σ|o_i| Σ_i Σ_t sg(r̂_{i,t}) Â_{i,t} log π_θ(o_{i,t})] (eq. 4),
      r̂ = clip(r, 1 − ε_low^IS, 1 + ε_high^IS) (eq. 5): the IS weight is clipped and
      stop-gradient, so every token keeps a gradient (PPO-clip zeroes those outside
      its range, often the rare "reflective" tokens the paper cares about).
  rl.agg_mode = "token-mean": eq. 4 normalises by the batch's total token count.
  rl.cispo_eps_low = 1.0: "we did not impose a lower bound on the IS weight by
      setting ε_low^IS to a large value" (§3.1); 1.0 makes the lower bound 0.
  rl.cispo_eps_high = 5.0: an assumption. MiniMax-M1 tuned ε_high^IS but did not
      publish it; 5.0 is slime's CISPO default, after ScaleRL (Khatri et al. 2025,
      "The Art of Scaling RL Compute"), which found CISPO robust to this choice.
  Group advantages and everything else: configs/grpo_4b.py (GRPO baseline of the LTE
      paper). With a critic, set algorithm = "ppo", rl.adv_estimator = "gae".
  rl.rollout_correction = "tis", rl.tis_cap = 2.0: Yao et al. 2025's truncated IS with
      C = 2, on ρ = π_trainer / π_sampler (bf16 rollout vs fp32-master trainer);
      CISPO's own weight is π_θ / π_old and does not see that mismatch.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, "grpo_4b.py")
  c.rl.loss = "cispo"
  c.rl.cispo_eps_low = 1.0
  c.rl.cispo_eps_high = 5.0
  c.rl.agg_mode = "token-mean"
  c.rl.recompute_old_logp = True
  c.rl.rollout_correction = "tis"
  c.rl.tis_cap = 2.0
  return c
