"""Qwen2/Qwen3 port: parity with HF transformers (torch) on tiny random models."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import mars.models as mm
from mars import sharding


def _batch(vocab, B=3, T=12, left=True, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, T))
  mask = np.ones((B, T), bool)
  pads = [5, 2, 0]
  for b, p in enumerate(pads[:B]):
    if p:
      if left:
        mask[b, :p] = False
      else:
        mask[b, T - p:] = False
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_qwen3"])
@pytest.mark.parametrize("left", [True, False])
def test_fp32_logits_match_hf(which, left, request):
  path, hf_model = request.getfixturevalue(which)
  cfg, params = mm.load_hf(path)
  tokens, mask, positions = _batch(cfg.vocab_size, left=left)
  ref = _hf_logits(hf_model, tokens, mask, positions)
  out = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  diff = np.abs(out - ref)[mask].max()
  assert diff <= 1e-4, diff
  assert np.abs(ref).max() > 1.0  # logits are spread out, so the comparison means something


def test_config_details(tiny_qwen2, tiny_qwen3):
  c2 = mm.load_config(tiny_qwen2[0])
  c3 = mm.load_config(tiny_qwen3[0])
  assert c2.qkv_bias and not c2.qk_norm and c2.tie_word_embeddings and c2.num_groups == 2
  assert c3.qk_norm and not c3.qkv_bias and not c3.tie_word_embeddings and c3.num_groups == 1
  assert c3.head_dim == 24 != c3.hidden_size // c3.num_heads


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_qwen3"])
def test_bf16_within_hf_own_bf16_error(which, request):
  """bf16 tolerance, justified: mars-bf16's error vs the fp32 reference must be
  of the same size as HF-bf16's own error (bf16 has an 8-bit mantissa, so
  both carry ~1e-2 relative error; we allow 2x HF's plus 0.02 absolute)."""
  path, hf_model = request.getfixturevalue(which)
  tokens, mask, positions = _batch(211)
  ref32 = _hf_logits(hf_model, tokens, mask, positions)
  hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
  ref16 = _hf_logits(hf_bf16, tokens, mask, positions)
  cfg, params = mm.load_hf(path, dtype="bfloat16")
  assert params["embed"].dtype == jnp.bfloat16
  out = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)), np.float32)
  hf_err = np.abs(ref16 - ref32)[mask].max()
  mars_err = np.abs(out - ref32)[mask].max()
  assert mars_err <= 2 * hf_err + 0.02, (mars_err, hf_err)
  assert np.abs(out - ref16)[mask].max() <= 2 * hf_err + 0.02


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_qwen3"])
def test_save_hf_round_trip(which, request, tmp_path):
  path, hf_model = request.getfixturevalue(which)
  cfg, params = mm.load_hf(path)
  mm.save_hf(cfg, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens, mask, positions = _batch(cfg.vocab_size)
  a = _hf_logits(hf_model, tokens, mask, positions)
  b = _hf_logits(reloaded, tokens, mask, positions)
  assert np.abs(a - b)[mask].max() <= 1e-5
  # And mars loads its own export back to identical params.
  cfg2, params2 = mm.load_hf(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_save_hf_sharded_index(tiny_qwen3, tmp_path):
  cfg, params = mm.load_hf(tiny_qwen3[0])
  mm.save_hf(cfg, params, str(tmp_path), max_shard_bytes=40_000)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  _, params2 = mm.load_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_qwen3"])
def test_prefill_and_decode_match_forward(which, request):
  path, _ = request.getfixturevalue(which)
  cfg, params = mm.load_hf(path)
  tokens, mask, positions = _batch(cfg.vocab_size, T=12)
  full = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  P = 8
  logits, cache = mm.prefill(cfg, params, jnp.asarray(tokens[:, :P]), jnp.asarray(mask[:, :P]), 16)
  np.testing.assert_allclose(np.asarray(logits)[mask[:, :P]], full[:, :P][mask[:, :P]], atol=1e-5)
  for t in range(P, 12):
    step_logits, cache = mm.decode_step(cfg, params, jnp.asarray(tokens[:, t]),
                                        jnp.asarray(positions[:, t]), cache)
    np.testing.assert_allclose(np.asarray(step_logits), full[:, t], atol=1e-5)
  assert int(cache.index) == 12
  assert cache.k.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 16, cfg.head_dim)


def test_qwen3_4b_index_maps_to_params(shared_dir):
  """Every real 4B weight name maps to a parameter of the right shape (abstractly)."""
  model_dir = shared_dir / "models" / "qwen3-4b-base"
  cfg = mm.load_config(str(model_dir), param_dtype="bfloat16", dtype="bfloat16")
  abstract = jax.eval_shape(lambda k: mm.init_params(cfg, k), jax.random.key(0))
  weight_map = json.load(open(model_dir / "model.safetensors.index.json"))["weight_map"]
  ours = mm.hf_keys(cfg)
  assert set(weight_map) == set(ours) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  hf_cfg = json.load(open(model_dir / "config.json"))
  H, K, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  expected_hf = {"q_proj.weight": (H * hd, D), "k_proj.weight": (K * hd, D),
                 "o_proj.weight": (D, H * hd), "gate_proj.weight": (hf_cfg["intermediate_size"], D)}
  for key, (path, layer) in ours.items():
    leaf = abstract
    for p in path:
      leaf = leaf[p]
    shape = leaf.shape[1:] if layer is not None else leaf.shape
    assert np.prod(shape) > 0 and leaf.dtype == jnp.bfloat16
    for suffix, hf_shape in expected_hf.items():
      if key.endswith(suffix):
        assert int(np.prod(shape)) == int(np.prod(hf_shape)), key
  assert abstract["embed"].shape == (hf_cfg["vocab_size"], hf_cfg["hidden_size"])
  assert cfg.num_layers == 36 and cfg.qk_norm and cfg.tie_word_embeddings


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (8, 1, 1)])
def test_sharded_forward_equals_unsharded(tiny_qwen2, mesh_shape):
  assert jax.device_count() == 8
  path, _ = tiny_qwen2
  cfg, params = mm.load_hf(path)
  tokens, mask, _ = _batch(cfg.vocab_size, B=8, T=12)
  ref = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  mesh = sharding.make_mesh(mesh_shape)
  _, sharded = mm.load_hf(path, mesh=mesh)
  if mesh_shape == (1, 2, 4):
    # q heads over tensor(4), embed over fsdp(2); 2 KV heads don't divide 4 -> replicated.
    assert sharded["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len({s.device for s in sharded["layers"]["gate"].addressable_shards}) == 8
    assert sharded["layers"]["gate"].addressable_shards[0].data.shape == (2, 32, 24)
    assert sharded["layers"]["k"].sharding.spec[2] is None
  batch_sh = sharding.batch_sharding(mesh)
  fwd = jax.jit(lambda p, t, m: mm.forward(cfg, p, t, m))
  with sharding.use_mesh(mesh):
    out = fwd(sharded, jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh))
  np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], atol=1e-5)


