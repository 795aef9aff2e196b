"""LTE: hinted extra rollouts for all-fail groups (Learning to Reason from Trial and Error).

One training step, over GRPO groups of G rollouts per question:

  1. sample G rollouts with Prompt(q), grade, binary reward    single_turn.rollout
  2. classify groups; all-fail ones are stuck                  classify_groups
       overlong_all  every rollout truncated  -> Concise(q)
       overlong_some some truncated           -> ConciseHint(q, wrong)
       pass_none     none truncated           -> Hint(q, wrong)
  3. hint set: distinct wrong answers of the non-truncated     build_hint_set
     failed rollouts, de-duplicated by canonical form, capped
  4. G hinted rollouts per all-fail group (one generate call)  hinted_problem / hinted_prompt
  5. the G' correct (and not truncated) ones replace G'        select_replacements
     randomly chosen failed originals, seeded per group
  6. replaced rows: response moved onto Prompt(q), off-policy  reattach_responses
     behaviour_logp stays the hinted-prompt logprob

The trainer then recomputes old_logp under the packed (unhinted) layout and
feeds the loss `old_logp_for_loss(batch, old_logp)`: for off-policy rows the
ratio is π_θ(y | Prompt(q)) / π_behaviour(y | hinted prompt), shaped by
f(r) = r / (r + γ) without clipping (mars.rl.losses.policy_loss). GRPO
advantages are computed after replacement, so a group with G' = G has zero
advantage (logged as `lte/all_replaced_groups`).

Steps 2–6 are pure functions over numpy arrays and per-row metadata; `rollout`
is the thin host driver. With no all-fail group it returns the plain
single-turn result untouched (the step is exactly GRPO).

Beyond the paper, lte.episode="multi_attempt" runs the same steps over groups
of multi-attempt episodes (mars.episodes.multi_attempt): an episode passes if
some attempt is correct, is truncated if it ran out of budget, the hint lists
the distinct wrong answers of every attempt in the group, and the hinted
extra episodes are multi-attempt episodes whose first prompt carries the note.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mars import distributed
from mars import prompts
from mars.episodes import multi_attempt
from mars.episodes import single_turn as single_turn_lib
from mars.episodes.hints import (  # the classes and hints, re-exported here
    EMPTY, SOME_PASS, ALL_PASS, OVERLONG_ALL, OVERLONG_SOME, PASS_NONE, CLASS_NAMES,
    ALL_FAIL_CLASSES, HINT_SOURCES, classify_groups, is_all_fail, build_hint_set, hinted_problem,
    hinted_prompt)
from mars.episodes.packing import EpisodeResult, Row
from mars.host_metrics import Metrics, merge
from mars.rewards import canonical_answer
from mars.tokenizer import bucket_length

EPISODES = ("single_turn", "multi_attempt")


# ----------------------------------------------------------------------------
# Pure selection logic (steps 2–6).

def select_replacements(orig_ok, hinted_ok, seed, hinted_truncated=None) -> list:
  """Pairs (orig_index, hinted_index): who replaces whom within one group.

  The usable hinted rollouts (correct and not truncated) replace as many
  randomly chosen *failed* originals, in hinted-index order. `seed` is
  anything np.random.default_rng takes, so the choice is reproducible.
  """
  orig_ok = np.asarray(orig_ok, bool)
  usable = np.asarray(hinted_ok, bool)
  if hinted_truncated is not None:
    usable = usable & ~np.asarray(hinted_truncated, bool)
  failed = np.flatnonzero(~orig_ok)
  good = np.flatnonzero(usable)
  k = min(len(failed), len(good))
  if k == 0:
    return []
  chosen = np.sort(np.random.default_rng(seed).choice(failed, size=k, replace=False))
  return [(int(i), int(j)) for i, j in zip(chosen, good[:k])]


def reattach_responses(rows: Sequence[Row], replacements, unhinted_prompt_ids=None) -> list:
  """Rows with replacements applied: hinted responses moved onto the unhinted prompt.

  Args:
    rows: the original (unhinted) rows.
    replacements: (row_index, hinted_row) pairs.
    unhinted_prompt_ids: optional ids per replacement (same order); by default
      the replaced row's own prompt, which is Prompt(q) by construction.
  Returns a new list; a replacement keeps the hinted row's response, masks,
  reward and behaviour_logp (the hinted-prompt logprob), takes the unhinted
  prompt and the original row's group, and is marked off-policy. `pack` then
  rebuilds positions and masks.
  """
  out = list(rows)
  for k, (index, hinted) in enumerate(replacements):
    orig = rows[index]
    prompt = orig.prompt if unhinted_prompt_ids is None else unhinted_prompt_ids[k]
    out[index] = dataclasses.replace(hinted, prompt=np.asarray(prompt, np.int32),
                                     group_id=orig.group_id, off_policy=True)
  return out


def old_logp_for_loss(batch, recomputed_old_logp):
  """The loss's `old_logp`: behaviour logp (hinted prompt) on off-policy rows.

  On-policy rows use the recomputed logp under the training layout; off-policy
  rows use the sampling-time logp under the hinted prompt, so the ratio is
  π_θ(y | Prompt(q)) / π_behaviour(y | hinted prompt).
  """
  off = jnp.asarray(batch.is_off_policy, bool)[:, None]
  return jnp.where(off, jnp.asarray(batch.behaviour_logp), jnp.asarray(recomputed_old_logp))


def passing_rows(rows: Sequence[Row], cfg, episode: str) -> np.ndarray:
  """[B] bool: the row's reward beats every failure reward of its episode kind
  (cfg.reward_wrong, and cfg.reward_no_answer for multi-attempt episodes).

  This reads the same `Row.reward` the advantages read: a correct answer that
  hit the length limit (reward_wrong under truncated_is_failure) fails, and a
  later-attempt success shrunk by attempt_discount still passes.
  """
  fail = float(cfg.reward_wrong)
  if episode == "multi_attempt":
    fail = max(fail, float(cfg.reward_no_answer))
  return np.array([r.reward > fail for r in rows], bool)


def group_rng(replace_seed: int, key, group: int) -> np.random.Generator:
  """Per-group generator from (config seed, step key, group): new each step, reproducible."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = np.asarray(key, np.uint32).ravel().tolist()
  return np.random.default_rng([int(replace_seed), *words, int(group)])


