"""Sequence packing (mars/rl/seq_pack.py): the plan and the balanced grouping of rows
into micro-batches on hand-worked examples; packed vs padded log-probs, values, losses,
metrics and gradients on ragged batches with every row kind (on-policy, LTE off-policy,
multi-attempt feedback spans, critic), regrouped or not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mars import config as mars_config
from mars.batch import empty_batch, positions_from_mask
from mars.models import init_params, tiny_config
from mars.rl import critic as critic_lib
from mars.rl import micro as micro_lib
from mars.rl import seq_pack
from mars.rl import step as step_lib

T = 32


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def test_plan_hand_worked():
  # 4 rows of width 8, 2 micro-batches (rows 0,2 and 1,3), packed rows of 8.
  # Row 0: tokens at 2..4; row 1: 0..4; row 2: 1..2; row 3: 4 (one token).
  p = seq_pack.plan([2, 0, 1, 4], [3, 5, 2, 1], width=8, num_micro=2)
  # Micro 0: row 0 (3 tokens, longest first) then row 2 in the same packed row.
  np.testing.assert_array_equal(p.source[0, 0], [2, 3, 4, 17, 18, -1, -1, -1])
  np.testing.assert_array_equal(p.segment[0, 0], [1, 1, 1, 2, 2, 0, 0, 0])
  # Micro 1: row 1 (5 tokens), then row 3's single token.
  np.testing.assert_array_equal(p.source[1, 0], [8, 9, 10, 11, 12, 28, -1, -1])
  np.testing.assert_array_equal(p.segment[1, 0], [1, 1, 1, 1, 1, 2, 0, 0])
  # Each token but a sequence's first comes back from its packed slot.
  np.testing.assert_array_equal(p.target[0], [-1, -1, -1, 1, 2, -1, -1, -1])
  np.testing.assert_array_equal(p.target[1], [-1, 1, 2, 3, 4, -1, -1, -1])
  np.testing.assert_array_equal(p.target[2], [-1, -1, 4, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(p.target[3], -1)
  assert seq_pack.efficiency(p) == pytest.approx(11 / 16)


def test_plan_rows_rounded_and_errors():
  # 6 rows of 5 tokens into rows of 8: 6 packed rows; a multiple of 4 -> 8.
  p = seq_pack.plan([0] * 6, [5] * 6, width=8, num_micro=1, rows_multiple=4)
  assert p.source.shape == (1, 8, 8)
  with pytest.raises(ValueError, match="does not fit a packed row of 4"):
    seq_pack.plan([0], [5], width=8, num_micro=1, length=4)
  mask = np.ones((2, 6), bool)
  mask[0, 2] = False   # a hole inside a row
  with pytest.raises(ValueError, match="contiguous"):
    seq_pack.plan_batch(jnp.asarray(mask), 1)


def test_balanced_order_hand_worked():
  """Rows of 8, 1, 8 and 1 tokens, 2 micro-batches, packed rows of 10: as given,
  micro-batch 0 holds both 8s (2 packed rows, so every micro-batch gets 2); balanced,
  each holds an 8 and a 1 (1 packed row each). The source and target index the
  reordered rows, and micro-batch i is reordered rows i, i + 2."""
  lengths = [8, 1, 8, 1]
  np.testing.assert_array_equal(seq_pack.balanced_order(lengths, 2, 10), [0, 2, 1, 3])
  as_given = seq_pack.plan([0] * 4, lengths, width=10, num_micro=2, balance=False)
  p = seq_pack.plan([0] * 4, lengths, width=10, num_micro=2)
  assert as_given.source.shape == (2, 2, 10) and p.source.shape == (2, 1, 10)
  np.testing.assert_array_equal(as_given.order, [0, 1, 2, 3])
  np.testing.assert_array_equal(p.order, [0, 2, 1, 3])
  # Micro 0 = reordered rows 0 and 2 = rows 0 (8 tokens) and 1 (1 token).
  np.testing.assert_array_equal(p.source[0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 20, -1])
  np.testing.assert_array_equal(p.segment[0, 0], [1] * 8 + [2, 0])
  np.testing.assert_array_equal(p.target[2], -1)   # a 1-token sequence: nothing scored
  np.testing.assert_array_equal(p.target[1], [-1, 1, 2, 3, 4, 5, 6, 7, -1, -1])
  # Never worse than the order given: equal lengths keep it.
  np.testing.assert_array_equal(seq_pack.balanced_order([5, 5, 5, 5], 2, 10), [0, 1, 2, 3])


def ragged_batch(cfg, rows: int, seed: int):
  """Long-tailed rows: left-padded prompts of 3-8 tokens, responses of 1-24 (most
  short), a feedback span in every third response, LTE off-policy rows, critic
  values; sampler logp near the trainer's (for the rollout correction)."""
  rng = np.random.default_rng(seed)
  P = 8
  attn = np.zeros((rows, T), bool)
  loss = np.zeros((rows, T), bool)
  transparent = np.zeros((rows, T), bool)
  for r in range(rows):
    plen = int(rng.integers(3, P + 1))
    rlen = int(min(T - P, 1 + rng.geometric(0.15)))
    attn[r, P - plen:P + rlen] = True
    loss[r, P:P + rlen] = True
    if r % 3 == 1 and rlen > 6:
      transparent[r, P + 2:P + 5] = True
      loss[r, P + 2:P + 5] = False
  tokens = np.where(attn, rng.integers(0, cfg.vocab_size, (rows, T)), 0).astype(np.int32)
  noise = lambda s: rng.normal(0, s, (rows, T)).astype(np.float32)
  old = np.where(loss, -1.0 + noise(0.3), 0).astype(np.float32)
  b = empty_batch(rows, T).replace(
      tokens=tokens, attention_mask=attn, positions=np.asarray(positions_from_mask(attn)),
      loss_mask=loss, transparent_mask=transparent, old_logp=old, behaviour_logp=old,
      sampler_logp=old + noise(0.05), ref_logp=old + noise(0.05),
      values=np.where(loss, noise(0.1), 0).astype(np.float32),
      reward=rng.normal(size=rows).astype(np.float32),
      group_id=(np.arange(rows) // 4).astype(np.int32),
      is_off_policy=(np.arange(rows) % 4 == 3))
  adv = np.where(loss, rng.normal(size=(rows, T)), 0).astype(np.float32)
  ret = np.where(loss, rng.uniform(-0.5, 0.5, (rows, T)), 0).astype(np.float32)
  return jax.tree.map(jnp.asarray, (b, adv, ret))


QWEN2 = tiny_config("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
QWEN3_CHUNKED = tiny_config("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=7, num_kv_heads=1, head_dim=8,
                            attention="chunked", attention_block=8)


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3_CHUNKED], ids=["qwen2-dense", "qwen3-chunked-gqa7"])
def test_recompute_packed_equals_padded(cfg):
  params = init_params(cfg, jax.random.key(0))
  critic = critic_lib.init_critic(params, cfg, jax.random.key(1), head_std=0.02)
  batch, _, _ = ragged_batch(cfg, 16, seed=1)
  pack, eff = micro_lib.plan_packing(batch.attention_mask, 8, None)
  assert pack.source.shape[:2][0] == 2 and pack.source.shape[1] < 8   # fewer rows than padded
  assert eff > float(jnp.mean(batch.attention_mask))
  # Every token but a row's first is scored from its own context.
  scored = np.asarray(batch.attention_mask) & (np.asarray(batch.positions) > 0)
  for fn, p in ((micro_lib.compute_logprobs, params), (micro_lib.compute_values, critic)):
    padded = np.asarray(fn(cfg, p, batch, micro_batch_size=8))
    packed = np.asarray(fn(cfg, p, batch, micro_batch_size=8, pack=pack))
    np.testing.assert_allclose(packed[scored], padded[scored], atol=1e-5, rtol=1e-5)
    assert np.all(packed[~scored] == 0)


