"""A short supervised warm start: next-token cross-entropy on response tokens.

    params, history = sft_train(cfg, params, tokenizer, [(prompt, response), ...],
                                steps=100, batch_size=32, lr=3e-3, seed=0)

Prompt and response are tokenized separately and concatenated, exactly as a
rollout sees them (prompt ids, then the model's own ids), and right-padded to
one length for the whole set, so the step compiles once. Only response tokens
are scored. The optimizer is mars.rl.optim's AdamW (warmup + cosine, global-
norm clip), and batches come from seeded epoch permutations: the same seed
gives the same params.
"""
import functools
import logging
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mars import config as mars_config
from mars import sharding
from mars import models
from mars.models import logprobs
from mars.models.config import ModelConfig
from mars.rl import optim, train_state
from mars.tokenizer import bucket_length


def pack_examples(tokenizer, examples: Sequence[tuple], length: Optional[int] = None):
  """(prompt, response) pairs -> right-padded (tokens, attention_mask, loss_mask) [N, T].

  `loss_mask[i, t]` marks response token t: it is scored from position t - 1.
  """
  if not examples:
    raise ValueError("pack_examples: no examples.")
  rows = []
  for i, (prompt, response) in enumerate(examples):
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    if not p or not r:
      raise ValueError(f"pack_examples: example {i} has an empty prompt or response.")
    rows.append((p, r))
  longest = max(len(p) + len(r) for p, r in rows)
  length = length or bucket_length(longest, minimum=16, multiple=16)
  if longest > length:
    raise ValueError(f"pack_examples: an example of {longest} tokens exceeds length {length}.")
  tokens = np.full((len(rows), length), tokenizer.pad_id, np.int32)
  attention_mask = np.zeros((len(rows), length), bool)
  loss_mask = np.zeros((len(rows), length), bool)
  for i, (p, r) in enumerate(rows):
    tokens[i, :len(p) + len(r)] = p + r
    attention_mask[i, :len(p) + len(r)] = True
    loss_mask[i, len(p):len(p) + len(r)] = True
  return tokens, attention_mask, loss_mask


def response_loss(cfg: ModelConfig, params, tokens, attention_mask, loss_mask):
  """Mean cross-entropy over response tokens, and next-token accuracy there."""
  logits = models.forward(cfg, params, tokens, attention_mask)
  logp = logprobs.logprobs_from_logits(logits, tokens)
  hit = jnp.pad(jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:], ((0, 0), (1, 0)))
  weight = loss_mask.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  return -(logp * weight).sum() / count, {"token_accuracy": (hit * weight).sum() / count}


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch_size] row indices: consecutive seeded epoch permutations."""
  rng = np.random.default_rng(seed)
  epochs = -(-steps * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
  return order[:steps * batch_size].reshape(steps, batch_size)


@functools.lru_cache(maxsize=8)
def _train_step(cfg: ModelConfig, mesh, opt_cfg: tuple):
  """(optimizer, jitted init, jitted step), cached: repeated runs with one setup compile
  once. With a mesh both take explicit shardings from the logical rules, as the RL
  step does: params and Adam's moments by their axes, rows over data×fsdp, scalars
  replicated."""
  optimizer = optim.make_optimizer(dict(opt_cfg))

  def train_step(params, opt_state, tokens, attention_mask, loss_mask):
    with sharding.use_mesh(mesh):
      (loss, aux), grads = jax.value_and_grad(
          lambda p: response_loss(cfg, p, tokens, attention_mask, loss_mask), has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = jax.tree.map(jnp.add, params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  if mesh is None:
    return optimizer, jax.jit(optimizer.init), jax.jit(train_step, donate_argnums=(0, 1))
  p_sh = models.param_shardings(cfg, mesh)
  p_abs = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  opt_sh = train_state.opt_state_shardings(optimizer, p_abs, p_sh, mesh)
  rows, rep = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
  init = jax.jit(optimizer.init, in_shardings=(p_sh,), out_shardings=opt_sh)
  step = jax.jit(train_step, in_shardings=(p_sh, opt_sh, rows, rows, rows),
                 out_shardings=(p_sh, opt_sh, rep), donate_argnums=(0, 1))
  return optimizer, init, step


def sft_train(cfg: ModelConfig, params, tokenizer, examples: Sequence[tuple], *, steps: int,
              batch_size: int, lr: float, seed: int, mesh=None, warmup_steps: Optional[int] = None,
              weight_decay: float = 0.0, grad_clip: float = 1.0, log_every: int = 10):
  """Supervised fine-tuning on (prompt, response) texts; returns (params, history).

  The caller's `params` are left intact (the step donates its own copy).
  `history` holds one dict per step: step, loss, token_accuracy, grad_norm, lr.
  With a `mesh`, params follow the model's logical sharding and rows are split
  over data×fsdp (batch_size must divide accordingly).
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"sft_train: steps ({steps}) and batch_size ({batch_size}) must be >= 1.")
  warmup = min(steps // 10, 20) if warmup_steps is None else warmup_steps
  opt_cfg = tuple(sorted(mars_config.optimizer_config(
      lr=lr, warmup_steps=warmup, schedule="cosine", total_steps=steps, min_lr_ratio=0.1,
      weight_decay=weight_decay, grad_clip=grad_clip).items()))
  _, init_opt, train_step = _train_step(cfg, mesh, opt_cfg)
  schedule = optim.make_schedule(dict(opt_cfg))
  data = pack_examples(tokenizer, examples)
  order = batch_order(len(examples), batch_size, steps, seed)

  params = jax.tree.map(jnp.array, params)  # a private copy: donation must not eat the caller's.
  rows = None
  if mesh is not None:
    sharding.check_batch(batch_size, mesh, "SFT batch")
    params = jax.device_put(params, models.param_shardings(cfg, mesh))
    rows = sharding.batch_sharding(mesh, 2)
  # With a mesh, the state's shardings are the step's own (in = out), so the step
  # compiles once: an init that left Adam's count unplaced compiled it twice.
  opt_state = init_opt(params)

  device_metrics, start = [], time.time()
  for step, idx in enumerate(order, start=1):
    batch = tuple(x[idx] for x in data)
    if rows is not None:
      batch = jax.device_put(batch, rows)
    params, opt_state, metrics = train_step(params, opt_state, *batch)
    device_metrics.append(metrics)  # fetched at the end: no host sync per step
    if log_every and (step % log_every == 0 or step == steps):
      logging.info("sft step %d/%d loss %.4f (%.1fs)", step, steps, float(metrics["loss"]),
                   time.time() - start)
  history = [{"step": step, "lr": float(schedule(step - 1)),
              **{k: float(v) for k, v in m.items()}}
             for step, m in enumerate(jax.device_get(device_metrics), start=1)]
  return params, history
