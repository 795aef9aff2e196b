"""The Pallas attention kernels (mars/models/kernels.py: TPU splash, GPU Triton flash)
in Pallas interpret mode on CPU, against the dense XLA attention and the chunked
one: forward and gradients within 1e-5 in fp32 on ragged, left/right-padded and
packed batches with GQA ratios 1/2/7 and head_dim 64/128; bf16 no worse than dense
bf16; splash skipping the blocks segments rule out; a whole model (vs HF), sharded on
a mesh; and how `auto` and validation pick.

Interpret mode runs the kernels' own code (grid, blocks, masks, custom backward)
as XLA on the host: it checks what they compute, not their speed or that Mosaic /
Triton compile them (tests/test_plan.py compiles splash for a TPU topology).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mars.models as mm
from mars import config as mars_config
from mars import config_validation, sharding
from mars.models import flash, kernels
from test_attention import _dense, _inputs, _value_and_grads

KINDS = ("splash", "pallas_gpu")


def _kernel(kind, block=128):
  return lambda q, k, v, m, seg=None: kernels.attend(kind, q, k, v, m, seg, block=block,
                                                     interpret=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H, KVH, hd", [(4, 4, 64), (4, 2, 64), (7, 1, 64), (4, 2, 128)])
def test_kernel_matches_dense_fp32(kind, H, KVH, hd):
  """T = 77: one block, padded inside the kernel; rows left-, right- and mostly padded."""
  q, k, v, key_mask, weights = _inputs(3, 77, H, KVH, hd)
  out_d, grads_d = _value_and_grads(_dense, q, k, v, key_mask, weights)
  out_k, grads_k = _value_and_grads(_kernel(kind), q, k, v, key_mask, weights)
  np.testing.assert_allclose(out_k[key_mask], out_d[key_mask], atol=1e-5, rtol=1e-5)
  assert np.abs(grads_d[0]).max() > 0.1   # the loss reaches q, k and v
  for gk, gd in zip(grads_k, grads_d):
    np.testing.assert_allclose(gk, gd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_packed_and_multi_block_matches_chunked(kind):
  """Packed rows (segment ids, empty tail slots) over T = 300: three kernel blocks
  of 128, segments crossing block edges; equal to the chunked attention, which
  tests/test_attention.py checks against dense attention per sequence."""
  T, lengths = 300, [[90, 170, 25], [300], [3, 3, 130, 100]]
  q, k, v, _, weights = _inputs(len(lengths), T, 7, 1, 64)
  seg = np.zeros((len(lengths), T), np.int32)
  for r, ls in enumerate(lengths):
    seg[r, :sum(ls)] = np.repeat(np.arange(1, len(ls) + 1), ls)
  weights = weights * (seg > 0)[:, :, None, None]
  segj = jnp.asarray(seg)
  chunked = lambda q, k, v, m: flash.flash_attention(q, k, v, m, 64, segment_ids=segj)
  ref_out, ref_grads = _value_and_grads(chunked, q, k, v, seg > 0, weights)
  kern = _kernel(kind)
  out, grads = _value_and_grads(lambda q, k, v, m: kern(q, k, v, m, segj), q, k, v, seg > 0,
                                weights)
  real = seg > 0
  np.testing.assert_allclose(out[real], ref_out[real], atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  assert all(np.all(g[~real] == 0) for g in grads)   # empty slots get no gradient


def test_segment_block_overlap_hand_worked():
  """Blocks of 128 over a packed row (segments of 150, 250 and 50 tokens, 62 empty
  slots) and a left-padded row (200 padding slots): which q block (row) can see
  which kv block (column), worked out by hand."""
  packed = np.zeros(512, np.int32)
  packed[:150], packed[150:400], packed[400:450] = 1, 2, 3
  padded = np.zeros(512, np.int32)
  padded[200:] = 1
  got = [np.asarray(kernels.segment_block_overlap(jnp.asarray(s), 128)).astype(int)
         for s in (packed, padded)]
  # packed: block 0 = {1}, 1 = {1, 2}, 2 = {2}, 3 = {2, 3, 0}: 3 meets 1 and 2 (id 2)
  # and itself, not 0. padded: 0 = {0}, 1 = {0, 1}, 2 = 3 = {1}.
  np.testing.assert_array_equal(got[0], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_array_equal(got[1], [[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
  # Any ids, in any order: never rules out two blocks that share an id.
  rng = np.random.default_rng(0)
  for _ in range(50):
    ids = rng.integers(-1, 5, 64).astype(np.int32)
    blocks = ids.reshape(8, 8)
    share = np.array([[bool(set(a) & set(b)) for b in blocks] for a in blocks])
    overlap = np.asarray(kernels.segment_block_overlap(jnp.asarray(ids), 8))
    assert np.all(overlap[share])


def test_splash_runs_only_the_blocks_segments_allow(monkeypatch):
  """The kernel honours the per-example block tables: with them, a packed row of three
  sequences over 4 blocks runs 6 of the 10 causal blocks (counted from the tables) and
  equals the chunked attention; told wrongly that q block 2 cannot see kv block 1
  (which its segment 2 needs), its output there changes and elsewhere it does not, so
  blocks ruled out are really not computed."""
  T = 512
  seg = np.zeros((1, T), np.int32)
  seg[0, :128], seg[0, 128:320], seg[0, 320:] = 1, 2, 3
  q, k, v, _, _ = _inputs(1, T, 4, 2, 64)
  segj = jnp.asarray(seg)
  ref = np.asarray(flash.flash_attention(q, k, v, jnp.asarray(seg > 0), 64, segment_ids=segj))
  kern = kernels._splash_kernel(4, T, 128, True)
  causal = np.asarray(kern.fwd_mask_info.block_mask[0]) > 0
  overlap = np.asarray(kernels.segment_block_overlap(segj[0], 128))
  assert causal.sum() == 10 and (causal & overlap).sum() == 6

  out = np.asarray(kernels.splash_attention(q, k, v, segj, block=128, interpret=True))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  true_overlap = kernels.segment_block_overlap
  def wrong(s, block):
    return true_overlap(s, block).at[2, 1].set(False)
  monkeypatch.setattr(kernels, "segment_block_overlap", wrong)
  sabotaged = np.asarray(kernels.splash_attention(q, k, v, segj, block=128, interpret=True))
  changed = np.abs(sabotaged - ref).max(axis=(2, 3))[0] > 1e-3
  assert changed[256:320].all()       # q block 2's segment-2 queries lost keys 128..255
  assert not changed[:256].any() and not changed[320:].any()


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_bf16_is_no_worse_than_dense_bf16(kind):
  """The stated bf16 tolerance: against fp32 dense, the kernel's largest error in bf16
  is within 1.5x (+ 1 bf16 ulp at 1) of dense bf16's, output and gradients."""
  q, k, v, key_mask, weights = _inputs(3, 77, 4, 2, 64)
  ref_out, ref_grads = _value_and_grads(_dense, q, k, v, key_mask, weights)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  dense_out, dense_grads = _value_and_grads(_dense, *bf, key_mask, weights)
  kern_out, kern_grads = _value_and_grads(_kernel(kind), *bf, key_mask, weights)
  for ref, d, c in zip([ref_out] + ref_grads, [dense_out] + dense_grads, [kern_out] + kern_grads):
    if ref.shape == ref_out.shape:
      ref, d, c = ref[key_mask], d[key_mask], c[key_mask]
    err_dense, err_kernel = np.abs(d - ref).max(), np.abs(c - ref).max()
    assert err_kernel <= 1.5 * err_dense + 2 ** -7, (err_kernel, err_dense)


