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


# Tiny models saved by the installed transformers. Together they cover Qwen2
# and Qwen3, tied and untied embeddings, GQA ratios 1, 2 and 7, head_dim other
# than hidden/heads, and the RoPE forms mars computes
# (default, linear, yarn), each with a RoPE base other than 10000.
VARIANTS = {
    "qwen2_tied_gqa2": "tiny_qwen2",           # conftest: rope_theta 5e5
    "qwen3_untied_gqa1_hd24": "tiny_qwen3",    # conftest: rope_theta 1e6
    "qwen2_untied_gqa7_hd16": ("qwen2", dict(
        num_attention_heads=7, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
        rope_theta=1_000_000.0)),
    "qwen3_tied_gqa7_hd8": ("qwen3", dict(
        num_attention_heads=14, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
        rope_theta=500_000.0)),
    "qwen2_linear": ("qwen2", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500_000.0})),
    "qwen3_yarn": ("qwen3", dict(
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "rope_theta": 1_000_000.0})),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, make_tiny_hf):
  spec = VARIANTS[request.param]
  if isinstance(spec, str):
    return request.getfixturevalue(spec)
  kind, kw = spec
  return make_tiny_hf(request.param, kind, **kw)


def _padded_batch(vocab, T=16, seed=0):
  """Rows left-padded by 5 and 2, right-padded by 3, and unpadded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (4, T))
  mask = np.ones((4, T), bool)
  mask[0, :5] = mask[1, :2] = False
  mask[2, T - 3:] = False
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return tokens, mask, positions


def _max_diff_vs_hf(cfg, params, hf_model):
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  ref = _hf_logits(hf_model, tokens, mask, positions)
  out = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  assert np.abs(ref).max() > 1.0  # logits are spread out, so the comparison means something
  return float(np.abs(out - ref)[mask].max())


def test_fp32_logits_match_hf(variant):
  path, hf_model = variant
  cfg, params = mm.load_hf(path)
  hf_rope = hf_model.config.rope_parameters
  assert (cfg.rope_type, cfg.rope_theta) == (hf_rope["rope_type"], hf_rope["rope_theta"])
  diff = _max_diff_vs_hf(cfg, params, hf_model)
  print(f"import max|dlogits| {os.path.basename(path)}: {diff:.2e}")
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("variant, wrong", [
    ("qwen3_untied_gqa1_hd24", dict(rope_theta=10_000.0)),  # the old silent fallback
    ("qwen2_linear", dict(rope_type="default", rope_scaling=())),
    ("qwen3_yarn", dict(rope_type="default", rope_scaling=())),
], indirect=["variant"])
def test_parity_fails_with_wrong_rope(variant, wrong):
  """The parity test can fail: a misread RoPE is far outside its 1e-4."""
  path, hf_model = variant
  cfg, params = mm.load_hf(path, **wrong)
  diff = _max_diff_vs_hf(cfg, params, hf_model)
  print(f"wrong RoPE max|dlogits| {os.path.basename(path)} {wrong}: {diff:.2e}")
  assert diff > 1e-2, diff


def test_export_reloads_in_hf(variant, tmp_path):
  """mars export -> transformers reload gives the original model's logits, and
  config.json is what transformers itself writes for that config."""
  path, hf_model = variant
  cfg, params = mm.load_hf(path)
  out = tmp_path / "export"
  mm.save_hf(cfg, params, str(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  assert type(reloaded) is type(hf_model)
  assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
  assert reloaded.config.layer_types == hf_model.config.layer_types
  resaved = tmp_path / "resaved"
  reloaded.config.save_pretrained(str(resaved))
  assert json.load(open(out / "config.json")) == json.load(open(resaved / "config.json"))
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  a = _hf_logits(hf_model, tokens, mask, positions)
  b = _hf_logits(reloaded, tokens, mask, positions)
  diff = float(np.abs(a - b)[mask].max())
  print(f"export max|dlogits| {os.path.basename(path)}: {diff:.2e}")
  assert diff <= 1e-5, diff
  # And mars loads its own export back to the same config and identical params.
  cfg2, params2 = mm.load_hf(str(out))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)


_SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("make, field", [
    (lambda: transformers.Qwen3Config(**_SMALL, use_sliding_window=True, sliding_window=8,
                                      max_window_layers=1), r"use_sliding_window=True"),
    (lambda: transformers.Qwen2Config(**_SMALL, layer_types=["full_attention", "sliding_attention"]),
     r"layer_types\[1\]='sliding_attention'"),
    (lambda: transformers.Qwen3Config(**_SMALL, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), r"rope_type='dynamic'"),
    (lambda: transformers.Qwen2Config(**_SMALL, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 5e5}), r"rope_type='llama3'"),
    (lambda: transformers.Qwen3Config(**_SMALL, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor=0.5"),
    (lambda: transformers.Qwen3MoeConfig(**_SMALL), r"model_type 'qwen3_moe'"),
    (lambda: transformers.Qwen2MoeConfig(**_SMALL), r"model_type 'qwen2_moe'"),
    (lambda: transformers.Qwen3Config(**_SMALL, num_experts=8), r"num_experts=8"),
    (lambda: transformers.LlamaConfig(**_SMALL), r"model_type 'llama'"),
    (lambda: transformers.Qwen2Config(**_SMALL, hidden_act="gelu"), r"hidden_act='gelu'"),
    (lambda: transformers.Qwen3Config(**_SMALL, attention_bias=True), r"attention_bias=True"),
], ids=["sliding_window", "layer_types", "rope_dynamic", "rope_llama3", "partial_rotary",
        "qwen3_moe", "qwen2_moe", "num_experts", "llama", "gelu", "qwen3_attention_bias"])
def test_refused_configs_give_one_error_line(make, field, tmp_path):
  """Configs transformers writes that mars cannot compute exactly: one line,
  naming the file and the field, never a silent fallback."""
  make().save_pretrained(str(tmp_path))
  with pytest.raises(mm.UnsupportedConfigError, match=field) as e:
    mm.load_config(str(tmp_path))
  assert "\n" not in str(e.value) and str(tmp_path / "config.json") in str(e.value)


def test_rope_theta_missing_or_contradictory_is_refused():
  hf = transformers.Qwen3Config(**_SMALL, rope_theta=1e6).to_dict()
  with pytest.raises(mm.UnsupportedConfigError, match="no RoPE base"):
    mm.from_hf_dict({k: v for k, v in hf.items() if k != "rope_parameters"})
  with pytest.raises(mm.UnsupportedConfigError, match="disagrees with the top-level rope_theta=10000"):
    mm.from_hf_dict(dict(hf, rope_theta=10000))
  # A sliding_window value with use_sliding_window on but no sliding layer is fine (as in HF).
  on = transformers.Qwen3Config(**_SMALL, use_sliding_window=True, sliding_window=8,
                                max_window_layers=2)
  assert on.layer_types == ["full_attention"] * 2
  assert mm.from_hf_dict(on.to_dict()).rope_theta == 10000.0


def _hf_rope_tables(hf_dict):
  """inv_freq and cos/sin scaling as transformers' rotary embedding builds them."""
  from transformers.models.qwen2 import modeling_qwen2
  from transformers.models.qwen3 import modeling_qwen3
  if hf_dict["model_type"] == "qwen2":
    rotary = modeling_qwen2.Qwen2RotaryEmbedding(transformers.Qwen2Config.from_dict(hf_dict))
  else:
    rotary = modeling_qwen3.Qwen3RotaryEmbedding(transformers.Qwen3Config.from_dict(hf_dict))
  return rotary.inv_freq.numpy(), rotary.attention_scaling


