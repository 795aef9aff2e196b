"""LTE: pure selection logic on hand-built batches, then end to end with a tiny
random Qwen (byte-level ChatML tokenizer) and a scripted grader."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mars.models as mm
from mars import config as mars_config
from mars import prompts
from mars.episodes import lte, multi_attempt, single_turn
from mars.episodes.packing import EpisodeResult, Row, pack
from mars.rewards import Grade
from mars.rl.advantages import grpo_advantages

PAD = 0


def _row(prompt, response, group, reward=0.0, truncated=False, logp_base=-1.0):
  n = len(response)
  return Row(prompt=prompt, response=response, is_model=np.ones(n, bool),
             behaviour_logp=logp_base - 0.1 * np.arange(n), reward=reward, group_id=group,
             truncated=truncated)


def _assert_batches_equal(a, b):
  for field in dataclasses.fields(a):
    np.testing.assert_array_equal(np.asarray(getattr(a, field.name)),
                                  np.asarray(getattr(b, field.name)), err_msg=field.name)


# ----------------------------------------------------------------------------
# classify_groups

def test_classify_groups_every_class():
  #        g0 some_pass | g1 all_pass | g2 overlong_all | g3 overlong_some | g4 pass_none
  rewards = [1, 0, 0,    1, 1, 1,      0, 0, 0,          0, 0, 0,           0, 0, 0]
  trunc = [0, 1, 0,      0, 0, 1,      1, 1, 1,          1, 0, 0,           0, 0, 0]
  groups = np.repeat(np.arange(5), 3)
  codes = lte.classify_groups(rewards, np.asarray(trunc, bool), groups, num_groups=6)
  assert codes.tolist() == [lte.SOME_PASS, lte.ALL_PASS, lte.OVERLONG_ALL, lte.OVERLONG_SOME,
                            lte.PASS_NONE, lte.EMPTY]
  assert lte.is_all_fail(codes).tolist() == [False, False, True, True, True, False]


def test_classify_groups_bool_flags_and_any_order():
  ok = np.array([False, True, False, False])
  codes = lte.classify_groups(ok, [False] * 4, group_ids=[1, 0, 1, 0], num_groups=2)
  assert codes.tolist() == [lte.SOME_PASS, lte.PASS_NONE]


def test_classify_groups_of_size_one():
  codes = lte.classify_groups([1.0, 0.0, 0.0], [False, False, True], [0, 1, 2], 3)
  assert codes.tolist() == [lte.ALL_PASS, lte.PASS_NONE, lte.OVERLONG_ALL]


def test_classify_every_group_all_fail():
  codes = lte.classify_groups(np.zeros(8), np.arange(8) % 3 == 0, np.repeat(np.arange(4), 2), 4)
  assert lte.is_all_fail(codes).all()


# ----------------------------------------------------------------------------
# build_hint_set

def test_hint_set_dedups_by_canonical_form_in_first_seen_order():
  extracted = ["1/2", "0.5", "7", "\\frac12", None, "7 ", "", "3"]
  canonical = ["1/2", "1/2", "7", "1/2", None, "7", None, "3"]
  hints = lte.build_hint_set(extracted, canonical, [False] * 8, cap=10)
  assert hints == ["1/2", "7", "3"]


def test_hint_set_skips_truncated_rollouts_and_falls_back_to_text_key():
  hints = lte.build_hint_set(["5", "x + 1", "x+1", "9"], [None, None, None, "9"],
                             [True, False, False, True], cap=None)
  assert hints == ["x + 1"]  # "5" and "9" were truncated; "x+1" squashes to the same key


def test_hint_set_longer_than_cap():
  answers = [str(i) for i in range(25)]
  hints = lte.build_hint_set(answers, answers, [False] * 25, cap=10)
  assert hints == [str(i) for i in range(10)]
  assert lte.build_hint_set(answers, answers, [False] * 25, cap=0) == []
  long_answer = ["1", "x" * 300, "2"]
  assert lte.build_hint_set(long_answer, [None] * 3, [False] * 3, max_chars=200) == ["1", "2"]


# ----------------------------------------------------------------------------
# hinted_prompt

# The three hinted templates, written out: the single-turn prompt with a note on the problem.
CONCISE = lambda q: prompts.single_turn_prompt(f"{q}\n\n{prompts.CONCISE_NOTE}")
HINT = lambda q, wrong: prompts.single_turn_prompt(
    f"{q}\n\n{prompts.HINT_NOTE.format(answers=prompts.format_wrong_answers(wrong))}")
CONCISE_HINT = lambda q, wrong: prompts.single_turn_prompt(
    f"{q}\n\n{prompts.CONCISE_HINT_NOTE.format(answers=prompts.format_wrong_answers(wrong))}")

def test_hinted_prompt_per_class():
  q, wrong = "Compute 1+1.", ["3", "1/2"]
  assert lte.hinted_prompt(q, lte.OVERLONG_ALL, wrong) == CONCISE(q)
  assert lte.hinted_prompt(q, lte.OVERLONG_SOME, wrong) == CONCISE_HINT(q, wrong)
  assert lte.hinted_prompt(q, lte.PASS_NONE, wrong) == HINT(q, wrong)
  assert "$3$, $1/2$" in lte.hinted_prompt(q, lte.PASS_NONE, wrong)
  # No usable wrong answer: nothing to hint.
  assert lte.hinted_prompt(q, lte.PASS_NONE, []) == prompts.single_turn_prompt(q)
  assert lte.hinted_prompt(q, lte.OVERLONG_SOME, []) == CONCISE(q)


def test_hinted_prompt_vanilla_extra_rollouts():
  q, wrong = "Compute 1+1.", ["3"]
  assert lte.hinted_prompt(q, lte.PASS_NONE, wrong, "none") == prompts.single_turn_prompt(q)
  assert lte.hinted_prompt(q, lte.OVERLONG_SOME, wrong, "none") == CONCISE(q)
  assert lte.hinted_prompt(q, lte.OVERLONG_ALL, wrong, "none") == CONCISE(q)


@pytest.mark.parametrize("source", lte.HINT_SOURCES)
@pytest.mark.parametrize("code", lte.ALL_FAIL_CLASSES)
@pytest.mark.parametrize("hints", [[], ["3", "1/2"]])
def test_hinted_problem_renders_to_hinted_prompt(code, hints, source):
  q = "Compute 1+1."
  assert (prompts.single_turn_prompt(lte.hinted_problem(q, code, hints, source))
          == lte.hinted_prompt(q, code, hints, source))


def test_hinted_prompt_rejects_bad_input():
  with pytest.raises(ValueError, match="not all-fail"):
    lte.hinted_prompt("q", lte.SOME_PASS, [])
  with pytest.raises(ValueError, match="hint_source"):
    lte.hinted_prompt("q", lte.PASS_NONE, [], "gold")
  with pytest.raises(ValueError, match="not all-fail"):
    lte.hinted_problem("q", lte.ALL_PASS, [])


# ----------------------------------------------------------------------------
# select_replacements

def test_select_replacements_none_correct():
  assert lte.select_replacements([False] * 4, [False] * 4, seed=0) == []


def test_select_replacements_all_correct_replaces_whole_group():
  pairs = lte.select_replacements([False] * 4, [True] * 4, seed=3)
  assert sorted(i for i, _ in pairs) == [0, 1, 2, 3]
  assert [j for _, j in pairs] == [0, 1, 2, 3]


def test_select_replacements_only_failed_originals_random_and_reproducible():
  orig_ok = np.array([True, False, False, True, False, False])
  hinted_ok = np.array([False, True, False, True, False, False])
  pairs = lte.select_replacements(orig_ok, hinted_ok, seed=7)
  assert pairs == lte.select_replacements(orig_ok, hinted_ok, seed=7)
  assert len(pairs) == 2 and [j for _, j in pairs] == [1, 3]
  assert all(not orig_ok[i] for i, _ in pairs)
  chosen = {tuple(i for i, _ in lte.select_replacements(orig_ok, hinted_ok, seed=s))
            for s in range(30)}
  assert len(chosen) > 2  # the choice depends on the seed: not always the first failures


def test_truncated_hinted_rollout_never_replaces():
  pairs = lte.select_replacements([False] * 3, [True, True, True], seed=0,
                                  hinted_truncated=[True, False, True])
  assert len(pairs) == 1 and pairs[0][1] == 1


def test_select_replacements_group_of_size_one():
  assert lte.select_replacements([False], [True], seed=0) == [(0, 0)]
  assert lte.select_replacements([True], [True], seed=0) == []


def test_group_rng_is_reproducible_per_group_and_step():
  draw = lambda seed, key, g: lte.group_rng(seed, key, g).integers(1 << 30)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  assert draw(0, k0, 2) == draw(0, k0, 2)
  assert len({draw(0, k0, 2), draw(0, k0, 3), draw(0, k1, 2), draw(1, k0, 2)}) == 4
  assert draw(0, jax.random.PRNGKey(5), 1) == draw(0, jax.random.PRNGKey(5), 1)


# ----------------------------------------------------------------------------
# reattach_responses + pack: token surgery

def test_reattach_moves_hinted_response_onto_unhinted_prompt():
  unhinted = np.array([11, 12, 13])
  rows = [_row(unhinted, [21, 22], 0), _row(unhinted, [23, 24, 25, 26], 0),
          _row([31, 32], [41], 1, reward=1.0)]
  hinted = _row([90, 91, 92, 93, 94, 95], [51, 52, 53], group=7, reward=1.0, logp_base=-3.0)
  new = lte.reattach_responses(rows, [(0, hinted)])
  assert new[1] is rows[1] and new[2] is rows[2] and rows[0].response.tolist() == [21, 22]
  r = new[0]
  assert r.prompt.tolist() == unhinted.tolist() and r.response.tolist() == [51, 52, 53]
  assert r.off_policy and r.group_id == 0 and r.reward == 1.0
  np.testing.assert_array_equal(r.behaviour_logp, hinted.behaviour_logp)

  batch = pack(new, PAD)
  P = 3  # the longest prompt: the unhinted one, not the hinted 6
  assert batch.tokens[0, P - 3:P + 3].tolist() == [11, 12, 13, 51, 52, 53]
  assert batch.attention_mask[0].sum() == 6 and batch.loss_mask[0, P:P + 3].all()
  assert batch.loss_mask[0].sum() == 3
  assert batch.positions[0, P - 3:P + 3].tolist() == list(range(6))
  np.testing.assert_allclose(batch.behaviour_logp[0, P:P + 3], hinted.behaviour_logp)
  assert batch.is_off_policy.tolist() == [True, False, False]
  assert batch.group_id.tolist() == [0, 0, 1] and batch.reward.tolist() == [1.0, 0.0, 1.0]
  # Rows that were not replaced pack exactly as before.
  before = pack(rows, PAD)
  for name in ("tokens", "attention_mask", "positions", "loss_mask", "behaviour_logp"):
    np.testing.assert_array_equal(getattr(batch, name)[1:], getattr(before, name)[1:])


def test_reattach_with_explicit_unhinted_prompts():
  rows = [_row([1, 2], [3], 0), _row([4, 5], [6], 1)]
  new = lte.reattach_responses(rows, [(1, _row([9, 9, 9], [7, 8], 5))], [[40, 41, 42]])
  assert new[1].prompt.tolist() == [40, 41, 42] and new[1].group_id == 1


class FakeSingleTurn:
  """Stands in for single_turn.rollout: records its calls, returns scripted rows.

  scripts[k] = per-row (status, reward, truncated) for the k-th call.
  """

  def __init__(self, *scripts):
    self.scripts, self.calls = scripts, []

  def __call__(self, sampler, params, tokenizer, problems, *, key, grade_fn, cfg,
               pad_prompts_to=None):
    script = self.scripts[len(self.calls)]
    self.calls.append(problems)
    G = len(script) // len(problems)
    rows = [_row([1, 2], [3, 4 + i], i // G, reward=r, truncated=t)
            for i, (_, r, t) in enumerate(script)]
    meta = [dict(problem_id=problems[i // G]["id"], status=st, extracted="5", canonical="5",
                 response="r", off_policy=False) for i, (st, _, _) in enumerate(script)]
    return EpisodeResult(rows=rows, meta=meta, metrics={}, pad_id=PAD)


def test_no_all_fail_group_is_plain_grpo(monkeypatch, tokenizer):
  """lte.rollout's real path: when every group has a passing *reward*, no hinted
  rollout runs and the step's batch is the plain one. Pass/fail is read from
  the reward (what the advantages use), not from the grader's status: in the
  second step group 1's only "correct" row hit the length limit and was
  rewarded 0, so that group is all-fail and gets hinted rollouts."""
  problems = PROBLEMS[:3]
  some_pass = [("wrong", 0.0, True), ("correct", 1.0, False),     # g0
               ("correct", 1.0, False), ("correct", 1.0, False),  # g1
               ("correct", 1.0, False), ("wrong", 0.0, False)]    # g2
  fake = FakeSingleTurn(some_pass)
  monkeypatch.setattr(single_turn, "rollout", fake)
  result = lte.rollout(None, None, tokenizer, problems, key=jax.random.key(0), grade_fn=None,
                       cfg=_cfg(group_size=2), lte_cfg=_lte_cfg())
  assert len(fake.calls) == 1 and result.metrics["lte/hinted_groups"] == 0
  assert result.metrics["lte/all_fail_frac"] == 0
  plain = pack([_row([1, 2], [3, 4 + i], i // 2, reward=r, truncated=t)
                for i, (_, r, t) in enumerate(some_pass)], PAD)
  _assert_batches_equal(result.batch, plain)
  assert not np.asarray(result.batch.is_off_policy).any()

  cut_correct = list(some_pass)
  cut_correct[2:4] = [("correct", 0.0, True), ("wrong", 0.0, False)]
  fake = FakeSingleTurn(cut_correct, [("correct", 1.0, False), ("wrong", 0.0, False)])
  monkeypatch.setattr(single_turn, "rollout", fake)
  result = lte.rollout(None, None, tokenizer, problems, key=jax.random.key(0), grade_fn=None,
                       cfg=_cfg(group_size=2), lte_cfg=_lte_cfg())
  assert len(fake.calls) == 2 and result.metrics["lte/hinted_groups"] == 1
  assert [p["id"] for p in fake.calls[1]] == [problems[1]["id"]]
  assert np.asarray(result.batch.is_off_policy).sum() == 1


def test_old_logp_for_loss_uses_behaviour_on_off_policy_rows():
  rows = [_row([1], [2, 3], 0), _row([1], [4, 5], 0, logp_base=-5.0)]
  rows[1].off_policy = True
  batch = pack(rows, PAD)
  recomputed = np.full(batch.tokens.shape, -0.5, np.float32)
  out = np.asarray(lte.old_logp_for_loss(batch, recomputed))
  np.testing.assert_array_equal(out[0], recomputed[0])
  np.testing.assert_array_equal(out[1], batch.behaviour_logp[1])


def test_lte_metrics_counts_zero_advantage_groups():
  codes = np.array([lte.SOME_PASS, lte.ALL_PASS, lte.PASS_NONE, lte.OVERLONG_ALL, lte.EMPTY])
  rows = [_row([1], [2], 0, reward=1.0), _row([1], [2], 0)]
  rows[0].off_policy = True
  result = EpisodeResult(rows=rows, meta=[], metrics={}, pad_id=PAD)
  m = lte.lte_metrics(codes, successes=[4, 0], G=4, result=result)
  assert m["lte/all_fail_frac"] == 0.5 and m["lte/some_pass_frac"] == 0.25
  assert m["lte/pass_none_frac"] == 0.25 and m["lte/overlong_all_frac"] == 0.25
  assert m["lte/hint_success_rate"] == 0.5 and m["lte/hint_solved_frac"] == 0.5
  assert m["lte/all_replaced_groups"] == 1 and m["lte/off_policy_rows"] == 1


# ----------------------------------------------------------------------------
# End to end: tiny random Qwen + a byte-level tokenizer + a scripted grader.

G, NEW = 4, 12
PROBLEMS = [dict(id=f"p{i}", problem=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(4)]


class ByteTokenizer:
  """UTF-8 bytes plus the ChatML specials: exact round trip, a 259-token vocab.

  The Tokenizer interface single_turn/lte use; a tiny vocab keeps the decode
  loop cheap on CPU (the real Qwen vocab is 151k).
  """
  SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

  def __init__(self):
    self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
    self.pad_id, self.im_end_id = 256, 258
    self.stop_ids = (256, 258)
    self.vocab_size = 259
    self._split = re.compile("(" + "|".join(map(re.escape, self.SPECIALS)) + ")")

  def encode(self, text):
    ids = []
    for part in self._split.split(text):
      ids += [self.special_ids[part]] if part in self.special_ids else list(part.encode())
    return ids

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids, skip_special_tokens=False):
    text, buf = [], bytearray()
    for i in ids:
      if i < 256:
        buf.append(i)
      else:
        special = "" if skip_special_tokens else self.SPECIALS[i - 256]
        text.append(buf.decode(errors="replace") + special)
        buf = bytearray()
    return "".join(text) + buf.decode(errors="replace")


@pytest.fixture(scope="module")
def tokenizer():
  return ByteTokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = mm.tiny_config("qwen2", vocab_size=tokenizer.vocab_size, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, tie_word_embeddings=False)
  init = jax.jit(mm.init_params, static_argnums=(0, 2))  # one program, not one per leaf
  params = init(cfg, jax.random.key(0), 0.5)
  # A large <|im_end|> logit in a random direction: rows stop at random lengths,
  # so both finished and truncated rollouts occur.
  v = jax.random.normal(jax.random.key(1), (cfg.hidden_size,))
  params["lm_head"] = params["lm_head"].at[tokenizer.im_end_id].set(6.0 * v / jnp.linalg.norm(v))
  return cfg, params


class CountingSampler:
  """The real Sampler, recording each generate call's (prompt rows, n)."""

  def __init__(self, sampler):
    self.sampler, self.calls = sampler, []

  def generate(self, params, tokens, mask, **kw):
    self.calls.append((tokens.shape[0], kw["n"]))
    return self.sampler.generate(params, tokens, mask, **kw)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
  from mars.sampling import Sampler
  return Sampler(model[0], stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)


