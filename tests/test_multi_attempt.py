"""Multi-attempt episodes: pure rules, scripted token streams, and a tiny model end to end.

Scripted tests drive the real `rollout` with `ScriptedSampler`, which keeps
the engine's column semantics (one shared write column, forced tokens first,
rewind refunds the budget) but replays scripted attempts instead of sampling.
The end-to-end test uses a tiny Qwen2 whose weights make it a bigram model
over a few tokens (" so", "\\", "boxed", "{", "1", "2", "}", <|im_end|>), so it
writes boxes, right and wrong answers and early stops on its own.
"""
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mars.models as mm
from mars import config as mars_config
from mars import prompts
from mars.episodes import attempts as rules
from mars.episodes import multi_attempt as ma
from mars.rewards import Grade, extract_boxed
from mars.sampling import Sampler, SampleOutput
from mars.tokenizer import load_tokenizer


def prompt_columns(batch) -> int:
  """Column where responses start in a packed batch (= its prompt length P)."""
  resp = batch.loss_mask | batch.transparent_mask
  first = np.argmax(resp, axis=1)
  has = resp.any(1)
  return int(first[has].min()) if has.any() else batch.tokens.shape[1]


@pytest.fixture(scope="module")
def tok(shared_dir):
  return load_tokenizer(str(shared_dir / "models" / "qwen2.5-math-1.5b"))


def cfg_with(**kw):
  cfg = mars_config.multi_attempt_config(mars_config.default_config())
  cfg.update(kw)
  return cfg


def stub_grade(calls=None):
  """Correct iff the extracted box equals the answer text; records every call."""
  def grade_fn(responses, answers):
    if calls is not None:
      calls.append(list(responses))
    out = []
    for r, a in zip(responses, answers):
      x = extract_boxed(r)
      out.append(Grade("no_answer") if x is None else Grade("correct" if x == a else "wrong", x))
    return out
  return grade_fn


# ----------------------------------------------------------------------------
# Pure rules.

def _decode_chars(ids):  # ids are code points: one character per token
  return "".join(map(chr, ids))


def _ids(text):
  return [ord(c) for c in text]


def test_find_box_end_smallest_prefix_and_settling():
  ids = _ids("so \\boxed{12} and more")
  assert rules.find_box_end(ids, _decode_chars) == len("so \\boxed{12}")
  assert rules.find_box_end(ids, _decode_chars, scanned=5) == len("so \\boxed{12}")
  assert rules.find_box_end(_ids("\\boxed{12"), _decode_chars) is None  # unclosed
  assert rules.find_box_end(_ids("no box here"), _decode_chars) is None
  # A brace-less box is settled only once the next character can't extend it.
  bare = _ids("\\boxed 42$.")
  assert rules.find_box_end(bare, _decode_chars) == len("\\boxed 42$")
  assert rules.find_box_end(_ids("\\boxed 42"), _decode_chars) is None
  assert rules.has_settled_box("\\boxed{}") and not rules.has_settled_box("\\boxed{")


def _end(reason, answer, closed=False, keep=3):
  return rules.AttemptEnd(reason=reason, keep=keep, text=f"\\boxed{{{answer}}}" if answer else "x",
                          answer=answer, turn_closed=closed)


def test_find_attempt_end_reasons():
  kw = dict(scanned=0, decode=_decode_chars, stop_ids={7}, im_end_id=7)
  boxed = rules.find_attempt_end(_ids("a\\boxed{1}b") + [7], done=True, attempt_end="boxed", **kw)
  assert (boxed.reason, boxed.keep, boxed.answer, boxed.turn_closed) == ("boxed", 10, "1", False)
  eos = rules.find_attempt_end(_ids("a\\boxed{1}b") + [7], done=True, attempt_end="eos", **kw)
  assert (eos.reason, eos.keep, eos.answer, eos.turn_closed) == ("eos", 12, "1", True)
  budget = rules.find_attempt_end(_ids("a\\boxed{1"), done=True, attempt_end="boxed", **kw)
  assert (budget.reason, budget.answer) == ("budget", None)
  assert rules.find_attempt_end(_ids("a\\boxed{1"), done=False, attempt_end="boxed", **kw) is None


def test_decide_branches():
  ep = rules.new_episode(3)
  ep2, act = rules.decide(ep, _end("boxed", "4"), "wrong", budget_left=10)
  assert act == rules.Action("feedback", 2, close_assistant=True) and ep2.attempts_left == 2
  assert act.feedback_text == prompts.feedback_turn(2, close_assistant=True)
  ep3, act = rules.decide(ep2, _end("eos", None, closed=True), "no_answer", budget_left=10)
  assert act == rules.Action("feedback", 1, close_assistant=False)
  ep4, act = rules.decide(ep3, _end("boxed", "3"), "correct", budget_left=10)
  assert act == rules.FINISH
  assert (ep4.status, ep4.success_attempt, ep4.attempts_used) == ("correct", 3, 3)
  assert ep4.answers == ("4", None, "3") and ep4.grades == ("wrong", "no_answer", "correct")
  # Last attempt wrong -> exhausted; the no-answer kind only if nothing was ever boxed.
  last = rules.new_episode(1)
  assert rules.decide(last, _end("boxed", "4"), "wrong",
                      budget_left=9)[0].status == "wrong_exhausted"
  assert rules.decide(last, _end("eos", None), "no_answer",
                      budget_left=9)[0].status == "no_answer_exhausted"
  # An unboxed attempt is no_answer whatever the grader said; budget ends.
  assert rules.decide(ep, _end("eos", None), "correct", budget_left=5)[0].grades == ("no_answer",)
  assert rules.decide(ep, _end("budget", None), "no_answer", budget_left=0)[0].status == "budget"
  assert rules.decide(ep, _end("boxed", "4"), "wrong", budget_left=0)[0].status == "budget"
  assert rules.decide(ep, _end("budget", "3"), "correct", budget_left=0)[0].status == "correct"
  with pytest.raises(ValueError):
    rules.decide(ep4, _end("boxed", "3"), "correct", budget_left=1)


