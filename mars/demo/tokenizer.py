"""The demo's byte-level BPE tokenizer, trained locally from the demo's own templates."""
import json
import os
import shutil
import tempfile

import numpy as np

from mars import prompts
from mars.demo.task import CandidateTask, answer_text, candidates_of
from mars.episodes import hints

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2.
# One token per boxed single-digit answer, "{7}", distinct from the listed "7".
BOXED_DIGIT_TOKENS = tuple("{%d}" % d for d in range(10))
# Likewise one token per single-digit answer in an LTE hint ("... incorrect: $3$, $7$.").
HINT_DIGIT_TOKENS = tuple("$%d$" % d for d in range(10))
_BUILD_INFO = "mars_demo_tokenizer.json"
_TOKENIZER_VERSION = 3  # 2: BOXED_DIGIT_TOKENS added; 3: LTE hint templates in the corpus


class TokenizerDirError(ValueError):
  """The demo tokenizer directory holds something else (mars.train: one error line)."""


def tokenizer_corpus(seed: int = 0, num_problems: int = 600) -> list:
  """Texts covering everything the demo renders, with the real chat templates."""
  rng = np.random.default_rng(seed)
  task = CandidateTask(k=3, num_problems=num_problems, seed=seed)
  texts = []
  for row in task:
    candidates = candidates_of(row["problem"])
    n = int(rng.integers(1, 6))
    first, second = (answer_text(c) for c in rng.choice(candidates, 2))
    closed = bool(rng.integers(2))
    wrong = [str(c) for c in candidates if str(c) != row["answer"]]
    texts += [
        prompts.single_turn_prompt(row["problem"]) + first + prompts.IM_END,
        # LTE's hinted prompts, so their notes are a few tokens, not ~150 bytes.
        hints.hinted_prompt(row["problem"], int(rng.choice(hints.ALL_FAIL_CLASSES)),
                             wrong[:int(rng.integers(1, 3))]) + second + prompts.IM_END,
        prompts.multi_attempt_prompt(row["problem"], n)
        + (first.removesuffix(".") if closed else first + prompts.IM_END)
        + prompts.feedback_turn(max(n - 1, 1), close_assistant=closed)
        + second + prompts.IM_END + "\n",
    ]
  return texts


def build_tokenizer(out_dir: str, *, vocab_size: int = 512, seed: int = 0) -> str:
  """Trains (or reuses) the demo's byte-level BPE tokenizer; returns `out_dir`.

  `vocab_size` caps the BPE merges (the corpus runs out near 413 tokens);
  BOXED_DIGIT_TOKENS and HINT_DIGIT_TOKENS add 20 more. Byte-level, so any
  text round-trips exactly. Digits are split one by one, as in Qwen's own tokenizer, except
  a boxed single digit: "\\boxed{7}" ends in the one token "{7}". The
  verifier sees the same text either way; the token is for the tiny model.
  "Don't box a candidate I already boxed" is then a one-layer circuit
  (attend to earlier "{d}" tokens, lower their logits), where with a plain
  "7" it must first tell a boxed "7" from a listed "7" by its neighbour, a
  two-layer composition. Measured with supervised labels (2 layers, 400
  steps): the rejected candidate's share fell to ~8% with "{d}" tokens and
  only to ~35% without. "$d$" in an LTE hint is the same idea: "don't box a
  listed wrong answer" is attend-to-"$d$", lower "{d}". The corpus is the
  demo's templates only (LTE's hinted ones included), so their words become
  single tokens and prompts stay short. Loads with
  mars.tokenizer.load_tokenizer.
  """
  info = {"vocab_size": vocab_size, "seed": seed, "special_tokens": list(SPECIAL_TOKENS),
          "version": _TOKENIZER_VERSION}
  info_path = os.path.join(out_dir, _BUILD_INFO)
  if os.path.exists(info_path):
    with open(info_path) as f:
      if json.load(f) == info:
        return out_dir
    raise TokenizerDirError(f"{out_dir} holds a demo tokenizer built with other settings "
                            f"({info_path}; a workdir from an older mars?); use another "
                            "directory.")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise TokenizerDirError(f"{out_dir} is not empty and holds no demo tokenizer; use another "
                            "directory.")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  # Build aside and rename: concurrent processes never see a partial directory.
  tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
  try:
    _train_tokenizer(vocab_size, seed).save_pretrained(tmp)
    with open(os.path.join(tmp, _BUILD_INFO), "w") as f:
      json.dump(info, f)
    try:
      os.rename(tmp, out_dir)
    except OSError:
      if not os.path.exists(info_path):  # not a lost race with another builder
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _train_tokenizer(vocab_size: int, seed: int):
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
  # Added (not special) tokens: matched before pre-tokenization, kept on decode.
  tok.add_tokens([AddedToken(t, normalized=False)
                  for t in BOXED_DIGIT_TOKENS + HINT_DIGIT_TOKENS])
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=prompts.IM_END, pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False,
      model_max_length=4096)
