"""ModelConfig: the decoder's static shape and numerics, built from HF config.json."""
import dataclasses
import json
import os
from typing import Optional

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_KINDS = ("dense", "chunked", "splash", "pallas_gpu", "auto")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static (hashable) description of a Qwen2/2.5/3 dense decoder.

  Frozen so it can be a static argument of jitted functions.
  """
  model_type: str = "qwen3"
  vocab_size: int = 1024
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 1_000_000.0
  # HF rope_type and its parameters other than rope_theta, as sorted
  # (key, value) pairs so the config stays hashable, e.g.
  # (("factor", 4.0), ("original_max_position_embeddings", 32768)) for yarn.
  rope_type: str = "default"
  rope_scaling: tuple = ()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  qkv_bias: bool = False      # Qwen2: bias on q/k/v projections.
  qk_norm: bool = False       # Qwen3: per-head RMSNorm on q and k before RoPE.
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"      # compute dtype of activations.
  # What each layer keeps for the backward pass (REMAT_POLICIES): "none" keeps
  # every activation, "full" keeps only the layer input and recomputes the
  # layer, "dots" keeps the weight matmuls' outputs and recomputes the rest
  # (attention scores, norms, activations).
  remat: str = "none"
  # The full-sequence forward runs `lax.scan` over the stacked layers (one
  # compiled layer: fast compiles at 28-36 layers). False unrolls it (MaxText's
  # scan_layers): no stacked per-layer residual buffers to zero and fill, and
  # one compile per layer. The cached forward (paged.py) always scans.
  scan_layers: bool = True
  # The full-sequence forward's attention (ATTENTION_KINDS): "dense" scores the
  # whole [T, T] matrix; "chunked" is flash attention in XLA (models/flash.py):
  # [block, block] scores at a time, causal blocks skipped, its own backward;
  # "splash" (TPU) and "pallas_gpu" (GPU) are Pallas kernels (models/kernels.py);
  # "auto" picks by backend (kernels.resolve).
  attention: str = "dense"
  attention_block: int = 512
  # Positions per chunk of the lm_head + log-softmax in full-sequence logprobs
  # (models/logprobs.py); 0 = all at once. Chunks keep [B, chunk, V] fp32
  # logits alive instead of [B, T, V], and the backward recomputes them.
  logits_chunk: int = 0
  # Logits are returned in fp32: RL needs exact log-probabilities.
  logits_dtype: str = "float32"

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    per_layer += (q + 2 * kv) if self.qkv_bias else 0
    per_layer += 2 * self.head_dim if self.qk_norm else 0
    return l * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d


class UnsupportedConfigError(ValueError):
  """An HF config that mars cannot compute exactly (the message is one line)."""


# Keys each rope_type reads besides rope_type/rope_theta, as transformers'
# modeling_rope_utils (_validate_*_rope_parameters) lists them.
ROPE_TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}
# Fields of HF mixture-of-experts configs: a dense qwen2/qwen3 reader would
# silently drop the experts.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size")


def _unsupported(field, value, why):
  return UnsupportedConfigError(f"HF config {field}={value!r}: {why}")


def _read_rope(hf: dict, max_position_embeddings: int):
  """(rope_theta, rope_type, rope_scaling pairs) the way transformers reads them.

  transformers 5 writes `rope_parameters` {"rope_type", "rope_theta", ...};
  older files have a top-level `rope_theta` and an optional `rope_scaling`
  dict (whose type key may be the legacy "type"). transformers takes
  `rope_scaling` over `rope_parameters`, and a theta inside the dict over the
  top-level one.
  """
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if not isinstance(params, dict):
    raise _unsupported(field, params, "expected a dict such as {'rope_type': 'default', "
                       "'rope_theta': 1000000.0}.")
  nested = [k for k, v in params.items() if isinstance(v, dict)]
  if nested:
    raise _unsupported(f"{field}[{nested[0]!r}]", params[nested[0]],
                       "per-layer-type RoPE is not supported; mars applies one RoPE to every layer.")
  theta = params.get("rope_theta")
  top = hf.get("rope_theta")
  if theta is None:
    theta = top
  elif top is not None and float(top) != float(theta):
    raise _unsupported(f"{field}.rope_theta", theta,
                       f"disagrees with the top-level rope_theta={top!r}; fix the config to give one value.")
  if theta is None:
    # No default on purpose: the RoPE base moved once already (rope_theta ->
    # rope_parameters), and a silent 10000 gave wrong logits without an error.
    raise _unsupported("rope_theta", None, "the config gives no RoPE base (neither a top-level "
                       "rope_theta nor rope_parameters.rope_theta).")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPE_KEYS:
    raise _unsupported(f"{field}.rope_type", rope_type,
                       f"mars computes RoPE types {sorted(ROPE_TYPE_KEYS)} only.")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial is not None and float(partial) != 1.0:
    raise _unsupported("partial_rotary_factor", partial, "mars rotates the whole head (1.0 only).")
  known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"} | set(ROPE_TYPE_KEYS[rope_type])
  unknown = sorted(set(params) - known)
  if unknown:
    raise _unsupported(f"{field}.{unknown[0]}", params[unknown[0]],
                       f"not a key mars reads for rope_type {rope_type!r} "
                       f"(it reads {sorted(ROPE_TYPE_KEYS[rope_type]) or 'none'}).")
  scaling = {k: params[k] for k in ROPE_TYPE_KEYS[rope_type] if params.get(k) is not None}
  if rope_type == "linear" and "factor" not in scaling:
    raise _unsupported(f"{field}.factor", None, "rope_type 'linear' needs a factor.")
  if rope_type == "yarn":
    # transformers' standardize_rope_params: a top-level value wins, then the
    # dict's, then max_position_embeddings; a missing factor is the ratio.
    original = hf.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings", max_position_embeddings)
    scaling["original_max_position_embeddings"] = int(original)
    if "factor" not in scaling:
      scaling["factor"] = max_position_embeddings / original
  return float(theta), rope_type, tuple(sorted(scaling.items()))


def _check_full_attention(hf: dict, num_layers: int):
  """Refuses sliding-window layers, deciding as transformers 5 Qwen2/Qwen3 do.

  Qwen configs carry a `sliding_window` value even when it is off: only
  `use_sliding_window` true turns it on, and then for layers
  i >= max_window_layers (default 28), which transformers 5 writes out as
  `layer_types`. We refuse an "on" window that reaches a layer even when an
  explicit layer_types says otherwise: older transformers and vLLM decide from
  use_sliding_window/max_window_layers alone.
  """
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  max_window_layers = hf.get("max_window_layers", 28)
  if window is not None and max_window_layers < num_layers:
    raise _unsupported("use_sliding_window", True,
                       f"sliding_window={window} applies to layers {max_window_layers}.."
                       f"{num_layers - 1} (max_window_layers={max_window_layers}); mars computes "
                       f"full causal attention only (use_sliding_window false, or max_window_layers "
                       f">= num_hidden_layers).")
  for i, layer_type in enumerate(hf.get("layer_types") or ()):
    if layer_type != "full_attention":
      raise _unsupported(f"layer_types[{i}]", layer_type,
                         "mars computes 'full_attention' layers only.")


def from_hf_dict(hf: dict, **overrides) -> ModelConfig:
  """Translates an HF Qwen2/Qwen3 config dict.

  Anything mars would not compute exactly as transformers does (another
  architecture, MoE, sliding windows, unknown RoPE scaling) raises
  UnsupportedConfigError with one line naming the field.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedConfigError(
        f"Unsupported model_type {model_type!r}; mars supports the dense decoders "
        f"{SUPPORTED_MODEL_TYPES}.")
  # num_key_value_heads is required: transformers' class default is 32,
  # whatever the head count, so there is no safe fallback (an explicit null
  # means "one per head", as in transformers).
  for field in ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
    if field not in hf:
      raise ValueError(f"HF config is missing required field {field!r}.")
  for field in MOE_FIELDS:
    if hf.get(field):
      raise _unsupported(field, hf[field], "mixture-of-experts layers are not supported; "
                         "mars computes dense MLPs only.")
  if hf.get("hidden_act", "silu") != "silu":
    raise _unsupported("hidden_act", hf["hidden_act"], "mars computes the SwiGLU MLP with silu only.")
  num_layers = hf["num_hidden_layers"]
  _check_full_attention(hf, num_layers)
  num_heads = hf["num_attention_heads"]
  is_qwen3 = model_type == "qwen3"
  if is_qwen3 and hf.get("attention_bias"):
    # HF Qwen3's attention_bias also puts a bias on o_proj, which mars does not have.
    raise _unsupported("attention_bias", hf["attention_bias"], "Qwen3 with biases on the q/k/v/o "
                       "projections is not supported; mars supports attention_bias false.")
  # Qwen3Config defaults head_dim to 128; Qwen2 derives it from the width.
  head_dim = hf.get("head_dim") or (128 if is_qwen3 else hf["hidden_size"] // num_heads)
  max_position_embeddings = int(hf.get("max_position_embeddings", 32768))
  rope_theta, rope_type, rope_scaling = _read_rope(hf, max_position_embeddings)
  cfg = ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=hf["num_key_value_heads"] or num_heads,
      head_dim=head_dim,
      rope_theta=rope_theta,
      rope_type=rope_type,
      rope_scaling=rope_scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      # Qwen2 always has qkv bias; Qwen3 (attention_bias false, checked above) none.
      qkv_bias=not is_qwen3,
      qk_norm=is_qwen3,
      max_position_embeddings=max_position_embeddings,
  )
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f"num_attention_heads={cfg.num_heads} is not a multiple of "
                     f"num_key_value_heads={cfg.num_kv_heads}.")
  return cfg.replace(**overrides)


