"""Multi-attempt PPO on Qwen2.5-Math-1.5B ("Learning from Failures in Multi-Attempt RL").

From the paper / issue: PPO with a critic, GAE γ=1 λ=0.99, KL k3 as a loss
term with coefficient 0.01, advantage whitening over the batch, actor lr 5e-7,
critic lr 1e-5, clip 0.2, N ~ U{1..5} attempts in training, a shared budget
of 3000 generated tokens, attempt ends on a complete \\boxed{}, rewards
+1 / −0.5 / −1, SimpleRL MATH L3–5 prompts.
Assumptions (not given there): 128 prompts per step with 1 episode each,
minibatch 64 (2 updates per step), 1 PPO epoch, chunk of 64 tokens between
checks, bf16 params, 500 steps.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.default_config()
  c.seed = 1
  c.algorithm = "ppo"
  c.model.path = "Qwen/Qwen2.5-Math-1.5B"
  c.model.dtype = "float32"          # fp32 master params and Adam state
  c.model.compute_dtype = "bfloat16"  # bf16 forward/backward and rollout copy
  c.model.remat = True
  c.data.name = "simplerl_math_l3to5"
  c.data.prompts_per_step = 128
  c.rollout.group_size = 1
  c.rollout.temperature = 1.0
  c.episode.kind = "multi_attempt"
  c.episode.min_attempts = 1
  c.episode.max_attempts = 5
  c.episode.chunk_tokens = 64
  c.episode.budget = 3000
  c.episode.attempt_end = "boxed"
  c.rl.adv_estimator = "gae"
  c.rl.gamma = 1.0
  c.rl.lam = 0.99
  c.rl.whiten = True
  c.rl.eps_low = c.rl.eps_high = 0.2
  c.rl.kl_coef = 0.01
  c.rl.kl_kind = "k3"
  c.rl.kl_in_reward = False
  c.rl.minibatch_size = 64
  c.rl.micro_batch_size = 8
  c.actor_optim.lr = 5e-7
  c.critic_optim.lr = 1e-5
  c.train.steps = 500
  c.train.ckpt_every = 20
  c.train.eval_every = 50
  c.eval.benchmarks = "math500,aime24,amc23,minerva_math,olympiadbench"
  c.eval.mode = "attempts"
  c.eval.max_attempts = 5
  return c