CASES = {
    "ppo-critic-kl-entropy": dict(kl_coef=0.01, entropy_coef=0.01),
    "grpo-seq-mean-tis": dict(agg_mode="seq-mean-token-mean", rollout_correction="tis",
                              recompute_old_logp=True),
    "gspo-seq-icepop": dict(loss="gspo", rollout_correction="icepop", recompute_old_logp=True),
    "cispo-dr-grpo": dict(loss="cispo", agg_mode="seq-mean-token-sum-norm", max_len_norm=24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_packed_equals_padded(case):
  """Losses, metrics and gradients (policy and critic) of the packed update equal
  the padded one's within 1e-5 in fp32."""
  cfg = QWEN3_CHUNKED if case.startswith("gspo") else QWEN2
  params = init_params(cfg, jax.random.key(0))
  critic = (critic_lib.init_critic(params, cfg, jax.random.key(1), head_std=0.02)
            if case.startswith("ppo") else None)
  batch, adv, ret = ragged_batch(cfg, 16, seed=2)
  rl_cfg = mars_config.rl_config(eps_low=0.2, eps_high=0.28, micro_batch_size=8,
                                 **CASES[case])
  opts = step_lib._loss_options(rl_cfg)
  pack, _ = micro_lib.plan_packing(batch.attention_mask, 8, None)

  @jax.jit
  def grads(pack):
    return step_lib.accumulate_gradients(cfg, opts, params, critic, batch, adv, ret, pack)

  padded, packed = grads(None), grads(pack)
  p_loss, p_grads, c_loss, c_grads, metrics = padded
  q_loss, q_grads, d_loss, d_grads, q_metrics = packed
  np.testing.assert_allclose(q_loss, p_loss, atol=1e-5, rtol=1e-5)
  assert set(q_metrics) == set(metrics)
  for k in metrics:
    np.testing.assert_allclose(q_metrics[k], metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(p_grads))
  assert scale > 1e-4   # the gradient is not trivially zero
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(scale, 1)),
               q_grads, p_grads)
  if critic is not None:
    np.testing.assert_allclose(d_loss, c_loss, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), d_grads, c_grads)


