"""Multi-attempt episode rules as pure host functions: no model, no device arrays.

One episode is one row of the rollout batch. After every generated chunk the
driver (`multi_attempt.rollout`) shows each running row's *current attempt*
(the model tokens since its last feedback turn) to these functions:

    end = find_attempt_end(tokens, done=..., scanned=..., decode=..., ...)
    episode, action = decide(episode, end, grade_status, budget_left=...)

  find_attempt_end  did the attempt end, where, and why (boxed | eos | budget)
  decide            correct -> finish; wrong or no answer with attempts left ->
                    n <- n-1 and a feedback turn; otherwise finish
  episode_reward    +1 / -0.5 / -1 (config), optional per-attempt discount

When an attempt ends (`attempt_end`, config `episode.attempt_end`):
  * "boxed" (the exact cut): at the *smallest token prefix* holding a complete
    box that no later text can change (`has_settled_box`). The tokens sampled
    after it in the same chunk are rewound by the driver (Sampler.rewind), so
    the transcript and the KV cache are as if generation had stopped there.
    A stop token the model emits before any box ends the attempt too ("eos")
    and stays in the transcript as the model's own `<|im_end|>`.
  * "chunk" (the reference, DualityRL/multi-attempt
    train/openrlhf/duality/vllm_mul.py): the attempt is generated in chunks of
    `chunk_tokens` sampled tokens *counted from the attempt's start* and checked
    after each one; it ends at the first chunk end where its text's last box is
    complete (`final_box`), keeping the rest of that chunk; the last box is
    graded. A stop token ends it too (the box check then covers the partial
    chunk). Before a feedback turn the attempt's stop token is dropped and the
    feedback's own `<|im_end|>` closes the turn, as the reference strips
    `<|im_end|>` from the model's text (`strip_stop`); a final attempt keeps it.
    `max_chunks` caps the chunks an episode may use, each attempt's last
    partial chunk counting whole (the reference's `num_iteration`).
  * "eos": only at the model's end of turn (or the budget); the last box of the
    whole turn is graded.
  * "budget" (every mode): the row is done without a stop token (token budget,
    chunk cap or cache end).
An unclosed box is not an answer. Attempt text is decoded without special
tokens, so `<|im_end|>` never glues onto a brace-less `\\boxed 4`.

The text handed to `grade_fn` is the attempt's whole kept text, and the grader
must grade its *last* complete box (mars.rewards.grade_one does: it grades
`extract_boxed`, the last box by closing brace). In "boxed" mode the kept text
holds exactly one complete box; in "chunk" and "eos" modes it may hold several.
"""
import dataclasses
import re
from typing import Callable, Optional, Sequence, Tuple

from mars import prompts
from mars.rewards.extract import extract_boxed

STATUSES = ("running", "correct", "wrong_exhausted", "no_answer_exhausted", "budget")
END_REASONS = ("boxed", "eos", "budget")
ATTEMPT_ENDS = ("boxed", "chunk", "eos")

# A brace-less `\boxed 4` (or `\boxed \pi`) at the very end of the text may still
# grow (`\boxed 42`, `\boxed \pia`); a box is settled once no suffix changes it.
_PROBES = ("0", "a")
# Box openers and brace tokens as mars.rewards.extract matches them (`\{` is a
# literal brace, `\\` a pair): enough to tell whether the last opener is closed.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")


@dataclasses.dataclass(frozen=True)
class Episode:
  """Per-row state. Attempt lists hold one entry per *finished* attempt."""
  num_attempts: int               # N announced in the first prompt
  attempts_left: int              # n: attempts left, counting the current one
  status: str = "running"         # one of STATUSES
  success_attempt: int = 0        # 1-based index of the correct attempt; 0 if none
  answers: Tuple = ()             # extracted answer per attempt (None: no complete box)
  grades: Tuple = ()              # Grade.status per attempt ("no_answer" if no box)
  ends: Tuple = ()                # why each attempt ended: boxed | eos | budget
  scanned: int = 0                # current-attempt tokens already searched for a box
  chunks: int = 0                 # "chunk" mode: chunks used by the finished attempts

  @property
  def attempts_used(self) -> int:
    return len(self.grades)

  @property
  def answered_any(self) -> bool:
    """Some attempt gave an answer (wrong, timeout and error included)."""
    return any(g != "no_answer" for g in self.grades)

  @property
  def done(self) -> bool:
    return self.status != "running"


def new_episode(num_attempts: int) -> Episode:
  if num_attempts < 1:
    raise ValueError(f"An episode needs at least 1 attempt, got {num_attempts}.")
  return Episode(num_attempts=int(num_attempts), attempts_left=int(num_attempts))


@dataclasses.dataclass(frozen=True)
class AttemptEnd:
  reason: str                # boxed | eos | budget
  keep: int                  # attempt tokens kept; the driver rewinds the rest
  text: str                  # decoded kept tokens (what is graded)
  answer: Optional[str]      # the box graded: extract_boxed(text) ("chunk": final_box(text))
  turn_closed: bool          # the kept tokens end with <|im_end|>
  # "chunk" mode: the kept tokens end with a stop token that a feedback turn
  # replaces (the driver rewinds it; the feedback's <|im_end|> closes the turn).
  strip_stop: bool = False
  chunks: int = 0            # "chunk" mode: chunks this attempt used (a partial one counts)


