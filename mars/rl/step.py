"""The jitted, sharded RL update: one train step (micro-batched gradients and the
optimizer update) and the PPO epochs over minibatches; the recompute is rl/micro.py.

    policy_opt = optim.make_optimizer(cfg.actor_optim)
    state = init_train_state(params, policy_opt, critic_params, critic_opt)
    shardings = train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
    state = jax.device_put(state, shardings)
    train_step = make_train_step(model_cfg, rl_cfg, policy_opt, critic_opt, mesh, shardings)
    state, metrics = ppo_epochs(train_step, state, batch, adv, returns, epochs, mb_size, key)

Each call of `train_step` is one optimizer update on one minibatch: a
`lax.scan` over micro-batches accumulates gradients, and every loss is divided
by the *minibatch* count of tokens (or sequences), so accumulation gives the
same update as one big batch. Micro-batches take every n-th row (strided), so
that each one still spans all data×fsdp shards.

rl_cfg: config.rl's fields (ml_collections.ConfigDict or dict), every one required; the
defaults are mars.config.default_config().rl's, and this function has none of its own:
  eps_low, eps_high         clip range of the on-policy ratio (clip-higher).
  dual_clip_c               dual-clip constant c > 1 for negative advantages.
  offpolicy_gamma           γ of f(r) = r/(r+γ) on `is_off_policy` rows.
  offpolicy_behaviour_one   LUFFY: behaviour probability taken as 1.
  agg_mode                  token-mean | seq-mean-token-mean | seq-mean-token-sum-norm.
  max_len_norm              Dr.GRPO constant (None: the padded length T).
  kl_coef, kl_kind          KL(π‖π_ref) loss term (uses batch.ref_logp).
  entropy_coef              entropy bonus (subtracted from the loss).
  value_clip                critic value clip ε around batch.values (None: no clip).
  vf_coef                   scale of the critic loss (the critic has its own optimizer).
  micro_batch_size          rows per micro-batch (None: the whole minibatch).
  loss                      on-policy surrogate: ppo | gspo | gspo_token | cispo
                            (losses.LOSS_TYPES), gspo_eps_* / cispo_eps_* their clips.
  rollout_correction        none | tis | mis | icepop (mars.rl.correction), on
                            ρ = exp(old_logp − sampler_logp); rollout_correction_level,
                            rollout_seq_ratio, tis_cap, mis_lo/hi, icepop_alpha/beta.
  recompute_old_logp        True: old_logp is the trainer's, so the sampler/trainer
                            mismatch (rollout_corr/*) is logged every update.
  packing, pack_length      run the model on packed rows (mars.rl.seq_pack) of
                            pack_length columns (0: the minibatch's T); the
                            losses still read the padded [B, T] arrays.

Feedback tokens (`transparent_mask`) are out of every loss: the contract keeps
them outside `loss_mask`, and the step also masks them out (`loss_mask &
~transparent_mask`), reporting any overlap as `transparent_in_loss_mask`.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mars import sharding
from mars.batch import RolloutBatch
from mars.models import logprobs
from mars.models.config import ModelConfig
from mars.rl import correction
from mars.rl import critic as critic_lib
from mars.rl import losses
from mars.rl import micro as micro_lib
from mars.rl import seq_pack
from mars.rl.train_state import (  # re-exported: the step's state and shardings
    TrainState, batch_shardings, init_train_state, train_state_shardings)

Params = Any


# ----------------------------------------------------------------------------
# Losses of one micro-batch.

def _loss_options(rl_cfg) -> dict:
  """rl_cfg (config.rl's fields, every one required) read once into plain Python values
  (closed over, never traced)."""
  dual, max_len_norm, value_clip = (rl_cfg["dual_clip_c"], rl_cfg["max_len_norm"],
                                    rl_cfg["value_clip"])
  return dict(
      eps_low=float(rl_cfg["eps_low"]),
      eps_high=float(rl_cfg["eps_high"]),
      dual_clip_c=None if dual is None else float(dual),
      offpolicy_gamma=float(rl_cfg["offpolicy_gamma"]),
      offpolicy_behaviour_one=bool(rl_cfg["offpolicy_behaviour_one"]),
      agg_mode=str(rl_cfg["agg_mode"]),
      max_len_norm=None if max_len_norm is None else float(max_len_norm),
      kl_coef=float(rl_cfg["kl_coef"]),
      kl_kind=str(rl_cfg["kl_kind"]),
      entropy_coef=float(rl_cfg["entropy_coef"]),
      value_clip=None if value_clip is None else float(value_clip),
      vf_coef=float(rl_cfg["vf_coef"]),
      micro_batch_size=rl_cfg["micro_batch_size"] or None,
      loss_type=str(rl_cfg["loss"]),
      gspo_eps_low=float(rl_cfg["gspo_eps_low"]),
      gspo_eps_high=float(rl_cfg["gspo_eps_high"]),
      cispo_eps_low=float(rl_cfg["cispo_eps_low"]),
      cispo_eps_high=float(rl_cfg["cispo_eps_high"]),
      correction=correction.options(rl_cfg),
      # ρ ≡ 1 by construction when old_logp is the sampler's: nothing to log.
      rollout_metrics=bool(rl_cfg["recompute_old_logp"]),
      packing=bool(rl_cfg["packing"]),
      pack_length=int(rl_cfg["pack_length"]))


def _rollout_weights(opts: dict, batch: RolloutBatch, mask):
  """TIS / MIS / IcePop weights [B, T] of a (micro-)batch, or None without a correction."""
  if opts["correction"]["method"] == "none":
    return None
  weight, _, _ = correction.rollout_weights(batch.old_logp, batch.sampler_logp, mask,
                                            **opts["correction"])
  return weight


def _train_mask(batch: RolloutBatch):
  # Belt and braces: the contract already keeps transparent tokens out of loss_mask.
  return batch.loss_mask.astype(bool) & ~batch.transparent_mask.astype(bool)


def _loss_denominator(mask, agg_mode: str):
  """The full-minibatch divisor that makes micro-batch losses sum to the big-batch loss."""
  if agg_mode == "token-mean":
    return jnp.sum(mask)
  return jnp.sum(jnp.any(mask, axis=-1))


def _model_logprobs(cfg: ModelConfig, params, batch: RolloutBatch, packed, with_entropy: bool):
  """(logp, entropy or None) [b, T] of a micro-batch's padded rows; with `packed` =
  (tokens, positions, segment ids, target) the model runs on the packed rows."""
  if packed is None:
    return logprobs.sequence_logprobs(cfg, params, batch.tokens, batch.attention_mask,
                                      batch.positions, with_entropy=with_entropy)
  tok, pos, seg, target = packed
  logp, ent = logprobs.sequence_logprobs(cfg, params, tok, seg > 0, pos, with_entropy, seg)
  return (seq_pack.unpack(logp, target),
          None if ent is None else seq_pack.unpack(ent, target))


def policy_objective(params, cfg: ModelConfig, opts: dict, batch: RolloutBatch, advantages,
                     denominator, packed=None):
  """Scalar policy loss of one micro-batch and its metrics (differentiable in params)."""
  mask = _train_mask(batch)
  # Zero every input outside the mask: a NaN there (e.g. -inf behaviour logp on
  # padding) would otherwise reach the gradient as 0 · NaN through jnp.where.
  old_logp, ref_logp, advantages = (jnp.where(mask, x, 0.0) for x in
                                    (batch.old_logp, batch.ref_logp, advantages))
  agg = dict(agg_mode=opts["agg_mode"], max_len_norm=opts["max_len_norm"],
             denominator=denominator)
  logp, entropy_per_token = _model_logprobs(cfg, params, batch, packed,
                                            bool(opts["entropy_coef"]))
  loss, metrics = losses.policy_loss(
      logp, old_logp, advantages, mask, batch.is_off_policy,
      eps_low=opts["eps_low"], eps_high=opts["eps_high"], dual_clip_c=opts["dual_clip_c"],
      offpolicy_gamma=opts["offpolicy_gamma"],
      offpolicy_behaviour_one=opts["offpolicy_behaviour_one"],
      loss_type=opts["loss_type"], gspo_eps_low=opts["gspo_eps_low"],
      gspo_eps_high=opts["gspo_eps_high"], cispo_eps_low=opts["cispo_eps_low"],
      cispo_eps_high=opts["cispo_eps_high"],
      rollout_weight=_rollout_weights(opts, batch.replace(old_logp=old_logp), mask), **agg)
  if opts["kl_coef"]:
    kl = losses.kl_loss(logp, ref_logp, mask, opts["kl_kind"], **agg)
    loss = loss + opts["kl_coef"] * kl
    metrics["kl_loss"] = jax.lax.stop_gradient(kl)
  if opts["entropy_coef"]:
    # Aligned like logp: column t is the entropy of the distribution that scores token t.
    entropy = losses.aggregate(entropy_per_token, mask, opts["agg_mode"], opts["max_len_norm"],
                               denominator)
    loss = loss - opts["entropy_coef"] * entropy
    metrics["entropy"] = jax.lax.stop_gradient(entropy)
  metrics["policy_loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def critic_objective(critic_params, cfg: ModelConfig, opts: dict, batch: RolloutBatch,
                     returns, denominator, packed=None):
  mask = _train_mask(batch)
  if packed is None:
    values = critic_lib.critic_values(cfg, critic_params, batch.tokens, batch.attention_mask,
                                      batch.positions)
  else:
    tok, pos, seg, target = packed
    values = seq_pack.unpack(critic_lib.critic_values(cfg, critic_params, tok, seg > 0, pos, seg),
                             target)
  old_values, returns = jnp.where(mask, batch.values, 0.0), jnp.where(mask, returns, 0.0)
  loss, metrics = losses.value_loss(values, old_values, returns, mask, opts["value_clip"],
                                    opts["agg_mode"], opts["max_len_norm"], denominator)
  # Explained variance is not a mean: the minibatch's comes from summed moments.
  residual = jnp.where(mask, returns - jax.lax.stop_gradient(values), 0.0)
  metrics.update(_ev_n=jnp.sum(mask).astype(jnp.float32), _ev_r=jnp.sum(returns),
                 _ev_r2=jnp.sum(jnp.square(returns)), _ev_e=jnp.sum(residual),
                 _ev_e2=jnp.sum(jnp.square(residual)))
  return opts["vf_coef"] * loss, metrics


# Metrics that add up over micro-batches (losses divided by the minibatch count, counts);
# the rest are per-micro-batch means, recombined weighted by the tokens each one
# averages: on-policy tokens, off-policy tokens, or (the rest) all trained tokens.
# So they are the minibatch's means however its rows are grouped into micro-batches.
_SUMMED = ("pg_loss", "kl_loss", "entropy", "policy_loss", "vf_loss", "num_tokens_on",
           "num_tokens_off")
_ON_POLICY_MEANS = ("clipfrac_low", "clipfrac_high", "clipfrac", "approx_kl", "ratio_mean_on",
                    "seq_ratio_mean_on", "clipfrac_dual")
_OFF_POLICY_MEANS = ("ratio_mean_off", "f_r_mean_off")


def _combine_micro_metrics(stacked: dict, micro_tokens):
  share = lambda counts: counts / jnp.maximum(jnp.sum(counts), 1)
  weights = dict(on=share(stacked["num_tokens_on"].astype(jnp.float32)),
                 off=share(stacked["num_tokens_off"].astype(jnp.float32)),
                 all=share(micro_tokens))
  out = {}
  for k, v in stacked.items():
    if k.startswith("_ev_"):
      continue
    if k in _SUMMED:
      out[k] = jnp.sum(v, axis=0)
    elif k.startswith("ratio_max"):
      out[k] = jnp.max(v, axis=0)
    else:
      kind = "on" if k in _ON_POLICY_MEANS else "off" if k in _OFF_POLICY_MEANS else "all"
      out[k] = jnp.sum(v * weights[kind], axis=0)
  if "_ev_n" in stacked:   # 1 − Var[R − V] / Var[R], Bessel-corrected as losses.masked_var
    n, r, r2, e, e2 = (jnp.sum(stacked[f"_ev_{m}"]) for m in ("n", "r", "r2", "e", "e2"))
    var = lambda total, squares: (squares - total * total / jnp.maximum(n, 1)) / jnp.maximum(
        n - 1, 1)
    var_r = var(r, r2)
    out["vf_explained_variance"] = jnp.where(
        var_r > 0, 1.0 - var(e, e2) / jnp.maximum(var_r, 1e-12), 0.0)
  return out


def accumulate_gradients(cfg: ModelConfig, opts: dict, params, critic_params,
                         batch: RolloutBatch, advantages, returns,
                         pack: Optional[seq_pack.PackIndex] = None):
  """Summed gradients over micro-batches == gradients of the whole minibatch.

  With `pack` (seq_pack.plan_batch of this minibatch) the model runs on each
  micro-batch's packed rows; the losses are the padded ones, token for token.
  Returns (policy_loss, policy_grads, critic_loss, critic_grads, metrics); the
  critic entries are None without a critic. Gradients are f32.
  """
  mask = _train_mask(batch)
  denominator = _loss_denominator(mask, opts["agg_mode"])
  n = micro_lib.num_micro(batch.tokens.shape[0], opts["micro_batch_size"])
  rows = (batch, advantages, returns)
  if pack is not None:   # the plan's grouping of rows into micro-batches
    rows = seq_pack.reorder_rows(rows, pack)
  micro = jax.tree.map(lambda x: micro_lib.split_micro(x, n), rows)
  if pack is not None:
    tok, pos, seg = seq_pack.pack_inputs(pack, rows[0].tokens, rows[0].positions)
    micro = micro + ((tok, pos, seg, micro_lib.split_micro(pack.target, n)),)
  else:
    micro = micro + (None,)
  has_critic = critic_params is not None
  zeros = lambda tree: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)
  policy_grad_fn = jax.value_and_grad(policy_objective, has_aux=True)
  critic_grad_fn = jax.value_and_grad(critic_objective, has_aux=True)

  def body(carry, xs):
    p_loss, p_grads, c_loss, c_grads = carry
    mb, adv, ret, packed = micro_lib.constrain_rows(xs)
    (loss, metrics), grads = policy_grad_fn(params, cfg, opts, mb, adv, denominator, packed)
    p_loss = p_loss + loss
    p_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), p_grads, grads)
    if has_critic:
      (closs, cmetrics), cgrads = critic_grad_fn(critic_params, cfg, opts, mb, ret, denominator,
                                                 packed)
      c_loss = c_loss + closs
      c_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), c_grads, cgrads)
      metrics.update(cmetrics)
    metrics["micro_tokens"] = jnp.sum(_train_mask(mb)).astype(jnp.float32)
    return (p_loss, p_grads, c_loss, c_grads), metrics

  init = (jnp.zeros((), jnp.float32), zeros(params), jnp.zeros((), jnp.float32),
          zeros(critic_params) if has_critic else None)
  (p_loss, p_grads, c_loss, c_grads), stacked = jax.lax.scan(body, init, micro)
  micro_tokens = stacked.pop("micro_tokens")
  metrics = _combine_micro_metrics(stacked, micro_tokens)
  metrics["num_loss_tokens"] = jnp.sum(micro_tokens)
  metrics["transparent_in_loss_mask"] = jnp.sum(
      batch.loss_mask.astype(bool) & batch.transparent_mask.astype(bool))
  if opts["rollout_metrics"]:
    # Over the whole minibatch (ρ does not depend on the params being trained).
    trainer_logp = jnp.where(mask, batch.old_logp, 0.0)
    sampler_logp = jnp.where(mask, batch.sampler_logp, 0.0)
    flags = {}
    if opts["correction"]["method"] != "none":
      _, masked, truncated = correction.rollout_weights(trainer_logp, sampler_logp, mask,
                                                        **opts["correction"])
      flags = dict(masked=masked, truncated=truncated)
    metrics.update(correction.mismatch_metrics(trainer_logp, sampler_logp, mask,
                                               batch.is_off_policy, **flags))
  return p_loss, p_grads, (c_loss if has_critic else None), c_grads, metrics


# ----------------------------------------------------------------------------
# The train step.

def _select(ok, new, old):
  """new where ok else old, leaf by leaf: a skipped step leaves every bit unchanged."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(model_cfg: ModelConfig, rl_cfg, policy_opt: optax.GradientTransformation,
                    critic_opt: Optional[optax.GradientTransformation] = None, mesh=None,
                    state_shardings: Optional[TrainState] = None):
  """Jitted `fn(state, batch, advantages [B,T], returns [B,T]) -> (state, metrics)`.

  With rl_cfg's `packing`, fn plans each minibatch's packing on the host
  (seq_pack.plan_batch) and runs the model on packed rows (one compile per
  packed-rows bucket); `pack_efficiency` (real tokens / packed slots) joins the metrics.

  `fn.traces` lists the batch shapes of every compile of this step (log its
  length; a repeated entry is a recompile), `fn.jitted` is the jax.jit object.

  One optimizer update per call (gradient accumulation inside). The state is
  donated. With a mesh, params and optimizer state follow `state_shardings`
  (default: `train_state_shardings`), batch rows go over data×fsdp, metrics are
  replicated. A non-finite loss or gradient norm (policy or critic) skips the
  whole update: params and optimizer states keep their exact old values and
  `skipped_updates` counts it.
  """
  opts = _loss_options(rl_cfg)
  # One entry per trace (= per compile) of this step: the batch shapes it was
  # traced for. A shape traced twice means the state's tree, dtypes or layout
  # changed between calls (e.g. Adam's mu coming back in another dtype): a
  # silent recompile, and donation that reuses nothing.
  traces = []

  def step(state: TrainState, batch: RolloutBatch, advantages, returns, pack=None):
    traces.append(tuple(x.shape for x in jax.tree.leaves((batch, pack))))
    with sharding.use_mesh(mesh):
      has_critic = state.critic_params is not None
      p_loss, p_grads, c_loss, c_grads, metrics = accumulate_gradients(
          model_cfg, opts, state.params, state.critic_params, batch, advantages, returns, pack)
      grad_norm = optax.tree.norm(p_grads)
      ok = jnp.isfinite(p_loss) & jnp.isfinite(grad_norm)
      updates, opt_state = policy_opt.update(p_grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics["grad_norm"] = grad_norm
      critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
      if has_critic:
        c_norm = optax.tree.norm(c_grads)
        ok = ok & jnp.isfinite(c_loss) & jnp.isfinite(c_norm)
        c_updates, critic_opt_state = critic_opt.update(c_grads, state.critic_opt_state,
                                                        state.critic_params)
        critic_params = optax.apply_updates(state.critic_params, c_updates)
        critic_params = _select(ok, critic_params, state.critic_params)
        critic_opt_state = _select(ok, critic_opt_state, state.critic_opt_state)
        metrics["critic_grad_norm"] = c_norm
        metrics["critic_loss"] = c_loss
      skipped = state.skipped_updates + (~ok).astype(jnp.int32)
      new_state = TrainState(
          step=state.step + 1, params=_select(ok, params, state.params),
          opt_state=_select(ok, opt_state, state.opt_state),
          critic_params=critic_params, critic_opt_state=critic_opt_state,
          skipped_updates=skipped)
      metrics["loss"] = p_loss
      metrics["skipped"] = (~ok).astype(jnp.int32)
      metrics["skipped_updates"] = skipped
      return new_state, metrics

  micro = opts["micro_batch_size"]

  def plan(batch):
    """(PackIndex, efficiency) of a minibatch, or (None, None) unpacked."""
    if not opts["packing"]:
      return None, None
    if isinstance(batch.attention_mask, jax.core.Tracer):
      # Traced without data (jax.eval_shape of the step): the largest packing.
      rows, width = batch.attention_mask.shape
      shapes = seq_pack.largest_shapes(rows, width, micro_lib.num_micro(rows, micro),
                                       opts["pack_length"])
      return jax.tree.map(lambda s: jnp.zeros(s, jnp.int32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple)), None
    return micro_lib.plan_packing(batch.attention_mask, micro, mesh, opts["pack_length"])

  def call(state, batch, advantages, returns):
    pack, efficiency = plan(batch)
    if pack is None:
      return jitted(state, batch, advantages, returns)
    out = jitted(state, batch, advantages, returns, pack)
    if efficiency is not None:
      out[1]["pack_efficiency"] = efficiency
    return out

  if mesh is None:
    jitted = jax.jit(step, donate_argnums=0)

    def unchecked(state, batch, advantages, returns):
      return call(state, batch, advantages, returns)

    unchecked.jitted, unchecked.traces = jitted, traces
    return unchecked
  if state_shardings is None:
    state_shardings = train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  rows = sharding.batch_sharding(mesh, 2)
  batch_sh = batch_shardings(mesh)
  in_sh = (state_shardings, batch_sh, rows, rows)
  if opts["packing"]:   # the PackIndex, a 5th argument
    in_sh += (micro_lib.pack_index_shardings(mesh),)
  jitted = jax.jit(step, donate_argnums=0, in_shardings=in_sh,
                   out_shardings=(state_shardings, sharding.replicated(mesh)))

  def checked(state, batch, advantages, returns):
    # A clear error before compiling, rather than an XLA sharding failure.
    sharding.check_batch(batch.tokens.shape[0], mesh, "minibatch")
    sharding.check_batch(micro or batch.tokens.shape[0], mesh, "micro_batch_size")
    # Rows gathered on the host side (e.g. PPO minibatches) may arrive with another
    # layout; put them on the declared one (a no-op when they already match).
    batch, advantages, returns = jax.device_put((batch, advantages, returns),
                                                (batch_sh, rows, rows))
    return call(state, batch, advantages, returns)

  checked.jitted, checked.traces = jitted, traces
  return checked


# ----------------------------------------------------------------------------
# PPO epochs (host loop).

@jax.jit
def _take_rows(tree, idx):
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def ppo_epochs(train_step, state: TrainState, batch: RolloutBatch, advantages, returns,
               num_epochs: int, minibatch_size: int, key: jax.Array):
  """`num_epochs` passes over the rollout batch in seeded random minibatches.

  Returns (state, metrics): metrics averaged over all updates, except
  `skipped_updates` (the running total after the last one) and `num_updates`.
  """
  num_rows = batch.tokens.shape[0]
  if num_rows % minibatch_size:
    raise ValueError(f"rollout batch of {num_rows} rows is not divisible by "
                     f"minibatch_size={minibatch_size}.")
  history = []
  for epoch in range(num_epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), num_rows))
    for start in range(0, num_rows, minibatch_size):
      idx = jnp.asarray(perm[start:start + minibatch_size])
      mb, adv, ret = _take_rows((batch, advantages, returns), idx)
      state, metrics = train_step(state, mb, adv, ret)
      history.append(metrics)
  history = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  out["skipped_updates"] = int(history[-1]["skipped_updates"])
  out["num_updates"] = len(history)
  return state, out
