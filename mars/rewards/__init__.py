"""Math answer rewards: extraction, math-verify grading, a worker-process pool.

  extract_boxed(text)            last complete \\boxed{}/\\fbox{} content, or None
  read_answer(response, boxes)   (text, parse) the grader reads; (None, []): no box
  grade_one(response, answer)    in-process Grade (what the workers run)
  canonical_answer(text)         de-duplication key (0.5 == \\frac12 == 1/2)
  GraderPool(...).grade_batch    hard per-answer timeouts, never hangs
  grade_batch(responses, answers, pool=None)

`boxes` picks the box(es) that hold the answer: "math_verify" (default,
math-verify's reading: `\\boxed{1}, \\boxed{2}` is {1, 2}) or "last".
"""
from mars.rewards.extract import extract_boxed, extract_boxes
from mars.rewards.answers import canonical_answer, gold_text, read_answer
from mars.rewards.grader import BOXES, STATUSES, Grade, grade_one
from mars.rewards.guards import MAX_PARSE_CHARS, SoftTimeout, soft_time_limit
from mars.rewards.pool import GraderPool, default_pool, grade_batch

__all__ = [
    "BOXES", "MAX_PARSE_CHARS", "STATUSES", "Grade", "GraderPool", "SoftTimeout",
    "canonical_answer", "default_pool", "extract_boxed", "extract_boxes", "gold_text",
    "grade_batch", "grade_one", "read_answer", "soft_time_limit",
]