# ----------------------------------------------------------------------------
# Host driver.

def rollout(sampler, params, tokenizer, problems: Sequence[dict], *, key, grade_fn, cfg,
            lte_cfg, num_attempts=None, group_size: Optional[int] = None,
            single_turn: bool = False, group_offset: int = 0,
            rescore_fn: Optional[Callable] = None) -> EpisodeResult:
  """One LTE rollout step; see the module docstring.

  Args:
    cfg: the episode config: single_turn's (group_size, max_new_tokens,
      sampling, rewards) or, with lte.episode="multi_attempt", multi_attempt's.
      Hinted rollouts use the same budget and sampling.
    lte_cfg: config.lte's fields (mars.config.default_config().lte).
    num_attempts, single_turn: passed to multi_attempt.rollout (multi_attempt only).
    group_size: G; defaults to cfg.group_size.
    group_offset: index of problems[0] in the global batch (a multi-host
      process's share), so replacement draws follow the global group.
    rescore_fn: rows -> [per-row response logp under the row's own (hinted)
      prompt], the trainer's forward (collective: every process calls it once
      per step with hinted groups, possibly with no rows). When given, the
      replacements' behaviour logp is the trainer's, not the sampler's: their
      numerics differ (bf16, other kernels) and would bias the ratio. The gap
      is logged as logp_mismatch/hinted_{mean,max}. None: the sampler's logp.
  Step 1 uses `key` exactly as the plain episode would (so with no all-fail
  group the result is the plain one, bit for bit); hinted rollouts use
  fold_in(key, 1).
  """
  episode = lte_cfg.episode
  if episode not in EPISODES:
    raise ValueError(f"lte.episode must be one of {EPISODES}, got {episode!r}.")
  G = int(group_size or cfg.group_size)
  run = _episode_runner(episode, sampler, params, tokenizer, grade_fn=grade_fn, cfg=cfg,
                        group_size=G, single_turn=single_turn)
  base = run(problems, key=key, num_attempts=num_attempts)
  if not lte_cfg.enabled:
    return base
  # Pass/fail from the rewards the advantages will use, not the grader's status
  # string, so that a custom reward and LTE's selection cannot disagree.
  ok = passing_rows(base.rows, cfg, episode)
  truncated = np.array([r.truncated for r in base.rows])
  group_ids = np.array([r.group_id for r in base.rows])
  codes = classify_groups(ok, truncated, group_ids, len(problems))
  hinted = np.flatnonzero(is_all_fail(codes))
  if not distributed.any_process(hinted.size > 0):  # exactly the plain step
    return dataclasses.replace(base, metrics=merge(
        base.metrics, lte_metrics(codes, [], G, base),
        _gap_metrics([], []) if rescore_fn else {}))

  # Steps 3-4: one hinted rollout call for every all-fail group, G per group.
  hinted_problems = []
  for g in hinted:
    hints = build_hint_set(*_wrong_answers(episode, base, np.flatnonzero(group_ids == g)),
                           cap=lte_cfg.hint_cap,
                           max_chars=lte_cfg.hint_max_chars)
    text = hinted_problem(problems[g]["problem"], codes[g], hints,
                          lte_cfg.hint_source)
    hinted_problems.append({**problems[g], "problem": text})
  # Each hinted episode announces the N of the original episode in its place.
  hinted_attempts = ([base.meta[r]["num_attempts"] for g in hinted
                      for r in np.flatnonzero(group_ids == g)] if episode == "multi_attempt"
                     else None)
  # In a multi-host run the hinted rollout is collective: a process without an
  # all-fail group plays one placeholder question (dropped), and every process
  # pads to the same prompt count.
  placeholder = not hinted_problems
  if placeholder:
    hinted_problems = [problems[0]]
    hinted_attempts = [base.meta[0]["num_attempts"]] * G if episode == "multi_attempt" else None
  pad_to = distributed.agree_max(
      bucket_length(len(hinted_problems), int(lte_cfg.hinted_min_prompts)))
  extra = run(hinted_problems, key=jax.random.fold_in(key, 1), num_attempts=hinted_attempts,
              pad_prompts_to=pad_to)
  if placeholder:
    extra = dataclasses.replace(extra, rows=[], meta=[])
  extra_ok = passing_rows(extra.rows, cfg, episode)
  extra_cut = np.array([r.truncated for r in extra.rows])
  extra_groups = np.array([r.group_id for r in extra.rows])

  # Steps 5-6: replace, re-attach onto the unhinted prompt, mark off-policy.
  replacements, unhinted, meta, successes = [], [], list(base.meta), []
  for h, g in enumerate(hinted):
    orig, new = np.flatnonzero(group_ids == g), np.flatnonzero(extra_groups == h)
    successes.append(int(np.sum(extra_ok[new] & ~extra_cut[new])))  # G'
    rng = group_rng(lte_cfg.replace_seed, key, group_offset + int(g))
    for i, j in select_replacements(ok[orig], extra_ok[new], rng, extra_cut[new]):
      replacements.append((orig[i], extra.rows[new[j]]))
      unhinted.append(_unhinted_ids(episode, tokenizer, problems[g]["problem"],
                                    base, orig[i], extra.meta[new[j]], single_turn))
      meta[orig[i]] = {
          **extra.meta[new[j]], "off_policy": True, "lte_class": CLASS_NAMES[int(codes[g])],
          "hinted_prompt": _first_prompt(episode, hinted_problems[h]["problem"],
                                         extra.meta[new[j]], single_turn),
          "replaced_response": base.meta[orig[i]]["response"]}
  gaps = {}
  if rescore_fn is not None:
    sampled = [hinted_row for _, hinted_row in replacements]
    rescored = rescore_fn(sampled)
    gaps = _gap_metrics(sampled, rescored)
    replacements = [(index, dataclasses.replace(
        hinted_row, behaviour_logp=np.where(hinted_row.is_model, logp, 0.0)))
        for (index, hinted_row), logp in zip(replacements, rescored)]
  if not replacements:  # G' = 0 everywhere: the batch is the plain one
    return dataclasses.replace(base, metrics=merge(
        base.metrics, lte_metrics(codes, successes, G, base, extra), gaps))
  rows = reattach_responses(base.rows, replacements, unhinted)
  result = EpisodeResult(rows=rows, meta=meta, pad_id=tokenizer.pad_id,
                         metrics=base.metrics)
  result.metrics = merge(base.metrics, lte_metrics(codes, successes, G, result, extra, base),
                         gaps)
  return result