def test_final_box_is_the_complete_last_box():
  assert rules.final_box("\\boxed{1} or \\boxed{2}.") == "2"
  # The last opener is still open: no answer yet, though an earlier box is complete.
  assert rules.final_box("\\boxed{1} or \\boxed{") is None
  assert rules.final_box("\\boxed{1} or \\boxed{\\frac{2}{3}") is None
  assert rules.final_box("\\boxed{1} or \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
  assert rules.final_box("\\boxed{\\{1\\}} x") == "\\{1\\}"  # literal braces open nothing
  assert rules.final_box("\\boxed{1} or \\boxed 4") is None     # may still grow to 42
  assert rules.final_box("\\boxed{1} or \\boxed 4$") == "4"
  assert rules.final_box("no box") is None


def test_find_chunk_end_hand_worked():
  # One character per token, chunks of 4 counted from the attempt's start.
  kw = dict(decode=_decode_chars, chunk_tokens=4, stop_ids={7, 8}, im_end_id=7)
  text = "ab\\boxed{1}cdefgh"  # the box closes at character 11
  end = rules.find_chunk_end(_ids(text), done=False, scanned=0, chunks_left=None, **kw)
  assert (end.reason, end.keep, end.text, end.answer, end.chunks) == (
      "boxed", 12, "ab\\boxed{1}c", "1", 3)  # the rest of the 3rd chunk ("c") is kept
  assert not end.strip_stop and not end.turn_closed
  # Chunk ends already checked (<= scanned) are not checked again.
  later = rules.find_chunk_end(_ids(text), done=False, scanned=12, chunks_left=None, **kw)
  assert (later.keep, later.text) == (16, "ab\\boxed{1}cdefg")
  # Two boxes in one chunk (of 20): the last one is the answer.
  two = rules.find_chunk_end(_ids("\\boxed{1}\\boxed{2}xyz"), done=False, scanned=0,
                             chunks_left=None, **dict(kw, chunk_tokens=20))
  assert (two.keep, two.text, two.answer) == (20, "\\boxed{1}\\boxed{2}xy", "2")
  # Chunks of 18: at 18 the text ends "\boxed{2", the last box still open, so
  # the earlier complete box is no answer yet; at 36 the last box is "22".
  late = rules.find_chunk_end(_ids("a\\boxed{1}\\boxed{22}" + "x" * 20), done=False, scanned=0,
                              chunks_left=None, **dict(kw, chunk_tokens=18))
  assert (late.keep, late.answer, late.chunks) == (36, "22", 2)
  assert rules.find_chunk_end(_ids("ab\\boxed{1"), done=False, scanned=0, chunks_left=None,
                              **kw) is None
  # A stop token inside a chunk ends the attempt; the partial chunk is checked
  # and counted; the stop token is marked for replacement by a feedback turn.
  stop = rules.find_chunk_end(_ids("ab\\boxed{1}") + [7], done=True, scanned=8,
                              chunks_left=None, **kw)
  assert (stop.reason, stop.keep, stop.answer, stop.chunks) == ("boxed", 12, "1", 3)
  assert stop.strip_stop and stop.turn_closed
  eos = rules.find_chunk_end(_ids("abc") + [8], done=True, scanned=0, chunks_left=None, **kw)
  assert (eos.reason, eos.keep, eos.answer, eos.chunks) == ("eos", 4, None, 1)
  assert eos.strip_stop and not eos.turn_closed  # <|endoftext|> is a stop, not <|im_end|>
  # An open last box at the stop is no answer (the reference finds none either).
  # (scanned=16: the chunk ends before it were checked, as the driver would have.)
  open_box = rules.find_chunk_end(_ids("\\boxed{1}\\boxed{") + [7], done=True, scanned=16,
                                  chunks_left=None, **kw)
  assert (open_box.reason, open_box.keep, open_box.answer) == ("eos", 17, None)
  # The chunk cap: 2 chunks left end a box-less attempt at token 8, whatever was sampled.
  cap = rules.find_chunk_end(_ids("abcdefghij"), done=False, scanned=4, chunks_left=2, **kw)
  assert (cap.reason, cap.keep, cap.answer, cap.chunks) == ("budget", 8, None, 2)
  at_cap = rules.find_chunk_end(_ids("ab\\boxed{1}xyz"), done=False, scanned=0, chunks_left=3,
                                **kw)
  assert (at_cap.reason, at_cap.keep) == ("boxed", 12)
  budget = rules.find_chunk_end(_ids("abcdef"), done=True, scanned=4, chunks_left=None, **kw)
  assert (budget.reason, budget.keep) == ("budget", 6)
  # The other modes ignore the chunk settings.
  assert rules.find_attempt_end(_ids(text), done=False, scanned=0, attempt_end="boxed",
                                chunk_tokens=4, chunks_left=1, **{k: kw[k] for k in (
                                    "decode", "stop_ids", "im_end_id")}).keep == 11


def test_decide_strip_stop_closes_the_turn():
  stripped = rules.AttemptEnd("eos", 3, "x", None, turn_closed=True, strip_stop=True, chunks=1)
  ep, act = rules.decide(rules.new_episode(2), stripped, "no_answer", budget_left=10)
  assert act == rules.Action("feedback", 1, close_assistant=True) and ep.chunks == 1
  assert act.feedback_text.startswith("<|im_end|>\n<|im_start|>system\n")


def test_episode_reward_and_discount():
  cfg = cfg_with(attempt_discount=0.5)
  correct = rules.Episode(3, 1, status="correct", success_attempt=3,
                          grades=("wrong", "wrong", "correct"))
  assert rules.episode_reward(correct, cfg) == 0.25
  wrong = rules.Episode(2, 0, status="budget", grades=("no_answer", "timeout"))
  assert rules.episode_reward(wrong, cfg) == -0.5
  never = rules.Episode(2, 0, status="no_answer_exhausted", grades=("no_answer",) * 2)
  assert rules.episode_reward(never, cfg) == -1.0


def test_draw_num_attempts():
  cfg = cfg_with(min_attempts=2, max_attempts=4)
  a = ma.draw_num_attempts(np.random.default_rng(7), 500, cfg)
  assert set(a.tolist()) == {2, 3, 4}
  np.testing.assert_array_equal(a, ma.draw_num_attempts(np.random.default_rng(7), 500, cfg))
  with pytest.raises(ValueError, match="min_attempts"):
    ma.draw_num_attempts(np.random.default_rng(0), 3, cfg_with(min_attempts=3, max_attempts=2))


def test_packed_lengths_buckets_and_prompt_column():
  """T rounds P + R up to 4 buckets per octave; P is the longest prompt, exactly."""
  from mars.episodes import packing
  from mars.tokenizer import bucket_length
  assert [bucket_length(n, per_octave=4) for n in (1, 16, 17, 20, 21, 129, 156, 161, 257)] == \
      [16, 16, 20, 20, 24, 160, 160, 192, 320]
  assert [bucket_length(n) for n in (17, 129, 257)] == [32, 256, 512]  # powers of two
  row = lambda p, r: packing.Row(prompt=np.arange(1, p + 1), response=np.arange(1, r + 1),
                                 is_model=np.ones(r, bool), behaviour_logp=np.zeros(r, np.float32),
                                 reward=1.0, group_id=0)
  batch = packing.pack([row(66, 20), row(40, 90)], pad_id=0)
  assert batch.tokens.shape == (2, 160) and prompt_columns(batch) == 66
  assert batch.attention_mask.sum(1).tolist() == [86, 130]
  np.testing.assert_array_equal(batch.tokens[1, 26:66], np.arange(1, 41))   # left-padded prompt
  np.testing.assert_array_equal(batch.tokens[1, 66:156], np.arange(1, 91))  # response at P


def test_metrics_success_at_k():
  eps = [rules.Episode(3, 1, "correct", 1, grades=("correct",)),
         rules.Episode(3, 1, "correct", 3, grades=("wrong", "wrong", "correct")),
         rules.Episode(3, 0, "wrong_exhausted", 0, grades=("wrong",) * 3),
         rules.Episode(3, 2, "budget", 0, grades=("no_answer",))]
  rows = [types.SimpleNamespace(reward=r, is_model=np.ones(n, bool))
          for r, n in ((1, 4), (1, 8), (-.5, 6), (-1, 10))]
  m = ma.episode_metrics(eps, rows, 4)
  assert [m[f"success@{k}"] for k in range(1, 5)] == [.25, .25, .5, .5]
  assert m["reward/frac_correct"] == .5
  assert m["reward/frac_wrong"] == m["reward/frac_no_answer"] == .25
  assert m["attempts_used/mean"] == 2.0 and m["budget_hit/frac"] == .25
  assert m["tokens_per_episode/mean"] == 7.0 and m["reward/mean"] == 0.125


# ----------------------------------------------------------------------------
# Scripted token streams through the real driver.

class ScriptedSampler:
  """The Sampler contract on the host, replaying scripts[row][attempt] token ids.

  Kept from the engine: one shared write column; done rows write nothing;
  forced tokens go first and reactivate a row; the budget counts sampled
  tokens; rewind drops columns and refunds them. A row whose script is used
  up emits <|im_end|> (a stop). A sampled token's logp is a function of its
  column, so tests can check which logps survive.
  """

  def __init__(self, scripts, tok, queue_len=64):
    self.scripts, self.im_end = scripts, tok.im_end_id
    self.stop_ids, self.pad_id, self.queue_len = tok.stop_ids, tok.pad_id, queue_len

  def start(self, params, tokens, mask, *, key, n=1, max_new_tokens, cache_len, sampling=None):
    B, P = tokens.shape[0] * n, tokens.shape[1]
    z = lambda dt: np.zeros((B, cache_len), dt)
    s = types.SimpleNamespace(
        tokens=np.full((B, cache_len), self.pad_id, np.int32), gen_mask=z(bool),
        forced_mask=z(bool), logp=z(np.float32), valid=z(bool), done=np.zeros(B, bool),
        stopped=np.zeros(B, bool), truncated=np.zeros(B, bool), num_generated=np.zeros(B, int),
        max_new=np.broadcast_to(max_new_tokens, (B,)), queue=[[] for _ in range(B)],
        attempt=[0] * B, pos=[0] * B, cache=types.SimpleNamespace(index=P), prompt_len=P)
    s.tokens[:, :P] = np.repeat(tokens, n, 0)
    s.valid[:, :P] = np.repeat(mask, n, 0)
    return s

  def _sample(self, s, b):
    script = self.scripts[b][s.attempt[b]] if s.attempt[b] < len(self.scripts[b]) else []
    s.pos[b] += 1
    return script[s.pos[b] - 1] if s.pos[b] <= len(script) else self.im_end

  def run(self, params, s, num_steps, sampling=None):
    S = s.tokens.shape[1]
    for _ in range(num_steps):
      col = s.cache.index
      if col >= S:  # out of columns: like the engine, every unfinished row is truncated
        s.truncated |= ~s.done
        s.done[:] = True
      if s.done.all():
        break
      for b in np.flatnonzero(~s.done):
        stop = out_of_budget = False
        if s.queue[b]:
          tok, s.forced_mask[b, col] = s.queue[b].pop(0), True
        else:
          tok, s.gen_mask[b, col], s.logp[b, col] = self._sample(s, b), True, -col / 100
          s.num_generated[b] += 1
          stop = tok in self.stop_ids
          out_of_budget = not stop and s.num_generated[b] >= s.max_new[b]
        truncated = out_of_budget or (not stop and col + 1 >= S)
        s.stopped[b] |= stop
        s.truncated[b] |= truncated  # like the engine, never cleared (force does not reset it)
        s.done[b] |= stop or truncated
        s.tokens[b, col], s.valid[b, col] = tok, True
      s.cache.index += 1
    return s

  def force(self, s, queued):
    for b, ids in queued.items():
      s.queue[b], s.done[b], s.stopped[b] = list(ids), False, False
      s.attempt[b] += 1
      s.pos[b] = 0
    return s

  def rewind(self, s, keep_until):
    for b, col in keep_until.items():
      s.tokens[b, col:] = np.where(s.gen_mask[b, col:] | s.forced_mask[b, col:], self.pad_id,
                                   s.tokens[b, col:])
      for buf in (s.gen_mask, s.forced_mask, s.valid):
        buf[b, col:] = False
      s.logp[b, col:] = 0
      s.num_generated[b] = s.gen_mask[b].sum()
    return s

  def finish(self, s, rows):
    s.done[list(rows)] = True
    return s

  def outputs(self, s):
    prompt_mask = np.zeros_like(s.valid)
    prompt_mask[:, :s.prompt_len] = s.valid[:, :s.prompt_len]
    return SampleOutput(tokens=s.tokens.copy(), prompt_mask=prompt_mask, gen_mask=s.gen_mask.copy(),
                        forced_mask=s.forced_mask.copy(), logp=s.logp.copy(),
                        sampler_logp=s.logp.copy(), lengths=s.num_generated.copy(),
                        truncated=s.truncated.copy(), stopped=s.stopped.copy(),
                        prompt_len=s.prompt_len)


def run_scripted(tok, scripts, *, answers=("3",), n=2, group_size=1, **cfg_kw):
  """scripts[row] = attempts, each a list of text pieces (tokenized piece by piece)."""
  ids = [[sum((tok.encode(p) for p in att), []) for att in row] for row in scripts]
  problems = [{"id": f"q{i}", "problem": f"Problem {i}?", "answer": a}
              for i, a in enumerate(answers)]
  calls = []
  res = ma.rollout(ScriptedSampler(ids, tok), None, tok, problems, key=jax.random.key(0),
                   grade_fn=stub_grade(calls), cfg=cfg_with(**cfg_kw), num_attempts=n,
                   group_size=group_size)
  return res, calls


def feedback(tok, n, closed):
  return ("feedback", tok.encode(prompts.feedback_turn(n, close_assistant=not closed)))


def model(tok, *pieces, stop=False):
  return ("model", sum((tok.encode(p) for p in pieces), []) + ([tok.im_end_id] if stop else []))


def assert_row(tok, res, b, parts, *, prompt_text):
  """Row b's response == parts in order, with exact masks in the packed batch."""
  row, batch = res.rows[b], res.batch
  want = np.array(sum((ids for _, ids in parts), []), np.int32)
  is_model = np.array(sum(([kind == "model"] * len(ids) for kind, ids in parts), []), bool)
  np.testing.assert_array_equal(row.response, want)
  np.testing.assert_array_equal(row.is_model, is_model)
  assert row.prompt.tolist() == tok.encode(prompt_text)
  P, n, T = prompt_columns(batch), len(want), batch.shape[1]
  np.testing.assert_array_equal(batch.tokens[b, P:P + n], want)
  np.testing.assert_array_equal(batch.tokens[b, P - len(row.prompt):P], row.prompt)
  np.testing.assert_array_equal(batch.loss_mask[b], np.r_[np.zeros(P, bool), is_model,
                                                          np.zeros(T - P - n, bool)])
  np.testing.assert_array_equal(batch.transparent_mask[b], np.r_[np.zeros(P, bool), ~is_model,
                                                                 np.zeros(T - P - n, bool)])
  cols = np.arange(T)
  np.testing.assert_array_equal(batch.attention_mask[b],
                                (cols >= P - len(row.prompt)) & (cols < P + n))
  assert (batch.behaviour_logp[b, P:P + n][~is_model] == 0).all()
  assert (batch.behaviour_logp[b, P:P + n][is_model] < 0).all()


def _check(res, b, *, status, reward, success, used, truncated=False):
  m = res.meta[b]
  assert (m["status"], m["reward"], m["success_attempt"], m["attempts_used"]) == (
      status, reward, success, used)
  assert res.batch.reward[b] == reward and res.batch.truncated[b] == truncated


@pytest.mark.parametrize("chunk", [3, 64])
def test_correct_first_try_drops_tail(tok, chunk):
  res, calls = run_scripted(tok, [[["Thus ", "\\boxed{3}", " and more"]]], n=3,
                            chunk_tokens=chunk)
  assert_row(tok, res, 0, [model(tok, "Thus ", "\\boxed{3}")],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 3))
  _check(res, 0, status="correct", reward=1.0, success=1, used=1)
  assert calls == [["Thus \\boxed{3}"]]  # graded once, on the kept text only
  assert res.meta[0]["answers"] == ["3"] and res.meta[0]["attempt_ends"] == ["boxed"]