class ScriptedGrader:
  """plans[k](row_index) -> Grade for the k-th grade_fn call."""

  def __init__(self, *plans):
    self.plans, self.calls = plans, []

  def __call__(self, responses, answers):
    plan = self.plans[len(self.calls)]
    self.calls.append(list(responses))
    return [plan(i) for i in range(len(responses))]


# Step-1 plan: g0 some-pass, g1 all-pass, g2/g3 all-fail with wrong answers to hint.
WRONG = {8: ("1/2", "1/2"), 9: ("0.5", "1/2"), 10: ("7", "7"), 12: ("\\frac12", "1/2"),
         13: ("9", "9"), 14: ("8", "8"), 15: ("10", "10")}


def _step1(i):
  if i == 0 or 4 <= i < 8:
    return Grade("correct", "x", "x")
  if i in WRONG:
    return Grade("wrong", *WRONG[i])
  return Grade("no_answer")


CORRECT = lambda i: Grade("correct", "4", "4")
WRONG_ALL = lambda i: Grade("wrong", "5", "5")


def _cfg(**kw):
  cfg = mars_config.default_config().rollout
  cfg.update(dict(dict(group_size=G, max_new_tokens=NEW), **kw))
  return cfg


def _lte_cfg(**kw):
  cfg = mars_config.default_config().lte
  cfg.enabled = True
  cfg.update(**kw)
  return cfg