@pytest.mark.parametrize("kind", KINDS)
def test_model_on_kernel_matches_hf_and_dense_gradients(kind, tiny_qwen3):
  """The whole Qwen3 forward with model.attention=<kernel> (qwen.forward -> kernels.attend):
  logits equal HF's within 1e-4, parameter gradients equal dense attention's."""
  path, hf_model = tiny_qwen3
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
  on_kernel = cfg.replace(attention=kind, attention_block=128)

  def loss(params, cfg):
    logits = mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    logp = mm.logprobs_from_logits(logits, jnp.asarray(tokens))
    scored = np.pad(mask[:, 1:] & mask[:, :-1], ((0, 0), (1, 0)))  # both tokens real
    return jnp.sum(jnp.where(jnp.asarray(scored), logp, 0.0)), logits

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  with kernels.interpret_mode():
    grads, logits = grad_fn(params, on_kernel)
  ref_grads, _ = grad_fn(params, cfg)
  assert np.abs(np.asarray(logits) - ref)[mask].max() <= 1e-4
  for path_, a, b in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                         jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path_[0]))


def test_splash_sharded_equals_unsharded_dense(tiny_qwen2):
  """On an fsdp=2 x tensor=4 mesh the kernel runs per device under shard_map (rows over
  fsdp; Qwen2's 2 kv heads do not split 4 ways, so heads stay whole): logits and
  parameter gradients equal the unsharded dense ones."""
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
  with sharding.use_mesh(mesh), kernels.interpret_mode():
    grads, logits = fn(sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows),
                       cfg.replace(attention="splash", attention_block=128))
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref_logits)[mask], atol=1e-5)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def test_auto_picks_by_platform_and_validation_names_the_fix():
  assert kernels.resolve("auto", "tpu") == "splash"
  assert kernels.resolve("auto", "gpu") == "chunked"   # until pallas_gpu has run on a GPU
  assert kernels.resolve("auto", "cpu") == "chunked"
  assert kernels.resolve("dense", "tpu") == "dense"
  c = mars_config.default_config()
  c.model.attention = "splash"
  config_validation.validate(c, 1, platform="tpu")
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(c, 1, platform="cpu")
  assert str(e.value) == ("model.attention='splash' is a TPU kernel; this run compiles for cpu: "
                          "use 'auto', 'chunked' or 'dense'.")
  c.model.attention = "flash"
  with pytest.raises(config_validation.ConfigError, match="Unknown model.attention 'flash'"):
    config_validation.validate(c, 1)