def _gap_metrics(sampled: Sequence[Row], rescored) -> Metrics:
  """|trainer − sampler| behaviour logp over the model tokens of the replacements."""
  gaps = [np.abs(np.asarray(logp) - r.behaviour_logp)[r.is_model]
          for r, logp in zip(sampled, rescored)]
  gaps = np.concatenate(gaps) if gaps else np.zeros((0,))
  return (Metrics().mean("logp_mismatch/hinted_mean", gaps)
          .max("logp_mismatch/hinted_max", gaps))


def _episode_runner(episode, sampler, params, tokenizer, *, grade_fn, cfg, group_size,
                    single_turn):
  """problems, key, num_attempts, pad_prompts_to -> EpisodeResult, for either episode kind."""
  def run(problems, *, key, num_attempts=None, pad_prompts_to=None):
    if episode == "single_turn":
      return single_turn_lib.rollout(sampler, params, tokenizer, problems, key=key,
                                     grade_fn=grade_fn, cfg=cfg, pad_prompts_to=pad_prompts_to)
    return multi_attempt.rollout(sampler, params, tokenizer, problems, key=key,
                                 grade_fn=grade_fn, cfg=cfg, num_attempts=num_attempts,
                                 group_size=group_size, single_turn=single_turn,
                                 pad_prompts_to=pad_prompts_to)
  return run