@pytest.mark.parametrize("name, theta", [("qwen2.5-math-1.5b", 10_000.0),
                                         ("qwen3-4b-base", 1_000_000.0),
                                         ("qwen3-8b-base", 1_000_000.0)])
def test_real_configs_load(shared_dir, name, theta):
  """The shared Qwen configs (top-level rope_theta, sliding_window set but off)
  load as transformers reads them; so do the legacy rope_scaling forms Qwen's
  model cards tell users to add, checked on the RoPE tables at full size."""
  model_dir = shared_dir / "models" / name
  hf = json.load(open(model_dir / "config.json"))
  cfg = mm.load_config(str(model_dir))
  ref = transformers.AutoConfig.from_pretrained(str(model_dir))
  assert cfg.rope_theta == theta == ref.rope_parameters["rope_theta"]
  assert cfg.rope_type == "default" and ref.layer_types == ["full_attention"] * cfg.num_layers
  ref_head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings,
          cfg.rms_norm_eps) == (ref.num_hidden_layers, ref.num_attention_heads,
                                ref.num_key_value_heads, ref_head_dim, ref.tie_word_embeddings,
                                ref.rms_norm_eps)
  legacy = {"none": None,
            "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            "linear": {"rope_type": "linear", "factor": 2.0}}
  for form, rope_scaling in legacy.items():
    d = dict(hf, rope_scaling=rope_scaling)
    c = mm.from_hf_dict(d)
    assert c.rope_type == (rope_scaling or {}).get("type", (rope_scaling or {}).get("rope_type", "default"))
    assert c.rope_theta == theta
    inv_freq, scaling = mm.rope_frequencies(c)
    ref_inv_freq, ref_scaling = _hf_rope_tables(d)
    np.testing.assert_allclose(np.asarray(inv_freq), ref_inv_freq, rtol=1e-6, err_msg=form)
    assert scaling == pytest.approx(ref_scaling, rel=1e-12), form
  # Export and re-read keeps everything (transformers 5 writes rope_parameters).
  assert mm.from_hf_dict(mm.to_hf_dict(cfg), param_dtype=cfg.param_dtype) == cfg


def test_config_details(tiny_qwen2, tiny_qwen3):
  c2 = mm.load_config(tiny_qwen2[0])
  c3 = mm.load_config(tiny_qwen3[0])
  assert c2.qkv_bias and not c2.qk_norm and c2.tie_word_embeddings and c2.num_groups == 2
  assert c3.qk_norm and not c3.qkv_bias and not c3.tie_word_embeddings and c3.num_groups == 1
  assert c3.head_dim == 24 != c3.hidden_size // c3.num_heads
  assert (c2.rope_theta, c3.rope_theta) == (500_000.0, 1_000_000.0)
  assert "rope_parameters" in json.load(open(os.path.join(tiny_qwen3[0], "config.json")))


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


def test_save_hf_sharded_index(tiny_qwen3, tmp_path):
  cfg, params = mm.load_hf(tiny_qwen3[0])
  mm.save_hf(cfg, params, str(tmp_path), max_shard_bytes=40_000)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  _, params2 = mm.load_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize("which", ["tiny_qwen2", "tiny_qwen3"])
def test_paged_prefill_extend_and_decode_match_forward(which, request):
  """Rows of uneven lengths through the paged KV pool (pages scattered over the pool,
  a page size that splits the prompt): a prefill, a 3-token extend, then one decode
  step at a time give the full forward's logits, and the pool holds every token."""
  from mars.models import paged
  path, _ = request.getfixturevalue(which)
  cfg, params = mm.load_hf(path)
  tokens, mask, positions = _batch(cfg.vocab_size, T=14)
  full = np.asarray(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  rows = [tokens[b][mask[b]] for b in range(3)]  # compact transcripts: 9, 12, 14 tokens
  page = 3
  pool = paged.init_pool(cfg, num_pages=20, page_size=page)
  tables = np.array([[7, 2, 9, 4, 11], [1, 3, 5, 6, 8], [10, 12, 13, 14, 15]], np.int32)
  fwd = jax.jit(lambda pool, t, f, c: paged.forward(cfg, params, pool, t, f, c, jnp.asarray(tables)))
  lens = np.array([len(r) for r in rows])
  cached = np.zeros(3, np.int32)
  for feed in (lens - 4, np.full(3, 3), np.ones(3, np.int64)):  # prefill, extend, decode
    chunk = np.zeros((3, int(feed.max())), np.int32)
    for b in range(3):
      chunk[b, :feed[b]] = rows[b][cached[b]:cached[b] + feed[b]]
    logits, pool = fwd(pool, jnp.asarray(chunk), jnp.asarray(feed, jnp.int32),
                       jnp.asarray(cached))
    cached = cached + feed
    for b in range(3):  # the last fed token's logits = the full forward's at that token
      col = np.flatnonzero(mask[b])[cached[b] - 1]
      np.testing.assert_allclose(np.asarray(logits)[b], full[b, col], atol=1e-5)
  assert (cached == lens).all()
  # Every token's layer-0 K lives in page table[pos // page] at slot pos % page.
  from mars.models import qwen
  k = np.asarray(pool.k)
  lp0 = jax.tree.map(lambda x: x[0], params["layers"])
  for b in range(3):
    x = qwen.rms_norm(qwen.embed(cfg, params, jnp.asarray(rows[b])[None]), lp0["input_norm"],
                      cfg.rms_norm_eps)
    _, want, _ = qwen.layer_qkv(cfg, lp0, x, jnp.arange(lens[b])[None])
    got = np.stack([k[0, tables[b, t // page], :, t % page] for t in range(lens[b])])
    np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-5)


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


def test_import_mars_does_not_import_jax():
  # `import mars` stays cheap because submodules load lazily: checked by what the
  # import pulls in, not by a wall-clock bound that a loaded machine can break.
  code = "import sys, mars; print(sorted(m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_remat_policies_match_hf_gradient_and_cut_memory(tiny_qwen3):
  """Each model.remat policy gives HF's gradient (torch autograd, the reference),
  and keeping less costs less: temporaries full < dots <= none."""
  path, hf_model = tiny_qwen3
  cfg, params = mm.load_hf(path)
  tokens, mask, positions = _padded_batch(cfg.vocab_size, T=32)
  target_mask = mask[:, 1:] & mask[:, :-1]

  def loss(params, cfg):
    logp = jax.nn.log_softmax(mm.forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask),
                                         jnp.asarray(positions)))
    picked = jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
    return jnp.sum(jnp.where(target_mask, picked, 0.0))

  hf_model.zero_grad()
  logits = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions)).logits.float()
  picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(tokens)[:, 1:, None])[..., 0]
  (picked * torch.tensor(target_mask)).sum().backward()
  ref = hf_model.model.embed_tokens.weight.grad.numpy()
  assert np.abs(ref).max() > 1e-3
  temps = {}
  for policy in ("none", "full", "dots"):
    pcfg = cfg.replace(remat=policy)
    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    grads = grad_fn(params, pcfg)
    np.testing.assert_allclose(np.asarray(grads["embed"]), ref, atol=2e-4, rtol=1e-4)
    temps[policy] = grad_fn.lower(params, pcfg).compile().memory_analysis().temp_size_in_bytes
  assert temps["full"] < temps["dots"] <= temps["none"], temps
  # model.scan_layers=False unrolls the layer loop: the same gradient, and no
  # stacked per-layer residuals (the scan's [layers, ...] buffers).
  unrolled = jax.jit(jax.grad(loss), static_argnums=1)
  grads = unrolled(params, cfg.replace(scan_layers=False))
  np.testing.assert_allclose(np.asarray(grads["embed"]), ref, atol=2e-4, rtol=1e-4)
  assert "while" not in unrolled.lower(params, cfg.replace(scan_layers=False)).as_text()
  with pytest.raises(ValueError, match="unknown remat policy 'True'"):
    jax.grad(loss)(params, cfg.replace(remat="True"))