def test_splash_compiles_for_a_tpu_topology():
  """Mosaic compiles the kernel, forward and backward (GQA 4, head_dim 128, T = 4000
  padded to the block, bf16): three TPU custom calls (forward, dq, dkv) in the
  program compiled for a v5p chip, and no [T, T] scores in its temporaries."""
  from mars import hardware
  if not hardware.has_libtpu():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU topology.")
  from jax.sharding import SingleDeviceSharding
  B, T, H, KVH, hd = 2, 4000, 8, 2, 128
  q = jax.ShapeDtypeStruct((B, T, H, hd), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, KVH, hd), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((B, T), jnp.bool_)
  loss = lambda q, k, v, m: jnp.sum(kernels.attend("splash", q, k, v, m).astype(jnp.float32))
  on_chip = SingleDeviceSharding(hardware.get("v5p-8").devices[0])
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(on_chip,) * 4).lower(
      q, kv, kv, mask).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3
  scores = B * H * T * T * 4   # fp32, what dense attention keeps: 1 GB
  assert compiled.memory_analysis().temp_size_in_bytes < scores / 8


# ----------------------------------------------------------------------------
# Decode: the paged kernels of the rollout engine (kernels.paged_decode_attention).

def _decode_reference(q, work_k, work_v, lengths):
  """numpy: softmax over each row's first `lengths` keys, fp64."""
  K, R, S, hd = work_k.shape
  H = q.shape[1]
  qq = q.reshape(R, K, H // K, hd).astype(np.float64) * hd ** -0.5
  s = np.einsum("rkgd,krsd->rkgs", qq, work_k.astype(np.float64))
  s = np.where(np.arange(S)[None, None, None] < lengths[:, None, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("rkgs,krsd->rkgd", p, work_v.astype(np.float64)).reshape(R, H, hd)


@pytest.mark.parametrize("kind", ("paged_tpu", "paged_gpu"))
@pytest.mark.parametrize("H, KVH, hd", [(4, 4, 64), (4, 2, 64), (7, 1, 64), (8, 2, 128)])
def test_decode_kernel_matches_reference(kind, H, KVH, hd):
  """Ragged lengths across page boundaries (1, a page, a page + 1, all 8 pages, 50): the
  GPU kernel within 1e-5 of fp64 attention in fp32; the TPU kernel reads K/V in bf16
  (it casts them), so it is within 1e-5 of attention over bf16-rounded K/V, and
  within 1e-2 of fp32's. Slots past a row's length hold large garbage, which must
  not reach its output (the kernels skip or mask them)."""
  R, M, p = 5, 8, 16
  rng = np.random.default_rng(H * 100 + hd)
  q = rng.normal(size=(R, H, hd)).astype(np.float32)
  work_k, work_v = (rng.normal(size=(KVH, R, M * p, hd)).astype(np.float32) for _ in range(2))
  lengths = np.array([1, 16, 17, 128, 50], np.int32)
  for r, n in enumerate(lengths):  # stale contents past the length: large, finite
    work_k[:, r, n:], work_v[:, r, n:] = 300.0, 1e4
  out = np.asarray(jax.jit(lambda *a: kernels.paged_decode_attention(kind, *a, p, interpret=True))(
      q, work_k, work_v, lengths))
  bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  exact = _decode_reference(q, work_k, work_v, lengths)
  if kind == "paged_gpu":
    np.testing.assert_allclose(out, exact, atol=1e-5, rtol=1e-5)
  else:
    ref = _decode_reference(q, bf16(work_k), bf16(work_v), lengths)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.abs(out - exact).max() < 1e-2


def _uneven_prompts():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 211, (4, 12))
  mask = np.ones((4, 12), bool)
  mask[0, :5] = False
  mask[2, :3] = False
  tokens[~mask] = 0
  return tokens, mask


def test_sampler_on_gpu_decode_kernel_equals_xla(tiny_qwen3):
  """The rollout engine with sampling.decode_attention=paged_gpu (interpret mode), fp32:
  greedy tokens equal the XLA decode's and logprobs agree within 1e-5, on left-padded
  prompts of uneven lengths, 3 samples a prompt sharing its pages, and a pool small
  enough to preempt and re-prefill."""
  from mars.sampling import GREEDY, Sampler
  path, _ = tiny_qwen3
  cfg, params = mm.load_hf(path)
  tokens, mask = _uneven_prompts()
  kw = dict(key=jax.random.key(6), n=3, max_new_tokens=24, sampling=GREEDY)
  engine = dict(page_size=4, kv_tokens=96)
  ref = Sampler(cfg, pad_id=0, **engine).generate(params, tokens, mask, **kw)
  sampler = Sampler(cfg, pad_id=0, decode_attention="paged_gpu", **engine)
  assert sampler.decode_attention == "paged_gpu"
  with kernels.interpret_mode():
    out = sampler.generate(params, tokens, mask, **kw)
  assert sampler.last_stats["preemptions"] > 0
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)


def test_sampler_on_tpu_decode_kernel_matches_the_trainers_forward(tiny_qwen3):
  """sampling.decode_attention=paged_tpu (interpret mode, slow: a short rollout) on the
  bf16 model, as real runs sample: the sampler's logprob of each token it drew equals
  the trainer's teacher-forced forward on the same bf16 weights within 3e-2 (bf16 K/V
  and activations on both sides; greedy argmaxes may differ from the XLA decode's
  where two logits are within bf16 rounding, so tokens are not compared)."""
  from mars.sampling import Sampler, SamplingParams
  path, _ = tiny_qwen3
  cfg, params = mm.load_hf(path, dtype="bfloat16")
  tokens, mask = _uneven_prompts()
  new = 6
  sampler = Sampler(cfg, pad_id=0, decode_attention="paged_tpu", page_size=4)
  with kernels.interpret_mode():
    out = sampler.generate(params, tokens, mask, key=jax.random.key(3), max_new_tokens=new,
                           sampling=SamplingParams(temperature=1.0))
  P = tokens.shape[1]
  seq = out.tokens[:, :P + new]
  seq_mask = np.concatenate([mask, np.ones((4, new), bool)], 1)
  ref = np.asarray(mm.token_logprobs(cfg, params, jnp.asarray(seq), jnp.asarray(seq_mask)))
  assert out.gen_mask[:, P:P + new].all()
  np.testing.assert_allclose(out.logp[:, P:P + new], ref[:, P:], atol=3e-2)


def test_decode_auto_picks_by_platform():
  from mars.sampling import Sampler
  assert kernels.resolve_decode("auto", "tpu") == "paged_tpu"
  assert kernels.resolve_decode("auto", "gpu") == "xla"   # until paged_gpu has run on a GPU
  assert kernels.resolve_decode("auto", "cpu") == "xla"
  with pytest.raises(ValueError, match="unknown decode_attention 'flash'"):
    Sampler(None, decode_attention="flash")  # before anything reads the model


def test_sharded_sampler_on_gpu_decode_kernel_equals_unsharded_xla(tiny_qwen3):
  """On a data=2 x tensor=4 mesh the kernel runs per device (rows over data, Qwen3's 4 kv
  heads over tensor; page ids local to each device): sampled tokens equal the unsharded
  XLA decode's."""
  from mars.sampling import Sampler, SamplingParams
  path, _ = tiny_qwen3
  cfg, params = mm.load_hf(path)
  tokens, mask = _uneven_prompts()
  kw = dict(key=jax.random.key(2), max_new_tokens=12, sampling=SamplingParams(1.0, 0.9, 0))
  ref = Sampler(cfg, pad_id=0).generate(params, tokens, mask, **kw)
  mesh = sharding.make_mesh((2, 1, 4))
  _, sharded = mm.load_hf(path, mesh=mesh)
  with kernels.interpret_mode():
    out = Sampler(cfg, pad_id=0, mesh=mesh, decode_attention="paged_gpu").generate(
        sharded, tokens, mask, **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)


def test_paged_decode_compiles_for_a_tpu_topology():
  """Mosaic compiles the TPU decode kernel as the engine calls it (bf16, head_dim 128,
  GQA 4, 16-token pages, 64 rows of 16 pages): one TPU custom call."""
  from mars import hardware
  if not hardware.has_libtpu():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): no TPU topology.")
  from jax.sharding import SingleDeviceSharding
  q = jax.ShapeDtypeStruct((64, 32, 128), jnp.bfloat16)
  work = jax.ShapeDtypeStruct((8, 64, 256, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((64,), jnp.int32)
  on_chip = SingleDeviceSharding(hardware.get("v5p-8").devices[0])
  attend = lambda q, k, v, n: kernels.paged_decode_attention("paged_tpu", q, k, v, n, 16)
  compiled = jax.jit(attend, in_shardings=(on_chip,) * 4).lower(q, work, work, lengths).compile()
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1
