"""The demo's synthetic task, tokenizer, model config and format-only examples."""
import collections
import os
import re

import numpy as np
import pytest

from mars import demo, prompts
from mars.data import PromptPipeline
from mars.episodes import lte
from mars.rewards.extract import extract_boxed
from mars.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return demo.build_tokenizer(str(tmp_path_factory.mktemp("demo") / "tokenizer"))


def test_task_is_deterministic_random_access():
  task = demo.CandidateTask(k=3, num_problems=1000, seed=7)
  again = demo.CandidateTask(k=3, num_problems=1000, seed=7)
  assert len(task) == 1000
  assert [task[i] for i in (0, 5, 999)] == [again[i] for i in (999, 5, 0)][::-1]
  assert task[-1] == task[999] and task[2:4] == [task[2], task[3]]
  assert task[3] != demo.CandidateTask(k=3, num_problems=1000, seed=8)[3]
  with pytest.raises(IndexError):
    task[1000]
  row = task[3]
  assert row["id"] == "candidates/7/3" and row["source"] == "candidates"
  assert row["problem"].startswith("Candidates: ") and len(row["problem"]) < 50


def test_answer_is_a_candidate_at_a_uniform_position():
  task = demo.CandidateTask(k=3, num_problems=3000, seed=0, value_range=(10, 40))
  positions = collections.Counter()
  for row in task:
    candidates = demo.candidates_of(row["problem"])
    assert len(set(candidates)) == 3 and all(10 <= c < 40 for c in candidates)
    positions[candidates.index(int(row["answer"]))] += 1
  counts = np.array([positions[i] for i in range(3)])
  chi2 = ((counts - 1000) ** 2 / 1000).sum()
  assert chi2 < 13.8, counts  # p = 0.001 for 2 degrees of freedom


def test_first_rule_keeps_the_candidates_and_answers_the_first():
  hidden = demo.CandidateTask(k=8, num_problems=200, seed=3)
  first = demo.CandidateTask(k=8, num_problems=200, seed=3, rule="first")
  for a, b in zip(hidden, first):
    assert a["problem"] == b["problem"]
    assert b["answer"] == str(demo.candidates_of(b["problem"])[0])
  assert sum(a["answer"] != b["answer"] for a, b in zip(hidden, first)) > 150  # 7/8 expected


def test_task_feeds_the_prompt_pipeline():
  pipeline = PromptPipeline(demo.CandidateTask(num_problems=50), batch_size=8, seed=0)
  batch = pipeline.next_batch()
  assert len(batch) == 8 and all(set(r) == {"id", "problem", "answer", "source"} for r in batch)


def test_bad_task_arguments():
  with pytest.raises(ValueError, match="fewer than k"):
    demo.CandidateTask(k=5, value_range=(0, 4))
  with pytest.raises(ValueError, match="unknown candidates rule 'last'"):
    demo.CandidateTask(rule="last")


def test_tokenizer_round_trips_and_is_small(tokenizer_dir):
  tok = load_tokenizer(tokenizer_dir)
  problem = demo.CandidateTask()[0]["problem"]
  texts = [prompts.single_turn_prompt(problem), prompts.multi_attempt_prompt(problem, 5),
           prompts.feedback_turn(3, close_assistant=True),
           prompts.feedback_turn(1, close_assistant=False),
           demo.answer_text(17) + prompts.IM_END,
           "\\boxed{\\frac{1}{2}} ünïcödé 🙂 \t\n"]
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  assert extract_boxed(tok.decode(tok.encode(demo.answer_text(42)))) == "42"
  for special in demo.SPECIAL_TOKENS:
    assert len(tok.encode(special)) == 1
  vocab = tok.hf.get_vocab()
  assert tok.stop_ids == (vocab["<|endoftext|>"], vocab["<|im_end|>"])
  assert tok.pad_id == vocab["<|endoftext|>"] and tok.im_end_id == vocab["<|im_end|>"]
  assert tok.vocab_size <= 1000
  assert len(tok.encode(prompts.multi_attempt_prompt(problem, 5))) < 100
  # Digits are single tokens; a boxed single digit is one token of its own
  # (demo.BOXED_DIGIT_TOKENS), a longer boxed number is digit tokens.
  vocab = tok.hf.get_vocab()
  assert tok.encode("7") == tok.encode(" 7")[1:] == tok.encode("{17}")[2:3]
  assert tok.encode("\\boxed{7}")[-1] == vocab["{7}"] != vocab["7"]
  assert tok.encode("{17}") == [vocab["{"], vocab["1"], vocab["7"], vocab["}"]]


