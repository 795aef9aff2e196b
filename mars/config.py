"""Every default of a run (and of an eval), each field documented once, and config-file loading.

Experiment configs in configs/*.py start from `default_config()` and override
what they change; `mars.config_validation.validate` checks the result.
"""
import ml_collections

from mars.config_validation import ConfigError


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
  # lax.scan over the layers in the update / log-prob forward (one compiled
  # layer); False unrolls them: 7% faster update at 4 layers on CPU
  # (benchmarks/update.py), compiles grow with the layer count.
  c.model.scan_layers = True
  # Attention of the update / log-prob forward: "dense" ([T, T] scores),
  # "chunked" (flash attention in XLA, models/flash.py: O(T) memory, causal
  # blocks skipped), the Pallas kernels "splash" (TPU) and "pallas_gpu" (GPU),
  # or "auto": splash on TPU, chunked elsewhere (models/kernels.py says why).
  # The sampler's cached attention is not affected.
  c.model.attention = "dense"
  c.model.attention_block = 512   # query/key block of chunked / the kernels
  # Positions per chunk of the lm_head + log-softmax in the update and the
  # log-prob recompute (models/logprobs.py); 0 = the whole row at once. With a
  # 152k vocabulary the [rows, T, V] fp32 logits and their gradient are the
  # update's largest temporaries; chunks keep [rows, chunk, V] and recompute.
  c.model.logits_chunk = 0
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
  # With staleness 1, the last `devices` devices form a rollout group (a mesh of
  # rollout.mesh_shape) that samples step t+1 while the others (mesh_shape) run
  # step t's update, as verl's one-step-off mode splits its GPUs; the new params
  # are copied across once per step. 0 = rollout and update share every device
  # and interleave. One process only (a multi-host run shares its devices).
  c.rollout.devices = 0
  c.rollout.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor) over the rollout group

  # The rollout engine (mars/sampling/engine.py): a paged KV cache with continuous
  # batching. kv_tokens sizes the page pool (KV memory) in tokens over all
  # devices; 0 = enough for every row at full length (never preempts, the
  # memory of a static cache). Smaller pools preempt the newest sequence and
  # re-prefill it later: nothing is lost, sampled tokens do not change.
  c.sampling = ml_collections.ConfigDict()
  c.sampling.kv_tokens = 0
  c.sampling.page_size = 16       # tokens per KV page
  c.sampling.max_slots = 0        # rows decoded at once (0 = every row of the rollout)
  c.sampling.decode_chunk = 256   # decode steps per device call before the host refills
  c.sampling.prefill_chunk = 512  # tokens per row per prefill/extend call (chunked prefill)
  # Decode attention (models/kernels.py): "xla" scores the rows' gathered pages up
  # to the table width; the Pallas kernels "paged_tpu" / "paged_gpu" read each row's
  # live pages only; "auto" = paged_tpu on TPU, xla elsewhere.
  c.sampling.decode_attention = "auto"

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
  # Rows per gradient-accumulation step (also the log-prob/value recompute's
  # micro batch); 0 = the minibatch; "auto" = the largest divisor of the
  # minibatch (a multiple of data×fsdp) whose compiled update fits this run's
  # devices with auto_micro_batch_margin to spare (mars/trainer/auto_micro_batch.py),
  # sized for rows of auto_micro_batch_prompt_len prompt tokens + the response budget.
  c.rl.micro_batch_size = ml_collections.FieldReference(0, field_type=object)
  c.rl.auto_micro_batch_margin = 0.1
  c.rl.auto_micro_batch_prompt_len = 1024
  # Sequence packing (mars/rl/seq_pack.py): the log-prob/value recompute and the
  # update run the model on each micro-batch's sequences laid end to end in
  # rows of pack_length columns (0: the minibatch's padded length), so compute
  # follows real tokens, not rows × the longest one. Losses are unchanged.
  c.rl.packing = False
  c.rl.pack_length = 0
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
  # The rollout engine's KV page pool, in tokens (sampling.kv_tokens of a run); 0 =
  # the run's (a run workdir: the same pool, so the trainer's compiled sampler
  # programs serve the eval too), else sized to each rollout's rows at full length.
  c.kv_tokens = 0
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