def test_balanced_packing_equals_padded():
  """A batch whose 8 longest rows sit in micro-batch 0 (rows 0, 2, ...): the balanced
  plan regroups rows into micro-batches and needs fewer packed rows than the order
  given, and its log-probs, values, losses, metrics and gradients (policy and critic)
  equal the padded ones within 1e-5."""
  cfg = QWEN2
  params = init_params(cfg, jax.random.key(0))
  critic = critic_lib.init_critic(params, cfg, jax.random.key(1), head_std=0.02)
  batch, adv, ret = ragged_batch(cfg, 16, seed=3)
  by_length = np.argsort(-np.asarray(batch.attention_mask).sum(1), kind="stable")
  skewed = np.empty(16, np.int64)
  skewed[0::2], skewed[1::2] = by_length[:8], by_length[8:]
  batch, adv, ret = jax.tree.map(lambda x: x[skewed], (batch, adv, ret))
  pack, _ = micro_lib.plan_packing(batch.attention_mask, 8, None)
  as_given = seq_pack.plan_batch(batch.attention_mask, 2, balance=False)
  assert pack.source.shape[1] < as_given.source.shape[1]
  assert not np.array_equal(np.asarray(pack.order), np.arange(16))
  scored = np.asarray(batch.attention_mask) & (np.asarray(batch.positions) > 0)
  for fn, p in ((micro_lib.compute_logprobs, params), (micro_lib.compute_values, critic)):
    padded = np.asarray(fn(cfg, p, batch, micro_batch_size=8))
    packed = np.asarray(fn(cfg, p, batch, micro_batch_size=8, pack=pack))
    np.testing.assert_allclose(packed[scored], padded[scored], atol=1e-5, rtol=1e-5)
  rl_cfg = mars_config.rl_config(eps_low=0.2, eps_high=0.28, micro_batch_size=8,
                                 **CASES["ppo-critic-kl-entropy"])
  opts = step_lib._loss_options(rl_cfg)
  grads = jax.jit(lambda pack: step_lib.accumulate_gradients(cfg, opts, params, critic, batch,
                                                            adv, ret, pack))
  (p_loss, p_grads, c_loss, c_grads, metrics), (q_loss, q_grads, d_loss, d_grads, q_metrics) = (
      grads(None), grads(pack))
  np.testing.assert_allclose(q_loss, p_loss, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(d_loss, c_loss, atol=1e-5, rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(q_metrics[k], metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(p_grads))
  assert scale > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(scale, 1)),
               q_grads, p_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), d_grads, c_grads)


