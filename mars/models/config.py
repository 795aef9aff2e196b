"""ModelConfig: the decoder's static shape and numerics, built from HF config.json."""
import dataclasses
import json
import os
from typing import Optional

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


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
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  qkv_bias: bool = False      # Qwen2: bias on q/k/v projections.
  qk_norm: bool = False       # Qwen3: per-head RMSNorm on q and k before RoPE.
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  dtype: str = "float32"      # compute dtype of activations.
  remat: bool = False         # rematerialize each layer in the backward pass.
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


def from_hf_dict(hf: dict, **overrides) -> ModelConfig:
  """Translates an HF Qwen2/Qwen3 config dict; unknown model types fail loudly."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"Unsupported model_type {model_type!r}; mars supports {SUPPORTED_MODEL_TYPES}.")
  for field in ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads"):
    if field not in hf:
      raise ValueError(f"HF config is missing required field {field!r}.")
  num_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  is_qwen3 = model_type == "qwen3"
  cfg = ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=head_dim,
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      # Qwen2 always has qkv bias; Qwen3 has it only if attention_bias is set.
      qkv_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else True,
      qk_norm=is_qwen3,
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
  )
  if cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f"num_attention_heads={cfg.num_heads} is not a multiple of "
                     f"num_key_value_heads={cfg.num_kv_heads}.")
  return cfg.replace(**overrides)


def to_hf_dict(cfg: ModelConfig) -> dict:
  arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
  d = {
      "architectures": [arch],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "hidden_act": "silu",
      "torch_dtype": cfg.param_dtype,
      "use_sliding_window": False,
  }
  if cfg.model_type == "qwen3":
    d["attention_bias"] = cfg.qkv_bias
  return d


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
  return from_hf_dict(hf, **overrides)


def tiny_config(model_type: str = "qwen3", **kw) -> ModelConfig:
  """Small config for tests and the CPU demo."""
  base = dict(model_type=model_type, qkv_bias=model_type == "qwen2",
              qk_norm=model_type == "qwen3")
  base.update(kw)
  return ModelConfig(**base)
