"""LTE on Qwen3-8B-Base: lte_4b.py with the 8B model (untied embeddings).
Assumption: the default mesh (1, -1, 1) puts every device on fsdp; on a
v5e-16 slice that holds 8B params + Adam states at ~6 GB per chip."""
import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lte_4b.py")
  spec = importlib.util.spec_from_file_location("lte_4b", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.path = "Qwen/Qwen3-8B-Base"
  c.rl.micro_batch_size = 8
  return c