@pytest.fixture(scope="module")
def replaced(sampler, model, tokenizer):
  """One LTE step where g2, g3 are all-fail and every hinted rollout is graded correct."""
  counting = CountingSampler(sampler)
  key = jax.random.key(3)
  result = lte.rollout(counting, model[1], tokenizer, PROBLEMS, key=key,
                       grade_fn=ScriptedGrader(_step1, CORRECT), cfg=_cfg(), lte_cfg=_lte_cfg())
  plain = single_turn.rollout(sampler, model[1], tokenizer, PROBLEMS, key=key,
                              grade_fn=ScriptedGrader(_step1), cfg=_cfg())
  return result, plain, counting.calls


def test_all_fail_groups_get_one_hinted_generate_call(replaced):
  result, plain, calls = replaced
  assert calls == [(4, G), (2, G)]  # step 1, then both all-fail groups in one call
  m = result.metrics
  assert m["lte/hinted_groups"] == 2 and m["lte/all_fail_frac"] == 0.5
  # g1's rows are all graded correct, but one that hit the length limit is
  # rewarded 0 (truncated_is_failure), and LTE judges by the reward.
  g1_cut = bool(np.asarray(plain.batch.truncated[4:8]).any())
  assert m["lte/some_pass_frac"] == (0.5 if g1_cut else 0.25)
  assert m["lte/all_pass_frac"] == (0.0 if g1_cut else 0.25)
  assert m["reward/mean"] == plain.metrics["reward/mean"]


