"""LTE's all-fail classes and the hinted prompts built from a group's wrong answers.

Pure Python and numpy (no jax): the demo's tokenizer corpus renders these prompts too.
"""
from typing import Optional, Sequence

import numpy as np

from mars import prompts

# Group classes. Only the last three are all-fail (they get hinted rollouts).
EMPTY, SOME_PASS, ALL_PASS, OVERLONG_ALL, OVERLONG_SOME, PASS_NONE = -1, 0, 1, 2, 3, 4
CLASS_NAMES = {EMPTY: "empty", SOME_PASS: "some_pass", ALL_PASS: "all_pass",
               OVERLONG_ALL: "overlong_all", OVERLONG_SOME: "overlong_some",
               PASS_NONE: "pass_none"}
ALL_FAIL_CLASSES = (OVERLONG_ALL, OVERLONG_SOME, PASS_NONE)
HINT_SOURCES = ("wrong_answers", "none")
def classify_groups(rewards, truncated, group_ids, num_groups: int) -> np.ndarray:
  """Class code per group [num_groups] (SOME_PASS, ALL_PASS, OVERLONG_*, PASS_NONE).

  A rollout passes when its reward is > 0 (or its bool flag is True). Group
  ids with no rows get EMPTY.
  """
  group_ids = np.asarray(group_ids, np.int64)
  passed = np.asarray(rewards) > 0
  count = np.bincount(group_ids, minlength=num_groups)
  n_pass = np.bincount(group_ids, weights=passed, minlength=num_groups)
  n_cut = np.bincount(group_ids, weights=np.asarray(truncated, bool), minlength=num_groups)
  fail = n_pass == 0
  codes = np.full((num_groups,), SOME_PASS, np.int32)
  codes[n_pass == count] = ALL_PASS
  codes[fail & (n_cut == count)] = OVERLONG_ALL
  codes[fail & (n_cut > 0) & (n_cut < count)] = OVERLONG_SOME
  codes[fail & (n_cut == 0)] = PASS_NONE
  codes[count == 0] = EMPTY
  return codes


def is_all_fail(codes) -> np.ndarray:
  return np.isin(np.asarray(codes), ALL_FAIL_CLASSES)


def build_hint_set(extracted: Sequence[Optional[str]], canonical: Sequence[Optional[str]],
                   truncated: Sequence[bool], cap: Optional[int] = None,
                   max_chars: Optional[int] = None) -> list:
  """Distinct wrong answers of one group's failed rollouts, in first-seen order.

  Args:
    extracted: each failed rollout's extracted answer (None: nothing to hint).
    canonical: its de-duplication key (e.g. Grade.canonical); None falls back to
      the whitespace-free text. `1/2`, `0.5`, `\\frac12` share a key, so the
      first of them is the one shown.
    truncated: truncated rollouts are skipped (their answer was not final).
    cap: at most this many answers (None: no cap).
    max_chars: answers longer than this are skipped (they would bloat the prompt).
  """
  seen, hints = set(), []
  for answer, key, cut in zip(extracted, canonical, truncated):
    if cap is not None and len(hints) >= cap:
      break
    if cut or answer is None or not answer.strip():
      continue
    answer = answer.strip()
    if max_chars is not None and len(answer) > max_chars:
      continue
    key = key if key else "".join(answer.split())
    if key not in seen:
      seen.add(key)
      hints.append(answer)
  return hints


def hinted_problem(problem: str, code: int, hints: Sequence[str],
                   hint_source: str = "wrong_answers") -> str:
  """The problem text with the class's note appended (the paper's step 4).

  Rendering it with the episode's own template gives the hinted prompt:
  single_turn_prompt(hinted_problem(...)) == hinted_prompt(...), and the
  multi-attempt prompt for lte.episode="multi_attempt". With no usable wrong
  answer (or hint_source="none") there is nothing to hint: pass-none groups get
  the plain problem (vanilla extra rollouts), overlong groups the Concise note.
  """
  if hint_source not in HINT_SOURCES:
    raise ValueError(f"lte.hint_source must be one of {HINT_SOURCES}, got {hint_source!r}.")
  hints = list(hints) if hint_source == "wrong_answers" else []
  answers = prompts.format_wrong_answers(hints)
  if code == OVERLONG_ALL or (code == OVERLONG_SOME and not hints):
    note = prompts.CONCISE_NOTE
  elif code == OVERLONG_SOME:
    note = prompts.CONCISE_HINT_NOTE.format(answers=answers)
  elif code == PASS_NONE:
    note = prompts.HINT_NOTE.format(answers=answers) if hints else None
  else:
    raise ValueError(
        f"hinted_problem: group class {CLASS_NAMES.get(code, code)!r} is not all-fail.")
  return f"{problem}\n\n{note}" if note else problem


def hinted_prompt(problem: str, code: int, hints: Sequence[str],
                  hint_source: str = "wrong_answers") -> str:
  """Single-turn prompt for an all-fail group's extra rollouts: Concise / ConciseHint / Hint."""
  return prompts.single_turn_prompt(hinted_problem(problem, code, hints, hint_source))