@pytest.mark.parametrize("chunk", [4, 64])
def test_wrong_then_right_exact_masks(tok, chunk):
  scripts = [[["I think ", "\\boxed{4}", " so much more text after the box"],
              ["No: ", "\\boxed{3}"]]]
  res, calls = run_scripted(tok, scripts, n=2, chunk_tokens=chunk)
  assert_row(tok, res, 0, [model(tok, "I think ", "\\boxed{4}"), feedback(tok, 1, closed=False),
                           model(tok, "No: ", "\\boxed{3}")],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 2))
  _check(res, 0, status="correct", reward=1.0, success=2, used=2)
  assert res.meta[0]["grades"] == ["wrong", "correct"]
  assert [len(c) for c in calls] == [1, 1]
  assert res.metrics["success@1"] == 0.0 and res.metrics["success@2"] == 1.0


def test_no_box_then_right_keeps_model_im_end(tok):
  res, calls = run_scripted(tok, [[["I give up"], ["\\boxed{3}"]]], n=3, chunk_tokens=64)
  assert_row(tok, res, 0, [model(tok, "I give up", stop=True), feedback(tok, 2, closed=True),
                           model(tok, "\\boxed{3}")],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 3))
  _check(res, 0, status="correct", reward=1.0, success=2, used=2)
  assert res.meta[0]["grades"] == ["no_answer", "correct"] and len(calls) == 1


