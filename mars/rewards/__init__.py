"""Math answer rewards: extraction, math-verify grading, a worker-process pool.

  extract_boxed(text)            last complete \\boxed{}/\\fbox{} content, or None
  grade_one(response, answer)    in-process Grade (what the workers run)
  canonical_answer(text)         de-duplication key (0.5 == \\frac12 == 1/2)
  GraderPool(...).grade_batch    hard per-answer timeouts, never hangs
  grade_batch(responses, answers, pool=None)
"""
from mars.rewards.extract import extract_boxed
from mars.rewards.grader import (MAX_PARSE_CHARS, STATUSES, Grade, SoftTimeout,
                                 canonical_answer, gold_text, grade_one,
                                 soft_time_limit)
from mars.rewards.pool import GraderPool, default_pool, grade_batch

__all__ = [
    "MAX_PARSE_CHARS", "STATUSES", "Grade", "GraderPool", "SoftTimeout",
    "canonical_answer", "default_pool", "extract_boxed", "gold_text",
    "grade_batch", "grade_one", "soft_time_limit",
]