def test_replacements_have_right_flags_and_prompts(replaced, tokenizer):
  result, plain, _ = replaced
  off = np.flatnonzero(result.batch.is_off_policy)
  assert len(off) > 0 and set(off) <= set(range(8, 16))  # only the all-fail groups
  assert result.metrics["lte/off_policy_rows"] == len(off)
  for g in (2, 3):
    rows = range(4 * g, 4 * g + 4)
    hinted = [result.meta[i] for i in rows if result.meta[i]["off_policy"]]
    # G' = the non-truncated hinted rollouts (all graded correct): a truncated
    # hinted rollout never replaces.
    assert all(not result.rows[i].truncated for i in rows if result.rows[i].off_policy)
    code = lte.classify_groups([0] * 4, [plain.rows[i].truncated for i in rows], [0] * 4, 1)[0]
    wrong = lte.build_hint_set([WRONG.get(i, (None,))[0] for i in rows],
                               [WRONG.get(i, (None, None))[1] for i in rows],
                               [plain.rows[i].truncated for i in rows])
    expected = lte.hinted_prompt(PROBLEMS[g]["problem"], code, wrong)
    assert all(m["hinted_prompt"] == expected for m in hinted)
    assert all(m["problem_id"] == f"p{g}" and m["status"] == "correct" for m in hinted)
  # The scenario is rich enough: a wrong-answer hint ran, some hinted rollouts were
  # truncated (and so not used), and some group replaced fewer than G rows.
  assert any("Hint:" in m.get("hinted_prompt", "") for m in result.meta)
  assert result.metrics["lte/hinted_truncated_frac"] > 0
  assert 0 < result.metrics["lte/hint_success_rate"] < 1
  P = int(np.argmax(result.batch.loss_mask.any(0)))
  for b in off:
    assert result.batch.reward[b] == 1.0 and result.batch.group_id[b] == b // G
    prompt_ids = result.batch.tokens[b, :P][result.batch.attention_mask[b, :P]]
    assert tokenizer.decode(prompt_ids) == prompts.single_turn_prompt(PROBLEMS[b // G]["problem"])
  # Rows that were not replaced are the plain rows, untouched.
  for b in set(range(16)) - set(off):
    assert result.meta[b] == plain.meta[b]
    np.testing.assert_array_equal(result.rows[b].response, plain.rows[b].response)


def test_rescore_fn_sets_the_behaviour_logp(sampler, model, tokenizer):
  """With a trainer rescore, replacements carry its logp (here a scripted one)
  on model tokens, and the gap to the sampler's is logged."""
  calls = []

  def rescore(rows):
    calls.append(len(rows))
    return [r.behaviour_logp - 0.25 for r in rows]

  result = lte.rollout(sampler, model[1], tokenizer, PROBLEMS, key=jax.random.key(3),
                       grade_fn=ScriptedGrader(_step1, CORRECT), cfg=_cfg(), lte_cfg=_lte_cfg(),
                       rescore_fn=rescore)
  off = np.flatnonzero(result.batch.is_off_policy)
  assert calls == [len(off)] and len(off) > 0
  sampled = lte.rollout(sampler, model[1], tokenizer, PROBLEMS, key=jax.random.key(3),
                        grade_fn=ScriptedGrader(_step1, CORRECT), cfg=_cfg(), lte_cfg=_lte_cfg())
  lm = result.batch.loss_mask
  np.testing.assert_allclose(result.batch.behaviour_logp[off][lm[off]],
                             sampled.batch.behaviour_logp[off][lm[off]] - 0.25, atol=1e-6)
  assert result.metrics["logp_mismatch/hinted_mean"] == pytest.approx(0.25, abs=1e-6)
  assert result.metrics["logp_mismatch/hinted_max"] == pytest.approx(0.25, abs=1e-6)


def test_offpolicy_logprobs_unhinted_numerator_hinted_behaviour(replaced, model, tokenizer):
  """Numerator: the packed row under Prompt(q) == a direct forward on prompt + response.
  Behaviour: the sampling-time logp == a direct forward on hinted prompt + response."""
  cfg, params = model
  result, _, _ = replaced
  batch = result.batch
  packed = np.asarray(mm.token_logprobs(cfg, params, jnp.asarray(batch.tokens),
                                        jnp.asarray(batch.attention_mask),
                                        jnp.asarray(batch.positions)))
  off = np.flatnonzero(batch.is_off_policy)
  seqs = []
  for b in off:
    response = result.rows[b].response.tolist()
    unhinted = tokenizer.encode(prompts.single_turn_prompt(PROBLEMS[b // G]["problem"]))
    hinted = tokenizer.encode(result.meta[b]["hinted_prompt"])
    seqs += [(unhinted, response), (hinted, response)]
  L = max(len(p) + len(r) for p, r in seqs)
  tokens = np.full((len(seqs), L), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(seqs), L), bool)
  for k, (p, r) in enumerate(seqs):  # right padding: no effect on earlier tokens
    tokens[k, :len(p) + len(r)] = p + r
    mask[k, :len(p) + len(r)] = True
  direct = np.asarray(mm.token_logprobs(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
  for k, b in enumerate(off):
    cols = batch.loss_mask[b]
    (p_un, r), (p_hi, _) = seqs[2 * k], seqs[2 * k + 1]
    numerator = direct[2 * k, len(p_un):len(p_un) + len(r)]
    behaviour = direct[2 * k + 1, len(p_hi):len(p_hi) + len(r)]
    np.testing.assert_allclose(packed[b, cols], numerator, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(batch.behaviour_logp[b, cols], behaviour, atol=2e-4, rtol=1e-4)
    assert np.abs(numerator - behaviour).max() > 1e-3  # the prompts really differ
  # What the loss sees on off-policy rows: behaviour logp as the denominator.
  loss_old = np.asarray(lte.old_logp_for_loss(batch, packed))
  np.testing.assert_array_equal(loss_old[off], batch.behaviour_logp[off])


def test_no_all_fail_group_is_bit_identical_to_plain_grpo(sampler, model, tokenizer):
  some_pass = lambda i: Grade("correct" if i % G == 1 else "wrong", "1", "1")
  # Every group passes by reward, also when its correct row hit the length limit.
  cfg = _cfg(truncated_is_failure=False)
  key = jax.random.key(5)
  counting = CountingSampler(sampler)
  result = lte.rollout(counting, model[1], tokenizer, PROBLEMS, key=key,
                       grade_fn=ScriptedGrader(some_pass), cfg=cfg, lte_cfg=_lte_cfg())
  plain = single_turn.rollout(sampler, model[1], tokenizer, PROBLEMS, key=key,
                              grade_fn=ScriptedGrader(some_pass), cfg=cfg)
  assert counting.calls == [(4, G)] and result.metrics["lte/hinted_groups"] == 0
  _assert_batches_equal(result.batch, plain.batch)
  adv = lambda b: np.asarray(grpo_advantages(b.reward, b.group_id, len(PROBLEMS)))
  np.testing.assert_array_equal(adv(result.batch), adv(plain.batch))
  assert result.meta == plain.meta


def test_every_group_all_fail_no_hinted_success(sampler, model, tokenizer):
  """G' = 0 everywhere (vanilla extra rollouts): hinted rollouts run, nothing is replaced."""
  key = jax.random.key(5)
  counting = CountingSampler(sampler)
  result = lte.rollout(counting, model[1], tokenizer, PROBLEMS, key=key,
                       grade_fn=ScriptedGrader(WRONG_ALL, WRONG_ALL), cfg=_cfg(),
                       lte_cfg=_lte_cfg(hint_source="none"))
  assert counting.calls == [(4, G), (4, G)]
  m = result.metrics
  assert m["lte/all_fail_frac"] == 1.0 and m["lte/hinted_groups"] == 4
  assert m["lte/hint_success_rate"] == 0.0 and m["lte/off_policy_rows"] == 0
  # Disabled LTE is the plain single-turn step.
  plain = lte.rollout(sampler, model[1], tokenizer, PROBLEMS, key=key,
                      grade_fn=ScriptedGrader(WRONG_ALL), cfg=_cfg(),
                      lte_cfg=_lte_cfg(enabled=False))
  assert "lte/hinted_groups" not in plain.metrics
  _assert_batches_equal(result.batch, plain.batch)


def test_unknown_episode(sampler, model, tokenizer):
  with pytest.raises(ValueError, match="lte.episode"):
    lte.rollout(sampler, model[1], tokenizer, PROBLEMS, key=jax.random.key(0),
                grade_fn=ScriptedGrader(), cfg=_cfg(), lte_cfg=_lte_cfg(episode="tree"))


# ----------------------------------------------------------------------------
# single_turn.rollout (LTE's step 1, and plain GRPO)

def test_response_text_stops_at_the_first_stop_token(tokenizer):
  ids = tokenizer.encode("\\boxed{4}<|im_end|>junk")
  assert single_turn.response_text(tokenizer, ids) == "\\boxed{4}"
  assert single_turn.response_text(tokenizer, tokenizer.encode("cut off")) == "cut off"


def test_single_turn_rollout_rows_rewards_meta(sampler, model, tokenizer):
  grader = ScriptedGrader(lambda i: Grade("correct", "6", "6") if i % 3 == 0 else
                          Grade("wrong", "5", "5"))
  cfg = _cfg(reward_wrong=-0.5)
  problems = PROBLEMS[:3]  # padded to 4 prompt rows: the extra samples are never graded
  result = single_turn.rollout(sampler, model[1], tokenizer, problems, key=jax.random.key(9),
                               grade_fn=grader, cfg=cfg, pad_prompts_to=4)
  batch = result.batch
  assert len(grader.calls[0]) == 3 * G and batch.tokens.shape[0] == 3 * G
  assert batch.group_id.tolist() == np.repeat(np.arange(3), G).tolist()
  # Truncated rollouts fail even when graded correct (rollout.truncated_is_failure).
  assert batch.reward.tolist() == [1.0 if i % 3 == 0 and not batch.truncated[i] else -0.5
                                   for i in range(3 * G)]
  assert batch.truncated.any() and (~batch.truncated).any()  # both cases are exercised
  assert not batch.is_off_policy.any()
  P = int(np.argmax(batch.loss_mask.any(0)))
  for i, (row, meta) in enumerate(zip(result.rows, result.meta)):
    assert meta["problem_id"] == f"p{i // G}" and meta["status"] in ("correct", "wrong")
    assert meta["response"] == grader.calls[0][i]
    assert meta["response"] == single_turn.response_text(tokenizer, row.response)
    assert batch.truncated[i] == row.truncated
    assert row.truncated == (row.response[-1] not in tokenizer.stop_ids)
    prompt = batch.tokens[i, :P][batch.attention_mask[i, :P]]
    assert tokenizer.decode(prompt) == prompts.single_turn_prompt(PROBLEMS[i // G]["problem"])
  m = result.metrics
  assert m["reward/mean"] == pytest.approx(float(batch.reward.mean()))
  assert m["truncated/frac"] == pytest.approx(float(batch.truncated.mean()))
  assert m["response_length/mean"] == pytest.approx(float(batch.loss_mask.sum(1).mean()))


def test_truncated_is_failure_can_be_turned_off(sampler, model, tokenizer):
  grader = ScriptedGrader(lambda i: Grade("correct", "6", "6"))
  cfg = _cfg()
  cfg.truncated_is_failure = False
  result = single_turn.rollout(sampler, model[1], tokenizer, PROBLEMS[:3], key=jax.random.key(9),
                               grade_fn=grader, cfg=cfg, pad_prompts_to=4)
  assert (result.batch.reward == 1.0).all()


def test_single_turn_rejects_a_short_grade_list(sampler, model, tokenizer):
  with pytest.raises(ValueError, match="grades"):
    single_turn.rollout(sampler, model[1], tokenizer, PROBLEMS, key=jax.random.key(9),
                        grade_fn=lambda r, a: [Grade("wrong")], cfg=_cfg())


# ----------------------------------------------------------------------------
# lte.episode = "multi_attempt"

class FakeMultiAttempt:
  """Stands in for multi_attempt.rollout: records its calls, returns scripted episodes.

  scripts[k] = per-row (status, answers, grades, truncated) for the k-th call.
  """

  def __init__(self, tokenizer, *scripts):
    self.tok, self.scripts, self.calls = tokenizer, scripts, []

  def __call__(self, sampler, params, tokenizer, problems, *, key, grade_fn, cfg,
               num_attempts=None, group_size=1, single_turn=False, pad_prompts_to=0):
    script = self.scripts[len(self.calls)]
    self.calls.append(dict(problems=problems, num_attempts=num_attempts, key=key,
                           group_size=group_size, pad_prompts_to=pad_prompts_to))
    G, rows, meta = group_size, [], []
    for b, (status, answers, grades, truncated) in enumerate(script):
      n = num_attempts[b]
      text = multi_attempt.first_prompt(problems[b // G]["problem"], n)
      response = [100 + len(self.calls), 101, 102, 103][:2 + b % 3]
      rows.append(Row(prompt=self.tok.encode(text), response=response,
                      is_model=np.ones(len(response), bool),
                      behaviour_logp=np.full(len(response), -0.25 * len(self.calls)),
                      reward=1.0 if status == "correct" else -0.5, group_id=b // G,
                      truncated=truncated))
      meta.append(dict(problem_id=problems[b // G]["id"], num_attempts=n, status=status,
                       answers=list(answers), grades=list(grades), response=f"r{b}",
                       off_policy=False))
    return EpisodeResult(rows=rows, meta=meta, pad_id=PAD,
                                     metrics={"reward/mean": 0.0})


def test_multi_attempt_groups_get_hinted_multi_attempt_episodes(monkeypatch, tokenizer):
  wrong2 = ("wrong_exhausted", ("1/2", None), ("wrong", "no_answer"), False)
  step1 = [("correct", ("4",), ("correct",), False), wrong2,                    # g0 some-pass
           wrong2, ("budget", ("0.5", "7"), ("wrong", "wrong"), True)]          # g1 all-fail
  hinted = [("correct", ("4",), ("correct",), False), ("budget", ("4",), ("correct",), True)]
  problems = PROBLEMS[:2]
  replaced = set()
  for seed in range(8):
    fake = FakeMultiAttempt(tokenizer, step1, hinted)
    monkeypatch.setattr(multi_attempt, "rollout", fake)
    key = jax.random.key(0)
    result = lte.rollout(None, None, tokenizer, problems, key=key, grade_fn=None,
                         cfg=mars_config.multi_attempt_config(mars_config.default_config()), group_size=2,
                         num_attempts=[2, 2, 2, 3],
                         lte_cfg=_lte_cfg(episode="multi_attempt", replace_seed=seed))
    first, second = fake.calls
    assert first["num_attempts"] == [2, 2, 2, 3] and first["key"] is key
    # g1 is overlong-some (one episode hit the budget): ConciseHint with the wrong
    # answers of every attempt, de-duplicated by canonical form (1/2 == 0.5).
    assert second["num_attempts"] == [2, 3] and second["group_size"] == 2
    assert first["pad_prompts_to"] is None and second["pad_prompts_to"] == 1
    assert second["problems"] == [dict(problems[1], problem=lte.hinted_problem(
        problems[1]["problem"], lte.OVERLONG_SOME, ["1/2", "7"]))]
    # One usable hinted episode (the other hit the budget) replaces one of g1's.
    off = np.flatnonzero(result.batch.is_off_policy)
    assert len(off) == 1 and off[0] in (2, 3)
    b = int(off[0])
    replaced.add(b)
    row, m = result.rows[b], result.meta[b]
    # Re-attached onto the unhinted prompt announcing the hinted episode's N (2),
    # also when it replaces the N = 3 episode.
    unhinted = multi_attempt.first_prompt(problems[1]["problem"], 2)
    assert row.prompt.tolist() == tokenizer.encode(unhinted)
    assert m["hinted_prompt"] == multi_attempt.first_prompt(second["problems"][0]["problem"], 2)
    assert row.response.tolist() == [102, 101] and row.group_id == 1 and row.reward == 1.0
    assert (row.behaviour_logp == -0.5).all() and m["lte_class"] == "overlong_some"
    assert result.metrics["lte/hint_success_rate"] == 0.5
    assert result.metrics["lte/overlong_some_frac"] == 0.5
  assert replaced == {2, 3}  # the seed picks which failed episode is replaced


def test_multi_attempt_lte_end_to_end_tiny_model(model, tokenizer):
  """The real multi-attempt driver: a random model never boxes an answer, so every
  group fails, hinted multi-attempt episodes run, none succeeds: the plain batch."""
  from mars.sampling import Sampler

  class RecordingSampler(Sampler):
    def start(self, params, tokens, mask, **kw):
      self.prompts.append([tokenizer.decode(t[m]) for t, m in zip(tokens, mask)])
      return super().start(params, tokens, mask, **kw)

  sampler = RecordingSampler(model[0], stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                             queue_len=128)  # byte-level feedback turns are ~100 tokens
  sampler.prompts = []
  cfg = mars_config.multi_attempt_config(mars_config.default_config())
  cfg.update(chunk_tokens=8, budget=12, max_attempts=2)
  kw = dict(key=jax.random.key(2), grade_fn=ScriptedGrader(), cfg=cfg, num_attempts=2,
            group_size=2)
  result = lte.rollout(sampler, model[1], tokenizer, PROBLEMS[:2],
                       lte_cfg=_lte_cfg(episode="multi_attempt"), **kw)
  plain = multi_attempt.rollout(sampler, model[1], tokenizer, PROBLEMS[:2], **kw)
  assert result.metrics["lte/all_fail_frac"] == 1.0 and result.metrics["lte/hinted_groups"] == 2
  hinted_prompts = sampler.prompts[1]
  for g, text in enumerate(hinted_prompts):
    code = lte.classify_groups([0, 0], plain.batch.truncated[2 * g:2 * g + 2], [0, 0], 1)[0]
    problem = lte.hinted_problem(PROBLEMS[g]["problem"], code, [])
    assert text == multi_attempt.first_prompt(problem, 2)
  _assert_batches_equal(result.batch, plain.batch)
