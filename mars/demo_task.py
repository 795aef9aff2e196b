"""The embedded CPU demo's synthetic task, tokenizer and tiny model.

Task: the prompt lists k distinct candidate integers; one of them, chosen by a
seeded RNG and never shown, is right.

    Candidates: 3, 7, 1. Which one is it?   ->   The answer is \\boxed{7}.

The same candidate list recurs under many ids with different answers, so the
answer is unknowable from the prompt: the best single attempt scores 1/k. With
N attempts and ground-truth feedback, a policy that never repeats a rejected
candidate scores min(N/k, 1); one that guesses independently scores only
1 - (1 - 1/k)^N. Success beyond 1/k therefore needs the multi-attempt
feedback, which is what the demo shows.

Answers are integers, not words: the math verifier would parse a word as a
product of symbols ("cat" == "act"), and integers hit its exact-text path.

Everything is built locally and deterministically from a seed: no downloads.
"""
import json
import os
import shutil
import tempfile

import numpy as np

from mars import prompts
from mars.models.config import ModelConfig

SOURCE = "candidates"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2.
# One token per boxed single-digit answer, "{7}", distinct from the listed "7".
BOXED_DIGIT_TOKENS = tuple("{%d}" % d for d in range(10))
# Likewise one token per single-digit answer in an LTE hint ("... incorrect: $3$, $7$.").
HINT_DIGIT_TOKENS = tuple("$%d$" % d for d in range(10))
# "hidden": the answer is uniform among the candidates, unknowable from the
# prompt (the multi-attempt demo). "first": always the first listed, a rule RL
# can learn from the reward alone (the LTE demo: failed groups it can rescue).
RULES = ("hidden", "first")
_BUILD_INFO = "mars_demo_tokenizer.json"
_TOKENIZER_VERSION = 3  # 2: BOXED_DIGIT_TOKENS added; 3: LTE hint templates in the corpus
INIT_STD = 0.05


class TokenizerDirError(ValueError):
  """The demo tokenizer directory holds something else (mars.train: one error line)."""


class CandidateTask:
  """Deterministic random-access source of candidate problems (no storage).

  Row i depends only on (seed, i), so any PromptPipeline order, process split
  or resume sees the same rows. `value_range` is [lo, hi) and must hold at
  least k values. Single digits (the default) make each candidate one token.
  """

  def __init__(self, k: int = 3, num_problems: int = 100_000, seed: int = 0,
               value_range: tuple = (0, 10), rule: str = "hidden"):
    lo, hi = value_range
    if k < 2:
      raise ValueError(f"k must be >= 2, got {k}")
    if rule not in RULES:
      raise ValueError(f"unknown candidates rule {rule!r}; choose one of {RULES}")
    if hi - lo < k:
      raise ValueError(f"value_range {value_range} holds fewer than k={k} values")
    self.k, self.num_problems, self.seed = k, num_problems, seed
    self.value_range = (lo, hi)
    self.rule = rule

  def __len__(self) -> int:
    return self.num_problems

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows")
    candidates, answer = self.sample(index)
    return {"id": f"{SOURCE}/{self.seed}/{index}", "problem": problem_text(candidates),
            "answer": str(answer), "source": SOURCE}

  def sample(self, index: int):
    """(candidates, answer) of row `index`: distinct values; the answer per `rule`."""
    rng = np.random.default_rng((self.seed, index))
    lo, hi = self.value_range
    candidates = [int(c) for c in rng.choice(hi - lo, size=self.k, replace=False) + lo]
    if self.rule == "first":
      return candidates, candidates[0]
    return candidates, candidates[int(rng.integers(self.k))]

  def __repr__(self) -> str:
    return (f"CandidateTask(k={self.k}, num_problems={self.num_problems}, seed={self.seed}, "
            f"value_range={self.value_range}, rule={self.rule!r})")


def problem_text(candidates) -> str:
  return f"Candidates: {', '.join(str(c) for c in candidates)}. Which one is it?"


def candidates_of(problem: str) -> list:
  """Inverse of problem_text (for format checks and evaluation)."""
  listed = problem.removeprefix("Candidates: ").split(".", 1)[0]
  return [int(c) for c in listed.split(", ")]


