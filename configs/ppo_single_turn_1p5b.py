"""Single-turn PPO baseline for multi_attempt_1p5b.py (the paper's "Baseline").

DualityRL/multi-attempt (commit 32d8641) train/examples/script/baseline.sh is
multi_attempt.sh without --multi_attempt and with the Qwen-prompt data file
(a diff of the two: the run name, sh:9, sh:42/43), so every hyperparameter of
multi_attempt_1p5b.py carries over, with its sources and assumptions. What
changes is the episode, which is then plain OpenRLHF generation
(trainer/ppo_utils/experience_maker.py, "em:LINE"):

  * one attempt with the single-turn prompt (the system turn
    "Please reason step by step, and put your final answer within \\boxed{}.",
    as in ppo_actor.py's default template; train.py plays N = 1 that way);
  * generated to the end of turn: up to 3000 tokens (em:633 max_tokens =
    generate_max_len, sh:34), stopping at <|im_end|> or <|endoftext|>
    (em:636-637): attempt_end="eos", budget 3000, no chunk cap;
  * graded on the last box of the whole response (em:25-47, the Qwen math
    parser's extract_answer takes the last "boxed"), a response cut at the
    budget included; rewards +1 correct / -0.5 boxed / -1 otherwise
    (em:43-47), the multi-attempt rewards with N = 1.

Not mapped: prompt_max_len 1024 (sh:33) here right-truncates prompt tokens
(em:646, tokenize_fn with truncation): 8 of the 8523 prompts are longer than
1024 tokens with this template and lose their end; mars plays them whole.
Assumption: the `input` field of data/math_level3to5_data_processed_with_qwen_prompt.json
(not in the stored repo) is this template around the problem.
Known difference: the reference's "-0.5" needs only the substring "boxed";
mars needs a complete box (an unclosed "\\boxed{" gets -1).
"""
from mars import config as mars_config


def get_config():
  c = mars_config.sibling(__file__, 'multi_attempt_1p5b.py')
  c.episode.min_attempts = 1
  c.episode.max_attempts = 1
  c.episode.attempt_end = "eos"
  c.episode.max_chunks = 0
  c.episode.budget = 3000
  return c