def _first_prompt(episode, problem: str, meta: dict, single_turn: bool) -> str:
  """The prompt text an episode of this kind starts from (its N for multi-attempt)."""
  if episode == "single_turn":
    return prompts.single_turn_prompt(problem)
  return multi_attempt.first_prompt(problem, meta["num_attempts"], single_turn)


def _unhinted_ids(episode, tokenizer, problem: str, base: EpisodeResult, row: int,
                  hinted_meta: dict, single_turn: bool):
  """Prompt(q) ids for a replacement: the replaced row's own prompt (the very ids
  the plain step used), unless a multi-attempt episode announced another N."""
  if episode == "single_turn" or base.meta[row]["num_attempts"] == hinted_meta["num_attempts"]:
    return base.rows[row].prompt
  return tokenizer.encode(_first_prompt(episode, problem, hinted_meta, single_turn))


def _wrong_answers(episode, base: EpisodeResult, rows):
  """(extracted, canonical, truncated) hint material of one group's rows.

  Only answers graded "wrong" count: a grader timeout or error may hide a
  correct answer, which must never be called wrong. Multi-attempt episodes
  contribute every attempt's answer; those answers were complete (boxed)
  even when a later attempt ran out of budget, so none counts as truncated.
  """
  if episode == "single_turn":
    metas = [base.meta[r] for r in rows]
    return ([m["extracted"] if m["status"] == "wrong" else None for m in metas],
            [m["canonical"] for m in metas], [base.rows[r].truncated for r in rows])
  answers = [a for r in rows for a, g in zip(base.meta[r]["answers"], base.meta[r]["grades"])
             if g == "wrong" and a is not None]
  return answers, [canonical_answer(a) for a in answers], [False] * len(answers)


def lte_metrics(codes, successes: Sequence[int], G: int, result: EpisodeResult,
                extra: Optional[EpisodeResult] = None,
                base: Optional[EpisodeResult] = None) -> Metrics:
  """Group fractions (pre-replacement: the paper's key curves) and hint statistics.

  successes: G' per hinted group; result: the final rows; extra: the hinted
  rollouts; base: the step-1 rows (defaults to result). With no hinted group
  the hint rates are 0 (see lte/hinted_groups).
  """
  codes = np.asarray(codes)
  base = base or result
  groups = int(np.sum(codes != EMPTY))
  successes = np.asarray(successes, np.float64)
  extra_rows = extra.rows if extra else []
  m = Metrics()
  for name, mask in (("all_fail", is_all_fail(codes)), ("some_pass", codes == SOME_PASS),
                     ("all_pass", codes == ALL_PASS), ("overlong_all", codes == OVERLONG_ALL),
                     ("overlong_some", codes == OVERLONG_SOME), ("pass_none", codes == PASS_NONE)):
    m.ratio(f"lte/{name}_frac", int(np.sum(mask)), groups)
  m.mean("lte/overlong_frac", [r.truncated for r in base.rows])  # rollouts, before replacement
  m.mean("lte/response_length/mean", [r.is_model.sum() for r in base.rows])  # model tokens
  m.total("lte/hinted_groups", len(successes))
  m.ratio("lte/hint_success_rate", successes.sum(), len(successes) * G)
  m.mean("lte/hint_solved_frac", successes > 0)
  m.total("lte/all_replaced_groups", int(np.sum(successes >= G)))  # G' = G: zero advantage
  m.total("lte/off_policy_rows", sum(r.off_policy for r in result.rows))
  m.mean("lte/reward_mean_after", [r.reward for r in result.rows])
  m.mean("lte/hinted_truncated_frac", [r.truncated for r in extra_rows])
  m.mean("lte/hinted_response_length/mean", [r.is_model.sum() for r in extra_rows])
  return m