def test_all_wrong_and_never_boxed(tok):
  scripts = [[["\\boxed{1}"], ["\\boxed{2}"], ["\\boxed{4}"]],
             [["hmm"], ["no idea"]]]
  res, _ = run_scripted(tok, scripts, answers=("3", "3"), n=[3, 2], chunk_tokens=5)
  assert_row(tok, res, 0, [model(tok, "\\boxed{1}"), feedback(tok, 2, False),
                           model(tok, "\\boxed{2}"), feedback(tok, 1, False),
                           model(tok, "\\boxed{4}")],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 3))
  _check(res, 0, status="wrong_exhausted", reward=-0.5, success=0, used=3)
  assert_row(tok, res, 1, [model(tok, "hmm", stop=True), feedback(tok, 1, True),
                           model(tok, "no idea", stop=True)],
             prompt_text=prompts.multi_attempt_prompt("Problem 1?", 2))
  _check(res, 1, status="no_answer_exhausted", reward=-1.0, success=0, used=2)
  assert res.metrics["reward/frac_wrong"] == 0.5 and res.metrics["reward/frac_no_answer"] == 0.5


def test_unclosed_box_is_no_answer(tok):
  res, calls = run_scripted(tok, [[["\\boxed{3"]]], n=1)
  _check(res, 0, status="no_answer_exhausted", reward=-1.0, success=0, used=1)
  assert calls == [] and res.meta[0]["answers"] == [None]


