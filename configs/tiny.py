"""The embedded CPU demo (the README's first command; no downloads, 2 cores).

A tiny Qwen3-architecture model and a tokenizer built by mars learn the
candidates task (mars/demo/): the prompt lists k candidates, one is
right and unknowable from the prompt, so single-attempt accuracy is capped at
1/k, but a policy that never repeats a rejected candidate reaches min(N/k, 1)
with N attempts. Multi-attempt training must teach it to use the feedback.

A format-only supervised warm start (mars/sft.py) teaches "\\boxed{c}" first;
it picks candidates uniformly (after rejections too, the rejected ones
included), so it cannot leak the answer or the non-repetition RL must learn.

    python -m mars.train                                  # this config
    python -m mars.train --config.episode.min_attempts=1 --config.episode.max_attempts=1
                                                          # single-turn baseline
    python -m mars.train --config.lte.enabled=True --config.episode.kind=single_turn \
        --config.rl.adv_estimator=grpo --config.actor_optim.lr=1e-3 \
        --config.data.candidates_rule=first --config.data.candidates_k=8 \
        --config.sft.hint_fraction=0.75 --config.sft.steps=1000
                                                          # LTE on the learnable rule; the warm
                                                          # start also teaches reading hints
                                                          # (benchmarks/demo.py --parts lte-first
                                                          # adds the recorded runs' settings)

Choices that differ from mars.config's defaults, and why (measured on 2 CPU
cores; the README's demo section has the figures):
  algorithm = grpo, rl.adv_estimator = attempt_rloo: no critic to train, so
      the ~10 min go to policy updates; the baseline of an attempt-j token is
      the mean reward of the group's other episodes that reached attempt j
      (mars/rl/advantages.py). Measured at 140 steps with the cosine lr, N = 3
      / 4 accuracy was 0.90 / 0.91 and 0.91 / 0.91 on seeds 0 / 1, against
      GRPO's 0.91 / 0.94 and 0.80 / 0.87.
      (The paper's PPO + critic, configs/multi_attempt_*, also runs here with
      --config.algorithm=ppo --config.rl.adv_estimator=gae; at this budget it
      was ~45% slower per step and no better.)
  rl.agg_mode = seq-mean-token-mean: with token-mean, failed episodes (more
      attempts, more tokens) outweigh solved ones, so the format tokens every
      attempt shares get a net negative advantage; measured: "The" at the
      start of an answer fell from p = 0.997 to < 0.004 in 60 steps and junk
      tokens crept in after "\\boxed". Per-episode means cancel that bias.
  episode.chunk_tokens = 6, budget = 30: an attempt ("The answer is \\boxed{7}")
      is 6 tokens, so one chunk is one attempt and nothing is sampled and
      rewound; 4 attempts fit in 30 tokens, keeping packed rows at 160-192 columns.
  episode.attempt_end = boxed (the exact cut; the paper configs use the
      reference's "chunk"): every figure below was measured with it. With one
      chunk per attempt the two differ only when the model writes tokens after
      its box within the chunk (chunk mode keeps them and grades the last box;
      the exact cut drops them); switching would need the recorded runs
      redone (~10 min each on 2 cores), not just relabelled.
  episode.min_attempts = 2 (max 4): an episode with N = 1 has no feedback turn,
      so it carries no signal about using feedback.
  actor_optim: lr 2e-3, 10 warmup updates, clip 0.5: the tiny model barely
      moves at 1e-4; 2e-3 without warmup collapsed to "no answer" within a few
      steps (Adam's first steps are sign-like and hit every weight at once).
  rl.kl_coef = 0, ppo_epochs = 1: on-policy GRPO without a reference model.
  rl.recompute_old_logp = False: the sampler's logprob is the old logprob. On
      CPU in fp32 it equals the trainer's recompute (logp_mismatch/on_policy_max stayed
      under 1.5e-5 over a run), and skipping the pass saves 0.44 s a step.
  actor_optim.schedule = cosine (to 0.1× lr): measured at 140 steps with GRPO
      (seed 0), greedy accuracy with 3 / 4 attempts was 0.91 / 0.94 against
      0.81 / 0.85 at a constant lr (probably: the decay lets the policy settle on the
      non-repetition it has found instead of moving on at full lr).
  train.steps = 80, sft.steps = 200: the 6-minute target (issue #23), from the
      idle per-step figures (3.2 s a step, ~0.26 s an SFT step). In a CI run
      under load (3-4x slower: 15.8 min) held-out accuracy with 1..4 attempts
      went from 0.30/0.44/0.51/0.52 after the warm start to 0.26/0.56/0.68/0.73
      (128 problems, greedy), train reward 0.26 -> 0.47 (first / last 10 steps).
      The old 140 steps after 300 SFT steps (~10 min) reached 0.34/0.71/0.90/0.91
      (seed 1: 0.33/0.70/0.91/0.91) against the ceiling 0.33/0.67/1/1
      (docs/experiments.md, benchmarks/results/demo_cpu*.json): run
      --config.train.steps=140 --config.sft.steps=300 for that.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.default_config()
  c.seed = 0
  c.algorithm = "grpo"
  c.rl.adv_estimator = "attempt_rloo"
  c.model.path = ""                  # the demo model; no downloads
  # Its 2 layers unrolled: update 1.56 -> 1.33 s per step, first-step compiles
  # 35 -> 25 s, same rewards (8-step run; docs/experiments.md).
  c.model.scan_layers = False
  c.data.name = "candidates"
  c.data.candidates_k = 3
  c.data.prompts_per_step = 16
  c.rollout.group_size = 8
  c.rollout.temperature = 1.0
  c.rollout.max_new_tokens = 16
  c.episode.kind = "multi_attempt"
  c.episode.min_attempts = 2
  c.episode.max_attempts = 4
  c.episode.chunk_tokens = 6
  c.episode.budget = 30
  c.episode.attempt_end = "boxed"
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 64
  c.rl.kl_coef = 0.0
  c.rl.agg_mode = "seq-mean-token-mean"
  c.actor_optim.lr = 2e-3
  c.actor_optim.warmup_steps = 10
  c.actor_optim.grad_clip = 0.5
  c.actor_optim.schedule = "cosine"  # to 0.1× over the run (min_lr_ratio)
  c.rl.recompute_old_logp = False
  c.sft.steps = 200
  c.sft.batch_size = 16
  c.sft.lr = 3e-3
  c.train.steps = 80
  c.train.ckpt_every = 10
  c.train.keep = 2
  c.train.grader_workers = 2
  c.train.eval_every = c.train.steps  # held-out eval at the end only, and before RL:
  c.train.eval_before = True          # the summary's before/after table
  c.eval.benchmarks = "candidates"
  c.eval.max_attempts = 4
  c.eval.limit = 128
  return c
