"""Default run config and its validation (clear errors before any compile).

Experiment configs in configs/*.py start from `default_config()` and override
what they change, so every field below is documented once, here.
"""
import math

import ml_collections

from mars.episodes.attempts import ATTEMPT_ENDS
from mars.models.config import ATTENTION_KINDS, REMAT_POLICIES
from mars.rewards import BOXES

ALGORITHMS = ("ppo", "grpo", "dapo")
EPISODE_KINDS = ("single_turn", "multi_attempt")
ADV_ESTIMATORS = ("gae", "grpo", "rloo", "drgrpo", "attempt_rloo")
LOSSES = ("ppo", "gspo", "gspo_token", "cispo")              # mars.rl.losses.LOSS_TYPES
ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "icepop")       # mars.rl.correction.METHODS


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.algorithm = "grpo"            # ppo (critic + GAE) | grpo | dapo
  c.mesh_shape = (1, -1, 1)       # (data, fsdp, tensor); -1 = the rest

  c.model = ml_collections.ConfigDict()
  c.model.path = ""               # local HF dir or hub id; "" = the demo's tiny model
  # Mixed precision as the field does it: fp32 master params (and Adam state,
  # and checkpoints), compute in `compute_dtype` (cast inside the jitted step;
  # the sampler reads one compute-dtype copy per rollout phase).
  c.model.dtype = "float32"       # stored (master) param dtype
  c.model.compute_dtype = ""      # activations/matmuls; "" = same as dtype. Real runs: bfloat16
  # Opt-in for dtype="bfloat16" storage in a trained run. What is lost: bf16
  # has 8 mantissa bits, so an Adam step of ~lr (1e-6) on a weight of ~1e-2 is
  # below half an ulp and rounds away: most weights never move. Only for
  # memory experiments at large lr.
  c.model.allow_low_precision_params = False
  c.model.remat = "none"          # none | full | dots (models.config.REMAT_POLICIES)
  # Attention of the update / log-prob forward: "dense" ([T, T] scores) or
  # "chunked" (flash attention in XLA, models/flash.py: O(T) memory, causal
  # blocks skipped). The sampler's cached attention is not affected.
  c.model.attention = "dense"
  c.model.attention_block = 512   # query/key block of "chunked"
  c.model.tokenizer_path = ""     # "" = model.path (or the demo tokenizer)

  c.data = ml_collections.ConfigDict()
  c.data.name = "simplerl_math_l3to5"  # TFDS builder name, or "candidates" (demo)
  c.data.split = "train"
  c.data.data_dir = ""            # "" = $MARS_DATA_DIR (offline files) or download
  c.data.prompts_per_step = 128
  c.data.candidates_k = 3         # demo task: candidates per problem
  c.data.candidates_rule = "hidden"  # demo task: hidden | first (see mars/demo/task.py RULES)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 8        # G samples (or episodes) per prompt
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.max_new_tokens = 1024
  c.rollout.reward_correct = 1.0  # single-turn rewards (binary by default)
  c.rollout.reward_wrong = 0.0
  c.rollout.truncated_is_failure = True  # cut at max_new_tokens = fail (LTE's "overlong")
  # One-step-off-policy rollouts (mars/trainer/async_loop.py): 0 = synchronous (sample
  # with the params being trained, today's loop); 1 = the batch trained at step t
  # was sampled with step t-1's params, while step t-1's update ran. Needs
  # rl.recompute_old_logp=True (the proximal old_logp is the trainer's current
  # policy; rollout_correction then corrects for the stale sampler). > 1 would
  # need partial rollouts (a rollout spanning updates), which mars lacks.
  c.rollout.staleness = 0

  c.episode = ml_collections.ConfigDict()
  c.episode.kind = "single_turn"  # single_turn | multi_attempt
  c.episode.min_attempts = 1
  c.episode.max_attempts = 5
  c.episode.chunk_tokens = 64     # tokens generated between two host checks
  c.episode.budget = 3000         # generated tokens shared by all attempts
  # When an attempt ends (mars/episodes/attempts.py has the details):
  #   boxed: the exact cut, right after the first complete \boxed{} (tokens
  #          sampled after it are rewound); a stop token before any box too.
  #   chunk: the reference (DualityRL/multi-attempt duality/vllm_mul.py): at the
  #          end of the first chunk_tokens chunk (counted from the attempt's
  #          start) whose text's last box is complete; the rest of that chunk
  #          is kept and the last box graded; the model's stop token before a
  #          feedback turn is replaced by the feedback's <|im_end|>.
  #   eos:   at the model's end of turn only (with N = 1: generate to EOS, the
  #          reference's single-turn baseline); the last box graded.
  # Every mode ends an attempt at the budget, and grades the attempt's last box.
  c.episode.attempt_end = "boxed"
  # chunk mode only: chunks an episode may use, an attempt's last partial chunk
  # counting whole (the reference's num_iteration); 0 = no cap (budget only).
  c.episode.max_chunks = 0
  c.episode.reward_correct = 1.0
  c.episode.reward_wrong = -0.5
  c.episode.reward_no_answer = -1.0
  c.episode.attempt_discount = 1.0

  c.lte = ml_collections.ConfigDict()
  c.lte.enabled = False
  c.lte.hint_cap = 8
  c.lte.hint_source = "wrong_answers"  # wrong_answers | none
  c.lte.episode = "single_turn"        # single_turn | multi_attempt
  c.lte.replace_seed = 0
  c.lte.hint_max_chars = 200           # skip absurdly long "answers" in hints
  c.lte.hinted_min_prompts = 1         # hinted batch padded to >= this (and the mesh's data size)

  c.rl = ml_collections.ConfigDict()
  c.rl.adv_estimator = "grpo"     # gae | grpo | rloo | drgrpo | attempt_rloo (RLOO per attempt)
  c.rl.gamma = 1.0
  c.rl.lam = 1.0
  c.rl.whiten = False
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.2
  c.rl.dual_clip_c = ml_collections.FieldReference(None, field_type=float)
  c.rl.offpolicy_gamma = 0.1
  c.rl.offpolicy_behaviour_one = False
  c.rl.agg_mode = "token-mean"
  c.rl.max_len_norm = ml_collections.FieldReference(None, field_type=int)
  c.rl.kl_coef = 0.0
  c.rl.kl_kind = "k3"
  c.rl.kl_in_reward = False       # True: -kl_coef*KL per token in the reward instead of a loss
  c.rl.entropy_coef = 0.0
  c.rl.value_clip = 0.2
  c.rl.vf_coef = 1.0
  c.rl.ppo_epochs = 1
  c.rl.minibatch_size = 0         # rows per optimizer update; 0 = the whole rollout batch
  c.rl.micro_batch_size = 0       # rows per gradient-accumulation step; 0 = minibatch
  # PPO's old_logp, and LTE's behaviour logp of its hinted replacements (under
  # the hinted prompt): a trainer forward pass (True, as verl does: the
  # sampler's numerics, bf16 decode and other kernels, differ from the
  # trainer's and would bias the ratio) or the sampler's own logprobs (False:
  # a forward pass less per step; logp_mismatch/* is then not measured).
  c.rl.recompute_old_logp = True
  c.rl.dynamic_sampling = False   # DAPO: drop all-equal groups, resample until full
  c.rl.max_resample_rounds = 3
  c.rl.overlong_buffer = 0        # DAPO overlong shaping buffer (tokens); 0 = off
  # On-policy surrogate (docs/offpolicy.md says when to use which):
  #   ppo        PPO-clip with eps_low/eps_high (PPO, GRPO, DAPO's clip-higher);
  #   gspo       GSPO (Zheng et al. 2025): one ratio per sequence, the geometric
  #              mean of its token ratios, clipped at the sequence level;
  #   gspo_token GSPO-token: same value, per-token advantages in the gradient;
  #   cispo      CISPO (MiniMax-M1): clip the stop-gradient IS weight, not the update.
  c.rl.loss = "ppo"
  c.rl.gspo_eps_low = 3e-4        # GSPO paper §5.1: clip range (3e-4, 4e-4)
  c.rl.gspo_eps_high = 4e-4
  c.rl.cispo_eps_low = 1.0        # >= 1: no lower bound on the IS weight (MiniMax-M1 §3.1)
  c.rl.cispo_eps_high = 5.0       # weight <= 1 + 5 (an assumption; the paper tunes it, unpublished)
  # Rollout correction on ρ = π_trainer / π_sampler per token (mars/rl/correction.py;
  # needs recompute_old_logp=True). LTE's hinted rows: ρ of the behaviour
  # denominator (trainer vs sampler under the hinted prompt).
  #   none    no correction (ρ is still logged as rollout_corr/*)
  #   tis     weight min(ρ, tis_cap)                 (Yao et al. 2025)
  #   mis     weight ρ inside [mis_lo, mis_hi], else drop   (masked IS)
  #   icepop  drop tokens with ρ outside [icepop_alpha, icepop_beta]   (Ring-1T)
  c.rl.rollout_correction = "none"
  c.rl.rollout_correction_level = "token"    # token | sequence (tis, mis)
  c.rl.rollout_seq_ratio = "geometric"       # a sequence's ρ: geometric (mean) | product
  c.rl.tis_cap = 2.0              # C (Yao et al. 2025)
  c.rl.mis_lo = 0.5
  c.rl.mis_hi = 2.0
  c.rl.icepop_alpha = 0.5         # Ring-1T report
  c.rl.icepop_beta = 5.0

  c.actor_optim = _optim(lr=1e-6)
  c.critic_optim = _optim(lr=1e-5)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0                 # supervised format warm start (demo)
  c.sft.batch_size = 32
  c.sft.lr = 3e-3
  c.sft.hint_fraction = 0.0       # share of LTE-hinted prompts (mars.demo.format_examples)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.ckpt_every = 10
  c.train.keep = 3
  c.train.async_checkpoint = True
  c.train.grader_workers = 2
  c.train.grader_timeout_s = 5.0
  # Which box holds the answer: "math_verify" (math-verify's own reading: boxes
  # joined by "," / "and" form one set) or "last" (the last box alone, as the
  # multi-attempt reference grades an attempt). See mars.rewards.read_answer.
  c.train.grader_boxes = "math_verify"
  c.train.eval_every = 0          # 0 = no periodic eval (else every N steps and at the last)
  c.train.eval_before = False     # also evaluate the initial policy (step 0): a before/after summary

  c.eval = ml_collections.ConfigDict()
  c.eval.benchmarks = "math500"
  c.eval.mode = "attempts"
  c.eval.max_attempts = 4
  c.eval.limit = 64
  c.eval.n = 1
  return c


