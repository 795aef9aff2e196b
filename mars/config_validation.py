"""Validation of a run config: one clear ConfigError line per problem, before any compile.

The defaults it checks live in mars/config.py.
"""
import math

import jax

from mars.episodes.attempts import ATTEMPT_ENDS
from mars.models.config import ATTENTION_KINDS, REMAT_POLICIES
from mars.rewards import BOXES

ALGORITHMS = ("ppo", "grpo", "dapo")
EPISODE_KINDS = ("single_turn", "multi_attempt")
ADV_ESTIMATORS = ("gae", "grpo", "rloo", "drgrpo", "attempt_rloo")
LOSSES = ("ppo", "gspo", "gspo_token", "cispo")              # mars.rl.losses.LOSS_TYPES
ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "icepop")       # mars.rl.correction.METHODS


class ConfigError(ValueError):
  """A config that cannot run; raised before anything compiles."""


def _one_of(value, name: str, choices) -> None:
  if value not in choices:
    raise ConfigError(f"Unknown {name} {value!r}; choose one of {choices}.")


def validate(c, num_devices: int = None, platform: str = None) -> None:
  """One clear error line per problem, before any compile. `platform`: where the
  run's steps compile (default: JAX's backend; mars.plan passes "tpu")."""
  _one_of(c.algorithm, "algorithm", ALGORITHMS)
  _one_of(c.model.remat, "model.remat", REMAT_POLICIES)
  _one_of(c.model.attention, "model.attention", ATTENTION_KINDS)
  # An explicit kernel must match the backend ("auto" resolves to one that does).
  needs = {"splash": "tpu", "pallas_gpu": "gpu"}.get(c.model.attention)
  if needs and needs != (platform or jax.default_backend()):
    raise ConfigError(f"model.attention={c.model.attention!r} is a {needs.upper()} kernel; this "
                      f"run compiles for {platform or jax.default_backend()}: use 'auto', "
                      f"'chunked' or 'dense'.")
  if c.model.attention_block < 1:
    raise ConfigError(f"model.attention_block must be >= 1, got {c.model.attention_block}.")
  if c.model.logits_chunk < 0:
    raise ConfigError(f"model.logits_chunk must be >= 0 (0 = unchunked), got {c.model.logits_chunk}.")
  _one_of(c.episode.kind, "episode.kind", EPISODE_KINDS)
  _one_of(c.rl.adv_estimator, "rl.adv_estimator", ADV_ESTIMATORS)
  if not 0.0 <= c.sft.hint_fraction <= 1.0:
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
  _one_of(c.episode.attempt_end, "episode.attempt_end", ATTEMPT_ENDS)
  for name in ("chunk_tokens", "budget"):
    if c.episode[name] < 1:
      raise ConfigError(f"episode.{name} must be >= 1, got {c.episode[name]}.")
  if c.episode.max_chunks < 0:
    raise ConfigError(f"episode.max_chunks must be >= 0 (0 = no cap), got {c.episode.max_chunks}.")
  if c.episode.max_chunks and c.episode.attempt_end != "chunk":
    raise ConfigError(f"episode.max_chunks={c.episode.max_chunks} caps chunk-mode episodes only; "
                      f"set it to 0 with attempt_end={c.episode.attempt_end!r}.")
  # config.eval may override the eval's attempt_end (mars.evaluate.trainer_eval_config).
  if "attempt_end" in c.eval and c.eval.attempt_end not in ATTEMPT_ENDS:
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
  micro = c.rl.micro_batch_size
  if micro == "auto":
    if not 0 <= c.rl.auto_micro_batch_margin < 1:
      raise ConfigError(f"rl.auto_micro_batch_margin must be in [0, 1), got "
                        f"{c.rl.auto_micro_batch_margin}.")
    if c.rl.auto_micro_batch_prompt_len < 1:
      raise ConfigError(f"rl.auto_micro_batch_prompt_len must be >= 1, got "
                        f"{c.rl.auto_micro_batch_prompt_len}.")
    micro = mb
  elif isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
    raise ConfigError(f"rl.micro_batch_size must be a row count >= 0 (0 = the minibatch) or "
                      f"\"auto\", got {micro!r}.")
  if isinstance(c.rl.pack_length, bool) or not isinstance(c.rl.pack_length, int) or \
      c.rl.pack_length < 0:
    raise ConfigError(f"rl.pack_length must be a column count >= 0 (0 = the padded length), "
                      f"got {c.rl.pack_length!r}.")
  micro = micro or mb
  if mb % micro:
    raise ConfigError(f"rl.minibatch_size={mb} is not divisible by rl.micro_batch_size={micro}.")
  split = _rollout_devices(c, num_devices)
  if num_devices is not None:
    shape = _resolve_mesh(c.mesh_shape, num_devices - split, "mesh_shape")
    data = shape[0] * shape[1]
    for what, n in (("prompts_per_step", c.data.prompts_per_step), ("micro-batch", micro)):
      if n % data:
        raise ConfigError(f"{what}={n} is not divisible by the data×fsdp mesh size {data} "
                          f"(mesh_shape {tuple(shape)}).")
    if split:
      shape = _resolve_mesh(c.rollout.mesh_shape, split, "rollout.mesh_shape")
      if c.data.prompts_per_step % (shape[0] * shape[1]):
        raise ConfigError(f"prompts_per_step={c.data.prompts_per_step} is not divisible by the "
                          f"rollout group's data×fsdp size {shape[0] * shape[1]} "
                          f"(rollout.mesh_shape {tuple(shape)}).")
  _one_of(c.train.grader_boxes, "train.grader_boxes", BOXES)
  if not 0 < c.rollout.top_p <= 1:
    raise ConfigError(f"rollout.top_p must be in (0, 1], got {c.rollout.top_p}.")
  if c.train.steps < 1:
    raise ConfigError(f"train.steps must be >= 1, got {c.train.steps}.")
  _validate_sampling(c)



