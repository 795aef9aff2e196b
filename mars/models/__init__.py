"""Qwen2/2.5/3 dense decoders in JAX, with HF import/export.

    cfg, params = mars.models.load_hf(path, dtype="float32", mesh=None)
    logits = mars.models.forward(cfg, params, tokens, attention_mask)
    mars.models.save_hf(cfg, params, out_dir)
"""
from mars import sharding
from mars.models.config import (ModelConfig, UnsupportedConfigError, from_hf_dict, load_config,
                                tiny_config, to_hf_config, to_hf_dict)
from mars.models.hf import CheckpointError, hf_keys, load_hf, resolve_model_dir, save_hf
from mars.models.logprobs import (entropy_from_logits, logprobs_from_hidden, logprobs_from_logits,
                                  sequence_logprobs, token_logprobs)
from mars.models.qwen import cast_params, forward, init_params, param_axes, param_shapes
from mars.models.rope import rope_frequencies


def param_shardings(cfg, mesh):
  """NamedSharding for every parameter, from the logical rules."""
  sharding.check_heads(cfg.num_heads, mesh)
  return sharding.tree_shardings(mesh, param_axes(cfg), param_shapes(cfg))


