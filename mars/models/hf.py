"""HF interop: load_hf / save_hf between safetensors checkpoints and mars params.

Loading reads tensors one at a time from (possibly sharded) safetensors files.
With a mesh, each parameter is built by `jax.make_array_from_callback`, so a
device receives only its own shard and the host never holds more than one
HF tensor (one layer's weight) at a time.
"""
import json
import logging
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

from mars import sharding
from mars.models import config as config_lib
from mars.models import qwen

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it should fill."""


# Each entry: our leaf path -> (HF key template, HF -> ours, ours -> HF).
# Templates containing {i} are per layer and get stacked on axis 0.
def _hf_layout(cfg: config_lib.ModelConfig) -> dict:
  D, H, K, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = (lambda w: w, lambda w: w)
  prefix = "model.layers.{i}."
  layout = {
      ("embed",): ("model.embed_tokens.weight",) + same,
      ("final_norm",): ("model.norm.weight",) + same,
      ("layers", "input_norm"): (prefix + "input_layernorm.weight",) + same,
      ("layers", "post_norm"): (prefix + "post_attention_layernorm.weight",) + same,
      # torch Linear stores [out, in]; we store [in, heads, head_dim].
      ("layers", "q"): (prefix + "self_attn.q_proj.weight",
                        lambda w: w.T.reshape(D, H, hd), lambda w: w.reshape(D, H * hd).T),
      ("layers", "k"): (prefix + "self_attn.k_proj.weight",
                        lambda w: w.T.reshape(D, K, hd), lambda w: w.reshape(D, K * hd).T),
      ("layers", "v"): (prefix + "self_attn.v_proj.weight",
                        lambda w: w.T.reshape(D, K, hd), lambda w: w.reshape(D, K * hd).T),
      ("layers", "o"): (prefix + "self_attn.o_proj.weight",
                        lambda w: w.T.reshape(H, hd, D), lambda w: w.reshape(H * hd, D).T),
      ("layers", "gate"): (prefix + "mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
      ("layers", "up"): (prefix + "mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
      ("layers", "down"): (prefix + "mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
  }
  if cfg.qkv_bias:
    layout[("layers", "q_bias")] = (prefix + "self_attn.q_proj.bias",
                                    lambda w: w.reshape(H, hd), lambda w: w.reshape(-1))
    layout[("layers", "k_bias")] = (prefix + "self_attn.k_proj.bias",
                                    lambda w: w.reshape(K, hd), lambda w: w.reshape(-1))
    layout[("layers", "v_bias")] = (prefix + "self_attn.v_proj.bias",
                                    lambda w: w.reshape(K, hd), lambda w: w.reshape(-1))
  if cfg.qk_norm:
    layout[("layers", "q_norm")] = (prefix + "self_attn.q_norm.weight",) + same
    layout[("layers", "k_norm")] = (prefix + "self_attn.k_norm.weight",) + same
  if not cfg.tie_word_embeddings:
    layout[("lm_head",)] = ("lm_head.weight",) + same
  return layout


def hf_keys(cfg: config_lib.ModelConfig) -> dict:
  """Every HF tensor name the model reads -> (our path, layer or None)."""
  out = {}
  for path, (template, _, _) in _hf_layout(cfg).items():
    if "{i}" in template:
      for i in range(cfg.num_layers):
        out[template.format(i=i)] = (path, i)
    else:
      out[template] = (path, None)
  return out


class _SafetensorsReader:
  """Lazy tensor-by-tensor reader over single-file or indexed safetensors."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open
    self._safe_open = safe_open
    index = os.path.join(model_dir, INDEX_FILE)
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.weight_map = {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        self.weight_map = {k: single for k in f.keys()}
    else:
      raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found.")
    self._handles = {}

  def get(self, key: str) -> np.ndarray:
    if key not in self.weight_map:
      files = sorted(set(self.weight_map.values()))
      raise CheckpointError(f"Key {key!r} is missing from the checkpoint ({', '.join(files)}).")
    file = self.weight_map[key]
    if file not in self._handles:
      if not os.path.exists(file):
        raise FileNotFoundError(f"Checkpoint shard {file} (holding {key!r}) does not exist.")
      self._handles[file] = self._safe_open(file, framework="numpy")
    return self._handles[file].get_tensor(key)


def resolve_model_dir(path: str) -> str:
  """A local HF directory as is; a hub id is fetched with huggingface_hub."""
  if os.path.isdir(path):
    return path
  if os.path.sep in path.rstrip("/").lstrip(".") and path.startswith(("/", ".")):
    raise FileNotFoundError(f"Model directory {path} does not exist.")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as e:  # offline, unknown repo, auth...
    raise FileNotFoundError(
        f"Model {path!r} is not a local directory and could not be fetched from the HF hub "
        f"({type(e).__name__}). Download it first, e.g. `huggingface-cli download {path} "
        f"--local-dir DIR`, and pass DIR.") from None


def load_hf(path: str, dtype: str = "float32", mesh=None, compute_dtype: Optional[str] = None,
            **config_overrides):
  """Loads an HF Qwen2/Qwen3 checkpoint: returns (ModelConfig, params).

  Args:
    path: local HF directory (config.json + safetensors) or a hub id.
    dtype: parameter dtype ("float32" or "bfloat16").
    mesh: optional mesh; params are then placed straight into their sharding.
    compute_dtype: activation dtype (defaults to `dtype`).
  """
  model_dir = resolve_model_dir(path)
  cfg = config_lib.load_config(model_dir, param_dtype=dtype,
                               dtype=compute_dtype or dtype, **config_overrides)
  reader = _SafetensorsReader(model_dir)
  shapes = qwen.param_shapes(cfg)
  np_dtype = jnp.dtype(dtype)
  layout = _hf_layout(cfg)
  shardings = None
  if mesh is not None:
    sharding.check_heads(cfg.num_heads, mesh)
    shardings = sharding.tree_shardings(mesh, qwen.param_axes(cfg), shapes)

  def read_one(template, to_ours, layer, expected):
    key = template.format(i=layer) if layer is not None else template
    w = reader.get(key)
    try:
      w = to_ours(w)
    except ValueError:
      w = None
    if w is None or tuple(w.shape) != tuple(expected):
      raise CheckpointError(f"Shape mismatch for {key!r} in {reader.weight_map[key]}: "
                            f"got {tuple(reader.get(key).shape)}, which does not fit the "
                            f"expected parameter shape {tuple(expected)}.")
    return w.astype(np_dtype)

  params = {"layers": {}}
  for path_, (template, to_ours, _) in layout.items():
    shape = _get(shapes, path_)
    per_layer = "{i}" in template

    def load_block(index=None, template=template, to_ours=to_ours, shape=shape,
                   per_layer=per_layer):
      index = index or tuple(slice(None) for _ in shape)
      if per_layer:
        layers = range(shape[0])[index[0]]
        return np.stack([read_one(template, to_ours, i, shape[1:])[index[1:]] for i in layers])
      return read_one(template, to_ours, None, shape)[index]

    if shardings is None:
      value = jnp.asarray(load_block())
    else:
      value = jax.make_array_from_callback(shape, _get(shardings, path_), load_block)
    _set(params, path_, value)
  logging.info("Loaded %s (%s, %.1fM params) from %s", cfg.model_type, dtype,
               cfg.num_params() / 1e6, model_dir)
  return cfg, params


def save_hf(cfg: config_lib.ModelConfig, params, out_dir: str, dtype: Optional[str] = None,
            max_shard_bytes: int = 5 * 2**30):
  """Writes config.json + safetensors that transformers (and vLLM) load."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  np_dtype = jnp.dtype(dtype or cfg.param_dtype)
  # transformers writes config.json itself: the file is then in the format
  # the installed transformers (and vLLM through it) reads.
  config_lib.to_hf_config(cfg, dtype=str(np_dtype)).save_pretrained(out_dir)

  shards, current, current_bytes = [], {}, 0
  for path_, (template, _, to_hf) in _hf_layout(cfg).items():
    value = _to_host(_get(params, path_)).astype(np_dtype)
    if "{i}" in template:
      items = [(template.format(i=i), to_hf(value[i])) for i in range(cfg.num_layers)]
    else:
      items = [(template, to_hf(value))]
    for key, w in items:
      w = np.ascontiguousarray(w)
      if current and current_bytes + w.nbytes > max_shard_bytes:
        shards.append(current)
        current, current_bytes = {}, 0
      current[key] = w
      current_bytes += w.nbytes
  shards.append(current)

  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    return out_dir
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    for key, w in shard.items():
      weight_map[key] = name
      total += w.nbytes
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return out_dir


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value