def test_mesh_errors():
  with pytest.raises(sharding.ShardingError, match="needs 16 devices"):
    sharding.make_mesh((2, 2, 4))
  mesh = sharding.make_mesh((1, 2, 4))
  with pytest.raises(sharding.ShardingError, match="batch size 7 is not divisible"):
    sharding.check_batch(7, mesh)
  with pytest.raises(sharding.ShardingError, match="num_attention_heads 6"):
    mm.param_shardings(mm.tiny_config(num_heads=6, num_kv_heads=2), mesh)
  assert sharding.make_mesh((2, -1, 1)).shape["fsdp"] == 4


def test_bad_checkpoints_give_clear_errors(tiny_qwen2, tmp_path):
  path, _ = tiny_qwen2
  with pytest.raises(FileNotFoundError, match="does not exist"):
    mm.load_hf(str(tmp_path / "nope"))
  bad = tmp_path / "bad_type"
  shutil.copytree(path, bad)
  cfg_json = json.load(open(bad / "config.json"))
  json.dump(dict(cfg_json, model_type="llama"), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="Unsupported model_type 'llama'"):
    mm.load_hf(str(bad))
  empty = tmp_path / "no_weights"
  empty.mkdir()
  shutil.copy(os.path.join(path, "config.json"), empty)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    mm.load_hf(str(empty))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(path, "model.safetensors"))
  missing = tmp_path / "missing_key"
  missing.mkdir()
  shutil.copy(os.path.join(path, "config.json"), missing)
  save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
            str(missing / "model.safetensors"))
  with pytest.raises(mm.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
    mm.load_hf(str(missing))
  wrong = tmp_path / "wrong_shape"
  wrong.mkdir()
  shutil.copy(os.path.join(path, "config.json"), wrong)
  tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 95), np.float32)
  save_file(tensors, str(wrong / "model.safetensors"))
  with pytest.raises(mm.CheckpointError, match="Shape mismatch for 'model.layers.0.mlp.down_proj.weight'"):
    mm.load_hf(str(wrong))


def test_import_is_fast():
  code = "import time; t=time.time(); import mars; print(time.time()-t)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert float(out.stdout) < 3.0
