"""Shared fixtures. 8 virtual CPU devices for every test (sharding tests need
them; unsharded code just runs on device 0), set before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import atexit
import pathlib
import shutil
import tempfile

# One persistent compilation cache per test session, inherited by the pytest-xdist
# workers and by the subprocesses tests start (`python -m mars.train ...`): the
# same tiny programs compile once instead of once per process. A fresh
# directory each session, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mars-tests-jax-cache-")
  # Removed by the process that made it (the xdist workers inherit the variable).
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest

SHARED = pathlib.Path(os.environ.get("MARS_SHARED_DIR",
                                     pathlib.Path(__file__).resolve().parents[1].parent / "shared"))
os.environ.setdefault("MARS_DATA_DIR", str(SHARED / "data"))


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.exists():
    pytest.fail(f"../shared not found at {SHARED}; set MARS_SHARED_DIR.")
  return SHARED


def _tiny_hf(tmp_path_factory, name, kind, **kw):
  import torch
  import transformers
  base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=512)
  base.update(kw)
  if kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base))
  else:
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**base))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # big weights make logits spread out: a harder parity test
      p.normal_(0.0, 0.3)
  model.eval()
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  return str(path), model


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory):
  """make_tiny_hf(name, "qwen2"|"qwen3", **config_kwargs) -> (path, torch model):
  a tiny random model saved by the installed transformers."""
  return lambda name, kind, **kw: _tiny_hf(tmp_path_factory, name, kind, **kw)


# Both use a RoPE base other than 10000 (transformers' default_theta), so a
# config reader that misses it and falls back to 10000 fails the parity tests.
@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
  """Qwen2: qkv bias, tied embeddings, GQA ratio 2, rope_theta 5e5."""
  return _tiny_hf(tmp_path_factory, "qwen2", "qwen2", num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=500_000.0)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
  """Qwen3: q/k norm, untied embeddings, head_dim 24 != 64/4, GQA ratio 1, rope_theta 1e6."""
  return _tiny_hf(tmp_path_factory, "qwen3", "qwen3", num_key_value_heads=4, head_dim=24,
                  tie_word_embeddings=False, rope_theta=1_000_000.0)