def test_balanced_packing_sharded_train_step_equals_unsharded_padded():
  """On a data=2 x fsdp=2 mesh (rows over 4 shards), a packed train step whose plan
  regroups the rows gives the params of the unsharded padded step."""
  from mars import sharding
  from mars.rl import optim
  cfg = QWEN2
  params = jax.device_get(init_params(cfg, jax.random.key(0)))   # each step donates its own
  batch, adv, ret = ragged_batch(cfg, 16, seed=3)
  by_length = np.argsort(-np.asarray(batch.attention_mask).sum(1), kind="stable")
  skewed = np.empty(16, np.int64)
  skewed[0::2], skewed[1::2] = by_length[:8], by_length[8:]
  batch, adv, ret = jax.tree.map(lambda x: x[skewed], (batch, adv, ret))
  mesh = sharding.make_mesh((2, 2, 1), devices=jax.devices()[:4])
  pack, _ = micro_lib.plan_packing(batch.attention_mask, 8, mesh)
  assert not np.array_equal(np.asarray(pack.order), np.arange(16))
  opt = optim.make_optimizer(mars_config.optimizer_config(lr=1e-2, eps=1e-4))
  new_params = []
  for packing, m in ((False, None), (True, mesh)):
    rl_cfg = mars_config.rl_config(micro_batch_size=8, packing=packing)
    shardings = step_lib.train_state_shardings(cfg, m, opt) if m is not None else None
    state = step_lib.init_train_state(jax.tree.map(jnp.asarray, params), opt)
    if m is not None:
      state = jax.device_put(state, shardings)
    fn = step_lib.make_train_step(cfg, rl_cfg, opt, None, m, shardings)
    state, _ = fn(state, batch, adv, ret)
    new_params.append(jax.device_get(state.params))
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(new_params[0]), jax.tree.leaves(params)))
  assert moved > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new_params[1],
               new_params[0])


def test_train_step_packed_logs_efficiency_and_compiles_per_bucket():
  from mars.rl import optim
  cfg = QWEN2
  params = init_params(cfg, jax.random.key(0))
  opt = optim.make_optimizer(mars_config.optimizer_config(lr=1e-2, eps=1e-4))
  rl_cfg = mars_config.rl_config(micro_batch_size=8, packing=True)
  fn = step_lib.make_train_step(cfg, rl_cfg, opt)
  state = step_lib.init_train_state(params, opt)
  effs = []
  for seed in range(3):
    batch, adv, ret = ragged_batch(cfg, 16, seed=10 + seed)
    state, metrics = fn(state, batch, adv, ret)
    effs.append(metrics["pack_efficiency"])
    assert effs[-1] > float(jnp.mean(batch.attention_mask))
  # One compile per distinct packed-rows bucket, never one per call of the same shape.
  assert len(fn.traces) == len(set(fn.traces)) <= 3