def test_budget_exhaustion(tok):
  long = ["word"] * 40
  scripts = [[long], [["\\boxed{5}"], long]]
  res, _ = run_scripted(tok, scripts, answers=("3", "3"), n=3, budget=12, chunk_tokens=8)
  _check(res, 0, status="budget", reward=-1.0, success=0, used=1, truncated=True)
  _check(res, 1, status="budget", reward=-0.5, success=0, used=2, truncated=True)
  assert [r.is_model.sum() for r in res.rows] == [12, 12]
  assert res.metrics["budget_hit/frac"] == 1.0


def test_rewound_tail_refunds_budget(tok):
  # Attempt 1 runs into the budget *after* its box, inside the same chunk: the
  # tail is rewound and refunded, so attempt 2 still fits and the row is not truncated.
  kept1, kept2 = tok.encode("\\boxed{4}"), tok.encode("\\boxed{3}")
  budget = len(kept1) + len(kept2)
  scripts = [[["\\boxed{4}"] + ["word"] * 30, ["\\boxed{3}"]]]
  res, _ = run_scripted(tok, scripts, n=2, budget=budget, chunk_tokens=64)
  _check(res, 0, status="correct", reward=1.0, success=2, used=2)
  assert res.rows[0].is_model.sum() == budget


def test_eos_mode_grades_last_box_at_end_of_turn(tok):
  scripts = [[["\\boxed{4}", " wait, ", "\\boxed{5}"], ["\\boxed{4}", " no, ", "\\boxed{3}"]]]
  res, calls = run_scripted(tok, scripts, n=2, attempt_end="eos", chunk_tokens=4)
  assert_row(tok, res, 0, [model(tok, "\\boxed{4}", " wait, ", "\\boxed{5}", stop=True),
                           feedback(tok, 1, True),
                           model(tok, "\\boxed{4}", " no, ", "\\boxed{3}", stop=True)],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 2))
  assert res.meta[0]["answers"] == ["5", "3"] and res.meta[0]["attempt_ends"] == ["eos", "eos"]
  _check(res, 0, status="correct", reward=1.0, success=2, used=2)


# ---- "chunk" mode: the reference's semantics (DualityRL/multi-attempt vllm_mul.py).

def test_chunk_mode_keeps_rest_of_chunk_and_grades_last_box(tok):
  # Chunks of 6 tokens, counted from each attempt's start. Attempt 1: "I think "
  # (3 tokens) + "\boxed{4}" (5) closes at token 8, so it ends at 12 with 4 of
  # the " word"s. Attempt 2: "No: " (3) "\boxed{4}" (5) " or " (2) "\boxed{3}" (5):
  # at 12 the text ends "... or \boxed", a last box still being written, so it
  # runs on to 18 (3 " word"s) and the last box, 3, is graded (the first, 4, is
  # wrong). Its first chunk also carried the 26 forced feedback tokens, so
  # columns-based chunk ends would cut elsewhere.
  scripts = [[["I think ", "\\boxed{4}", " word" * 20],
              ["No: ", "\\boxed{4}", " or ", "\\boxed{3}", " word" * 10]]]
  res, calls = run_scripted(tok, scripts, n=2, chunk_tokens=6, attempt_end="chunk")
  assert len(tok.encode(prompts.feedback_turn(1, close_assistant=True))) % 6 != 0
  assert calls == [["I think \\boxed{4} word word word word"],
                   ["No: \\boxed{4} or \\boxed{3} word word word"]]
  assert_row(tok, res, 0, [model(tok, "I think ", "\\boxed{4}", " word" * 4),
                           feedback(tok, 1, closed=False),
                           model(tok, "No: ", "\\boxed{4}", " or ", "\\boxed{3}", " word" * 3)],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 2))
  _check(res, 0, status="correct", reward=1.0, success=2, used=2)
  assert res.meta[0]["answers"] == ["4", "3"] and res.meta[0]["attempt_ends"] == ["boxed"] * 2
  # The exact cut on the same model output: both attempts end at their first box.
  exact, calls = run_scripted(tok, scripts, n=2, chunk_tokens=6, attempt_end="boxed")
  assert calls == [["I think \\boxed{4}"], ["No: \\boxed{4}"]]
  _check(exact, 0, status="wrong_exhausted", reward=-0.5, success=0, used=2)


def test_chunk_mode_strips_stop_token_before_feedback(tok):
  # Row 0 stops (<|im_end|>) without a box; row 1 boxes then stops with
  # <|endoftext|>. Either stop token is dropped and the feedback turn's own
  # <|im_end|> closes the assistant turn; the last attempt keeps its <|im_end|>.
  scripts = [[["hmm"], ["\\boxed{3}"]], [["\\boxed{4}", "<|endoftext|>"], ["\\boxed{3}"]]]
  res, calls = run_scripted(tok, scripts, answers=("3", "3"), n=2, chunk_tokens=64,
                            attempt_end="chunk")
  assert calls == [["\\boxed{4}"], ["\\boxed{3}", "\\boxed{3}"]]
  for b, first in enumerate(["hmm", "\\boxed{4}"]):
    assert_row(tok, res, b, [model(tok, first), feedback(tok, 1, closed=False),
                             model(tok, "\\boxed{3}", stop=True)],
               prompt_text=prompts.multi_attempt_prompt(f"Problem {b}?", 2))
    _check(res, b, status="correct", reward=1.0, success=2, used=2)
    response = res.rows[b].response.tolist()
    assert response.count(tok.im_end_id) == 3 and tok.pad_id not in response
    assert tok.decode(response).startswith(first + "<|im_end|>\n<|im_start|>system\n")
  assert [m["attempt_ends"] for m in res.meta] == [["eos", "boxed"], ["boxed", "boxed"]]


