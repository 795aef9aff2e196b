"""Grader worker: `python -m mars.rewards.worker SOFT_TIMEOUT_S MEM_MB [PARENT_PID]`.

Started by `pool.GraderPool`. Reads length-prefixed pickled requests on stdin,
writes one length-prefixed pickled reply per request on (the original) stdout:

  ("grade", response, answer, options) -> (status, extracted, canonical)
                                 options: grade_one's keyword arguments
  ("canonical", text)         -> canonical string
  first message, unprompted   -> ("ready",)

Each request runs under `soft_time_limit(SOFT_TIMEOUT_S)`, which turns slow
Python-level sympy work into a "timeout" grade without losing the process; the
parent's hard timeout (kill) covers long C calls the soft one cannot stop.
"""
import ctypes
import os
import resource
import signal
import sys
import time

from mars.rewards import answers, grader, guards
from mars.rewards.extract import extract_boxed
from mars.rewards.ipc import read_frame, write_frame


def _die_with_parent() -> None:
  """Linux: SIGKILL this worker when the parent dies (no orphans stuck in sympy).

  The kernel ties this to the parent *thread* that started the worker; if that
  thread exits first the worker dies too, and the pool replaces it on next use.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


# Test-only responses that simulate what no real input reliably triggers now
# that the grader guards against known blow-ups: a hang inside one C call (the
# soft timer cannot fire) and a hard crash. Active only with this variable set.
TEST_HOOKS_ENV = "MARS_GRADER_TEST_HOOKS"
TEST_HANG = "\x00mars-test-hang\x00"
TEST_CRASH = "\x00mars-test-crash\x00"


def _test_hook(response) -> None:
  if not isinstance(response, str) or os.environ.get(TEST_HOOKS_ENV) != "1":
    return
  if response.startswith(TEST_HANG):
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(3600)
  elif response.startswith(TEST_CRASH):
    os._exit(3)


def _handle(message, soft_timeout_s: float):
  kind = message[0]
  try:
    with guards.soft_time_limit(soft_timeout_s):
      if kind == "grade":
        _test_hook(message[1])
        g = grader.grade_one(message[1], message[2], **message[3])
        return (g.status, g.extracted, g.canonical)
      if kind == "canonical":
        return answers.canonical_answer(message[1], timeout_s=None)
  except guards.SoftTimeout:  # fired between grade_one's return and disarming.
    pass
  if kind == "grade":  # the last box, as for an item the pool had to kill
    response = message[1]
    if isinstance(response, bytes):
      response = response.decode("utf-8", "replace")
    return ("timeout", extract_boxed(str(response)), None)
  return "".join(str(message[1]).split())


# One of each common answer shape: the first parse of a new shape costs the
# antlr parser ~0.3 s of cache building, which should not count against an item.
_WARMUP_ANSWERS = (
    "\\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)", "[-2, 7)",
    "(-\\infty, 2] \\cup (3, \\infty)", "\\{1, 2\\}", "x \\in [1, 2]",
    "y = -2x + 1", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "2\\sqrt{3} + 1",
    "50\\%", "30^\\circ", "10 \\text{ cm}", "\\text{(C)}", "x^2 + 2x + 1")


def main(argv) -> None:
  soft_timeout_s, memory_limit_mb = float(argv[1]), int(argv[2])
  _die_with_parent()
  if len(argv) > 3 and os.getppid() != int(argv[3]):
    return  # the parent died before prctl took effect.
  # Ctrl-C reaches the whole process group; the parent shuts workers down.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if memory_limit_mb > 0:
    # A runaway sympy computation then fails with MemoryError (graded "wrong")
    # instead of taking the host's memory.
    limit = memory_limit_mb * 2**20
    try:
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
      pass
  # Requests come on stdin, replies go to a private copy of stdout; fd 1 then
  # points at stderr so that stray prints can never corrupt a reply frame.
  requests = os.fdopen(os.dup(0), "rb", buffering=0)
  replies = os.fdopen(os.dup(1), "wb", buffering=0)
  os.dup2(2, 1)
  for answer in _WARMUP_ANSWERS:  # fill the parser's caches before the clock runs.
    grader.grade_one("\\boxed{" + answer + "}", "0.5")
  write_frame(replies, ("ready",))
  while (message := read_frame(requests)) is not None:
    write_frame(replies, _handle(message, soft_timeout_s))


if __name__ == "__main__":
  main(sys.argv)
