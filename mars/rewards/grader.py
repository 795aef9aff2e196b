"""In-process grading of one response against its ground truth (math-verify).

`grade_one` is what the worker processes of `pool.GraderPool` run. It may be
slow or hang on adversarial input (sympy), so the trainer never calls it
directly: it goes through the pool, which adds a hard per-answer timeout.
How answers are read is `answers.py`'s; the cost guards and the soft time
limit are `guards.py`'s.

Grading is math-verify's: the response's boxes are read by math-verify's own
box extraction (`read_answer`), the ground truth by `math_verify.parse` with
its default configs (`LatexExtractionConfig()`, `ExprExtractionConfig()`), and
the two are compared by `math_verify.verify` with its default options. That
covers several boxes as one set answer, numbers, thousands separators,
fractions, decimals vs fractions, percentages, degrees, `\\text{}` and units,
intervals, tuples, sets (in any order), "and"-lists, matrices and equations
(`x=3` vs `3`).

Where mars differs from plain `verify(parse(gold), parse(response))`, on purpose:
  * the answer must be boxed: a response without a complete `\\boxed{}` is
    "no_answer", even when math-verify would read a number from its prose (the
    prompts ask for a box, and the multi-attempt reward gives no answer -1).
    Within a boxed response only the box(es) are read: a "The final answer is
    $X$" sentence elsewhere does not override the box.
  * `boxes="last"` (an option) reads only the last box, as the multi-attempt
    paper's reference does; math-verify's default, `boxes="math_verify"`, reads
    `\\boxed{1}, \\boxed{2}` as the set {1, 2}. A box math-verify has no pattern
    for (brace-less `\\boxed 9`, valid TeX) is read as the last box.
  * `allow_set_relation_comp=True` (an option; math-verify's default is False)
    lets an inequality match an interval (`3 \\le x \\le 4` == `[3,4]`).
  * the ground truth's $ are dropped before math-verify reads it (`gold_text`).
  * identical strings (ignoring leading and trailing whitespace) are correct
    without comparing;
  * cheap guards keep inputs that would make sympy or math-verify's box
    joining run away from reaching them: with more than MAX_BOXES boxes, or a
    box past the text guards (length, nesting, matrix size), the last box
    alone is read; an answer past the guards (those, or number size) is never
    compared, so only an identical string can be right.
math-verify's own timeouts are turned off: they use `signal.alarm` with whole
seconds and would cancel our finer SIGALRM timer (`soft_time_limit`); the
pool's process kill is the hard bound.
"""
import dataclasses
import logging

import math_verify
import math_verify.grader

from mars.rewards.answers import canonical_from_parsed, gold_text, read_answer, read_gold
from mars.rewards.extract import extract_boxed
from mars.rewards.guards import SoftTimeout, too_costly

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")
# Which box(es) hold the answer (see `grade_one`).
BOXES = ("math_verify", "last")

# We pass verify timeouts of None on purpose (see above); silence the one-time
# "timeout disabled" warning.
math_verify.grader.TIMEOUT_WARNING_SHOWN = True


@dataclasses.dataclass(frozen=True)
class Grade:
  """One graded response.

  status: correct | wrong | no_answer | timeout | error. "no_answer" exactly
    when the response has no complete box (`extract_boxed` is None, as in the
    multi-attempt rules; that reward gives it -1, not -0.5); a box math-verify
    cannot read is "wrong".
  extracted: the answer text `read_answer` read ("" for `\\boxed{}`; "1,2" for
    `\\boxed{1}, \\boxed{2}`; the last box when grading did not finish), or
    None when there is no box.
  canonical: a de-duplication key from that same parse (0.5, \\frac12, 1/2 and
    \\dfrac{1}{2} share one; it is `canonical_answer(extracted)`), used to build
    LTE's wrong-answer hints. None when there is no answer or grading did not
    finish.
  """
  status: str
  extracted: str | None = None
  canonical: str | None = None

  @property
  def correct(self) -> bool:
    return self.status == "correct"


def grade_one(response, answer, boxes: str = "math_verify",
              allow_set_relation_comp: bool = False) -> Grade:
  """Grades one response against `answer` (str, number or list of str).

  boxes: which box(es) hold the answer, see `read_answer`: "math_verify"
    (math-verify's reading: joined boxes form a set) or "last".
  allow_set_relation_comp: `math_verify.verify`'s option (inequality vs interval).

  Never raises on model output: exceptions give status "error", and a
  SoftTimeout (from an enclosing `soft_time_limit`, as in the pool's workers)
  gives status "timeout". A grade that does not finish reports the last box
  as `extracted`.
  """
  if boxes not in BOXES:
    raise ValueError(f"boxes must be one of {BOXES}, got {boxes!r}")
  extracted = None
  try:
    if isinstance(response, bytes):
      response = response.decode("utf-8", "replace")
    extracted = extract_boxed(str(response))
    if extracted is None:
      return Grade("no_answer")
    extracted, parsed = read_answer(response, boxes)
    if parsed and too_costly(parsed[0]):
      parsed = []  # never compared: only the identical string below can be right
    canonical = canonical_from_parsed(parsed, extracted)
    if not extracted.strip():
      return Grade("wrong", extracted, "")  # \boxed{}: answered, never correct.
    gold = gold_text(answer)
    if gold and extracted.strip() == gold:
      # Same text as the ground truth: correct without comparing (also past
      # the guards). Whitespace inside must match too: math-verify reads
      # "12 345" as 357.
      return Grade("correct", extracted, canonical)
    gold_parsed = read_gold(gold) if gold else []
    ok = bool(gold_parsed) and bool(parsed) and math_verify.verify(
        gold_parsed, parsed, allow_set_relation_comp=allow_set_relation_comp,
        timeout_seconds=None)
    return Grade("correct" if ok else "wrong", extracted, canonical)
  except SoftTimeout:
    return Grade("timeout", extracted, None)
  except Exception:  # pylint: disable=broad-except
    logging.getLogger(__name__).debug("grading error", exc_info=True)
    return Grade("error", extracted, None)
