"""GRPO on Qwen3-4B-Base: the baseline of "Learning to Reason from Trial and Error" (LTE).

From the paper / issue: G=8, temperature 1.0, max response 8192 tokens,
lr 1e-6 constant, 128 prompts per step, no KL, binary reward.
Assumptions: minibatch 512 rows (2 updates per step), micro-batch 8, clip
0.2/0.28 clip-higher off (0.2/0.2), token-mean loss, bf16 + remat, training
prompts from SimpleRL MATH L3–5, 300 steps.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.default_config()
  c.seed = 2
  c.algorithm = "grpo"
  c.model.path = "Qwen/Qwen3-4B-Base"
  c.model.dtype = "float32"          # fp32 master params and Adam state
  c.model.compute_dtype = "bfloat16"  # bf16 forward/backward and rollout copy
  c.model.remat = "full"
  # Flash attention for the update and log-prob passes: no [T, T] scores. "auto":
  # the Pallas splash kernel on TPU, flash attention in XLA ("chunked") elsewhere.
  # mars.plan, grpo_4b update on v5p-8 at micro batch 8: temporaries 85.9 (dense) ->
  # 39.9 GiB (chunked, --effort=-1), 102% -> 54% of HBM; at the default effort with
  # logits_chunk, chunked 27.5 / splash 26.8 GiB, compiled in 238 / 40 s
  # (docs/design.md, "Memory options").
  c.model.attention = "auto"
  # The lm_head + log-softmax over 1024 positions at a time: the [rows, T, 151936]
  # fp32 logits and their gradient are never whole. grpo_4b update, v5p-8, micro
  # 8, default effort: temporaries 40.7 -> 27.5 GiB per chip (55% -> 41% of HBM),
  # and micro 32 fits (67%). Costs one more lm_head forward in the backward.
  c.model.logits_chunk = 1024
  # Sequence packing for the log-prob passes and the update (mars/rl/seq_pack.py):
  # responses are long-tailed, so padded rows are mostly padding. Losses are the
  # padded ones token for token; benchmarks/update.py --preset cpu-longtail: 2.99x
  # the padded update's tokens/s (real tokens 28% -> 91% of the model's slots).
  c.rl.packing = True
  c.data.name = "simplerl_math_l3to5"
  c.data.prompts_per_step = 128
  c.rollout.group_size = 8
  c.rollout.temperature = 1.0
  c.rollout.max_new_tokens = 8192
  # KV page pool: 262,144 tokens over the slice (mars.plan: the 4B and 8B rollouts then fit
  # a v5p-8, decode at 52% / 66% of HBM; the 4B fits up to 524,288 at 90%). 1,024 rows ×
  # 8,193 slots as a static cache would need 9.4M tokens; rows past the pool are preempted
  # and re-prefilled (sampler/preemptions in the metrics).
  c.sampling.kv_tokens = 262144
  c.episode.kind = "single_turn"
  c.rl.adv_estimator = "grpo"
  c.rl.kl_coef = 0.0
  c.rl.entropy_coef = 0.0
  c.rl.minibatch_size = 512
  c.rl.micro_batch_size = 8
  c.rl.agg_mode = "token-mean"
  c.actor_optim.lr = 1e-6
  c.actor_optim.schedule = "constant"
  c.train.steps = 300
  c.train.ckpt_every = 20
  c.train.eval_every = 50
  c.eval.benchmarks = "math500,aime24,aime25,amc23,minerva_math,olympiadbench"
  c.eval.mode = "passk"
  c.eval.n = 16
  return c