def _rollout_devices(c, num_devices: int = None) -> int:
  """rollout.devices, checked: devices split off for the rollout group (0: none)."""
  split = c.rollout.devices
  if isinstance(split, bool) or not isinstance(split, int) or split < 0:
    raise ConfigError(f"rollout.devices must be a device count >= 0 (0: rollout and update "
                      f"share every device), got {split!r}.")
  if split and c.rollout.staleness != 1:
    raise ConfigError(f"rollout.devices={split} splits off a rollout group for one-step-off "
                      f"rollouts: set rollout.staleness=1 (a synchronous rollout would leave "
                      f"the group idle through every update).")
  if num_devices is not None and split >= num_devices:
    raise ConfigError(f"rollout.devices={split} leaves no device for the update "
                      f"({num_devices} available).")
  return split


def _resolve_mesh(mesh_shape, num_devices: int, name: str) -> list:
  """`mesh_shape` with its -1 resolved over `num_devices` devices."""
  shape = list(mesh_shape)
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ConfigError(f"{name} {tuple(shape)} does not divide {num_devices} devices.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"{name} {tuple(mesh_shape)} needs {math.prod(shape)} devices; "
                      f"{num_devices} are available.")
  return shape


def _validate_sampling(c) -> None:
  s = c.sampling
  for field in ("page_size", "decode_chunk", "prefill_chunk"):
    if field in s and (not isinstance(s[field], int) or s[field] < 1):
      raise ConfigError(f"sampling.{field} must be an int >= 1, got {s[field]!r}.")
  for field in ("kv_tokens", "max_slots"):
    if field in s and (not isinstance(s[field], int) or s[field] < 0):
      raise ConfigError(f"sampling.{field} must be an int >= 0 (0: enough for every row), got "
                        f"{s[field]!r}.")
  kinds = ("xla", "paged_tpu", "paged_gpu", "auto")  # mars.models.kernels.DECODE_KINDS
  if "decode_attention" in s and s.decode_attention not in kinds:
    raise ConfigError(f"Unknown sampling.decode_attention {s.decode_attention!r}; choose one of "
                      f"{kinds}.")


def _validate_offpolicy(c) -> None:
  """rl.loss, rl.rollout_correction and rollout.staleness (docs/offpolicy.md)."""
  rl = c.rl
  loss, corr, level = rl.loss, rl.rollout_correction, rl.rollout_correction_level
  _one_of(loss, "rl.loss", LOSSES)
  _one_of(corr, "rl.rollout_correction", ROLLOUT_CORRECTIONS)
  if level not in ("token", "sequence"):
    raise ConfigError(f"Unknown rl.rollout_correction_level {level!r}; choose 'token' or "
                      f"'sequence'.")
  if rl.rollout_seq_ratio not in ("geometric", "product"):
    raise ConfigError(f"Unknown rl.rollout_seq_ratio {rl.rollout_seq_ratio!r}; choose "
                      f"'geometric' or 'product'.")
  if rl.tis_cap <= 0:
    raise ConfigError(f"rl.tis_cap must be > 0 (C of min(ρ, C)), got {rl.tis_cap}.")
  for lo, hi in (("mis_lo", "mis_hi"), ("icepop_alpha", "icepop_beta")):
    if not 0 <= rl[lo] < rl[hi]:
      raise ConfigError(f"rl.{lo}={rl[lo]} and rl.{hi}={rl[hi]} must satisfy "
                        f"0 <= {lo} < {hi}.")
  for name in ("gspo_eps_low", "gspo_eps_high", "cispo_eps_low", "cispo_eps_high"):
    if rl[name] <= 0:
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
  staleness = c.rollout.staleness
  if staleness not in (0, 1):
    raise ConfigError(f"rollout.staleness={staleness}: only 0 (synchronous) and 1 (one-step-"
                      f"off) are supported; more needs partial-rollout support, which mars "
                      f"does not have.")
  if staleness and not rl.recompute_old_logp:
    raise ConfigError("rollout.staleness=1 samples with the previous step's params: set "
                      "rl.recompute_old_logp=True so old_logp is the trainer's current policy.")
