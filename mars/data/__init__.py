"""Math datasets (TFDS array_record builders) and the resumable prompt pipeline.

  load_source(name, split=None, data_dir=None)  random access to normalized rows
      {id, problem, answer, source, level, subject}
  PromptPipeline(source, batch_size, seed)      seeded epochs, get/set_state
  DATASETS, TRAIN_DATASETS, EVAL_BENCHMARKS     valid names
"""
from mars.data.builder import DATA_DIR_ENV, TFDS_DIR_ENV, default_tfds_dir
from mars.data.pipeline import (BUILDERS, DATASETS, EVAL_BENCHMARKS, TRAIN_DATASETS,
                                DecodedSource, PromptPipeline, get_builder,
                                load_source)
from mars.data.rows import MalformedRowError

__all__ = [
    "BUILDERS", "DATASETS", "DATA_DIR_ENV", "EVAL_BENCHMARKS", "TFDS_DIR_ENV",
    "TRAIN_DATASETS", "DecodedSource", "MalformedRowError", "PromptPipeline",
    "default_tfds_dir", "get_builder", "load_source",
]
