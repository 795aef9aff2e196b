"""TFDS builders (row counts, normalization, malformed rows) and the prompt pipeline."""
import json
import logging
import os
import pathlib

import numpy as np
import pytest

from mars import data
from mars.data import rows as rows_lib
from mars.rewards import extract_boxed

SHARED = pathlib.Path(os.environ.get(
    "MARS_SHARED_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))
DATA = pathlib.Path(os.environ.get("MARS_DATA_DIR", SHARED / "data"))

ROW_COUNTS = {
    ("simplerl_math_l3to5", "train"): 8523,
    ("math", "train"): 7500,
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("math500", "test"): 500,
    ("aime24", "test"): 30,
    ("aime25", "test"): 30,
    ("amc23", "test"): 40,
    ("minerva_math", "test"): 272,
    ("olympiadbench", "test"): 675,
}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """Prepared data for this module only: never the user's ~/.cache."""
  if not DATA.exists():
    pytest.fail(f"{DATA} not found; set MARS_DATA_DIR to shared/data")
  return str(tmp_path_factory.mktemp("tfds"))


def load(name, tfds_dir, split=None):
  return data.load_source(name, split, data_dir=tfds_dir, manual_dir=str(DATA))


# ---- real data

@pytest.mark.parametrize("name, split", list(ROW_COUNTS))
def test_row_counts_and_schema(tfds_dir, name, split):
  source = load(name, tfds_dir, split)
  assert len(source) == ROW_COUNTS[(name, split)]
  rows = [source[i] for i in range(len(source))]
  assert len({r["id"] for r in rows}) == len(rows)  # ids are unique
  for row in rows:
    assert set(row) == {"id", "problem", "answer", "source", "level", "subject"}
    assert isinstance(row["problem"], str) and row["problem"].strip()
    assert row["source"] == name
    assert isinstance(row["level"], int) and isinstance(row["subject"], str)
    if name == "olympiadbench":
      assert isinstance(row["answer"], list) and all(isinstance(a, str) and a for a in row["answer"])
    else:
      assert isinstance(row["answer"], str)


def test_empty_upstream_answers_are_kept_and_known(tfds_dir):
  # The paper's sets include these rows, so the counts above need them.
  simplerl = load("simplerl_math_l3to5", tfds_dir)
  assert [i + 1 for i in range(len(simplerl)) if not simplerl[i]["answer"]] == [5055, 5159]
  math = load("math", tfds_dir)
  assert [i + 1 for i in range(len(math)) if not math[i]["answer"]] == [5342, 5344]


def test_normalized_values(tfds_dir):
  assert load("gsm8k", tfds_dir, "train")[0]["answer"] == "72"
  assert all("," not in r["answer"] and "####" not in r["answer"]
             for r in load("gsm8k", tfds_dir, "test"))
  assert load("amc23", tfds_dir)[0]["answer"] == "27"  # stored as 27.0
  first = load("math500", tfds_dir)[0]
  assert first["id"] == "math500/test/precalculus/807.json"
  assert (first["level"], first["subject"]) == (2, "Precalculus")
  assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
  assert load("olympiadbench", tfds_dir)[0]["answer"] == ["2"]
  with open(DATA / "eval/minerva_math/test.jsonl") as f:
    raw = [json.loads(line) for line in f]
  minerva = load("minerva_math", tfds_dir)
  assert [r["answer"] for r in minerva] == [extract_boxed(r["solution"]).strip() for r in raw]
  math = load("math", tfds_dir)
  assert math[888]["answer"] == "2"  # "\boxed 2": the brace-less TeX form
  assert {r["level"] for r in math} == {0, 1, 2, 3, 4, 5}  # 0: "Level ?"


def test_math_level_configs(tfds_dir):
  l3to5 = load("math/level3to5", tfds_dir)
  assert len(l3to5) == 1592 + 1690 + 2304
  assert {r["level"] for r in l3to5} == {3, 4, 5}
  assert len(load("math/level1", tfds_dir)) == 564


def test_default_splits_and_unknown_names(tfds_dir):
  assert len(load("gsm8k", tfds_dir)) == 1319  # eval benchmark: test split
  assert set(data.EVAL_BENCHMARKS) <= set(data.DATASETS)
  assert set(data.TRAIN_DATASETS) <= set(data.DATASETS)
  with pytest.raises(ValueError, match="valid names: .*math500"):
    data.load_source("math501")
  with pytest.raises(ValueError, match="no split"):
    load("math500", tfds_dir, "train")
  with pytest.raises(ValueError, match="unknown config"):
    data.load_source("math/level9")


def test_data_dir_from_environment(tfds_dir, monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA))
  monkeypatch.setenv(data.TFDS_DIR_ENV, str(tmp_path))
  assert data.default_tfds_dir() == str(tmp_path)
  assert len(data.load_source("aime24")) == 30
  assert (tmp_path / "aime24").is_dir()


# ---- malformed and alternative raw files

def write_raw(root, relpath, lines):
  path = root / relpath
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def good(i):
  return json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)})


