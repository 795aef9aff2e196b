"""Reading answers as math-verify does: a response's boxes, a ground truth, and the
canonical de-duplication key of an answer."""
import functools
import re

import math_verify
import math_verify.parser
import sympy

from mars.rewards.extract import extract_boxes
from mars.rewards.guards import (MAX_BOXES, SoftTimeout, soft_time_limit, text_too_costly,
                                 too_costly)

# math-verify's default extraction configs (those of `math_verify.parse`).
_LATEX_CONFIG = math_verify.LatexExtractionConfig()
_PARSE_CONFIG = (_LATEX_CONFIG, math_verify.ExprExtractionConfig())
# math-verify's own box patterns, the two it ranks at `boxed_match_priority`:
# a math environment ($...$, \[...\]) holding boxes, possibly chained to more
# by ", and/or", and a bare run from the first \boxed{ to the last }. Its
# other patterns ("The final answer is $X$", "answer: X", any number in the
# prose) are left out: for mars the answer is what is boxed.
_BOX_PATTERNS = [(pattern, priority) for pattern, priority
                 in math_verify.parser.lazy_latex_regex(_LATEX_CONFIG)
                 if priority == _LATEX_CONFIG.boxed_match_priority and "boxed" in pattern.pattern]
if len(_BOX_PATTERNS) != 2:
  raise ImportError(f"math-verify's box patterns changed (expected 2, found "
                    f"{len(_BOX_PATTERNS)}): mars/rewards/answers.py needs updating")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# We pass parsing timeouts of None on purpose (see mars/rewards/grader.py's docstring);
# silence the one-time "timeout disabled" warning.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True


def gold_text(answer) -> str:
  """Ground truth as one LaTeX answer string (no $ delimiters).

  A list (OlympiadBench `final_answer`) is a multi-part answer: its items are
  joined with ", " so that math-verify reads them as one set, and a response
  must give all of them. Whole floats (27.0 in AMC) become integers. The $ are
  dropped rather than left to math-verify: data sets put stray ones inside
  answers ("$221,$8$" in OlympiadBench, "x_0 \\cos t+$ $\\dot{x}_0" in Minerva),
  which would hide part of the answer from it.
  """
  if isinstance(answer, (list, tuple)):
    return ", ".join(filter(None, (gold_text(a) for a in answer)))
  if isinstance(answer, bytes):
    answer = answer.decode("utf-8", "replace")
  if isinstance(answer, float) and answer.is_integer():
    answer = int(answer)
  return _UNESCAPED_DOLLAR.sub("", str(answer)).strip()

def _squash(text: str) -> str:
  """Whitespace-free form: the string fallback for comparison and canonical."""
  return "".join(text.split())


def _parse(latex: str) -> list:
  """math-verify parse of a bare answer: [sympy expr, str] or [str] or [].

  The box makes math-verify read the whole text as one answer (its boxed
  extraction), which is how it reads the response's box(es) too.
  """
  return math_verify.parse("\\boxed{" + latex + "}", _PARSE_CONFIG, parsing_timeout=None)


def _read_boxes(text: str) -> list:
  """math-verify's reading of the boxes in `text`: [expr, str], [str] or [].

  `math_verify.parse` restricted to its box patterns (see _BOX_PATTERNS): the
  rightmost match wins; boxes it joins (a comma, "and" or "or" between them,
  or one math environment holding them) are one set answer; the str is its
  normalized LaTeX of what it read.
  """
  try:
    return math_verify.parser.extract_target_from_pred(
        text, [(_BOX_PATTERNS, _LATEX_CONFIG)], fallback_mode="first_match",
        extraction_mode="any_match")
  except Exception:  # pylint: disable=broad-except
    return []  # as math_verify.parse does


@functools.lru_cache(maxsize=4096)
def read_gold(gold: str) -> list:
  """math-verify's reading of a ground truth ([] when too costly to parse:
  then only the exact-string match can make an answer correct).

  Boxed, as an answer is: plain `parse` would find nothing in a bare
  "\\sqrt{3}". A ground truth that is a worked solution with boxes is read as
  a response is. Cached: the same ground truth is graded G times per step
  (GRPO groups).
  """
  boxes = extract_boxes(gold)
  if boxes:
    if len(boxes) > MAX_BOXES or any(map(text_too_costly, boxes)):
      return []
    parsed = _read_boxes(gold)
  elif text_too_costly(gold):
    return []
  else:
    parsed = _parse(gold)
  return [] if parsed and too_costly(parsed[0]) else parsed


def canonical_from_parsed(parsed: list, text: str) -> str:
  """sympy string of the parsed answer with floats made exact, else squashed text."""
  expr = parsed[0] if parsed else None
  if not isinstance(expr, (sympy.Basic, sympy.MatrixBase)):
    return _squash(text)
  floats = expr.atoms(sympy.Float)
  if floats:
    # 0.5 -> 1/2 so it meets \frac12. evaluate(False): rebuilding must not
    # evaluate the rest of the tree (9^{9^{9^9}} would never finish).
    with sympy.evaluate(False):
      expr = expr.xreplace({f: sympy.Rational(str(f)) for f in floats})
  return sympy.sstr(expr)


def canonical_answer(text: str, timeout_s: float = 0.5) -> str:
  """De-duplication key for an extracted answer; cheap and never raises.

  The key `grade_one` gives `Grade.canonical` for this answer text: the sympy
  string of its math-verify parse within the same guards, under a
  `soft_time_limit` of `timeout_s`; anything else, or any failure, falls back
  to the whitespace-free string. Inside the grader pool `Grade.canonical`
  carries the same key, computed in the worker: prefer it in the trainer.
  """
  if text is None:
    return ""
  text = str(text)
  if not text.strip() or text_too_costly(text):
    return _squash(text)
  try:
    with soft_time_limit(timeout_s):
      parsed = _parse(text)
      return canonical_from_parsed([] if parsed and too_costly(parsed[0]) else parsed, text)
  except (Exception, SoftTimeout):  # pylint: disable=broad-except
    return _squash(text)


def read_answer(response, boxes: str = "math_verify") -> tuple[str | None, list]:
  """(extracted text, math-verify parse) of a response; (None, []) without a box.

  boxes="math_verify": math-verify's own reading of the boxes (`_read_boxes`);
    the extracted text is its normalized LaTeX ("1,2" for `\\boxed{1},
    \\boxed{2}`). A box it does not match (brace-less `\\boxed 9`), or boxes
    past the guards, leave the last box.
  boxes="last": the last complete box (`extract_boxed`), as written.
  No complete box is no answer in both modes, whatever math-verify could read
  from the prose. A last box past the text guards is not parsed ([]).
  """
  if isinstance(response, bytes):
    response = response.decode("utf-8", "replace")
  response = str(response)
  found = extract_boxes(response)
  if not found:
    return None, []
  if (boxes == "math_verify" and len(found) <= MAX_BOXES
      and not any(map(text_too_costly, found))):
    read = _read_boxes(response)
    text = next((r for r in reversed(read) if isinstance(r, str)), None)
    if read and text is not None:
      return text, read
  last = found[-1]
  return last, [] if text_too_costly(last) else _parse(last)

