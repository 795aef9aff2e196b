"""Multi-attempt PPO on Qwen2.5-Math-1.5B ("Learning from Failures in Multi-Attempt RL").

Values from DualityRL/multi-attempt (commit 32d8641): the launch script
train/examples/script/multi_attempt.sh ("sh:LINE"), the argument defaults it
leaves alone in train/openrlhf/cli/train_ppo_ray.py ("cli:LINE"), and the code
they reach: train/openrlhf/duality/vllm_mul.py ("mul:LINE"), trainer/ray/
ppo_actor.py and ppo_critic.py, trainer/ppo_trainer.py, trainer/ppo_utils/
replay_buffer.py and experience_maker.py, models/model.py, utils/deepspeed.py.

  model           Qwen/Qwen2.5-Math-1.5B (sh:1); --bf16 with ZeRO-3 (sh:35-36) is
                  bf16 compute over fp32 master weights, hence float32 params and
                  bfloat16 compute (bf16 params would round away every lr-5e-7
                  update); --gradient_checkpointing (sh:48) -> remat
  data            1024 prompts per rollout (sh:27 rollout_batch_size), 1 episode
                  each (sh:29 n_samples_per_prompt), temperature 1 (sh:28), top_p
                  1 (cli:300), no top-k (experience_maker.py:632 top_k=-1)
  episode         N ~ U{1..5} per question (cli:195-196, mul:124); a check every
                  64 tokens (cli:200 mul_num_token); attempt_end="chunk", the
                  reference's semantics (mul:129-210, see mars/episodes/attempts.py);
                  max_chunks = 3000 // 64 + 5 = 51 (mul:129 num_iteration, with
                  sh:34 generate_max_len 3000 and max_attempt 5), budget = 51 × 64
                  = 3264 tokens, the most 51 chunks can hold (so it never binds
                  first); rewards +1 / -0.5 / -1 (mul:204, :202, :140), no
                  attempt discount (cli:198)
  PPO             critic + GAE, γ = 1 (cli:295), λ = 0.99 (sh:42); clip 0.2
                  (cli:292), value clip 0.2 (cli:293); 1 epoch (sh:31); 128 rows
                  per update (sh:25 train_batch_size; the critic's too, cli:298);
                  token-mean loss (sh:10 --disable_seq_mean, models/loss.py
                  PolicyLoss); KL 0.01 (sh:39) as a loss term (sh:40 --direct_kl)
                  with the k3 estimator (sh:41)
  advantages      whitened over the rollout's model tokens (ppo_trainer.py:339-340:
                  --disable_normalize_adv is not passed; replay_buffer.py:222).
                  --normalize_reward (sh:45) is *not* reward normalisation here:
                  with no reward model it only makes the critic compute
                  (value - mean) / std with the buffers mean = 0, std = 1, since
                  the Qwen config.json has no "mean"/"std" (models/model.py:239,
                  :267) - a no-op, so nothing in mars maps to it
  micro-batch     sh:24 micro_train_batch_size 8 is per GPU (cli:296) on 4 actor
                  GPUs (sh:16): 32 rows per accumulation step. In mars the loss is
                  the minibatch's token mean whatever the micro-batch, so this is
                  a memory setting only
  optimisers      actor lr 5e-7 (sh:37), critic lr 1e-5 (sh:38); Adam betas
                  (0.9, 0.95) (cli:326), no weight decay (cli:290), grad-norm clip
                  1.0 (cli:289); cosine_with_min_lr to 0.1 × lr after a warmup of
                  3% of max_steps (ppo_actor.py:134-141, ppo_critic.py:271-278),
                  max_steps = 160 (sh:32 num_episodes) × (8523 prompts // 128) =
                  10560 updates, warmup ceil(316.8) = 317. The run itself does
                  fewer updates (the dataloader drops the last partial rollout,
                  utils/deepspeed.py:150): 8 rollouts × 8 updates per pass, so the
                  schedule never reaches its end, as in the reference
  length          160 passes × 8 rollouts = 1280 steps (the paper's learning curve,
                  fig/learning_curve.webp, ends there); eval and checkpoint every
                  8 steps (sh:49-50), keep 2 checkpoints (sh:58)
  eval            the five benchmarks of utils/utils.py:139 (olympiadbench as one);
                  attempts end as in training ("chunk"): README.md's evaluation of
                  both runs with k attempts calls vllm_mul.py, whose eval goes
                  through MulLLM.generate with the answers (eval/meval/
                  math_eval.py:325-327). ppo_single_turn_1p5b.py inherits it, so
                  both runs' eval attempts end alike (each with its own run's
                  token budget, 3264 and 3000; the README's eval used 8000, mul:300)

Not mapped: prompt_max_len 1024 (sh:33). This path never truncates prompts
(mul:128 formats the raw question); the number only sizes vLLM's context at
1024 + 3000 tokens (cli:145). mars plays every prompt whole (the longest
SimpleRL L3-5 prompt is 1704 tokens with this template, 8 of 8523 exceed 1024).
Also infrastructure only: ZeRO-3, vLLM engines, offloading, colocation,
micro_rollout_batch_size, save_steps_hf, max_samples (above the data size).

Assumptions (not in the stored repo):
  * the data: sh:43's data/math_level3to5_data.json is not stored; we use
    SimpleRL's MATH level 3-5 set (8523 problems, ../shared), and its `input`
    field is taken to be the bare problem text (mul:128 wraps it in the prompt);
    the 10560 / 317 / 1280 above assume 8523 problems.
  * Adam eps 1e-8 (DeepSpeed's CPU Adam default, not set by the repo).
  * seed 42 is the reference's default (cli:302), not its random stream.
  * the in-training eval: the reference scores one greedy attempt with 3000
    tokens (mul:260-280); mars's attempts mode reports Acc@1..5, and its
    attempts follow attempt_end (the reference's eval attempt runs to EOS).
Known differences: the reference's stop token is stripped from the final
attempt too (mul:152 runs on every chunk) and its transcript is re-tokenised
from text; mars keeps the final attempt's sampled tokens as sampled, stop
token included. An <|endoftext|> before a feedback turn is stripped in mars
(the reference leaves it in the text, which no chat template renders). The
reference's token mean is per GPU micro-batch (8 rows, loss.py masked_mean),
then averaged; mars's is over the whole 128-row minibatch. The reference's
"-0.5" needs a box that its own extraction finds (the last "boxed{" closed
and non-empty); mars counts any complete box, `\\boxed{}` included.
"""
from mars import config as mars_config

