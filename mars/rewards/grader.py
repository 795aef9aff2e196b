"""In-process grading of one response against its ground truth (math-verify).

`grade_one` is what the worker processes of `pool.GraderPool` run. It may be
slow or hang on adversarial input (sympy), so the trainer never calls it
directly: it goes through the pool, which adds a hard per-answer timeout.

Comparison: the extracted box content and the ground truth are both parsed by
math-verify (latex2sympy + sympy) and compared with `math_verify.verify`, which
handles numbers, fractions (`\\dfrac`, `\\tfrac`, `a/b`), decimals vs fractions,
percentages, degrees, `\\text{}` and units, intervals, tuples, sets, matrices
and equations (`x=3` vs `3`). On top of math-verify:
  * identical strings (ignoring whitespace) are correct without sympy;
  * a trailing percent sign may be dropped on either side ("12.5\\%" == "12.5");
  * an inequality may match an interval ("3 \\le x \\le 4" == "[3,4]");
  * a list ground truth (OlympiadBench) must be matched as a whole, as a set;
  * cheap guards (length, nesting, number size, matrix size) keep inputs that
    would make sympy run away from reaching it: those compare as strings.
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

from mars.rewards.extract import extract_boxed

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")

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

_PARSE_CONFIG = (math_verify.LatexExtractionConfig(boxed_match_priority=0),
                 math_verify.ExprExtractionConfig())
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_TRAILING_PERCENT = re.compile(r"\s*\\?%\s*$")

# We pass timeouts of None on purpose (see module docstring); silence the
# one-time "timeout disabled" warnings.
math_verify.grader.TIMEOUT_WARNING_SHOWN = True
math_verify.parser.TIMEOUT_WARNING_SHOWN = True


@dataclasses.dataclass(frozen=True)
class Grade:
  """One graded response.

  status: correct | wrong | no_answer | timeout | error. "no_answer" means no
    complete \\boxed{} (the multi-attempt reward gives it -1, not -0.5).
  extracted: the last complete box's content ("" for `\\boxed{}`), or None.
  canonical: a de-duplication key for `extracted` (0.5, \\frac12, 1/2 and
    \\dfrac{1}{2} share one), used to build LTE's wrong-answer hints. None when
    there is no extracted answer or grading did not finish.
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
  """Ground truth as one LaTeX string (no $ delimiters).

  A list (OlympiadBench `final_answer`) is a multi-part answer: its items are
  joined with ", " so that math-verify compares them as a set, and a response
  must give all of them. Whole floats ("27.0" in AMC) become integers.
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
      size = math.inf if exponent > 300 else (base + 1) * 10.0**exponent
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
  """math-verify parse of a bare answer: [sympy expr, str] or [str] or []."""
  return math_verify.parse("\\boxed{" + latex + "}", _PARSE_CONFIG,
                           parsing_timeout=None)


def _without_percent(latex: str) -> str | None:
  """"12.5\\%" -> "12.5" (None if there is no trailing percent sign)."""
  stripped = _TRAILING_PERCENT.sub("", latex)
  return stripped if stripped != latex and stripped else None


def _with_alternatives(latex: str, parsed: list) -> list:
  """Parsed forms of an answer plus its percent-less reading.

  math-verify equates "50%" with "50" only for integers; "12.5%" vs "12.5" is
  the same answer written with or without the unit, so we try both readings.
  """
  bare = _without_percent(latex)
  return parsed + _parse(bare) if bare else parsed


@functools.lru_cache(maxsize=4096)
def _gold_forms(gold: str) -> tuple[list, str]:
  """(parsed readings, canonical) of a ground truth.

  Cached: the same ground truth is graded G times per step (GRPO groups).
  """
  if _text_too_costly(gold):
    return [gold], _squash(gold)
  parsed = _parse(gold)
  return _with_alternatives(gold, parsed), _canonical_from_parsed(parsed, gold)


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

  Uses math-verify (sympy) within the same guards as grading, under a
  `soft_time_limit` of `timeout_s`; anything else, or any failure, falls back to
  the whitespace-free string. Inside the grader pool `Grade.canonical` carries
  the same key, computed in the worker: prefer it in the trainer.
  """
  if text is None:
    return ""
  text = str(text)
  if not text.strip() or _text_too_costly(text):
    return _squash(text)
  try:
    with soft_time_limit(timeout_s):
      parsed = _parse(text)
      if parsed and _too_costly(parsed[0]):
        return _squash(text)
      return _canonical_from_parsed(parsed, text)
  except (Exception, SoftTimeout):  # pylint: disable=broad-except
    return _squash(text)


def grade_one(response: str, answer) -> Grade:
  """Grades one response against `answer` (str, number or list of str).

  Never raises on model output: exceptions give status "error", and a
  SoftTimeout (from an enclosing `soft_time_limit`, as in the pool's workers)
  gives status "timeout".
  """
  extracted = None
  try:
    if isinstance(response, bytes):
      response = response.decode("utf-8", "replace")
    extracted = extract_boxed(str(response))
    if extracted is None:
      return Grade("no_answer")
    if not extracted.strip():
      return Grade("wrong", extracted, "")  # \boxed{}: answered, never correct.
    gold = gold_text(answer)
    if gold and _squash(extracted) == _squash(gold):
      # Same text as the ground truth: no sympy for the response at all.
      return Grade("correct", extracted, _gold_forms(gold)[1])
    if _text_too_costly(extracted):
      return Grade("wrong", extracted, _squash(extracted))
    parsed = _parse(extracted)
    if parsed and _too_costly(parsed[0]):
      return Grade("wrong", extracted, _squash(extracted))
    canonical = _canonical_from_parsed(parsed, extracted)
    gold_parsed = _gold_forms(gold)[0] if gold else []
    candidates = _with_alternatives(extracted, parsed)
    ok = bool(gold_parsed) and bool(candidates) and math_verify.verify(
        gold_parsed, candidates, allow_set_relation_comp=True, timeout_seconds=None)
    return Grade("correct" if ok else "wrong", extracted, canonical)
  except SoftTimeout:
    return Grade("timeout", extracted, None)
  except Exception:  # pylint: disable=broad-except
    logging.getLogger(__name__).debug("grading error", exc_info=True)
    return Grade("error", extracted, None)