def test_bad_json_names_file_and_line(tmp_path):
  path = write_raw(tmp_path / "raw", "eval/aime24/test.jsonl", [good(1), good(2), "{not json", good(4)])
  with pytest.raises(data.MalformedRowError, match=f"{path}:3: .*bad JSON"):
    data.load_source("aime24", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "raw"))


def test_missing_answer_names_file_and_line(tmp_path):
  rows = [good(1), json.dumps({"problem": "no answer here"}), good(3)]
  path = write_raw(tmp_path / "raw", "eval/aime24/test.jsonl", rows)
  with pytest.raises(data.MalformedRowError, match=f"{path}:2: .*missing field 'answer'"):
    data.load_source("aime24", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "raw"))


def test_missing_box_and_gsm8k_marker(tmp_path):
  write_raw(tmp_path / "raw", "eval/minerva_math/test.jsonl",
            [json.dumps({"problem": "p", "solution": "it is \\boxed{4}"}),
             json.dumps({"problem": "p", "solution": "it is 4"})])
  with pytest.raises(data.MalformedRowError, match=r"test.jsonl:2: .*no \\boxed"):
    data.load_source("minerva_math", data_dir=str(tmp_path / "t1"), manual_dir=str(tmp_path / "raw"))
  write_raw(tmp_path / "raw", "train/gsm8k/train.jsonl",
            [json.dumps({"question": "q", "answer": "so 4"})])
  write_raw(tmp_path / "raw", "eval/gsm8k/test.jsonl",
            [json.dumps({"question": "q", "answer": "so\n#### 1,000"})])
  with pytest.raises(data.MalformedRowError, match=r"train.jsonl:1: .*####"):
    data.load_source("gsm8k", data_dir=str(tmp_path / "t2"), manual_dir=str(tmp_path / "raw"))


def test_skip_malformed_logs_count(tmp_path, caplog):
  rows = [good(1), "{not json", json.dumps({"answer": "3"}), good(4), "[1, 2]"]
  write_raw(tmp_path / "raw", "eval/aime25/test.jsonl", rows)
  with caplog.at_level(logging.WARNING):
    source = data.load_source("aime25", data_dir=str(tmp_path / "tfds"),
                              manual_dir=str(tmp_path / "raw"), skip_malformed=True)
  assert [r["answer"] for r in source] == ["2", "8"]
  assert [r["id"] for r in source] == ["aime25/test/1", "aime25/test/4"]
  assert "skipped 3 malformed rows" in caplog.text


def test_missing_raw_file_is_reported(tmp_path):
  (tmp_path / "raw").mkdir()
  with pytest.raises(FileNotFoundError, match="eval/amc23/test.jsonl"):
    data.load_source("amc23", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "raw"))


def test_online_formats(tmp_path):
  # SimpleRL's original file is a JSON array with "question"; MATH's tarball is
  # a directory of JSON files. Both are read by the same code as the local files.
  array = [{"question": "q1", "answer": "1", "level": "Level 3"}, {"question": "q2", "answer": "2"}]
  write_raw(tmp_path / "raw", "train/simplerl_math_l3to5/train.jsonl", [json.dumps(array, indent=1)])
  source = data.load_source("simplerl_math_l3to5", data_dir=str(tmp_path / "tfds"),
                            manual_dir=str(tmp_path / "raw"))
  assert [(r["problem"], r["answer"], r["level"]) for r in source] == [("q1", "1", 3), ("q2", "2", 0)]
  for subject, number in [("algebra", 10), ("algebra", 2), ("geometry", 1)]:
    write_raw(tmp_path / "MATH/train", f"{subject}/{number}.json", [json.dumps(
        {"problem": f"{subject} {number}", "level": "Level 1", "type": subject,
         "solution": f"\\boxed{{{number}}}"})])
  rows = [row for _, row in rows_lib.read_rows(str(tmp_path / "MATH/train"))]
  assert [r["problem"] for r in rows] == ["algebra 2", "algebra 10", "geometry 1"]


