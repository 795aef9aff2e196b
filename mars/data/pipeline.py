"""Loading prepared datasets and the seeded, resumable prompt pipeline."""
from collections.abc import Sequence
import logging

import numpy as np

from mars.data import benchmarks, train_sets
from mars.data.builder import MathBuilder

TRAIN_DATASETS = ("simplerl_math_l3to5", "math", "gsm8k")
EVAL_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math",
                   "olympiadbench", "gsm8k")
BUILDERS = {cls.name: cls for cls in (
    train_sets.SimplerlMathL3to5, train_sets.Math, train_sets.Gsm8k, benchmarks.Math500,
    benchmarks.Aime24, benchmarks.Aime25, benchmarks.Amc23, benchmarks.MinervaMath,
    benchmarks.OlympiadBench)}
DATASETS = tuple(BUILDERS)


class DecodedSource(Sequence):
  """Random access to normalized rows as plain Python (str, int, list[str])."""

  def __init__(self, source, name: str = ""):
    self._source = source
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows")
    return {key: _decode(value) for key, value in self._source[index].items()}

  def __repr__(self) -> str:
    return f"DecodedSource({self.name!r}, {len(self)} rows)"


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_decode(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_decode(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def get_builder(name: str, data_dir: str | None = None, **kwargs) -> MathBuilder:
  """Builder for `name` or `name/config` (e.g. "math/level3to5")."""
  base, _, config = name.partition("/")
  if base not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}"
                     " (math also takes a config: math/<"
                     + "|".join(c.name for c in train_sets.Math.BUILDER_CONFIGS) + ">)")
  cls = BUILDERS[base]
  if config:
    valid = [c.name for c in cls.BUILDER_CONFIGS]
    if config not in valid:
      raise ValueError(f"unknown config {config!r} for {base}; valid: {valid}")
    kwargs["config"] = config
  return cls(data_dir=data_dir, **kwargs)


def load_source(name: str, split: str | None = None, data_dir: str | None = None, *,
                manual_dir: str | None = None, skip_malformed: bool = False) -> DecodedSource:
  """A random-access source of normalized rows, preparing the data on first use.

  Args:
    name: one of DATASETS, optionally with a config ("math/level3to5").
    split: defaults to the builder's DEFAULT_SPLIT: "test" for eval benchmarks
      (gsm8k included), "train" for training-only sets.
    data_dir: prepared-TFDS cache (default $MARS_TFDS_DIR or ~/.cache/mars/tfds).
    manual_dir: raw files (default $MARS_DATA_DIR, else download).
    skip_malformed: skip (and log) malformed raw rows instead of raising.

  Preparation runs once per (name, config, version) under `data_dir`; later
  calls read the cache whatever `manual_dir` / `skip_malformed` say, so point
  experiments with other raw files at another `data_dir`.
  """
  builder = get_builder(name, data_dir, manual_dir=manual_dir,
                        skip_malformed=skip_malformed)
  split = split or builder.DEFAULT_SPLIT
  if split not in builder.SPLITS:
    raise ValueError(f"{name} has no split {split!r}; splits: {list(builder.SPLITS)}")
  builder.download_and_prepare()
  return DecodedSource(builder.as_data_source(split=split), name=f"{name}:{split}")


class PromptPipeline:
  """Shuffled, seeded, epoch-aware batches of rows, resumable exactly.

  Epoch e visits rows in the order `default_rng((seed, e)).permutation(n)`, so
  the order depends only on (seed, epoch) and the state is just (epoch, index):
  `get_state()` after k batches, restored with `set_state` into a new pipeline,
  yields exactly the batches k+1, k+2, ... of the original.

  With drop_remainder (training), an epoch yields n // batch_size full batches
  and the leftover rows are skipped that epoch (they come up in other epochs,
  since each epoch has its own permutation). Without it (evaluation), the last
  batch of an epoch is short.

  Multi-host: `batch_size` is the global batch. Process p of P gets rows
  [p * B/P, (p+1) * B/P) of every global batch, so processes see disjoint rows
  and together exactly the global batch (a short last batch is split with
  np.array_split, so a process may get fewer rows, or none).
  """

  def __init__(self, source, batch_size: int, seed: int, drop_remainder: bool = True,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} is not divisible by "
                       f"process_count {process_count}")
    if len(source) == 0 or (drop_remainder and len(source) < batch_size):
      raise ValueError(f"{len(source)} rows cannot fill a batch of {batch_size}")
    self.source = source
    self.batch_size = batch_size
    self.seed = int(seed)
    self.drop_remainder = drop_remainder
    self.shuffle = shuffle
    self.process_index, self.process_count = process_index, process_count
    self.epoch = 0
    self.index = 0  # next position in this epoch's order
    self._order_epoch, self._order = None, None

  @property
  def num_examples(self) -> int:
    return len(self.source)

  def order(self, epoch: int) -> np.ndarray:
    """Row indices in the order epoch `epoch` visits them."""
    if self._order_epoch != epoch:
      n = self.num_examples
      self._order = (np.random.default_rng((self.seed, epoch)).permutation(n)
                     if self.shuffle else np.arange(n))
      self._order_epoch = epoch
    return self._order

  def _next_global_indices(self) -> np.ndarray:
    remaining = self.num_examples - self.index
    if remaining <= 0 or (self.drop_remainder and remaining < self.batch_size):
      self.epoch, self.index = self.epoch + 1, 0
    start = self.index
    indices = self.order(self.epoch)[start:start + self.batch_size]
    self.index = start + len(indices)
    return indices

  def next_batch(self) -> list[dict]:
    """This process's rows of the next global batch."""
    indices = self._next_global_indices()
    if len(indices) == self.batch_size:
      per_process = self.batch_size // self.process_count
      mine = indices[self.process_index * per_process:(self.process_index + 1) * per_process]
    else:
      mine = np.array_split(indices, self.process_count)[self.process_index]
    return [self.source[int(i)] for i in mine]

  def __iter__(self):
    while True:
      yield self.next_batch()

  def get_state(self) -> dict:
    """Small JSON-serialisable position; store it with the checkpoint."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "num_examples": self.num_examples, "batch_size": self.batch_size}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "num_examples"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(f"pipeline state has {key}={state[key]} but this "
                         f"pipeline has {getattr(self, key)}: not the same data order")
    if state.get("batch_size", self.batch_size) != self.batch_size:
      # Same row order, different chunking: fine, but not the same batches.
      logging.warning("resuming with batch_size %d (was %d)", self.batch_size,
                      state["batch_size"])
    if not 0 <= state["index"] <= self.num_examples:
      raise ValueError(f"state index {state['index']} out of range")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    logging.info("PromptPipeline resumed at epoch %d, index %d", self.epoch, self.index)