@dataclasses.dataclass(frozen=True)
class Action:
  kind: str                  # "feedback" | "finish"
  attempts_left: int = 0     # n announced by the feedback turn
  close_assistant: bool = False

  @property
  def feedback_text(self) -> str:
    return prompts.feedback_turn(self.attempts_left, close_assistant=self.close_assistant)


FINISH = Action("finish")


# ----------------------------------------------------------------------------
# Checking a chunk.

def has_settled_box(text: str) -> bool:
  """`text` holds a complete box whose answer no appended text can change."""
  answer = extract_boxed(text)
  return answer is not None and all(extract_boxed(text + p) == answer for p in _PROBES)


def find_box_end(tokens: Sequence[int], decode: Callable, scanned: int = 0) -> Optional[int]:
  """Smallest k > scanned such that decode(tokens[:k]) has a settled box, else None.

  Prefixes up to `scanned` were searched in earlier chunks and hold none. A
  complete box never disappears as text grows, so one decode of the whole
  attempt rules out most chunks; the token-by-token scan runs once per box.
  """
  tokens = list(tokens)
  if len(tokens) <= scanned or extract_boxed(decode(tokens)) is None:
    return None
  for k in range(scanned + 1, len(tokens) + 1):
    if has_settled_box(decode(tokens[:k])):
      return k
  return None


def final_box(text: str) -> Optional[str]:
  """The box the reference grades at this point of the text, else None.

  That is the last box, once it is complete: None while the last `\\boxed{`
  is still open (the reference's extraction looks at the last opener only, so
  "\\boxed{1} or \\boxed{" has no answer yet) or while a brace-less last box
  could still grow. Its content is `extract_boxed(text)`, what the grader takes.
  """
  if _last_box_open(text) or not has_settled_box(text):
    return None
  return extract_boxed(text)


def _last_box_open(text: str) -> bool:
  """The text's last `\\boxed{` / `\\fbox{` has no closing brace yet."""
  last = None
  for last in _BOX_OPEN.finditer(text):
    pass
  if last is None:
    return False
  depth = 1
  for token in _BRACE_TOKEN.finditer(text, last.end()):
    depth += {"{": 1, "}": -1}.get(token.group(), 0)
    if depth == 0:
      return False
  return True