def to_hf_config(cfg: ModelConfig, dtype: Optional[str] = None):
  """The transformers Qwen2Config/Qwen3Config of `cfg`.

  Built by transformers' own class so the saved file is what the installed
  transformers writes (rope_parameters, layer_types, ...) and reads back.
  """
  import transformers
  if cfg.model_type == "qwen2" and (not cfg.qkv_bias or cfg.qk_norm):
    raise ValueError("An HF Qwen2 has qkv bias and no q/k norm; this config "
                     f"(qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}) has no HF equivalent.")
  if cfg.model_type == "qwen3" and (cfg.qkv_bias or not cfg.qk_norm):
    raise ValueError("An HF Qwen3 has q/k norm and no qkv-only bias; this config "
                     f"(qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}) has no HF equivalent.")
  kw = dict(
      architectures=[{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]],
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      # Qwen2Config has no head_dim field, but its attention reads one if set.
      head_dim=cfg.head_dim,
      rope_parameters={"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
                       **dict(cfg.rope_scaling)},
      rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=cfg.max_position_embeddings,
      hidden_act="silu",
      use_sliding_window=False,
      dtype=dtype or cfg.param_dtype,
  )
  if cfg.model_type == "qwen3":
    return transformers.Qwen3Config(attention_bias=False, **kw)
  return transformers.Qwen2Config(**kw)


def to_hf_dict(cfg: ModelConfig) -> dict:
  """config.json contents, exactly as transformers' save_pretrained writes them."""
  return json.loads(to_hf_config(cfg).to_json_string())


def load_config(path: str, **overrides) -> ModelConfig:
  """Reads `config.json` from an HF model directory (or the file itself)."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"No HF config found: {file} does not exist.")
  with open(file) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: invalid JSON ({e}).") from None
  try:
    return from_hf_dict(hf, **overrides)
  except ValueError as e:  # same error type, now naming the file
    raise type(e)(f"{file}: {e}") from None


def tiny_config(model_type: str = "qwen3", **kw) -> ModelConfig:
  """Small config for tests and the CPU demo."""
  base = dict(model_type=model_type, qkv_bias=model_type == "qwen2",
              qk_norm=model_type == "qwen3")
  base.update(kw)
  return ModelConfig(**base)
