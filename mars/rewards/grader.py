"""In-process grading of one response against its ground truth (math-verify).

`grade_one` is what the worker processes of `pool.GraderPool` run. It may be
slow or hang on adversarial input (sympy), so the trainer never calls it
directly: it goes through the pool, which adds a hard per-answer timeout.

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
import contextlib
import dataclasses
import functools
import logging
import math
import re
import signal
import threading

import math_verify
import math_verify.grader
import math_verify.parser
import sympy

from mars.rewards.extract import extract_boxed, extract_boxes

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")
# Which box(es) hold the answer (see `grade_one`).
BOXES = ("math_verify", "last")

# Cheap guards before sympy. Past them an answer is compared as a string only
# (so it can still be exactly right, but is never simplified). Real answers sit
# far inside them: the longest ground truth we ship is ~200 characters, its
# deepest bracket nesting is 4, its largest number has ~300 digits.
MAX_PARSE_CHARS = 500
MAX_NESTING = 8  # the antlr parser and simplify are exponential in nesting.
MAX_DIGITS = 10_000  # 9^{9^{9^9}} has ~10^{369693099} digits: never evaluate it.
MAX_MATRIX_ENTRIES = 64
MAX_DET_CELLS = 16  # latex2sympy expands \det while parsing: cubic and worse.
MAX_SUM_TERMS = 10_000

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
                    f"{len(_BOX_PATTERNS)}): mars/rewards/grader.py needs updating")
# Past this many boxes a response is read by its last box alone: math-verify's
# joining of boxes is quadratic in their number (1,000 boxes take ~0.05 s,
# 10,000 ~0.6 s). No real answer has that many.
MAX_BOXES = 1000
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# We pass timeouts of None on purpose (see module docstring); silence the
# one-time "timeout disabled" warnings.
math_verify.grader.TIMEOUT_WARNING_SHOWN = True
math_verify.parser.TIMEOUT_WARNING_SHOWN = True


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


class SoftTimeout(BaseException):
  """Raised by `soft_time_limit`.

  A BaseException so that the many `except Exception` blocks in sympy and
  math-verify do not swallow it.
  """


@contextlib.contextmanager
def soft_time_limit(seconds: float | None):
  """Raises SoftTimeout in this thread after `seconds` (SIGALRM based).

  Only interrupts Python bytecode: a single long C call (a huge integer power)
  runs on, which is why the pool also kills workers. A no-op off the main
  thread or when an outer timer is already running (the outer one bounds us).
  """
  if (not seconds or threading.current_thread() is not threading.main_thread()
      or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
    yield
    return

  def _raise(signum, frame):
    del signum, frame
    raise SoftTimeout()

  previous = signal.signal(signal.SIGALRM, _raise)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


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


def _nesting(text: str) -> int:
  depth = deepest = 0
  for char in text:
    if char in "([{":
      depth += 1
      deepest = max(deepest, depth)
    elif char in ")]}":
      depth = max(depth - 1, 0)
  return deepest


def _text_too_costly(text: str) -> bool:
  """String-level guards, checked before parsing."""
  if len(text) > MAX_PARSE_CHARS or _nesting(text) > MAX_NESTING:
    return True
  cells = text.count("&") + text.count("\\\\") + 1
  return cells > MAX_MATRIX_ENTRIES or ("det" in text and cells > MAX_DET_CELLS)


def _log10_size(expr, memo: dict) -> float | None:
  """Upper bound on log10 of max(|x|, 1/|x|) for a numeric subtree, else None.

  Works on the unevaluated tree latex2sympy returns, with floats only, so
  `9^{9^{9^9}}` is sized without being computed.
  """
  if expr in memo:
    return memo[expr]
  size = None
  if expr.is_Integer:
    size = abs(int(expr)).bit_length() * 0.30103
  elif expr.is_Rational:
    size = max(abs(expr.p).bit_length(), abs(expr.q).bit_length()) * 0.30103
  elif expr.is_Float or expr.is_NumberSymbol or expr is sympy.I:
    size = 1.0 if not expr.is_Float else abs(float(sympy.log(abs(expr) + 1, 10)))
  elif isinstance(expr, sympy.Pow):
    base, exponent = (_log10_size(a, memo) for a in expr.args)
    if base is not None and exponent is not None:
      size = math.inf if exponent > 300 else (base + 1) * _magnitude_bound(expr.args[1], exponent, memo)
  elif isinstance(expr, sympy.factorial):
    n = _log10_size(expr.args[0], memo)
    if n is not None:
      size = math.inf if n > 300 else 10.0**n * (n + 1)
  elif isinstance(expr, (sympy.Add, sympy.Mul)):
    sizes = [_log10_size(a, memo) for a in expr.args]
    if all(s is not None for s in sizes):
      size = sum(sizes) + 1
  memo[expr] = size
  return size


def _magnitude_bound(expr, size: float, memo: dict) -> float:
  """An upper bound on |expr|, a numeric subtree of log10 size `size` <= 300.

  The size bounds both |x| and 1/|x|, so 10**size is loose for an exponent
  whose terms may cancel: it would call 10^{(sqrt(13) - 5)/6} huge. When every
  node of the subtree is sized within 10^{+-300}, a 15-digit evalf of it is
  cheap and gives the bound directly.
  """
  bound = 10.0**size
  sizes = (memo.get(node) for node in sympy.preorder_traversal(expr))
  if not all(s is not None and s <= 300 for s in sizes):
    return bound
  try:
    return min(bound, float(abs(sympy.N(expr, 15))))
  except (TypeError, ValueError, ArithmeticError):
    return bound


def _too_costly(expr) -> bool:
  """Whether sympy comparison could run away (huge numbers, matrices, sums)."""
  if isinstance(expr, sympy.MatrixBase):
    return len(expr) > MAX_MATRIX_ENTRIES
  if not isinstance(expr, sympy.Basic):
    return False
  memo = {}
  for node in sympy.preorder_traversal(expr):
    if isinstance(node, sympy.MatrixBase) and len(node) > MAX_MATRIX_ENTRIES:
      return True
    if isinstance(node, (sympy.Sum, sympy.Product)):
      for limits in node.limits:
        span = [_log10_size(b, memo) for b in limits[1:]]
        if any(s is None or s > math.log10(MAX_SUM_TERMS) for s in span):
          return True
    size = _log10_size(node, memo) if isinstance(node, sympy.Expr) else None
    if size is not None and size > MAX_DIGITS:
      return True
  return False


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
def _gold_parsed(gold: str) -> list:
  """math-verify's reading of a ground truth ([] when too costly to parse:
  then only the exact-string match can make an answer correct).

  Boxed, as an answer is: plain `parse` would find nothing in a bare
  "\\sqrt{3}". A ground truth that is a worked solution with boxes is read as
  a response is. Cached: the same ground truth is graded G times per step
  (GRPO groups).
  """
  boxes = extract_boxes(gold)
  if boxes:
    if len(boxes) > MAX_BOXES or any(map(_text_too_costly, boxes)):
      return []
    parsed = _read_boxes(gold)
  elif _text_too_costly(gold):
    return []
  else:
    parsed = _parse(gold)
  return [] if parsed and _too_costly(parsed[0]) else parsed


def _canonical_from_parsed(parsed: list, text: str) -> str:
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
  if not text.strip() or _text_too_costly(text):
    return _squash(text)
  try:
    with soft_time_limit(timeout_s):
      parsed = _parse(text)
      return _canonical_from_parsed([] if parsed and _too_costly(parsed[0]) else parsed, text)
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
      and not any(map(_text_too_costly, found))):
    read = _read_boxes(response)
    text = next((r for r in reversed(read) if isinstance(r, str)), None)
    if read and text is not None:
      return text, read
  last = found[-1]
  return last, [] if _text_too_costly(last) else _parse(last)


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
    if parsed and _too_costly(parsed[0]):
      parsed = []  # never compared: only the identical string below can be right
    canonical = _canonical_from_parsed(parsed, extracted)
    if not extracted.strip():
      return Grade("wrong", extracted, "")  # \boxed{}: answered, never correct.
    gold = gold_text(answer)
    if gold and extracted.strip() == gold:
      # Same text as the ground truth: correct without comparing (also past
      # the guards). Whitespace inside must match too: math-verify reads
      # "12 345" as 357.
      return Grade("correct", extracted, canonical)
    gold_parsed = _gold_parsed(gold) if gold else []
    ok = bool(gold_parsed) and bool(parsed) and math_verify.verify(
        gold_parsed, parsed, allow_set_relation_comp=allow_set_relation_comp,
        timeout_seconds=None)
    return Grade("correct" if ok else "wrong", extracted, canonical)
  except SoftTimeout:
    return Grade("timeout", extracted, None)
  except Exception:  # pylint: disable=broad-except
    logging.getLogger(__name__).debug("grading error", exc_info=True)
    return Grade("error", extracted, None)
