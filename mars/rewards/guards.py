"""Cheap guards that keep grading bounded in-process: size limits checked before sympy and
math-verify see an input, and a soft (SIGALRM) time limit for what slips past them."""
import contextlib
import math
import signal
import threading

import sympy

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
# Past this many boxes a response is read by its last box alone: math-verify's
# joining of boxes is quadratic in their number (1,000 boxes take ~0.05 s,
# 10,000 ~0.6 s). No real answer has that many.
MAX_BOXES = 1000


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


def _nesting(text: str) -> int:
  depth = deepest = 0
  for char in text:
    if char in "([{":
      depth += 1
      deepest = max(deepest, depth)
    elif char in ")]}":
      depth = max(depth - 1, 0)
  return deepest


def text_too_costly(text: str) -> bool:
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


def too_costly(expr) -> bool:
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