def find_chunk_end(tokens: Sequence[int], *, done: bool, scanned: int, decode: Callable,
                   chunk_tokens: int, chunks_left: Optional[int], stop_ids,
                   im_end_id: int) -> Optional[AttemptEnd]:
  """"chunk" mode: where the current attempt ended (None: still running).

  The attempt's chunk ends are at multiples of `chunk_tokens` of its own
  sampled tokens, whatever the driver's chunks were (its first chunk after a
  feedback turn also writes the forced tokens), so they fall where the
  reference's would; tokens sampled past the chosen end are rewound.

  Args:
    scanned: chunk ends at or before this many tokens were checked already.
    chunks_left: chunks the episode may still use (None: no cap); reaching the
      cap without a box ends the attempt ("budget") at the cap.
  """
  tokens = [int(t) for t in tokens]
  n = len(tokens)
  cap = n if chunks_left is None else chunks_left * chunk_tokens  # most tokens it may keep
  ends_at = lambda kept, reason: _end(reason, kept, decode, im_end_id, answer_fn=final_box,
                                      stop_ids=stop_ids, chunk_tokens=chunk_tokens)
  first = (scanned // chunk_tokens + 1) * chunk_tokens
  for k in range(first, min(n, cap) + 1, chunk_tokens):
    if final_box(decode(tokens[:k])) is not None:
      return ends_at(tokens[:k], "boxed")
  stopped = n > 0 and tokens[-1] in stop_ids
  if stopped and n <= cap:  # the partial last chunk is checked like a full one
    return ends_at(tokens, "boxed" if final_box(decode(tokens)) is not None else "eos")
  if done or (chunks_left is not None and n >= cap):
    return ends_at(tokens[:cap], "budget")
  return None


def find_attempt_end(tokens: Sequence[int], *, done: bool, scanned: int, decode: Callable,
                     attempt_end: str, stop_ids, im_end_id: int, chunk_tokens: int = 0,
                     chunks_left: Optional[int] = None) -> Optional[AttemptEnd]:
  """Where the current attempt ended (None: still running).

  Args:
    tokens: model tokens of the current attempt so far.
    done: the sampler stopped the row (stop token, budget or cache end).
    scanned: tokens already searched for a box in earlier chunks.
    decode: ids -> text without special tokens.
    attempt_end: "boxed" (first complete box), "chunk" (the reference; see the
      module docstring) or "eos" (end of turn only).
    chunk_tokens, chunks_left: "chunk" mode only (see find_chunk_end).
  """
  tokens = [int(t) for t in tokens]
  if attempt_end == "chunk":
    return find_chunk_end(tokens, done=done, scanned=scanned, decode=decode,
                          chunk_tokens=chunk_tokens, chunks_left=chunks_left, stop_ids=stop_ids,
                          im_end_id=im_end_id)
  if attempt_end == "boxed":
    k = find_box_end(tokens, decode, scanned)
    if k is not None:
      return _end("boxed", tokens[:k], decode, im_end_id)
  if tokens and tokens[-1] in stop_ids:
    return _end("eos", tokens, decode, im_end_id)
  if done:
    return _end("budget", tokens, decode, im_end_id)
  return None


def _end(reason, kept, decode, im_end_id, answer_fn=extract_boxed, stop_ids=(),
         chunk_tokens=0) -> AttemptEnd:
  """stop_ids / chunk_tokens are given in "chunk" mode only (strip_stop, chunks)."""
  text = decode(kept)
  return AttemptEnd(reason=reason, keep=len(kept), text=text, answer=answer_fn(text),
                    turn_closed=bool(kept) and kept[-1] == im_end_id,
                    strip_stop=bool(kept) and kept[-1] in stop_ids,
                    chunks=max(1, -(-len(kept) // chunk_tokens)) if chunk_tokens else 0)


def check_chunk(episodes: Sequence[Episode], attempts: Sequence[Sequence[int]],
                done: Sequence[bool], *, decode: Callable, attempt_end: str, stop_ids,
                im_end_id: int, chunk_tokens: int = 0, max_chunks: int = 0) -> list:
  """`find_attempt_end` for every row (None for finished episodes and running attempts).

  chunk_tokens, max_chunks: "chunk" mode's chunk size and per-episode chunk cap (0: none).
  """
  if attempt_end not in ATTEMPT_ENDS:
    raise ValueError(f"attempt_end must be one of {ATTEMPT_ENDS}, got {attempt_end!r}.")
  if attempt_end == "chunk" and chunk_tokens < 1:
    raise ValueError(f"attempt_end='chunk' needs chunk_tokens >= 1, got {chunk_tokens}.")
  return [None if ep.done else find_attempt_end(
      toks, done=bool(d), scanned=ep.scanned, decode=decode, attempt_end=attempt_end,
      stop_ids=stop_ids, im_end_id=im_end_id, chunk_tokens=chunk_tokens,
      chunks_left=max_chunks - ep.chunks if max_chunks else None)
          for ep, toks, d in zip(episodes, attempts, done)]


def mark_scanned(ep: Episode, num_tokens: int) -> Episode:
  """Records that the running attempt's first `num_tokens` tokens hold no settled box."""
  return dataclasses.replace(ep, scanned=int(num_tokens))


# ----------------------------------------------------------------------------
# Deciding.

def needs_grading(end: AttemptEnd) -> bool:
  """Only an attempt with a complete box goes to the grader; the rest is no_answer."""
  return end.answer is not None


def decide(ep: Episode, end: AttemptEnd, grade_status: str, *,
           budget_left: int) -> Tuple[Episode, Action]:
  """Applies one finished attempt: returns the new episode and what to do next.

  Args:
    grade_status: Grade.status of the attempt ("no_answer" when it had no box).
    budget_left: sampled tokens the episode may still generate (after rewind;
      in "chunk" mode with a chunk cap, at most the chunks left × chunk_tokens).

  Status precedence: correct; "budget" if this attempt was cut by the budget;
  exhausted when no attempt is left; "budget" if attempts are left but no
  tokens are (another attempt could not write a single token).
  """
  if ep.done:
    raise ValueError(f"decide: episode is already {ep.status}.")
  if end.answer is None:
    grade_status = "no_answer"
  ep = dataclasses.replace(ep, answers=ep.answers + (end.answer,),
                           grades=ep.grades + (grade_status,), ends=ep.ends + (end.reason,),
                           scanned=0, chunks=ep.chunks + end.chunks)
  if grade_status == "correct":
    return dataclasses.replace(ep, status="correct", success_attempt=ep.attempts_used), FINISH
  left = ep.attempts_left - 1
  if end.reason == "budget":
    status = "budget"
  elif left <= 0:
    status = "wrong_exhausted" if ep.answered_any else "no_answer_exhausted"
  elif budget_left <= 0:
    status = "budget"
  else:
    # A stripped stop token leaves the turn open: the feedback closes it.
    return (dataclasses.replace(ep, attempts_left=left),
            Action("feedback", attempts_left=left,
                   close_assistant=end.strip_stop or not end.turn_closed))
  return dataclasses.replace(ep, status=status, attempts_left=max(left, 0)), FINISH


def episode_reward(ep: Episode, cfg) -> float:
  """+reward_correct·discount^(k-1) if attempt k was correct; else wrong / no-answer reward."""
  if not ep.done:
    raise ValueError("episode_reward: the episode is still running.")
  if ep.status == "correct":
    return float(cfg.reward_correct) * float(cfg.attempt_discount) ** (ep.success_attempt - 1)
  return float(cfg.reward_wrong if ep.answered_any else cfg.reward_no_answer)
