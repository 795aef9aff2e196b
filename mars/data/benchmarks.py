"""TFDS builders of the eval benchmarks: MATH-500, AIME 24/25, AMC 23 (Qwen2.5-Math's
copies), Minerva math and OlympiadBench."""
import ast

from mars.data.builder import MathBuilder
from mars.data.rows import BadRow, boxed_answer, level_number, text_field

_QWEN_EVAL = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data"


class Math500(MathBuilder, skip_registration=True):
  """MATH-500 (PRM800K split of the MATH test set)."""

  name = "math500"
  SPLITS = {"test": (
      "eval/math500/test.jsonl",
      "https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/test.jsonl")}

  def normalize(self, row, split, number):
    return {"id": f"{self.name}/{text_field(row, 'unique_id')}",
            "problem": text_field(row, "problem"),
            "answer": text_field(row, "answer"), "level": level_number(row.get("level")),
            "subject": str(row.get("subject") or "")}


class _QwenEval(MathBuilder, skip_registration=True):
  """A benchmark from Qwen2.5-Math's evaluation data (problem / answer / id)."""

  def normalize(self, row, split, number):
    example = {"problem": text_field(row, "problem", "question"),
               "answer": text_field(row, "answer")}
    if row.get("id") is not None:
      example["id"] = f"{self.name}/{row['id']}"
    return example


class Aime24(_QwenEval, skip_registration=True):
  """AIME 2024 (30)."""
  name = "aime24"
  SPLITS = {"test": ("eval/aime24/test.jsonl", f"{_QWEN_EVAL}/aime24/test.jsonl")}


class Aime25(_QwenEval, skip_registration=True):
  """AIME 2025 (30)."""
  name = "aime25"
  SPLITS = {"test": (
      "eval/aime25/test.jsonl",
      "https://raw.githubusercontent.com/ZubinGou/math-evaluation-harness/main/data/aime25/test.jsonl")}


class Amc23(_QwenEval, skip_registration=True):
  """AMC 2023 (40); answers stored as floats ("27.0") become "27"."""
  name = "amc23"
  SPLITS = {"test": ("eval/amc23/test.jsonl", f"{_QWEN_EVAL}/amc23/test.jsonl")}


class MinervaMath(MathBuilder, skip_registration=True):
  """Minerva's OCW problems (272); answer = last \\boxed{} of the solution."""

  name = "minerva_math"
  SPLITS = {"test": ("eval/minerva_math/test.jsonl", f"{_QWEN_EVAL}/minerva_math/test.jsonl")}

  def normalize(self, row, split, number):
    example = {"problem": text_field(row, "problem"),
               "answer": boxed_answer(text_field(row, "solution")),
               "subject": str(row.get("type") or "")}
    if row.get("idx") is not None:
      example["id"] = f"{self.name}/{row['idx']}"
    return example


class OlympiadBench(MathBuilder, skip_registration=True):
  """OlympiadBench English text-only math (675); answer = the `final_answer` list."""

  name = "olympiadbench"
  MULTI_ANSWER = True
  SPLITS = {"test": ("eval/olympiadbench/test.jsonl",
                     f"{_QWEN_EVAL}/olympiadbench/test.jsonl")}

  def normalize(self, row, split, number):
    answers = row.get("final_answer")
    if isinstance(answers, str):  # some copies store the list as its repr.
      try:
        answers = ast.literal_eval(answers)
      except (ValueError, SyntaxError):
        answers = [answers]
    if not isinstance(answers, (list, tuple)):
      answers = [] if answers is None else [answers]
    answers = [str(a).strip() for a in answers if str(a).strip()]
    if not answers:
      raise BadRow("missing field 'final_answer'")
    problem = text_field(row, "question", "problem")
    if row.get("context"):
      problem = f"{str(row['context']).strip()}\n\n{problem}"
    example = {"problem": problem, "answer": answers,
               "subject": str(row.get("subfield") or "")}
    if row.get("id") is not None:
      example["id"] = f"{self.name}/{row['id']}"
    return example