CHUNK_TOKENS = 64          # cli:200 mul_num_token
GENERATE_MAX_LEN = 3000    # sh:34
MAX_ATTEMPTS = 5           # cli:196
MAX_CHUNKS = GENERATE_MAX_LEN // CHUNK_TOKENS + MAX_ATTEMPTS  # mul:129 num_iteration = 51
MAX_STEPS = 160 * (8523 // 128)  # ppo_actor.py:128-131 = 10560 scheduler steps
WARMUP = -(-MAX_STEPS * 3 // 100)  # ppo_actor.py:138 ceil(3%) = 317


def get_config():
  c = mars_config.default_config()
  c.seed = 42
  c.algorithm = "ppo"
  c.model.path = "Qwen/Qwen2.5-Math-1.5B"
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
  c.rl.packing = True  # sequence packing, as configs/grpo_4b.py says why
  c.data.name = "simplerl_math_l3to5"
  c.data.prompts_per_step = 1024
  c.rollout.group_size = 1
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.episode.kind = "multi_attempt"
  c.episode.min_attempts = 1
  c.episode.max_attempts = MAX_ATTEMPTS
  c.episode.chunk_tokens = CHUNK_TOKENS
  c.episode.attempt_end = "chunk"
  c.episode.max_chunks = MAX_CHUNKS
  c.episode.budget = MAX_CHUNKS * CHUNK_TOKENS
  # KV page pool over the slice: 2,097,152 tokens (~2,048 per row, about a whole episode;
  # a static cache of 1,024 × 5,120 slots would be 5.2M). mars.plan: the rollout then fits
  # a v5p-8 and a v6e-8 (docs/plan.md); rows past the pool are preempted and re-prefilled.
  c.sampling.kv_tokens = 2097152
  c.episode.reward_correct = 1.0
  c.episode.reward_wrong = -0.5
  c.episode.reward_no_answer = -1.0
  c.episode.attempt_discount = 1.0
  c.rl.adv_estimator = "gae"
  c.rl.gamma = 1.0
  c.rl.lam = 0.99
  c.rl.whiten = True
  c.rl.eps_low = c.rl.eps_high = 0.2
  c.rl.value_clip = 0.2
  c.rl.kl_coef = 0.01
  c.rl.kl_kind = "k3"
  c.rl.kl_in_reward = False
  c.rl.agg_mode = "token-mean"
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 128
  c.rl.micro_batch_size = 32
  for o, lr in ((c.actor_optim, 5e-7), (c.critic_optim, 1e-5)):
    o.lr = lr
    o.schedule = "cosine"
    o.warmup_steps = WARMUP
    o.total_steps = MAX_STEPS
    o.min_lr_ratio = 0.1
    o.delay_steps = 0        # cli:303 freezing_actor_steps -1
    o.b1, o.b2, o.eps = 0.9, 0.95, 1e-8
    o.weight_decay = 0.0
    o.grad_clip = 1.0
  c.train.steps = 160 * (8523 // 1024)  # 1280
  c.train.ckpt_every = 8
  c.train.keep = 2
  c.train.grader_boxes = "last"  # the reference grades an attempt's last box (mul:129-210)
  c.train.eval_every = 8
  c.eval.benchmarks = "math500,aime24,amc23,minerva_math,olympiadbench"
  c.eval.mode = "attempts"
  c.eval.max_attempts = 5
  c.eval.attempt_end = "chunk"
  return c