def test_tokenizer_is_deterministic_and_cached(tokenizer_dir, tmp_path):
  other = demo.build_tokenizer(str(tmp_path / "again"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(tokenizer_dir, name), "rb") as a:
      with open(os.path.join(other, name), "rb") as b:
        assert a.read() == b.read(), name
  stamp = os.stat(os.path.join(tokenizer_dir, "tokenizer.json")).st_mtime_ns
  assert demo.build_tokenizer(tokenizer_dir) == tokenizer_dir
  assert os.stat(os.path.join(tokenizer_dir, "tokenizer.json")).st_mtime_ns == stamp
  with pytest.raises(ValueError, match="other settings"):
    demo.build_tokenizer(tokenizer_dir, vocab_size=300)


def test_tiny_model_config():
  cfg = demo.tiny_model_config(413)
  assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.vocab_size == 413
  assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.num_params() < 500_000


class _FirstIsRight(demo.CandidateTask):
  """The answer is always the first listed candidate: a leak would show."""

  def sample(self, index):
    candidates, _ = super().sample(index)
    return candidates, candidates[0]


def test_format_examples_do_not_leak_the_answer():
  examples = demo.format_examples(_FirstIsRight(), 3000, np.random.default_rng(0))
  right = rejected_again = feedback = 0
  depths = set()
  for prompt, response in examples:
    assert response.startswith("The answer is \\boxed{") and response.endswith(prompts.IM_END)
    assert prompt.endswith("<|im_start|>assistant\n")
    candidates = demo.candidates_of(prompt.split("<|im_start|>user\n")[1])
    chosen = int(extract_boxed(response))
    assert chosen in candidates
    right += chosen == candidates[0]
    if "Your answer is incorrect" in prompt:
      feedback += 1
      rejected = [int(r) for r in re.findall(r"\\boxed\{(\d+)\}", prompt)]
      assert prompt.count("Your answer is incorrect") == len(rejected) >= 1
      assert set(rejected) <= set(candidates[1:])  # feedback only follows a wrong answer
      depths.add(len(rejected))
      rejected_again += chosen == rejected[-1]
  # Binomial(n, 1/3): 4 standard deviations either way.
  assert abs(right / 3000 - 1 / 3) < 4 * np.sqrt(2 / 9 / 3000)
  assert feedback > 300 and depths == {1, 2, 3, 4}  # every depth an episode reaches
  assert abs(rejected_again / feedback - 1 / 3) < 4 * np.sqrt(2 / 9 / feedback)
  assert examples == demo.format_examples(_FirstIsRight(), 3000, 0)


def test_hinted_examples_avoid_listed_answers_and_do_not_leak_the_answer():
  task = demo.CandidateTask(k=8, rule="first", num_problems=1000)
  examples = demo.format_examples(task, 3000, 1, single_turn_fraction=1.0, hint_fraction=1.0)
  right, expected, templates = 0, 0.0, set()
  for prompt, response in examples:
    problem = prompt.split("<|im_start|>user\n")[1].split("\n\n")[0]
    candidates = demo.candidates_of(problem)
    chosen = int(extract_boxed(response))
    listed = [int(a) for a in re.findall(r"\$(\d+)\$", prompt)]
    # Exactly the prompt LTE builds for that group class and hint set.
    codes = (lte.PASS_NONE, lte.OVERLONG_SOME) if listed else (lte.OVERLONG_ALL,)
    assert prompt in {lte.hinted_prompt(problem, c, [str(a) for a in listed]) for c in codes}
    templates.add(("Hint" in prompt, "concisely" in prompt))
    assert len(set(listed)) == len(listed) and chosen in candidates and chosen not in listed
    assert set(listed) <= set(candidates[1:])  # a hint lists wrong answers only
    right += chosen == candidates[0]
    expected += 1 / (len(candidates) - len(listed))  # uniform over the unlisted ones
  assert templates == {(True, False), (True, True), (False, True)}
  # No leak: the right one is picked only as often as any unlisted candidate.
  assert abs(right - expected) < 4 * np.sqrt(expected)
  plain = demo.format_examples(task, 500, 1)
  assert not any("Hint" in p or "Note:" in p for p, _ in plain)  # off by default