# ---- pipeline

ROWS = [{"id": str(i), "problem": f"p{i}", "answer": str(i)} for i in range(103)]


def ids(batch):
  return [row["id"] for row in batch]


def take(pipeline, k):
  return [ids(pipeline.next_batch()) for _ in range(k)]


def test_pipeline_is_seeded_and_epoch_aware():
  a = take(data.PromptPipeline(ROWS, batch_size=10, seed=7), 25)
  b = take(data.PromptPipeline(ROWS, batch_size=10, seed=7), 25)
  c = take(data.PromptPipeline(ROWS, batch_size=10, seed=8), 25)
  assert a == b and a != c
  assert all(len(batch) == 10 for batch in a)
  # drop_remainder: 10 full batches per epoch, no row twice within an epoch.
  for epoch in range(2):
    seen = [i for batch in a[10 * epoch:10 * (epoch + 1)] for i in batch]
    assert len(set(seen)) == 100
  assert a[:10] != a[10:20]  # each epoch has its own order


def test_pipeline_without_drop_remainder_visits_everything():
  pipeline = data.PromptPipeline(ROWS, batch_size=10, seed=0, drop_remainder=False)
  epoch = take(pipeline, 11)
  assert [len(b) for b in epoch] == [10] * 10 + [3]
  assert sorted(int(i) for b in epoch for i in b) == list(range(103))
  assert pipeline.epoch == 0 and len(pipeline.next_batch()) == 10 and pipeline.epoch == 1
  unshuffled = data.PromptPipeline(ROWS, batch_size=5, seed=0, shuffle=False)
  assert ids(unshuffled.next_batch()) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("stop_after", [0, 3, 10, 11, 23])
def test_pipeline_resume_is_exact(drop_remainder, stop_after):
  original = data.PromptPipeline(ROWS, batch_size=10, seed=3, drop_remainder=drop_remainder)
  take(original, stop_after)
  state = json.loads(json.dumps(original.get_state()))  # as stored in a checkpoint
  assert set(state) >= {"epoch", "index"}
  resumed = data.PromptPipeline(ROWS, batch_size=10, seed=3, drop_remainder=drop_remainder)
  resumed.set_state(state)
  assert take(resumed, 15) == take(original, 15)


def test_pipeline_state_checks():
  pipeline = data.PromptPipeline(ROWS, batch_size=10, seed=3)
  with pytest.raises(ValueError, match="seed"):
    pipeline.set_state({**pipeline.get_state(), "seed": 4})
  with pytest.raises(ValueError, match="num_examples"):
    data.PromptPipeline(ROWS[:50], batch_size=10, seed=3).set_state(pipeline.get_state())
  with pytest.raises(ValueError):
    data.PromptPipeline(ROWS[:5], batch_size=10, seed=0)
  with pytest.raises(ValueError):
    data.PromptPipeline(ROWS, batch_size=10, seed=0, process_count=3)
  with pytest.raises(ValueError):
    data.PromptPipeline(ROWS, batch_size=10, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_pipeline_process_shards_are_disjoint_slices(drop_remainder):
  full = data.PromptPipeline(ROWS, batch_size=12, seed=5, drop_remainder=drop_remainder)
  shards = [data.PromptPipeline(ROWS, batch_size=12, seed=5, drop_remainder=drop_remainder,
                                process_index=p, process_count=4) for p in range(4)]
  for _ in range(20):
    global_batch = ids(full.next_batch())
    parts = [ids(s.next_batch()) for s in shards]
    assert sum(parts, []) == global_batch
    if len(global_batch) == 12:
      assert all(len(p) == 3 for p in parts)


def test_pipeline_over_real_source(tfds_dir):
  source = load("math500", tfds_dir)
  pipeline = data.PromptPipeline(source, batch_size=64, seed=0)
  batch = pipeline.next_batch()
  order = pipeline.order(0)[:64]
  assert [row["id"] for row in batch] == [source[int(i)]["id"] for i in order]
  assert np.all(np.sort(pipeline.order(1)) == np.arange(500))