def test_chunk_mode_chunk_cap(tok):
  # Chunks of 4, at most 3 per episode. Attempt 1 "\boxed{4}" + <|im_end|> is 6
  # tokens: 2 chunks, the second partial. Attempt 2 gets the 1 chunk left:
  # 4 " word"s, no box, so the episode ends there ("budget") at -0.5, as the
  # reference's loop ends after num_iteration rounds.
  scripts = [[["\\boxed{4}"], [" word" * 10]]]
  res, _ = run_scripted(tok, scripts, n=2, chunk_tokens=4, attempt_end="chunk", max_chunks=3,
                        budget=12)
  assert_row(tok, res, 0, [model(tok, "\\boxed{4}"), feedback(tok, 1, closed=False),
                           model(tok, " word" * 4)],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 2))
  _check(res, 0, status="budget", reward=-0.5, success=0, used=2, truncated=True)
  # With 2 chunks the first attempt uses them all: no room for a second one.
  res, _ = run_scripted(tok, scripts, n=2, chunk_tokens=4, attempt_end="chunk", max_chunks=2,
                        budget=12)
  assert_row(tok, res, 0, [model(tok, "\\boxed{4}", stop=True)],
             prompt_text=prompts.multi_attempt_prompt("Problem 0?", 2))
  _check(res, 0, status="budget", reward=-0.5, success=0, used=1, truncated=True)
  with pytest.raises(ValueError, match="max_chunks"):
    run_scripted(tok, scripts, n=2, attempt_end="boxed", max_chunks=3)


def test_paper_configs_attempt_semantics(tok):
  """The multi-attempt config ends an N = 1 attempt at the chunk holding its
  first box; the single-turn baseline config generates to EOS and grades the
  last box (the reference's baseline.sh is plain generation)."""
  from mars import config as mars_config
  import pathlib
  configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
  script = [[["\\boxed{4}", " word" * 70, " so ", "\\boxed{3}"]]]
  ids = [[sum((tok.encode(p) for p in att), []) for att in row] for row in script]
  out = {}
  for name in ("multi_attempt_1p5b", "ppo_single_turn_1p5b"):
    c = mars_config.load_config_file(str(configs / f"{name}.py"))
    cfg = mars_config.multi_attempt_config(mars_config.default_config())
    cfg.update({k: v for k, v in c.episode.items() if k in cfg})
    calls = []
    out[name] = ma.rollout(ScriptedSampler(ids, tok), None, tok,
                           [{"id": 0, "problem": "P", "answer": "3"}], key=jax.random.key(0),
                           grade_fn=stub_grade(calls), cfg=cfg, num_attempts=1,
                           single_turn=True), calls
  (ma_res, ma_calls), (st_res, st_calls) = out["multi_attempt_1p5b"], out["ppo_single_turn_1p5b"]
  assert ma_calls == [[tok.decode(ids[0][0][:64])]] and ma_res.meta[0]["status"] == "wrong_exhausted"
  np.testing.assert_array_equal(st_res.rows[0].response, ids[0][0] + [tok.im_end_id])
  assert st_calls == [[tok.decode(ids[0][0])]] and st_res.meta[0]["status"] == "correct"
  assert tok.decode(st_res.rows[0].prompt) == prompts.single_turn_prompt("P")


# ---- Both modes: the transcript is what the chat template renders.

