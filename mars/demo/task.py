"""The embedded CPU demo's synthetic task and its format-only warm-start data.

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

"""
import numpy as np

from mars import prompts
from mars.episodes import hints

SOURCE = "candidates"  # config.data.name and the eval benchmark name of this task
# "hidden": the answer is uniform among the candidates, unknowable from the
# prompt (the multi-attempt demo). "first": always the first listed, a rule RL
# can learn from the reward alone (the LTE demo: failed groups it can rescue).
RULES = ("hidden", "first")


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
  code = int(rng.choice(hints.ALL_FAIL_CLASSES))
  listed = []
  if code != hints.OVERLONG_ALL:  # "be concise" alone lists nothing to exclude
    wrong = [c for c in candidates if str(c) != row["answer"]]
    listed = [int(c) for c in rng.permutation(wrong)[:int(rng.integers(1, len(wrong) + 1))]]
  unlisted = [c for c in candidates if c not in listed]
  prompt = hints.hinted_prompt(row["problem"], code, [str(c) for c in listed])
  return prompt, answer_text(rng.choice(unlisted)) + prompts.IM_END

