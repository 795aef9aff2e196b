"""Every real config builds its full train state abstractly on an 8-device mesh.

No weights: the model shape comes from the real config.json in ../shared, the
state from jax.eval_shape, the layout from the logical sharding rules.
"""
import pathlib

import jax
import jax.numpy as jnp
import pytest

from mars import config as mars_config
from mars import config_validation
from mars import models, sharding
from mars.trainer import loop, policy, rollout_phase, specs
from mars.batch import empty_batch
from mars.rl import optim, step as step_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
MODEL_DIRS = {"Qwen/Qwen2.5-Math-1.5B": "qwen2.5-math-1.5b",
              "Qwen/Qwen3-4B-Base": "qwen3-4b-base", "Qwen/Qwen3-8B-Base": "qwen3-8b-base"}


def load(name):
  return mars_config.load_config_file(str(CONFIGS / f"{name}.py"))


@pytest.mark.parametrize("name", ["multi_attempt_1p5b", "ppo_single_turn_1p5b", "grpo_4b",
                                  "lte_4b", "lte_8b", "dapo_4b"])
def test_real_config_builds_abstract_train_state(name, shared_dir):
  c = load(name)
  config_validation.validate(c, jax.device_count())
  model_dir = shared_dir / "models" / MODEL_DIRS[c.model.path]
  model_cfg = models.load_config(str(model_dir), param_dtype=c.model.dtype, dtype=c.model.dtype,
                                 **policy.compute_options(c))
  mesh = sharding.make_mesh((1, 4, 2))
  policy_opt = optim.make_optimizer(specs.optim_config(c.actor_optim, c))
  critic_opt = (optim.make_optimizer(specs.optim_config(c.critic_optim, c))
                if c.algorithm == "ppo" else None)
  shardings = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  abstract = jax.eval_shape(lambda: specs.abstract_train_state(model_cfg, policy_opt, critic_opt))
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  assert n_params == model_cfg.num_params()
  expected = {"qwen2.5-math-1.5b": 1.54e9, "qwen3-4b-base": 4.02e9, "qwen3-8b-base": 8.19e9}
  assert abs(n_params / expected[MODEL_DIRS[c.model.path]] - 1) < 0.02, n_params
  assert (abstract.critic_params is not None) == (c.algorithm == "ppo")
  # Every leaf has a sharding whose spec fits its rank, and big matrices are split.
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    assert len(sh.spec) <= leaf.ndim
  q_spec = shardings.params["layers"]["q"].spec
  assert q_spec[1] == "fsdp" and q_spec[2] == "tensor"


def test_tiny_config_validates():
  c = load("tiny")
  config_validation.validate(c, 1)
  assert c.model.path == "" and c.data.name == "candidates"


@pytest.mark.parametrize("override,message", [
    (dict(algorithm="reinforce"), "Unknown algorithm 'reinforce'"),
    (dict(sft=dict(hint_fraction=1.5)), r"sft.hint_fraction=1.5 must be in \[0, 1\]"),
    (dict(episode=dict(min_attempts=3, max_attempts=2)), "max_attempts=2 < episode.min_attempts=3"),
    (dict(rl=dict(minibatch_size=12)), "not divisible by rl.minibatch_size=12"),
    (dict(rollout=dict(group_size=1)), "needs rollout.group_size >= 2"),
    (dict(data=dict(prompts_per_step=4), rl=dict(minibatch_size=32)),
     "prompts_per_step=4 is not divisible by the data×fsdp mesh size 8"),
    (dict(actor_optim=dict(total_steps=3)),
     r"actor_optim: a cosine schedule needs total_steps - delay_steps > warmup_steps; got 3 - 0"),
    (dict(critic_optim=dict(schedule="linear")), "Unknown critic_optim.schedule 'linear'"),
    (dict(episode=dict(attempt_end="box")), "Unknown episode.attempt_end 'box'"),
    (dict(episode=dict(max_chunks=51)), "episode.max_chunks=51 caps chunk-mode episodes only"),
    (dict(episode=dict(attempt_end="chunk", max_chunks=-1)), "episode.max_chunks must be >= 0"),
    (dict(episode=dict(chunk_tokens=0)), "episode.chunk_tokens must be >= 1"),
    (dict(eval=dict(attempt_end="first")), "Unknown eval.attempt_end 'first'"),
    (dict(train=dict(grader_boxes="first")), "Unknown train.grader_boxes 'first'"),
    (dict(model=dict(dtype="bfloat16")), "model.dtype='bfloat16' stores the trained params"),
    (dict(model=dict(attention="flash")), r"Unknown model.attention 'flash'; choose one of \('dense', 'chunked', 'splash', "
                                        r"'pallas_gpu', 'auto'\)"),
    (dict(model=dict(attention="splash")), r"model.attention='splash' is a TPU kernel; this run "
                                           r"compiles for cpu: use 'auto', 'chunked' or 'dense'."),
    (dict(model=dict(remat="partial")), r"Unknown model.remat 'partial'; choose one of \('none', 'full', 'dots'\)"),
    (dict(model=dict(logits_chunk=-1)), r"model.logits_chunk must be >= 0 \(0 = unchunked\), got -1"),
    (dict(sampling=dict(kv_tokens=-5)), r"sampling.kv_tokens must be an int >= 0 \(0: enough for"),
    (dict(sampling=dict(page_size=0)), "sampling.page_size must be an int >= 1, got 0"),
])
def test_config_errors_are_one_clear_line(override, message):
  c = load("tiny")
  with c.unlocked():
    for section, value in override.items():
      if isinstance(value, dict):
        c[section].update(value)
      else:
        c[section] = value
  with pytest.raises(config_validation.ConfigError, match=message) as e:
    config_validation.validate(c, 8)
  assert "\n" not in str(e.value)


