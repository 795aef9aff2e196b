"""The demo's tiny Qwen3-architecture model: its shape and its initialisation."""
from mars.models import qwen
from mars.models.config import ModelConfig

INIT_STD = 0.05


def tiny_model_config(vocab_size: int, **overrides) -> ModelConfig:
  """A Qwen3-architecture decoder small enough to train on 2 CPU cores.

  Untied embeddings: with tied ones the digits' shared output role ("a digit
  comes after {") pulls their input embeddings together and copying a
  candidate from the prompt took several times more SFT steps (or never came).
  Many narrow heads likewise find the copying head sooner than 4 wide ones.
  """
  base = dict(model_type="qwen3", vocab_size=vocab_size, hidden_size=64,
              intermediate_size=192, num_layers=2, num_heads=8, num_kv_heads=4,
              head_dim=16, qk_norm=True, qkv_bias=False, tie_word_embeddings=False,
              rope_theta=10_000.0, max_position_embeddings=1024)
  base.update(overrides)
  return ModelConfig(**base)


def init_demo_params(cfg: ModelConfig, key):
  """Random init at the tiny model's scale.

  std 0.05 (about 0.4 / sqrt(hidden)) instead of the LLM-scale 0.02: at width
  64 the smaller init left SFT on the uniform-over-digits plateau for
  hundreds of steps before the copying head formed.
  """
  return qwen.init_params(cfg, key, std=INIT_STD)
