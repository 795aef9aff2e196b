"""TFDS builders of the training sets: SimpleRL's MATH levels 3-5, Hendrycks MATH (whole
or by level) and GSM8K (whose test split is also an eval benchmark)."""
import dataclasses
import os

import tensorflow_datasets as tfds

from mars.data.builder import MathBuilder
from mars.data.rows import BadRow, boxed_answer, level_number, text_field

_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"


class SimplerlMathL3to5(MathBuilder, skip_registration=True):
  """MATH levels 3-5 (8,523 problems) used by SimpleRL-Zoo and the multi-attempt paper.

  Two upstream rows (lines 5055 and 5159, multiple-choice problems) have an
  empty answer. They are kept, so the set matches the paper's 8,523, and can
  never be graded correct (the grader never accepts an empty ground truth).
  A row with no answer field at all is malformed.
  """

  name = "simplerl_math_l3to5"
  DEFAULT_SPLIT = "train"
  SPLITS = {"train": (
      "train/simplerl_math_l3to5/train.jsonl",
      "https://raw.githubusercontent.com/hkust-nlp/simpleRL-reason/v0/train/data/"
      "math_level3to5_data_processed_with_qwen_prompt.json")}

  def normalize(self, row, split, number):
    example = {"problem": text_field(row, "problem", "question"),
               "answer": text_field(row, "answer", "gt_answer", allow_empty=True)}
    if row.get("level") is not None:
      example["level"] = level_number(row["level"])
    return example


@dataclasses.dataclass(eq=False)
class MathConfig(tfds.core.BuilderConfig):
  """MATH train filtered to levels [min_level, max_level] ("Level ?" only in `all`)."""

  min_level: int = 0
  max_level: int = 5


class Math(MathBuilder, skip_registration=True):
  """Hendrycks MATH train (7,500); answer = last \\boxed{} of the solution.

  Two upstream solutions (lines 5342 and 5344) end in an empty `\\boxed{}`; like
  SimpleRL's empty answers they are kept (7,500 rows) and never graded correct.
  """

  name = "math"
  DEFAULT_SPLIT = "train"
  BUILDER_CONFIGS = [
      MathConfig(name="all", description="All 7,500 problems."),
      MathConfig(name="level3to5", min_level=3, max_level=5),
      *[MathConfig(name=f"level{k}", min_level=k, max_level=k) for k in range(1, 6)],
  ]
  SPLITS = {"train": ("train/math/train.jsonl",
                      "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar")}

  def _download(self, dl_manager, url):
    # The tarball holds MATH/{train,test}/<subject>/<n>.json.
    return os.path.join(os.fspath(dl_manager.download_and_extract(url)), "MATH", "train")

  def normalize(self, row, split, number):
    return {"problem": text_field(row, "problem"),
            "answer": boxed_answer(text_field(row, "solution"), allow_empty=True),
            "level": level_number(row.get("level")),
            "subject": str(row.get("type") or "")}

  def keep(self, example):
    if self.builder_config.name == "all":
      return True
    return self.builder_config.min_level <= example["level"] <= self.builder_config.max_level


class Gsm8k(MathBuilder, skip_registration=True):
  """GSM8K train (7,473) and test (1,319); answer = text after '#### '."""

  name = "gsm8k"
  DEFAULT_SPLIT = "test"  # it is one of the eval benchmarks
  SPLITS = {"train": ("train/gsm8k/train.jsonl", f"{_GSM8K}/train.jsonl"),
            "test": ("eval/gsm8k/test.jsonl", f"{_GSM8K}/test.jsonl")}

  def normalize(self, row, split, number):
    solution = text_field(row, "answer")
    if "####" not in solution:
      raise BadRow("no '####' final answer in 'answer'")
    # Thousands separators: "1,000" must not read as the set {1, 0}.
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
      raise BadRow("empty answer after '####'")
    return {"problem": text_field(row, "question"), "answer": answer}