def test_demo_rule_error_is_one_clear_line():
  """The demo's settings are checked where the demo is resolved (the trainer's policy module)."""
  c = load("tiny")
  c.data.candidates_rule = "last"
  with pytest.raises(config_validation.ConfigError, match="Unknown data.candidates_rule 'last'") as e:
    policy.make_source(c)
  assert "\n" not in str(e.value)


def test_shortened_cosine_run_shortens_its_warmup():
  """The demo decays its lr by cosine over train.steps × updates; a run cut to
  2 steps (4 updates, under the 10-update warmup) warms up for 2 and decays,
  while an explicit total_steps under the warmup stays an error."""
  c = load("tiny")
  c.train.steps, c.data.prompts_per_step, c.rollout.group_size, c.rl.minibatch_size = 2, 8, 4, 16
  o = specs.optim_config(c.actor_optim, c)
  assert (o["schedule"], o["total_steps"], o["warmup_steps"]) == ("cosine", 4, 2)
  lr = optim.make_schedule(o)
  peak, floor = c.actor_optim.lr, c.actor_optim.lr * c.actor_optim.min_lr_ratio
  assert [float(lr(i)) for i in (0, 2, 4)] == pytest.approx([0.0, peak, floor])
  c.train.steps = 100  # the full demo keeps its configured warmup
  assert specs.optim_config(c.actor_optim, c)["warmup_steps"] == c.actor_optim.warmup_steps
  c.actor_optim.total_steps = 4
  with pytest.raises(ValueError, match="total_steps > warmup_steps"):
    optim.make_schedule(specs.optim_config(c.actor_optim, c))


@pytest.mark.parametrize("name,param_dtype", [("multi_attempt_1p5b", None), ("grpo_4b", None),
                                              ("lte_8b", None), ("grpo_4b", "bfloat16")])
def test_update_step_returns_the_state_it_was_given(name, param_dtype, shared_dir):
  """The jitted update's output state has its input's tree, shapes and dtypes (traced
  with jax.eval_shape, no weights): a state that changed dtype after the first step
  (bf16 params with f32 Adam moments) compiled the step twice and defeated donation."""
  c = load(name)
  if param_dtype:  # bf16 storage (model.allow_low_precision_params): the fault, kept visible
    c.model.dtype = param_dtype
  model_dir = shared_dir / "models" / MODEL_DIRS[c.model.path]
  model_cfg = models.load_config(str(model_dir), param_dtype=c.model.dtype,
                                 dtype=c.model.compute_dtype, **policy.compute_options(c))
  mesh = sharding.make_mesh((1, 4, 2))
  policy_opt, critic_opt = specs.make_optimizers(c)
  shardings = step_lib.train_state_shardings(model_cfg, mesh, policy_opt, critic_opt)
  state = jax.eval_shape(lambda: specs.abstract_train_state(model_cfg, policy_opt, critic_opt))
  rows, length = 8, 64
  batch = jax.eval_shape(lambda: empty_batch(rows, length, jnp))
  adv = jax.ShapeDtypeStruct((rows, length), jnp.float32)
  train_step = step_lib.make_train_step(model_cfg, specs.rl_step_config(c), policy_opt,
                                        critic_opt, mesh, shardings)
  out, _ = jax.eval_shape(train_step, state, batch, adv, adv)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  changed = [(jax.tree_util.keystr(path), (a.shape, a.dtype), (b.shape, b.dtype))
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                     jax.tree.leaves(out))
             if (a.shape, a.dtype) != (b.shape, b.dtype)]
  if param_dtype == "bfloat16":  # optax keeps Adam's mu in f32 for bf16 params
    assert any(path.endswith(".mu']") or ".mu" in path for path, _, _ in changed), changed[:5]
  else:
    assert not changed, changed[:5]
