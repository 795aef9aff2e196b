"""The TFDS builder every math data set derives from (no TensorFlow): one row schema,
raw files found locally or downloaded, malformed rows named by file and line.

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
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from mars.data.rows import BadRow, MalformedRowError, read_rows

DATA_DIR_ENV = "MARS_DATA_DIR"
TFDS_DIR_ENV = "MARS_TFDS_DIR"


def default_tfds_dir() -> str:
  return os.environ.get(TFDS_DIR_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "mars", "tfds")


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
    """Raw row -> {id, problem, answer, [level, subject]}; raises BadRow.

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
        if isinstance(row, BadRow):
          raise row
        if not isinstance(row, dict):
          raise BadRow(f"expected a JSON object, got {type(row).__name__}")
        example = self.normalize(row, split, number)
      except BadRow as e:
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