def rl_config(**overrides) -> dict:
  """config.rl's defaults as a dict, with `overrides` (tests and benchmarks that drive
  mars.rl.step directly; a trainer passes its run's config.rl)."""
  return _overridden(default_config().rl.to_dict(), overrides)


def optimizer_config(**overrides) -> dict:
  """An optimizer section's defaults as a dict, with `overrides` (see rl_config)."""
  return _overridden(_optim(0.0).to_dict(), overrides)


def _overridden(defaults: dict, overrides: dict) -> dict:
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ConfigError(f"Unknown config field(s) {unknown}; known: {sorted(defaults)}.")
  return dict(defaults, **overrides)


def multi_attempt_config(c) -> ml_collections.ConfigDict:
  """What a multi-attempt episode reads (mars.episodes.multi_attempt): config.episode plus
  the rollout's sampling settings and group size."""
  cfg = ml_collections.ConfigDict(c.episode.to_dict())
  for k in ("temperature", "top_p", "top_k", "group_size"):
    cfg[k] = c.rollout[k]
  return cfg


def _optim(lr):
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.schedule = "constant"        # constant | cosine (warmup + cosine to min_lr_ratio)
  o.warmup_steps = 0
  o.delay_steps = 0              # lr 0 for the first updates (PPO actor: let the critic learn)
  o.total_steps = 0              # 0 = train.steps × updates per step
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.grad_clip = 1.0
  return o


