"""Chunked (flash) attention, models/flash.py, against the dense attention it
replaces and against HF: forward and gradients in fp32 within 1e-5, bf16 no
worse than dense bf16, and the memory it exists to save."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mars.models as mm
from mars.models import flash, qwen
from mars.models.config import ModelConfig


def _inputs(B, T, H, KVH, hd, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(B, T, n, hd)).astype(np.float32) for n in (H, KVH, KVH))
  key_mask = np.ones((B, T), bool)
  key_mask[0, :5] = False                 # left padding
  key_mask[1 % B, T - 7:] = False         # right padding
  key_mask[2 % B, : T // 2] = False       # mostly padding
  weights = rng.normal(size=(B, T, H, hd)).astype(np.float32) * key_mask[:, :, None, None]
  return q, k, v, key_mask, weights


def _dense(q, k, v, key_mask):
  B, T, H, hd = q.shape
  cfg = ModelConfig(num_heads=H, num_kv_heads=k.shape[2], head_dim=hd)
  mask = jnp.tril(jnp.ones((T, T), bool))[None] & key_mask[:, None, :]
  return qwen.attention(q, k, v, mask, cfg)


def _value_and_grads(attend, q, k, v, key_mask, weights):
  """(output, [dq, dk, dv]) of sum(attend(...) * weights), in one compiled program."""
  def loss(q, k, v):
    out = attend(q, k, v, key_mask)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


@pytest.mark.parametrize("H, KVH, T, block", [
    (4, 4, 37, 16), (4, 2, 37, 16), (7, 1, 37, 16),   # GQA 1, 2, 7; a ragged last block
    (4, 2, 64, 16),                                   # T a multiple of the block
    (4, 2, 5, 512)])                                  # one block shorter than the setting
def test_chunked_matches_dense_fp32(H, KVH, T, block):
  q, k, v, key_mask, weights = _inputs(3, T, H, KVH, 8)
  chunked = lambda q, k, v, m: flash.flash_attention(q, k, v, m, block)
  out_d, grads_d = _value_and_grads(_dense, q, k, v, key_mask, weights)
  out_c, grads_c = _value_and_grads(chunked, q, k, v, key_mask, weights)
  np.testing.assert_allclose(out_c[key_mask], out_d[key_mask], atol=1e-5, rtol=1e-5)
  assert np.abs(grads_d[0]).max() > 0.1   # the loss reaches q, k and v
  for gc, gd in zip(grads_c, grads_d):
    np.testing.assert_allclose(gc, gd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H, KVH", [(4, 2), (7, 1)])
def test_chunked_packed_matches_dense_per_sequence(H, KVH):
  """Packed rows (segment ids): each segment's outputs and gradients equal dense
  attention run on that sequence alone, within 1e-5 in fp32 (GQA 1/2/7)."""
  T, hd, lengths = 37, 8, [[9, 17, 5], [30], [3, 3, 3, 20]]   # empty tail slots too
  q, k, v, _, weights = _inputs(len(lengths), T, H, KVH, hd)
  seg = np.zeros((len(lengths), T), np.int32)
  for r, ls in enumerate(lengths):
    seg[r, :sum(ls)] = np.repeat(np.arange(1, len(ls) + 1), ls)
  weights = weights * (seg > 0)[:, :, None, None]
  chunked = lambda q, k, v, m: flash.flash_attention(q, k, v, m, 16, segment_ids=jnp.asarray(seg))
  out_c, grads_c = _value_and_grads(chunked, q, k, v, seg > 0, weights)
  for r, ls in enumerate(lengths):
    start = 0
    for n in ls:
      sl = (slice(r, r + 1), slice(start, start + n))
      one = [x[sl] for x in (q, k, v)]
      out_d, grads_d = _value_and_grads(_dense, *one, np.ones((1, n), bool), weights[sl])
      np.testing.assert_allclose(out_c[sl], out_d, atol=1e-5, rtol=1e-5)
      for gc, gd in zip(grads_c, grads_d):
        np.testing.assert_allclose(gc[sl], gd, atol=1e-5, rtol=1e-5)
      start += n
  assert all(np.all(g[seg == 0] == 0) for g in grads_c)   # empty slots get no gradient


def test_chunked_skips_key_blocks_no_query_sees():
  """Segment-aware block skipping: with packed 16-token sequences and 8-token blocks, query
  block i starts at key block 2*(i//2) (its sequence's start), and with 20 tokens of left
  padding in every row at key block 2; outputs and gradients still equal dense attention
  per sequence / on the padded batch (fp32, 1e-5)."""
  seg = np.repeat(np.arange(1, 5), 16)[None].repeat(2, 0).astype(np.int32)   # [2, 64]
  lo = np.asarray(flash._first_key_blocks(jnp.asarray(seg), 8, True, 8))
  np.testing.assert_array_equal(lo, [0, 0, 2, 2, 4, 4, 6, 6])
  q, k, v, _, weights = _inputs(2, 64, 4, 2, 8)
  chunked = lambda q, k, v, m: flash.flash_attention(q, k, v, m, 8, segment_ids=jnp.asarray(seg))
  out_c, grads_c = _value_and_grads(chunked, q, k, v, seg > 0, weights)
  for start in range(0, 64, 16):
    sl = (slice(0, 2), slice(start, start + 16))
    out_d, grads_d = _value_and_grads(_dense, *[x[sl] for x in (q, k, v)], np.ones((2, 16), bool),
                                      weights[sl])
    np.testing.assert_allclose(out_c[sl], out_d, atol=1e-5, rtol=1e-5)
    for gc, gd in zip(grads_c, grads_d):
      np.testing.assert_allclose(gc[sl], gd, atol=1e-5, rtol=1e-5)
  key_mask = np.ones((2, 64), bool)
  key_mask[:, :20] = False
  lo = np.asarray(flash._first_key_blocks(jnp.asarray(key_mask), 8, False, 8))
  np.testing.assert_array_equal(lo, [0, 1, 2, 2, 2, 2, 2, 2])
  weights = weights * key_mask[:, :, None, None]
  out_d, grads_d = _value_and_grads(_dense, q, k, v, key_mask, weights)
  out_c, grads_c = _value_and_grads(lambda q, k, v, m: flash.flash_attention(q, k, v, m, 8),
                                    q, k, v, key_mask, weights)
  np.testing.assert_allclose(out_c[key_mask], out_d[key_mask], atol=1e-5, rtol=1e-5)
  for gc, gd in zip(grads_c, grads_d):
    np.testing.assert_allclose(gc, gd, atol=1e-5, rtol=1e-5)


def test_chunked_bf16_is_no_worse_than_dense_bf16():
  """bf16 tolerance, stated as a comparison: against the fp32 dense result,
  chunked bf16's largest error is within 1.5x (+ 1 bf16 ulp at 1) of dense bf16's."""
  q, k, v, key_mask, weights = _inputs(3, 37, 4, 2, 8)
  ref_out, ref_grads = _value_and_grads(_dense, q, k, v, key_mask, weights)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  chunked = lambda q, k, v, m: flash.flash_attention(q, k, v, m, 16)
  dense_out, dense_grads = _value_and_grads(_dense, *bf, key_mask, weights)
  chunked_out, chunked_grads = _value_and_grads(chunked, *bf, key_mask, weights)
  for ref, d, c in zip([ref_out] + ref_grads, [dense_out] + dense_grads,
                       [chunked_out] + chunked_grads):
    if ref.shape == ref_out.shape:
      ref, d, c = ref[key_mask], d[key_mask], c[key_mask]
    err_dense, err_chunked = np.abs(d - ref).max(), np.abs(c - ref).max()
    assert err_chunked <= 1.5 * err_dense + 2 ** -7, (err_chunked, err_dense)


def test_model_with_chunked_attention_matches_hf_and_dense_gradients(tiny_qwen2):
  path, hf_model = tiny_qwen2
  cfg, params = mm.load_hf(path)
  T = 40
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (3, T))
  mask = np.ones((3, T), bool)
  mask[0, :6] = False
  mask[1, T - 9:] = False
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions)).logits.float().numpy()
  chunked = cfg.replace(attention="chunked", attention_block=16)
  logits = np.asarray(mm.forward(chunked, params, jnp.asarray(tokens), jnp.asarray(mask),
                                 jnp.asarray(positions)))
  assert np.abs(logits - ref)[mask].max() <= 1e-4

  def loss(params, cfg):
    logp = mm.logprobs_from_logits(
        mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)),
        jnp.asarray(tokens))
    # Column t scores token t from the logits at t-1: both must be real tokens
    # (a padding query's output is meaningless, and differs between the two).
    scored = np.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))
    return jnp.sum(jnp.where(jnp.asarray(scored), logp, 0.0))

  grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
  grads = [grad_fn(params, c) for c in (cfg, chunked)]
  for path_, a, b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[0]),
                         jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path_[0]))


def test_chunked_attention_saves_the_score_memory():
  """Compiled forward+backward of one attention at T=1024 (4 heads): dense keeps
  [B, H, T, T] fp32 scores (16 MiB a row); chunked keeps [block, block] blocks."""
  B, T, H, hd = 2, 1024, 4, 16
  q = jax.ShapeDtypeStruct((B, T, H, hd), jnp.float32)
  kv = jax.ShapeDtypeStruct((B, T, 2, hd), jnp.float32)
  key_mask = jax.ShapeDtypeStruct((B, T), jnp.bool_)
  temps = {}
  for name, attend in (("dense", _dense),
                       ("chunked", lambda q, k, v, m: flash.flash_attention(q, k, v, m, 128))):
    grad = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(attend(q, k, v, m)), argnums=(0, 1, 2)))
    temps[name] = grad.lower(q, kv, kv, key_mask).compile().memory_analysis().temp_size_in_bytes
  scores = B * H * T * T * 4
  assert temps["dense"] >= scores, temps
  assert temps["chunked"] < scores / 8, temps


def test_chunked_sharded_equals_unsharded_dense(tiny_qwen2):
  """On an fsdp=2 x tensor=4 mesh (rows over fsdp, q heads over tensor), the
  chunked forward and its parameter gradients equal the unsharded dense ones."""
  from mars import sharding
  path, _ = tiny_qwen2
  cfg, params = mm.load_hf(path)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (8, 20))
  mask = np.ones((8, 20), bool)
  mask[::2, :4] = False

  def loss_and_logits(params, tokens, mask, cfg):
    logits = mm.forward(cfg, params, tokens, mask)
    return jnp.sum(jnp.where(mask[..., None], logits, 0.0) ** 2) * 1e-3, logits

  fn = jax.jit(jax.grad(loss_and_logits, has_aux=True), static_argnums=3)
  ref_grads, ref_logits = fn(params, jnp.asarray(tokens), jnp.asarray(mask), cfg)
  mesh = sharding.make_mesh((1, 2, 4))
  _, sharded = mm.load_hf(path, mesh=mesh)
  rows = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh):
    grads, logits = fn(sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows),
                       cfg.replace(attention="chunked", attention_block=8))
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref_logits)[mask], atol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)
