"""LTE on Qwen3-4B-Base ("Learning to Reason from Trial and Error").

GRPO (grpo_4b.py) plus: all-fail groups get G hinted extra rollouts
(Concise / Hint / ConciseHint by failure class), correct hinted samples
replace failed ones and train off-policy with f(r)=r/(r+γ), γ=0.1, no clip.
From the paper / issue: G=8, T=1.0, max response 8192, lr 1e-6 constant,
128 prompts per step, γ=0.1, no KL. LTE† (entropy bonus) is
`--config.rl.entropy_coef=0.001` (0.001 is our assumption; the paper gives none).
Assumptions: hint list capped at 8 answers; the rest as in grpo_4b.py.
"""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, 'grpo_4b.py')
  c.lte.enabled = True
  c.lte.hint_cap = 8
  c.lte.hint_source = "wrong_answers"
  c.lte.episode = "single_turn"
  c.rl.offpolicy_gamma = 0.1
  c.rl.offpolicy_behaviour_one = False
  c.rl.entropy_coef = 0.0
  return c