def default_eval_config() -> ml_collections.ConfigDict:
  """Every eval field; configs/eval_math.py documents where the values come from."""
  c = ml_collections.ConfigDict()
  c.benchmarks = "math500,aime24,aime25,amc23,minerva_math,olympiadbench"
  c.mode = "passk"                # passk | attempts
  c.n = 16                        # passk: samples per problem; attempts: episodes per problem if sampled
  c.ks = (1, 2, 4, 8, 16)         # passk: Pass@k columns (each k <= n)
  c.temperature = 0.6
  c.top_p = 0.95
  c.top_k = 0
  c.max_new_tokens = 0            # passk: response budget; 0 = the run's (else 4096)
  c.max_attempts = 7              # attempts: K, the curve is Acc@1..K
  c.greedy = True                 # attempts: greedy decoding (one episode per problem)
  c.budget = 0                    # attempts: tokens shared by an episode's attempts; 0 = the run's (else 3000)
  c.chunk_tokens = 0              # attempts: tokens between host checks for an attempt's end; 0 = the run's (else 64)
  c.attempt_end = "boxed"         # attempts: boxed | chunk | eos (see mars.episodes.attempts)
  c.limit = 0                     # problems per benchmark (seeded subsample); 0 = all
  c.seed = 0
  c.batch_size = 16               # prompts per generate call; passk rows = batch_size x n
  c.grader_workers = 2
  c.grader_timeout_s = 5.0
  c.grader_boxes = ""             # math_verify | last; "" = the run's (else math_verify)
  c.dtype = "bfloat16"            # param dtype for HF checkpoints (a run uses its own)
  c.mesh_shape = (1, -1, 1)       # (data, fsdp, tensor); prompts are padded to data x fsdp
  c.data_dir = ""                 # TFDS dir ("" = $MARS_TFDS_DIR or ~/.cache/mars/tfds)
  c.candidates_k = 0              # demo benchmark: candidates per problem; 0 = the run's (else 3)
  c.candidates_problems = 500
  c.candidates_rule = ""          # demo benchmark: hidden | first; "" = the run's (else hidden)
  return c