def answer_text(candidate) -> str:
  """The format the warm start teaches: no reasoning, one boxed candidate."""
  return f"The answer is \\boxed{{{candidate}}}."


# ---------------------------------------------------------------------------
# Tokenizer.

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
        _lte().hinted_prompt(row["problem"], int(rng.choice(_lte().ALL_FAIL_CLASSES)),
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


# ---------------------------------------------------------------------------
# Model and warm-start data.

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
  from mars.models import qwen
  return qwen.init_params(cfg, key, std=INIT_STD)


def format_examples(task: CandidateTask, n: int, rng, *, max_attempts: int = 5,
                    single_turn_fraction: float = 0.2, feedback_fraction: float = 0.3,
                    hint_fraction: float = 0.0) -> list:
  """`n` (prompt, response) pairs for a FORMAT-ONLY supervised warm start.

  The response is `answer_text(c) + <|im_end|>` with c uniform over the
  listed candidates, independent of the hidden answer: SFT teaches the chat
  turn and the \\boxed{} format, never which candidate is right (it is right
  1/k of the time, as chance).

  A `feedback_fraction` of the prompts are a multi-attempt transcript after
  1 to attempts-1 rejected attempts (wrong candidates drawn independently, so
  they may repeat, as in a real episode; each closed either way the episode
  code may close it), and the next answer is again uniform over ALL
  candidates, the rejected ones included: the warm start shows the turn
  layout at every depth an episode reaches but does not teach avoiding a
  rejected candidate. Learning that is left to RL.

  A `hint_fraction` of the prompts are LTE's hinted single-turn prompts
  (mars.episodes.lte: hint, concise + hint, concise): the hint lists 1 to k-1
  wrong candidates and the response is uniform over the candidates it does
  not list. That is instruction following, which an LLM brings from
  pretraining and the tiny model does not: without it LTE's hinted rollouts
  succeed below chance (measured ~6% at k=8) and there is nothing to rescue.
  It still never tells the right candidate from the unlisted wrong ones, so
  the unhinted policy is taught nothing about the answer. Off (0) by default:
  the multi-attempt demo must not learn avoidance from the warm start.
  """
  rng = np.random.default_rng(rng)
  examples = []
  for _ in range(n):
    row = task[int(rng.integers(len(task)))]
    candidates = candidates_of(row["problem"])
    if hint_fraction and rng.random() < hint_fraction:
      examples.append(_hinted_example(row, candidates, rng))
      continue
    response = answer_text(rng.choice(candidates)) + prompts.IM_END
    if rng.random() < single_turn_fraction:
      examples.append((prompts.single_turn_prompt(row["problem"]), response))
      continue
    attempts = int(rng.integers(1, max_attempts + 1))
    prompt = prompts.multi_attempt_prompt(row["problem"], attempts)
    if attempts > 1 and rng.random() < feedback_fraction:
      wrong = [c for c in candidates if str(c) != row["answer"]]
      rejections = int(rng.integers(1, attempts))
      for i in range(rejections):
        # closed: the episode cut the turn right after the box (no "." or <|im_end|>).
        closed = bool(rng.integers(2))
        rejected = answer_text(rng.choice(wrong))
        prompt += rejected.removesuffix(".") if closed else rejected + prompts.IM_END
        prompt += prompts.feedback_turn(attempts - 1 - i, close_assistant=closed)
    examples.append((prompt, response))
  return examples


def _hinted_example(row, candidates, rng) -> tuple:
  code = int(rng.choice(_lte().ALL_FAIL_CLASSES))
  listed = []
  if code != _lte().OVERLONG_ALL:  # "be concise" alone lists nothing to exclude
    wrong = [c for c in candidates if str(c) != row["answer"]]
    listed = [int(c) for c in rng.permutation(wrong)[:int(rng.integers(1, len(wrong) + 1))]]
  unlisted = [c for c in candidates if c not in listed]
  prompt = _lte().hinted_prompt(row["problem"], code, [str(c) for c in listed])
  return prompt, answer_text(rng.choice(unlisted)) + prompts.IM_END


def _lte():
  from mars.episodes import lte  # lazily: it pulls in jax, which the tokenizer build needn't
  return lte
