"""TFDS builders for the math training sets and eval benchmarks (no TensorFlow).

Every builder writes `array_record` files (read back with `as_data_source`, no
TensorFlow needed) and normalizes its rows to one schema:

  id: str, problem: str, answer: str (list[str] for olympiadbench),
  source: str, level: int (0 = unknown), subject: str ("" = unknown)

Raw files come from, in order: the builder's `manual_dir` argument, then
$MARS_DATA_DIR (layout as in shared/README.md: eval/<name>/test.jsonl,
train/<name>/train.jsonl), then a download from the public URL. Prepared data
is cached under `data_dir` (default $MARS_TFDS_DIR or ~/.cache/mars/tfds).

A malformed row (bad JSON, missing problem/answer) raises MalformedRowError
naming the file and line; with `skip_malformed=True` it is skipped and the count
is logged. Rows are never dropped silently.

Rows keep their file order (`disable_shuffling`), so index i is line i + 1 and
evaluation order is reproducible; the training pipeline shuffles by itself.
"""
import abc
import ast
import dataclasses
import glob
import json
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from mars.rewards.extract import extract_boxed

DATA_DIR_ENV = "MARS_DATA_DIR"
TFDS_DIR_ENV = "MARS_TFDS_DIR"

_QWEN_EVAL = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data"
_GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"


class MalformedRowError(ValueError):
  """A raw row that cannot be normalized; the message names file and line."""


class _BadRow(Exception):
  """Internal: raised by `normalize`, re-raised with file/line context."""


def default_tfds_dir() -> str:
  return os.environ.get(TFDS_DIR_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "mars", "tfds")


def read_rows(path: str):
  """Yields (line_number, row dict or _BadRow) from a raw file.

  Handles JSON Lines, a JSON array (SimpleRL's original file) and a directory
  of one-JSON-object files (the Hendrycks MATH tarball). Bad JSON is reported
  per row, so the caller decides between raising and skipping.
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True),
                   key=_natural_key)
    for number, name in enumerate(files, start=1):
      with open(name, encoding="utf-8") as f:
        yield number, _loads(f.read())
    return
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      yield e.lineno, _BadRow(f"bad JSON: {e.msg}")
      return
    for number, row in enumerate(rows, start=1):
      yield number, row
    return
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      yield number, _loads(line)


def _loads(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    return _BadRow(f"bad JSON: {e.msg} (column {e.colno})")


def _natural_key(path: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _text(row: dict, *keys: str, allow_empty: bool = False) -> str:
  """The first present, non-empty field among `keys`, as a stripped string.

  allow_empty: accept a field that is present but "" (returned as "").
  """
  empty = None
  for key in keys:
    value = row.get(key)
    if value is None:
      continue
    if isinstance(value, float) and value.is_integer():
      value = int(value)  # AMC stores 27.0
    value = str(value).strip()
    if value:
      return value
    empty = value
  if allow_empty and empty is not None:
    return empty
  raise _BadRow(f"missing field {' / '.join(repr(k) for k in keys)}")


def _level(value) -> int:
  """MATH's "Level 3" (or 3) -> 3; "Level ?" -> 0."""
  match = re.search(r"\d+", str(value or ""))
  return int(match.group()) if match else 0


def _boxed_answer(solution: str, allow_empty: bool = False) -> str:
  """Last box of a reference solution; no box at all is malformed."""
  answer = extract_boxed(solution)
  if answer is None or not (answer.strip() or allow_empty):
    raise _BadRow("no \\boxed{} answer in 'solution'")
  return answer.strip()


class MathBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses set `name`, `SPLITS` and `normalize`.

  SPLITS: {split: (path under the raw data dir, public URL)}.
  """

  # Bump when normalization changes: prepared caches are keyed by version.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SPLITS: dict = {}
  DEFAULT_SPLIT = "test"  # load_source's split when none is given
  MULTI_ANSWER = False  # answer is a list of strings (olympiadbench)

  def __init__(self, *, manual_dir: str | None = None, skip_malformed: bool = False,
               data_dir: str | None = None, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._raw_dir = manual_dir
    self.skip_malformed = skip_malformed
    self.num_skipped = {}  # split -> malformed rows skipped while preparing
    super().__init__(data_dir=data_dir or default_tfds_dir(), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    answer = (tfds.features.Sequence(tfds.features.Text()) if self.MULTI_ANSWER
              else tfds.features.Text())
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "problem": tfds.features.Text(),
            "answer": answer,
            "source": tfds.features.Text(),
            "level": tfds.features.Scalar(dtype=np.int32),
            "subject": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  @abc.abstractmethod
  def normalize(self, row: dict, split: str, number: int) -> dict:
    """Raw row -> {id, problem, answer, [level, subject]}; raises _BadRow.

    Each dataset's builder defines it (its own field names and answer rule).
    """

  def keep(self, example: dict) -> bool:
    """Config filters (e.g. MATH levels); filtered rows are not malformed."""
    del example
    return True

  def _raw_root(self, dl_manager) -> str | None:
    if self._raw_dir:
      return self._raw_dir
    if os.environ.get(DATA_DIR_ENV):
      return os.environ[DATA_DIR_ENV]
    manual = getattr(dl_manager, "_manual_dir", None)
    return str(manual) if manual and os.path.isdir(manual) else None

  def _split_generators(self, dl_manager):
    root = self._raw_root(dl_manager)
    generators = {}
    for split, (relpath, url) in self.SPLITS.items():
      if root:
        path = os.path.join(root, relpath)
        if not os.path.exists(path):
          raise FileNotFoundError(
              f"{self.name}: expected {path} (raw data dir {root}, layout as in "
              "shared/README.md); unset it to download from " + url)
      else:
        path = self._download(dl_manager, url)
      generators[split] = self._generate_examples(path, split)
    return generators

  def _download(self, dl_manager, url: str) -> str:
    return os.fspath(dl_manager.download(url))

  def _generate_examples(self, path: str, split: str):
    skipped = 0
    for number, row in read_rows(path):
      try:
        if isinstance(row, _BadRow):
          raise row
        if not isinstance(row, dict):
          raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
        example = self.normalize(row, split, number)
      except _BadRow as e:
        if not self.skip_malformed:
          raise MalformedRowError(f"{path}:{number}: {self.name}: {e}") from None
        skipped += 1
        continue
      example.setdefault("id", f"{self.name}/{split}/{number}")
      example.setdefault("level", 0)
      example.setdefault("subject", "")
      example["source"] = self.name
      if self.keep(example):
        yield number, example
    self.num_skipped[split] = skipped
    if skipped:
      logging.warning("%s: skipped %d malformed rows in %s", self.name, skipped, path)


# ---- training sets


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
    example = {"problem": _text(row, "problem", "question"),
               "answer": _text(row, "answer", "gt_answer", allow_empty=True)}
    if row.get("level") is not None:
      example["level"] = _level(row["level"])
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
    return {"problem": _text(row, "problem"),
            "answer": _boxed_answer(_text(row, "solution"), allow_empty=True),
            "level": _level(row.get("level")),
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
    solution = _text(row, "answer")
    if "####" not in solution:
      raise _BadRow("no '####' final answer in 'answer'")
    # Thousands separators: "1,000" must not read as the set {1, 0}.
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
      raise _BadRow("empty answer after '####'")
    return {"problem": _text(row, "question"), "answer": answer}


# ---- eval benchmarks


class Math500(MathBuilder, skip_registration=True):
  """MATH-500 (PRM800K split of the MATH test set)."""

  name = "math500"
  SPLITS = {"test": (
      "eval/math500/test.jsonl",
      "https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/test.jsonl")}

  def normalize(self, row, split, number):
    return {"id": f"{self.name}/{_text(row, 'unique_id')}",
            "problem": _text(row, "problem"),
            "answer": _text(row, "answer"), "level": _level(row.get("level")),
            "subject": str(row.get("subject") or "")}


class _QwenEval(MathBuilder, skip_registration=True):
  """A benchmark from Qwen2.5-Math's evaluation data (problem / answer / id)."""

  def normalize(self, row, split, number):
    example = {"problem": _text(row, "problem", "question"),
               "answer": _text(row, "answer")}
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
    example = {"problem": _text(row, "problem"),
               "answer": _boxed_answer(_text(row, "solution")),
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
      raise _BadRow("missing field 'final_answer'")
    problem = _text(row, "question", "problem")
    if row.get("context"):
      problem = f"{str(row['context']).strip()}\n\n{problem}"
    example = {"problem": problem, "answer": answers,
               "subject": str(row.get("subfield") or "")}
    if row.get("id") is not None:
      example["id"] = f"{self.name}/{row['id']}"
    return example


BUILDERS = {cls.name: cls for cls in (
    SimplerlMathL3to5, Math, Gsm8k, Math500, Aime24, Aime25, Amc23,
    MinervaMath, OlympiadBench)}