class ConfigError(ValueError):
  """A config that cannot run; raised before anything compiles."""


def validate(c, num_devices: int = None) -> None:
  """One clear error line per problem, before any compile."""
  if c.algorithm not in ALGORITHMS:
    raise ConfigError(f"Unknown algorithm {c.algorithm!r}; choose one of {ALGORITHMS}.")
  if c.model.remat not in REMAT_POLICIES:
    raise ConfigError(f"Unknown model.remat {c.model.remat!r}; choose one of {REMAT_POLICIES}.")
  if c.model.attention not in ATTENTION_KINDS:
    raise ConfigError(f"Unknown model.attention {c.model.attention!r}; choose one of "
                      f"{ATTENTION_KINDS}.")
  if c.model.attention_block < 1:
    raise ConfigError(f"model.attention_block must be >= 1, got {c.model.attention_block}.")
  if c.episode.kind not in EPISODE_KINDS:
    raise ConfigError(f"Unknown episode.kind {c.episode.kind!r}; choose one of {EPISODE_KINDS}.")
  if c.rl.adv_estimator not in ADV_ESTIMATORS:
    raise ConfigError(f"Unknown rl.adv_estimator {c.rl.adv_estimator!r}; choose one of "
                      f"{ADV_ESTIMATORS}.")
  if not 0.0 <= c.sft.get("hint_fraction", 0.0) <= 1.0:
    raise ConfigError(f"sft.hint_fraction={c.sft.hint_fraction} must be in [0, 1].")
  if c.model.dtype != "float32" and not c.model.allow_low_precision_params:
    raise ConfigError(
        f"model.dtype={c.model.dtype!r} stores the trained params in low precision, where "
        f"lr-sized updates round away; keep model.dtype='float32' (fp32 masters) with "
        f"model.compute_dtype={c.model.dtype!r}, or opt in with "
        f"model.allow_low_precision_params=True.")
  if c.algorithm == "ppo" and c.rl.adv_estimator != "gae":
    raise ConfigError("algorithm 'ppo' needs rl.adv_estimator='gae' (it trains a critic).")
  if c.algorithm != "ppo" and c.rl.adv_estimator == "gae":
    raise ConfigError(f"rl.adv_estimator='gae' needs a critic: use algorithm='ppo', not "
                      f"{c.algorithm!r}.")
  if c.episode.max_attempts < c.episode.min_attempts:
    raise ConfigError(f"episode.max_attempts={c.episode.max_attempts} < "
                      f"episode.min_attempts={c.episode.min_attempts}.")
  if c.episode.min_attempts < 1:
    raise ConfigError(f"episode.min_attempts must be >= 1, got {c.episode.min_attempts}.")
  if c.episode.attempt_end not in ATTEMPT_ENDS:
    raise ConfigError(f"Unknown episode.attempt_end {c.episode.attempt_end!r}; choose one of "
                      f"{ATTEMPT_ENDS}.")
  for name in ("chunk_tokens", "budget"):
    if c.episode[name] < 1:
      raise ConfigError(f"episode.{name} must be >= 1, got {c.episode[name]}.")
  if c.episode.max_chunks < 0:
    raise ConfigError(f"episode.max_chunks must be >= 0 (0 = no cap), got {c.episode.max_chunks}.")
  if c.episode.max_chunks and c.episode.attempt_end != "chunk":
    raise ConfigError(f"episode.max_chunks={c.episode.max_chunks} caps chunk-mode episodes only; "
                      f"set it to 0 with attempt_end={c.episode.attempt_end!r}.")
  # config.eval may override the eval's attempt_end (mars.evaluate.trainer_eval_config).
  if c.eval.get("attempt_end", ATTEMPT_ENDS[0]) not in ATTEMPT_ENDS:
    raise ConfigError(f"Unknown eval.attempt_end {c.eval.attempt_end!r}; choose one of "
                      f"{ATTEMPT_ENDS}.")
  _validate_offpolicy(c)
  if c.lte.enabled and c.algorithm == "ppo":
    raise ConfigError("LTE works over GRPO groups: set algorithm='grpo' (or 'dapo') with lte.")
  for name in ("actor_optim", "critic_optim"):
    o = c[name]
    if o.schedule not in ("constant", "cosine"):
      raise ConfigError(f"Unknown {name}.schedule {o.schedule!r}; choose 'constant' or 'cosine'.")
    # A total_steps of 0 is derived from the run's length (and the warmup fitted to it).
    if o.schedule == "cosine" and o.total_steps and o.total_steps - o.delay_steps <= o.warmup_steps:
      raise ConfigError(f"{name}: a cosine schedule needs total_steps - delay_steps > warmup_steps; "
                        f"got {o.total_steps} - {o.delay_steps} <= {o.warmup_steps}.")
  G = c.rollout.group_size
  if G < 1:
    raise ConfigError(f"rollout.group_size must be >= 1, got {G}.")
  if c.algorithm != "ppo" and G < 2:
    raise ConfigError(f"{c.algorithm} needs rollout.group_size >= 2 (group-relative "
                      f"advantages), got {G}.")
  rows = c.data.prompts_per_step * G
  mb = c.rl.minibatch_size or rows
  if rows % mb:
    raise ConfigError(f"rollout batch of {rows} rows (prompts_per_step × group_size) is not "
                      f"divisible by rl.minibatch_size={mb}.")
  if c.algorithm != "ppo" and mb % G:
    raise ConfigError(f"rl.minibatch_size={mb} must be a multiple of rollout.group_size={G}.")
  micro = c.rl.micro_batch_size or mb
  if mb % micro:
    raise ConfigError(f"rl.minibatch_size={mb} is not divisible by rl.micro_batch_size={micro}.")
  if num_devices is not None:
    shape = list(c.mesh_shape)
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      if num_devices % known:
        raise ConfigError(f"mesh_shape {tuple(shape)} does not divide {num_devices} devices.")
      shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
      raise ConfigError(f"mesh_shape {tuple(c.mesh_shape)} needs {math.prod(shape)} devices; "
                        f"{num_devices} are available.")
    data = shape[0] * shape[1]
    for what, n in (("prompts_per_step", c.data.prompts_per_step), ("micro-batch", micro)):
      if n % data:
        raise ConfigError(f"{what}={n} is not divisible by the data×fsdp mesh size {data} "
                          f"(mesh_shape {tuple(shape)}).")
  if c.train.grader_boxes not in BOXES:
    raise ConfigError(f"Unknown train.grader_boxes {c.train.grader_boxes!r}; choose one of "
                      f"{BOXES}.")
  if not 0 < c.rollout.top_p <= 1:
    raise ConfigError(f"rollout.top_p must be in (0, 1], got {c.rollout.top_p}.")
  if c.train.steps < 1:
    raise ConfigError(f"train.steps must be >= 1, got {c.train.steps}.")


