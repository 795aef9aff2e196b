"""The grader pool never hangs and never raises, whatever the model wrote."""
import os
import time

import math_verify
import pytest

from mars import rewards
import adversarial_inputs as adversarial  # tests/adversarial_inputs.py (a fixture, not library)
from mars.rewards import worker as worker_lib

TIMEOUT_S = 1.0
# A reply can come a little after the deadline: select() wake-up and the kill.
SLACK_S = 0.5


@pytest.fixture(scope="module")
def pool():
  with rewards.GraderPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
    p.grade_batch(["\\boxed{1}"], ["1"])  # wait until the workers are up
    yield p


def test_adversarial_set_finishes_within_bounds(pool):
  cases = adversarial.adversarial_cases(n=240)
  assert len(cases) >= 200
  assert sum(len(response) for response, _ in cases) > 1_000_000  # some are ~100 kB
  start = time.monotonic()
  grades = pool.grade_batch([r for r, _ in cases], [a for _, a in cases])
  elapsed = time.monotonic() - start
  assert len(grades) == len(cases)
  assert all(isinstance(g, rewards.Grade) and g.status in rewards.STATUSES for g in grades)
  assert max(pool.last_latencies_s) <= TIMEOUT_S + SLACK_S
  # Two workers, each item bounded by the timeout.
  assert elapsed <= len(cases) * TIMEOUT_S / 2 + 5.0
  # Only the many-boxes family ("\boxed{1} \boxed{1} ... \boxed{k}") can hold a
  # right answer: its joined boxes ("1,2") against "\{1,2\}", say. Whatever is
  # graded correct, plain math-verify must accept too.
  correct = [(response, gold, g) for (response, gold), g in zip(cases, grades) if g.correct]
  for response, gold, g in correct:
    assert g.extracted == rewards.read_answer(response)[0]
    assert math_verify.verify(math_verify.parse("$" + rewards.gold_text(gold) + "$"),
                              math_verify.parse("\\boxed{" + g.extracted + "}")), (gold, g)


def test_named_nasty_inputs(pool):
  nasty = {
      "tower": "\\boxed{9^{9^{9^{9}}}}",
      "frac_100kb": "\\boxed{" + "\\frac{" * 17000 + "1" + "}{2}" * 17000 + "}",
      "frac_unclosed_100kb": "\\boxed{" + "\\frac{" * 17000,
      "unbalanced": "\\boxed{{{{}",
      "nul": "\x00\\boxed{3\x00}\x00",
      "empty_box": "\\boxed{}",
      "no_box": "I give up.",
      "lone_surrogate": "\\boxed{\ud800}",
      "huge_int": "\\boxed{" + "9" * 20000 + "}",
  }
  grades = dict(zip(nasty, pool.grade_batch(list(nasty.values()), ["3"] * len(nasty))))
  assert max(pool.last_latencies_s) <= TIMEOUT_S + SLACK_S
  assert grades["tower"].status in ("wrong", "timeout")
  assert grades["frac_100kb"].status == "wrong"
  assert grades["frac_unclosed_100kb"].status == "no_answer"
  assert grades["unbalanced"].status == "no_answer"
  assert grades["nul"].status == "wrong"
  assert grades["empty_box"] == rewards.Grade("wrong", "", "")
  assert grades["no_box"].status == "no_answer"
  assert grades["lone_surrogate"].status == "wrong"
  assert grades["huge_int"].status == "wrong"


def test_in_process_grading_never_raises():
  for response, gold in adversarial.adversarial_cases(n=48, seed=1):
    with rewards.soft_time_limit(TIMEOUT_S):
      g = rewards.grade_one(response, gold)
    assert g.status in rewards.STATUSES


@pytest.fixture(scope="module")
def hook_pool():
  """A pool whose workers (and their replacements) honour the test hooks."""
  previous = os.environ.get(worker_lib.TEST_HOOKS_ENV)
  os.environ[worker_lib.TEST_HOOKS_ENV] = "1"
  try:
    with rewards.GraderPool(num_workers=2, timeout_s=TIMEOUT_S, max_tasks_per_worker=5) as p:
      p.grade_batch(["\\boxed{1}"], ["1"])  # wait until the workers are up
      yield p
  finally:
    if previous is None:
      del os.environ[worker_lib.TEST_HOOKS_ENV]
    else:
      os.environ[worker_lib.TEST_HOOKS_ENV] = previous


def test_hung_worker_is_killed_and_replaced(hook_pool):
  # A hang inside one C call (SIGALRM blocked): only the hard kill can end it.
  responses = ["\\boxed{1}", worker_lib.TEST_HANG + "so \\boxed{7}", "\\boxed{2}"]
  killed_before = hook_pool.num_killed
  start = time.monotonic()
  grades = hook_pool.grade_batch(responses, ["1", "7", "2"])
  assert time.monotonic() - start < TIMEOUT_S + 5.0
  # The timed-out item still reports its boxed answer (the parent extracts it).
  assert grades == [rewards.Grade("correct", "1", "1"), rewards.Grade("timeout", "7", None),
                    rewards.Grade("correct", "2", "2")]
  assert hook_pool.num_killed == killed_before + 1
  assert hook_pool.last_latencies_s[1] <= TIMEOUT_S + SLACK_S
  assert hook_pool.grade_batch(["\\boxed{\\frac12}"] * 6, ["0.5"] * 6) == [
      rewards.Grade("correct", "\\frac{1}{2}", "1/2")] * 6  # math-verify's normalized text


def test_crashed_worker_gives_error_and_pool_recovers(hook_pool):
  grades = hook_pool.grade_batch([worker_lib.TEST_CRASH, "\\boxed{1}"], ["1", "1"])
  assert [g.status for g in grades] == ["error", "correct"]
  assert hook_pool.grade_batch(["\\boxed{3}"], ["3"])[0].correct


def test_workers_are_recycled(hook_pool):
  recycled_before = hook_pool.num_recycled
  grades = hook_pool.grade_batch([f"\\boxed{{{i}}}" for i in range(20)],
                                 [str(i) for i in range(20)])
  assert all(g.correct for g in grades)
  assert hook_pool.num_recycled - recycled_before >= 2  # 20 tasks, 5 per worker


def test_module_level_grade_batch_and_close():
  grades = rewards.grade_batch(["\\boxed{0.5}", "nothing"], ["\\frac{1}{2}", "1"])
  assert [g.status for g in grades] == ["correct", "no_answer"]
  pool = rewards.GraderPool(num_workers=1)
  pool.close()
  with pytest.raises(RuntimeError):
    pool.grade_batch(["\\boxed{1}"], ["1"])
  with pytest.raises(ValueError):
    rewards.grade_batch(["a"], [])
