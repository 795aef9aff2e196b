"""Chunked next-token logprobs and entropies (models/logprobs.py, model.logits_chunk)
against HF's logits and the unchunked path: values, gradients, sharding and the
memory they exist to save."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mars.models as mm
from mars import sharding
from mars.models import logprobs


def _batch(cfg, B=3, T=29, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (B, T))
  mask = np.ones((B, T), bool)
  mask[0, :5] = False           # left padding
  mask[1, T - 6:] = False       # right padding
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  # Column t scores token t from position t-1: both must be real tokens.
  scored = np.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))
  return tokens, mask, positions, scored


def _hf_reference(hf_model, tokens, mask, positions):
  """(logp, entropy) from HF's logits, aligned as mars aligns them (column 0 = 0)."""
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(tokens),
                      attention_mask=torch.tensor(mask.astype(np.int64)),
                      position_ids=torch.tensor(positions)).logits.double()
  logp_all = torch.log_softmax(logits[:, :-1], -1)
  logp = torch.gather(logp_all, -1, torch.tensor(tokens[:, 1:, None])).squeeze(-1).numpy()
  entropy = -(logp_all.exp() * logp_all).sum(-1).numpy()
  pad = ((0, 0), (1, 0))
  return np.pad(logp, pad), np.pad(entropy, pad)


@pytest.mark.parametrize("chunk", [0, 7, 28, 64])   # off, ragged last chunk, exact, one chunk
def test_chunked_logprobs_match_hf(tiny_qwen3, chunk):
  path, hf_model = tiny_qwen3
  cfg, params = mm.load_hf(path)
  tokens, mask, positions, scored = _batch(cfg)
  want_logp, want_entropy = _hf_reference(hf_model, tokens, mask, positions)
  logp, entropy = jax.jit(logprobs.sequence_logprobs, static_argnums=(0, 5))(
      cfg.replace(logits_chunk=chunk), params, tokens, mask, positions, True)
  assert np.abs(np.asarray(logp) - want_logp)[scored].max() <= 1e-4
  assert np.abs(np.asarray(entropy) - want_entropy)[scored].max() <= 1e-4
  assert np.all(np.asarray(logp)[:, 0] == 0) and np.all(np.asarray(entropy)[:, 0] == 0)
  # The token-level API takes the same path.
  np.testing.assert_allclose(
      np.asarray(mm.token_logprobs(cfg.replace(logits_chunk=chunk), params, tokens, mask, positions)),
      np.asarray(logp), atol=1e-6)


def test_chunked_gradients_equal_unchunked(tiny_qwen3):
  """d/dθ of Σ w1·logp + w2·entropy: chunked (7 positions, ragged) = unchunked, fp32."""
  path, _ = tiny_qwen3
  cfg, params = mm.load_hf(path)
  tokens, mask, positions, scored = _batch(cfg, seed=1)
  rng = np.random.default_rng(3)
  w1, w2 = (jnp.asarray(rng.normal(size=tokens.shape) * scored, jnp.float32) for _ in range(2))

  def loss(params, cfg):
    logp, ent = logprobs.sequence_logprobs(cfg, params, tokens, mask, positions, with_entropy=True)
    return jnp.sum(w1 * logp) + jnp.sum(w2 * ent)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  ref, got = grad(params, cfg), grad(params, cfg.replace(logits_chunk=7))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref)) > 1e-2  # it reaches θ
  for path_, a, b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(ref),
                         jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path_[0]))


def test_chunked_sharded_equals_unsharded(tiny_qwen2):
  """fsdp=2 x tensor=4 (rows over fsdp, vocab over tensor): chunked logp and grads
  equal the unsharded unchunked ones."""
  path, _ = tiny_qwen2
  cfg, params = mm.load_hf(path)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (8, 20))
  mask = np.ones((8, 20), bool)
  mask[::2, :4] = False

  def loss_and_logp(params, tokens, mask, cfg):
    logp = logprobs.sequence_logprobs(cfg, params, tokens, mask)[0]
    return jnp.sum(jnp.where(mask, logp, 0.0)), logp

  fn = jax.jit(jax.grad(loss_and_logp, has_aux=True), static_argnums=3)
  ref_grads, ref_logp = fn(params, jnp.asarray(tokens), jnp.asarray(mask), cfg)
  mesh = sharding.make_mesh((1, 2, 4))
  _, sharded = mm.load_hf(path, mesh=mesh)
  rows = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh):
    grads, logp = fn(sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows),
                     cfg.replace(logits_chunk=6))
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(ref_logp)[mask], atol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def test_chunked_logits_save_the_logits_memory():
  """Compiled grad of Σ logp at T=512, V=8192: unchunked keeps the [B, T, V] fp32
  logits for the backward (their gradient, one-hot minus softmax, XLA fuses into
  the lm_head's backward matmuls); 64-position chunks keep [B, 64, V], so at
  least (1 − 64/T) of the logits' bytes go (the rest is the model's own).
  Measured: 112.5 MiB unchunked, 74.7 MiB chunked (the gather-based pick kept
  a zeroed [B, T, V] for its scatter too: 144.5 MiB unchunked)."""
  cfg = mm.tiny_config().replace(vocab_size=8192)
  params = jax.eval_shape(lambda: mm.init_params(cfg, jax.random.key(0)))
  B, T = 2, 512
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, T), jnp.bool_)
  temps = {}
  for chunk in (0, 64):
    c = cfg.replace(logits_chunk=chunk)
    grad = jax.jit(jax.grad(lambda p, t, m: jnp.sum(logprobs.sequence_logprobs(c, p, t, m)[0])))
    temps[chunk] = grad.lower(params, tokens, mask).compile().memory_analysis().temp_size_in_bytes
  logits = B * T * cfg.vocab_size * 4
  assert temps[0] >= logits, temps
  assert temps[0] - temps[64] >= logits * (1 - 64 / T), temps


def test_pick_logprobs_value_and_gradient_match_numpy():
  """The one-hot pick (no gather) is log_softmax[target], and its gradient is
  w·(onehot − softmax), worked in float64 numpy."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 11)) * 4
  logits[0, 0, 3] = -np.inf                                 # a masked vocabulary entry
  targets = rng.integers(0, 11, (3, 5))
  targets[0, 0] = 4
  w = rng.standard_normal((3, 5))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  got = logprobs.pick_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(jnp.asarray(w, jnp.float32) *
                                    logprobs.pick_logprobs(x, jnp.asarray(targets))))(
                                        jnp.asarray(logits, jnp.float32))
  onehot = np.eye(11)[targets]
  np.testing.assert_allclose(np.asarray(grad), w[..., None] * (onehot - np.exp(logp)),
                             rtol=1e-5, atol=1e-6)
