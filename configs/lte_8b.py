"""LTE on Qwen3-8B-Base: lte_4b.py with the 8B model (untied embeddings).
Assumption: the default mesh (1, -1, 1) puts every device on fsdp; on a
v5e-16 slice that holds 8B params + Adam states at ~6 GB per chip."""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, 'lte_4b.py')
  c.model.path = "Qwen/Qwen3-8B-Base"
  c.rl.micro_batch_size = 8
  return c