def _validate_offpolicy(c) -> None:
  """rl.loss, rl.rollout_correction and rollout.staleness (docs/offpolicy.md)."""
  rl = c.rl
  loss = rl.get("loss", "ppo")
  corr = rl.get("rollout_correction", "none")
  level = rl.get("rollout_correction_level", "token")
  if loss not in LOSSES:
    raise ConfigError(f"Unknown rl.loss {loss!r}; choose one of {LOSSES}.")
  if corr not in ROLLOUT_CORRECTIONS:
    raise ConfigError(f"Unknown rl.rollout_correction {corr!r}; choose one of "
                      f"{ROLLOUT_CORRECTIONS}.")
  if level not in ("token", "sequence"):
    raise ConfigError(f"Unknown rl.rollout_correction_level {level!r}; choose 'token' or "
                      f"'sequence'.")
  if rl.get("rollout_seq_ratio", "geometric") not in ("geometric", "product"):
    raise ConfigError(f"Unknown rl.rollout_seq_ratio {rl.rollout_seq_ratio!r}; choose "
                      f"'geometric' or 'product'.")
  if rl.get("tis_cap", 2.0) <= 0:
    raise ConfigError(f"rl.tis_cap must be > 0 (C of min(ρ, C)), got {rl.tis_cap}.")
  for lo, hi in (("mis_lo", "mis_hi"), ("icepop_alpha", "icepop_beta")):
    if not 0 <= rl.get(lo, 0.5) < rl.get(hi, 2.0):
      raise ConfigError(f"rl.{lo}={rl[lo]} and rl.{hi}={rl[hi]} must satisfy "
                        f"0 <= {lo} < {hi}.")
  for name in ("gspo_eps_low", "gspo_eps_high", "cispo_eps_low", "cispo_eps_high"):
    if rl.get(name, 1.0) <= 0:
      raise ConfigError(f"rl.{name} must be > 0, got {rl[name]}.")
  if corr != "none" and not rl.recompute_old_logp:
    raise ConfigError(f"rl.rollout_correction={corr!r} needs rl.recompute_old_logp=True: "
                      f"with the sampler's logp as old_logp, ρ = 1 by construction.")
  if corr == "icepop" and level != "token":
    raise ConfigError("rl.rollout_correction='icepop' masks tokens: set "
                      "rl.rollout_correction_level='token' (or use 'mis' per sequence).")
  if corr != "none" and c.lte.enabled and rl.offpolicy_behaviour_one:
    raise ConfigError("rl.rollout_correction acts on LTE's behaviour denominator, which "
                      "rl.offpolicy_behaviour_one=True (LUFFY) replaces by 1; drop one of them.")
  if loss != "ppo" and rl.dual_clip_c is not None:
    raise ConfigError(f"rl.dual_clip_c is a PPO-clip option; rl.loss={loss!r} has no dual "
                      f"clip.")
  if loss in ("gspo", "gspo_token") and rl.agg_mode != "seq-mean-token-mean":
    raise ConfigError(f"rl.loss={loss!r} averages per sequence (GSPO eq. 5): set "
                      f"rl.agg_mode='seq-mean-token-mean', not {rl.agg_mode!r}.")
  if loss == "gspo" and corr != "none" and level != "sequence":
    raise ConfigError(f"rl.loss='gspo' has one ratio per sequence: a token-level "
                      f"{corr!r} breaks it; set rl.rollout_correction_level='sequence' "
                      f"(or rl.loss='gspo_token').")
  staleness = c.rollout.get("staleness", 0)
  if staleness not in (0, 1):
    raise ConfigError(f"rollout.staleness={staleness}: only 0 (synchronous) and 1 (one-step-"
                      f"off) are supported; more needs partial-rollout support, which mars "
                      f"does not have.")
  if staleness and not rl.recompute_old_logp:
    raise ConfigError("rollout.staleness=1 samples with the previous step's params: set "
                      "rl.recompute_old_logp=True so old_logp is the trainer's current policy.")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config .py file (how configs build on each other)."""
  import importlib.util
  import os
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"mars_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of configs/<name> next to `config_file` (pass __file__)."""
  import os
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))