TEMPLATE_CASES = {
    # name: (attempt_end, chunk_tokens, attempt 1 script, attempt 2 script,
    #        expected attempt 1 text, expected attempt 2 text, attempt 2 closed by <|im_end|>)
    # Chunks of 8: "I think \boxed{4}" is 7 tokens, so 1 " word" stays with each.
    "chunk/cut_mid_stream": ("chunk", 8, "I think \\boxed{4} word word word word word word",
                             "No: \\boxed{3} word word word word word word",
                             "I think \\boxed{4} word", "No: \\boxed{3} word", False),
    "chunk/model_im_end": ("chunk", 64, "hmm", "\\boxed{3}", "hmm", "\\boxed{3}", True),
    "chunk/model_endoftext": ("chunk", 64, "\\boxed{4}<|endoftext|>", "\\boxed{3}", "\\boxed{4}",
                              "\\boxed{3}", True),
    "boxed/cut_at_box": ("boxed", 64, "I think \\boxed{4} word word", "\\boxed{3} so",
                         "I think \\boxed{4}", "\\boxed{3}", False),
    # The exact cut ends attempt 2 at its box, before the script's <|im_end|>.
    "boxed/model_im_end": ("boxed", 64, "hmm", "\\boxed{3}", "hmm", "\\boxed{3}", False),
    "eos/model_im_end": ("eos", 4, "\\boxed{4} wait", "\\boxed{3}", "\\boxed{4} wait", "\\boxed{3}",
                         True),
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_episode_tokens_equal_chat_template(tok, case):
  """prompt + attempt 1 + feedback turn + attempt 2, token for token, equals the
  real Qwen2.5-Math tokenizer's apply_chat_template of the same conversation.
  (A script that runs out emits <|im_end|>, as a model ending its turn.)"""
  mode, chunk, script1, script2, text1, text2, closed = TEMPLATE_CASES[case]
  res, _ = run_scripted(tok, [[[script1], [script2]]], n=2, chunk_tokens=chunk,
                        attempt_end=mode)
  assert [m["status"] for m in res.meta] == ["correct"]
  messages = [{"role": "system", "content": prompts.multi_attempt_system(2)},
              {"role": "user", "content": "Problem 0?"},
              {"role": "assistant", "content": text1},
              {"role": "system", "content": prompts.feedback_message(1)},
              {"role": "assistant", "content": text2}]
  template = tok.hf.apply_chat_template(messages, tokenize=True, return_dict=False)
  # The template closes the last turn with "<|im_end|>\n"; an episode ends at
  # the model's <|im_end|> (no "\n" after it), or mid-turn when it was cut.
  tail = [tok.im_end_id] + tok.encode("\n") if not closed else tok.encode("\n")
  assert template[-len(tail):] == tail
  row = res.rows[0]
  assert row.prompt.tolist() + row.response.tolist() == template[:-len(tail)]


def test_groups_per_episode_n_and_chunk_invariance(tok):
  scripts = [[["\\boxed{1}", " tail"], ["\\boxed{3}"]], [["\\boxed{3}"]],
             [["x"], ["\\boxed{1}"]], [["\\boxed{1}"], ["y ", "\\boxed{2}"], ["\\boxed{3}"]]]
  results = [run_scripted(tok, scripts, answers=("3", "2"), n=[2, 2, 1, 3], group_size=2,
                          chunk_tokens=c)[0] for c in (2, 7, 64)]
  for res in results:
    assert [m["group_id"] for m in res.meta] == [0, 0, 1, 1]
    assert [m["num_attempts"] for m in res.meta] == [2, 2, 1, 3]
    assert [m["status"] for m in res.meta] == ["correct", "correct", "no_answer_exhausted",
                                               "correct"]
    assert tok.decode(res.rows[3].prompt) == prompts.multi_attempt_prompt("Problem 1?", 3)
    for a, b in zip(res.rows, results[0].rows):
      np.testing.assert_array_equal(a.response, b.response)
      np.testing.assert_array_equal(a.is_model, b.is_model)
  assert results[0].meta[3]["success_attempt"] == 2


def test_single_turn_baseline_and_discount(tok):
  ids = [[tok.encode("\\boxed{4}")]]
  res = ma.rollout(ScriptedSampler(ids, tok), None, tok, [{"id": 0, "problem": "P", "answer": "3"}],
                   key=jax.random.key(0), grade_fn=stub_grade(), cfg=cfg_with(),
                   num_attempts=5, single_turn=True)
  assert tok.decode(res.rows[0].prompt) == prompts.single_turn_prompt("P")
  _check(res, 0, status="wrong_exhausted", reward=-0.5, success=0, used=1)
  res, _ = run_scripted(tok, [[["\\boxed{4}"], ["\\boxed{3}"]]], n=2, attempt_discount=0.5)
  assert res.meta[0]["reward"] == 0.5


def test_num_attempts_drawn_from_key_per_question(tok):
  problems = [{"id": i, "problem": f"P{i}", "answer": "3"} for i in range(6)]
  cfg = cfg_with(min_attempts=2, max_attempts=4)
  draws = []
  for _ in range(2):
    res = ma.rollout(ScriptedSampler([[]] * 12, tok), None, tok, problems, key=jax.random.key(5),
                     grade_fn=stub_grade(), cfg=cfg, num_attempts=None, group_size=2)
    draws.append([m["num_attempts"] for m in res.meta])
  assert draws[0] == draws[1] and set(draws[0]) <= {2, 3, 4}
  assert draws[0][0::2] == draws[0][1::2]  # one N per question, shared by its group
  assert [m["attempts_used"] for m in res.meta] == draws[0]  # every attempt stops unboxed


def test_padding_problems_are_played_then_dropped(tok):
  # LTE and multi-host runs pad the problem count (one shape for every process);
  # the copies play like any episode, then leave no row, meta or metric behind.
  scripts = [[["\\boxed{1}"], ["\\boxed{3}"]], [["\\boxed{3}"]],   # the real problem, G = 2
             [["\\boxed{3}"]], [["\\boxed{3}"]]]                    # its padding copy
  ids = [[tok.encode(a[0]) for a in row] for row in scripts]
  calls = []
  res = ma.rollout(ScriptedSampler(ids, tok), None, tok, [{"id": 0, "problem": "P", "answer": "3"}],
                   key=jax.random.key(0), grade_fn=stub_grade(calls), cfg=cfg_with(),
                   num_attempts=[2], group_size=2, pad_prompts_to=2)
  assert len(res.rows) == len(res.meta) == res.batch.tokens.shape[0] == 2
  assert [m["success_attempt"] for m in res.meta] == [2, 1]
  assert res.metrics["success@1"] == 0.5 and res.metrics["attempts_used/mean"] == 1.5
  # 5 graded attempts: the real rows 2 + 1, the copies 1 + 1.
  assert sum(map(len, calls)) == 5


def test_feedback_longer_than_queue_is_an_error(tok):
  sampler = ScriptedSampler([[[]]], tok, queue_len=8)
  with pytest.raises(ValueError, match="queue_len"):
    ma.rollout(sampler, None, tok, [{"id": 0, "problem": "P", "answer": "3"}],
               key=jax.random.key(0), grade_fn=stub_grade(), cfg=cfg_with(), num_attempts=2)


# ----------------------------------------------------------------------------
# End to end: a tiny Qwen2 that writes boxes, through the real Sampler.

BIGRAM_TEXT = {"so": " so", "bs": "\\", "boxed": "boxed", "lb": "{", "one": "1", "two": "2",
               "rb": "}"}
BIGRAM = {  # p(next | current); "other" is every token outside the alphabet
    "other": {"so": .6, "bs": .4}, "end": {"so": .6, "bs": .4},
    "so": {"so": .5, "bs": .35, "end": .15},
    "bs": {"boxed": 1.0}, "boxed": {"lb": 1.0},
    "lb": {"one": .45, "two": .45, "rb": .1},
    "one": {"rb": .85, "so": .15}, "two": {"rb": .85, "so": .15},
    "rb": {"so": .6, "end": .4},
}


@pytest.fixture(scope="module")
def bigram_model(tok, tmp_path_factory):
  """Tiny Qwen2 (hidden 32, 2 layers, full Qwen vocab) that is nearly a bigram chain.

  Huge one-hot embeddings dominate the residual stream, so the logits follow
  BIGRAM; the random layers still perturb them slightly, so attention to the
  context (and thus the KV cache) matters.
  """
  import torch
  import transformers
  D = 32
  hf_cfg = transformers.Qwen2Config(
      vocab_size=tok.vocab_size, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
      tie_word_embeddings=False)
  model = transformers.Qwen2ForCausalLM(hf_cfg)
  ids = {k: tok.encode(v)[0] for k, v in BIGRAM_TEXT.items()} | {"end": tok.im_end_id}
  slot = {name: i + 1 for i, name in enumerate(ids)} | {"other": 0}
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.ones_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    emb.zero_()
    emb[:, 0] = 100.0
    head.zero_()
    for name, i in ids.items():
      emb[i] = 0.0
      emb[i, slot[name]] = 100.0
    for cur, dist in BIGRAM.items():
      for nxt, p in dist.items():
        head[ids[nxt], slot[cur]] = (30.0 + math.log(p)) / math.sqrt(D)
  path = tmp_path_factory.mktemp("bigram_qwen2")
  model.save_pretrained(path)
  return mm.load_hf(str(path))


class Recorder:
  """Delegates to a Sampler and keeps a copy of the transcripts after every run."""

  def __init__(self, sampler):
    self.inner, self.states = sampler, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def run(self, *args, **kw):
    state = self.inner.run(*args, **kw)
    self.states.append({k: getattr(state, k).copy() for k in (
        "tokens", "prompt_mask", "gen_mask", "forced_mask", "logp", "done")})
    return state


PROBLEMS = [{"id": "one", "problem": "What is 0+1?", "answer": "1"},
            {"id": "two", "problem": "What is 1+1?", "answer": "2"}]


@pytest.mark.parametrize("mode", ["boxed", "chunk"])
def test_tiny_model_end_to_end(tok, bigram_model, mode):
  # "boxed" mode covers every engine path: rewinds after a box, feedback that
  # closes the turn, and feedback after the model's own <|im_end|> (no box).
  # "chunk" mode rewinds tokens sampled past an attempt's chunk end and the stop
  # token before every feedback.
  model_cfg, params = bigram_model
  sampler = Recorder(Sampler(model_cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id))
  cfg = cfg_with(budget=40, chunk_tokens=8, max_attempts=3, attempt_end=mode,
                 max_chunks=5 if mode == "chunk" else 0)
  calls = []
  # (Key 13 in chunk mode also runs an episode into the chunk cap.)
  res = ma.rollout(sampler, params, tok, PROBLEMS, key=jax.random.key(1 if mode == "boxed" else 13),
                   grade_fn=stub_grade(calls), cfg=cfg, num_attempts=3, group_size=4)
  assert 0 < len(calls) <= len(sampler.states)  # at most one grader call per chunk
  statuses = [m["status"] for m in res.meta]
  assert "correct" in statuses and "wrong_exhausted" in statuses
  assert mode == "boxed" or "budget" in statuses
  ends = {e for m in res.meta for e in m["attempt_ends"][:-1]}
  assert ends == {"boxed", "eos"}  # feedback followed both kinds of attempt end
  P = prompt_columns(res.batch)
  for b, (row, m) in enumerate(zip(res.rows, res.meta)):
    assert tok.decode(row.prompt) == prompts.multi_attempt_prompt(PROBLEMS[b // 4]["problem"], 3)
    n = len(row.response)
    np.testing.assert_array_equal(res.batch.tokens[b, P:P + n], row.response)
    np.testing.assert_array_equal(res.batch.loss_mask[b, P:P + n], row.is_model)
    np.testing.assert_array_equal(res.batch.transparent_mask[b, P:P + n], ~row.is_model)
    assert not (res.batch.loss_mask[b] & res.batch.transparent_mask[b]).any()
    assert row.is_model.sum() <= cfg.budget and row.is_model[-1]
    runs = _runs(row)
    model_runs, feedback_runs = runs[0::2], runs[1::2]
    assert len(model_runs) == m["attempts_used"] == len(feedback_runs) + 1
    for j, fb in enumerate(feedback_runs):  # the injected text decodes exactly
      closed = model_runs[j][-1] == tok.im_end_id
      assert not (mode == "chunk" and closed)  # the stop token was replaced
      assert tok.decode(fb) == prompts.feedback_turn(3 - (j + 1), close_assistant=not closed)
    for j, ids in enumerate(model_runs):
      text = tok.decode(ids, skip_special_tokens=True)
      answer = rules.final_box(text) if mode == "chunk" else extract_boxed(text)
      assert answer == m["answers"][j]
      if mode == "boxed" and m["attempt_ends"][j] == "boxed":  # cut exactly at the box
        assert rules.has_settled_box(text)
        assert not rules.has_settled_box(tok.decode(ids[:-1], skip_special_tokens=True))
      if mode == "chunk":  # no earlier chunk end of the attempt had a complete last box
        for k in range(8, len(ids), 8):
          assert rules.final_box(tok.decode(ids[:k], skip_special_tokens=True)) is None
        if m["attempt_ends"][j] == "boxed" and j == len(model_runs) - 1:
          assert len(ids) % 8 == 0 or ids[-1] == tok.im_end_id  # chunk end or the model's stop
    assert m["reward"] == {"correct": 1.0}.get(m["status"], -0.5 if any(
        a is not None for a in m["answers"]) else -1.0)
  # After every chunk (forced feedback turns, rewinds, shared prompt pages), each sampled
  # token's logprob equals the trainer's forward over the transcript as it stands.
  forced_seen = False
  for state in sampler.states:
    valid = state["prompt_mask"] | state["gen_mask"] | state["forced_mask"]
    ref = np.asarray(mm.token_logprobs(model_cfg, params, jnp.asarray(state["tokens"]),
                                       jnp.asarray(valid)))
    gen = state["gen_mask"]
    np.testing.assert_allclose(state["logp"][gen], ref[gen], atol=1e-4)
    forced_seen |= bool((state["forced_mask"] & np.roll(gen, -1, axis=1)).any())
  assert forced_seen  # a sampled token right after a forced turn was checked


def _runs(row):
  """Response split into alternating model / injected runs (model first)."""
  edges = np.flatnonzero(np.diff(row.is_model.astype(int))) + 1
  return [r.tolist() for r in np.split(row.response, edges)]
