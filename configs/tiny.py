"""The embedded CPU demo (the README's first command; no downloads, 2 cores).

A tiny Qwen3-architecture model and a tokenizer built by mars learn the
candidates task (mars/demo_task.py): the prompt lists k candidates, one is
right and unknowable from the prompt, so single-attempt accuracy is capped at
1/k, but a policy that never repeats a rejected candidate reaches min(N/k, 1)
with N attempts. Multi-attempt training must teach it to use the feedback.

A format-only supervised warm start (mars/sft.py) teaches "\\boxed{c}" first;
it picks candidates uniformly, so it cannot leak the answer.

    python -m mars.train                                  # this config
    python -m mars.train --config.episode.max_attempts=1  # single-turn baseline
    python -m mars.train --config.lte.enabled=True --config.episode.kind=single_turn
"""
from mars import config as mars_config


def get_config():
  c = mars_config.default_config()
  c.seed = 0
  c.algorithm = "grpo"
  c.rl.adv_estimator = "grpo"
  c.model.path = ""                  # the demo model; no downloads
  c.data.name = "candidates"
  c.data.candidates_k = 3
  c.data.prompts_per_step = 16
  c.rollout.group_size = 8
  c.rollout.temperature = 1.0
  c.rollout.max_new_tokens = 16
  c.episode.kind = "multi_attempt"
  c.episode.min_attempts = 1
  c.episode.max_attempts = 4
  c.episode.chunk_tokens = 16
  c.episode.budget = 64
  c.episode.attempt_end = "boxed"
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 64
  c.rl.kl_coef = 0.0
  c.actor_optim.lr = 1e-3
  c.actor_optim.grad_clip = 1.0
  c.sft.steps = 300
  c.sft.batch_size = 16
  c.sft.lr = 3e-3
  c.train.steps = 50
  c.train.ckpt_every = 10
  c.train.keep = 2
  c.train.grader_workers = 2
  c.train.eval_every = 0
  c.eval.benchmarks = "candidates"
  c.eval.max_attempts = 4
  c.eval.limit = 128
  return c
