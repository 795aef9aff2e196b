"""Multi-attempt episodes ("Learning from Failures in Multi-Attempt RL"): host driver.

    result = multi_attempt.rollout(sampler, params, tok, problems, key=key,
                                   grade_fn=rewards.grade_batch, cfg=cfg,
                                   num_attempts=draw_num_attempts(rng, len(problems), cfg))

Each episode starts from the multi-attempt prompt announcing N attempts (the
single-turn baseline: `single_turn=True`, the plain prompt and N = 1). The
sampler generates `cfg.chunk_tokens` tokens at a time; after each chunk the
host reads only the new columns, finds attempts that ended
(`attempts.check_chunk`), grades them in one `grade_fn` call, and applies
`attempts.decide`: rewind the tokens written after the attempt's end, force
the feedback turn (no re-prefill), or finish the row. Rules live in
`attempts.py`; `cfg.attempt_end` picks when an attempt ends:
  "boxed"  right after its first complete \\boxed{} (the exact cut; tail rewound)
  "chunk"  the reference (DualityRL/multi-attempt, duality/vllm_mul.py): at the
           end of the chunk (counted from the attempt's start) in which its last
           box is complete, the rest of the chunk kept and the last box graded;
           the model's stop token before a feedback turn is replaced by the
           feedback's <|im_end|>; `cfg.max_chunks` caps the chunks per episode
  "eos"    at the model's end of turn; the last box graded (with N = 1: the
           reference's single-turn baseline, which generates to EOS)
Whatever the mode, a feedback turn follows exactly one <|im_end|> closing the
assistant turn, so the transcript renders as the Qwen chat template would
(tests/test_multi_attempt.py checks it against apply_chat_template).

Rows are group-major (G = group_size episodes per question, group_id = the
question's index). The response of a row is its model tokens and the injected
feedback tokens in order; feedback is `~is_model`, hence the RolloutBatch's
transparent span. The episode reward (`Row.reward`) goes on the last model
token (the advantage code places it). `Row.truncated` means status "budget"
(the sampler's own flag can be stale after a rewind + force).
"""
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from mars import distributed
from mars import prompts
from mars.episodes import attempts as rules
from mars.episodes.packing import EpisodeResult, rows_from_output
from mars.sampling import SamplingParams
from mars.host_metrics import Metrics
from mars.tokenizer import LENGTH_BUCKETS_PER_OCTAVE, bucket_length, left_pad


def validate_config(cfg) -> None:
  lo, hi = int(cfg.min_attempts), int(cfg.max_attempts)
  if not 1 <= lo <= hi:
    raise ValueError(f"episode: need 1 <= min_attempts <= max_attempts, got {lo}, {hi}.")
  if cfg.attempt_end not in rules.ATTEMPT_ENDS:
    raise ValueError(f"episode.attempt_end must be one of {rules.ATTEMPT_ENDS}, "
                     f"got {cfg.attempt_end!r}.")
  for name in ("chunk_tokens", "budget"):
    if int(cfg[name]) < 1:
      raise ValueError(f"episode.{name} must be >= 1, got {cfg[name]}.")
  max_chunks = int(cfg.max_chunks)
  if max_chunks < 0 or (max_chunks and cfg.attempt_end != "chunk"):
    raise ValueError(f"episode.max_chunks={max_chunks}: must be >= 0, and > 0 only with "
                     "attempt_end='chunk'.")


def draw_num_attempts(rng: np.random.Generator, batch: int, cfg) -> np.ndarray:
  """N per question (or per episode), uniform on {min_attempts..max_attempts}."""
  validate_config(cfg)
  return rng.integers(int(cfg.min_attempts), int(cfg.max_attempts) + 1,
                      size=batch).astype(np.int32)


def first_prompt(problem: str, num_attempts: int, single_turn: bool = False) -> str:
  return prompts.single_turn_prompt(problem) if single_turn else prompts.multi_attempt_prompt(
      problem, num_attempts)


def cache_length(prompt_len: int, max_attempts: int, feedback_len: int, cfg) -> int:
  """Columns one row can use: prompt + budget + a feedback turn per extra attempt.

  Each row's transcript is compact (the engine has no shared write column),
  and tokens sampled past an attempt's end are rewound and refunded, so the
  budget bounds the sampled tokens at every moment. Rounded up to a length
  bucket (few distinct output widths).
  """
  need = prompt_len + int(cfg.budget) + 1 + (max_attempts - 1) * feedback_len
  return bucket_length(need, 128, per_octave=LENGTH_BUCKETS_PER_OCTAVE)


# ----------------------------------------------------------------------------
# Host view of the sampler's columns.

class _Transcript:
  """The driver's view of the sampler's rows: the engine keeps every transcript on
  the host (tokens, gen/forced masks, done flags in SampleOutput's column layout),
  so this reads them in place."""

  def __init__(self, prompt_len: int):
    self.prompt_len = prompt_len
    self.tokens = self.gen = self.forced = None

  def pull(self, state) -> np.ndarray:
    """Points at the state's rows after a run; returns each row's done flag."""
    self.tokens, self.gen, self.forced = state.tokens, state.gen_mask, state.forced_mask
    return np.asarray(state.done, bool).copy()

  def attempt(self, row: int):
    """(tokens, columns) of the model tokens after the row's last forced token."""
    forced = np.flatnonzero(self.forced[row])
    start = forced[-1] + 1 if forced.size else self.prompt_len
    cols = start + np.flatnonzero(self.gen[row, start:])
    return self.tokens[row, cols], cols

  def num_generated(self, row: int) -> int:
    return int(self.gen[row].sum())


# ----------------------------------------------------------------------------
# The driver.

def rollout(sampler, params, tokenizer, problems: Sequence[dict], *, key, grade_fn: Callable,
            cfg, num_attempts=None, group_size: int = 1,
            single_turn: bool = False, pad_prompts_to: int = 0) -> EpisodeResult:
  """Runs G = group_size multi-attempt episodes per problem; see the module docstring.

  Args:
    sampler: a `mars.sampling.Sampler` (or anything with its start / run /
      force / rewind / finish / outputs contract and `stop_ids`, `queue_len`).
    problems: dicts with `id`, `problem`, `answer`.
    key: PRNG key of the sampler (and of N when `num_attempts` is None).
    grade_fn: (responses: list[str], answers: list) -> list[Grade]; called once
      per chunk, only for attempts with a complete box.
    cfg: mars.config.multi_attempt_config(config): config.episode + the rollout's sampling.
    num_attempts: N per problem (len(problems)) or per episode
      (len(problems)·G), or one int (evaluation). None: drawn from `key`.
      Episodes of one problem that share N share one prefill.
    single_turn: the baseline: plain single-turn prompt, N = 1.
    pad_prompts_to: plays copies of the last problem up to this many problems
      (one compiled shape for a varying count, and equal shapes on every
      process of a multi-host run); their episodes are dropped from the result.
  """
  validate_config(cfg)
  G = int(group_size)
  n_rows = _attempts_per_row(num_attempts, len(problems), G, single_turn, key, cfg)
  real_rows = len(n_rows)
  extra = max(0, int(pad_prompts_to or 0) - len(problems))
  problems = list(problems) + [problems[-1]] * extra
  n_rows = n_rows + n_rows[-G:] * extra
  # Shapes and layouts every process of a multi-host run must share.
  shared = not distributed.any_process(
      not all(len(set(n_rows[q * G:(q + 1) * G])) == 1 for q in range(len(problems))))
  if shared:  # one prefill per problem, fanned out to G rows
    texts = [first_prompt(p["problem"], n_rows[q * G], single_turn)
             for q, p in enumerate(problems)]
  else:
    texts = [first_prompt(problems[r // G]["problem"], n, single_turn)
             for r, n in enumerate(n_rows)]
  ids = tokenizer.encode_batch(texts)
  A, prompt_len = distributed.agree_max(
      max(n_rows), bucket_length(max(map(len, ids)), 16, per_octave=LENGTH_BUCKETS_PER_OCTAVE))
  tokens, mask = left_pad(ids, tokenizer.pad_id, length=prompt_len)
  feedback_len = max((len(tokenizer.encode(prompts.feedback_turn(n, True))) for n in range(1, A)),
                     default=0)
  if feedback_len > sampler.queue_len:
    raise ValueError(f"multi_attempt: a feedback turn is {feedback_len} tokens, more than the "
                     f"sampler's queue_len={sampler.queue_len}; build the Sampler with a larger "
                     "one.")
  cache_len = cache_length(tokens.shape[1], A, feedback_len, cfg)
  state = sampler.start(params, tokens, mask, key=key, n=G if shared else 1,
                        max_new_tokens=int(cfg.budget), cache_len=cache_len,
                        sampling=SamplingParams.from_config(cfg))
  episodes = [rules.new_episode(n) for n in n_rows]
  answers = [problems[r // G]["answer"] for r in range(len(n_rows))]
  state, episodes = _play(sampler, params, state, episodes, answers, tokenizer, grade_fn, cfg,
                          prompt_len=tokens.shape[1])
  return _result(sampler.outputs(state), episodes[:real_rows], problems, G, tokenizer, cfg)


def _attempts_per_row(num_attempts, num_problems, G, single_turn, key, cfg) -> list:
  B = num_problems * G
  if single_turn:
    return [1] * B
  if num_attempts is None:  # N per problem from the rollout key (typed or raw uint32)
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    seed = np.asarray(jax.random.key_data(key) if typed else key).ravel().tolist()
    num_attempts = draw_num_attempts(np.random.default_rng(seed), num_problems, cfg)
  n = np.asarray(num_attempts, np.int64).ravel()
  if np.ndim(num_attempts) == 0:  # evaluation: one N for every problem
    n = np.full((num_problems,), n[0])
  if len(n) == num_problems:
    n = np.repeat(n, G)
  if len(n) != B or (n < 1).any():
    raise ValueError(f"num_attempts: need ints >= 1, one per problem ({num_problems}) or per "
                     f"episode ({B}); got {np.asarray(num_attempts).tolist()}.")
  return [int(x) for x in n]


def _play(sampler, params, state, episodes, answers, tokenizer, grade_fn, cfg, *, prompt_len):
  """Chunk loop: run -> check -> grade -> rewind / force / finish, until every episode ends."""
  view = _Transcript(prompt_len)
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  stop_ids = frozenset(int(t) for t in sampler.stop_ids)
  feedback_ids = functools.lru_cache(None)(lambda text: list(tokenizer.encode(text)))
  sampling, budget = SamplingParams.from_config(cfg), int(cfg.budget)
  chunk, max_chunks = int(cfg.chunk_tokens), int(cfg.max_chunks)
  while distributed.any_process(not all(ep.done for ep in episodes)):
    state = sampler.run(params, state, chunk, sampling)
    done = view.pull(state)
    spans = [view.attempt(b) if not ep.done else ([], []) for b, ep in enumerate(episodes)]
    ends = rules.check_chunk(episodes, [t for t, _ in spans], done, decode=decode,
                             attempt_end=cfg.attempt_end, stop_ids=stop_ids,
                             im_end_id=tokenizer.im_end_id, chunk_tokens=chunk,
                             max_chunks=max_chunks)
    statuses = _grade(ends, answers, grade_fn)
    rewinds, forced, finished = {}, {}, []
    for b, end in enumerate(ends):
      if episodes[b].done:
        continue
      if end is None:
        episodes[b] = rules.mark_scanned(episodes[b], len(spans[b][0]))
        continue
      cols = spans[b][1]
      budget_left = budget - (view.num_generated(b) - (len(cols) - end.keep))
      if max_chunks:
        budget_left = min(budget_left, (max_chunks - episodes[b].chunks - end.chunks) * chunk)
      episodes[b], action = rules.decide(episodes[b], end, statuses[b], budget_left=budget_left)
      keep = end.keep
      if action.kind == "feedback":
        keep -= int(end.strip_stop)  # the feedback's <|im_end|> replaces the model's stop token
        forced[b] = feedback_ids(action.feedback_text)
      else:
        finished.append(b)
      if keep < len(cols):
        rewinds[b] = int(cols[keep])
    state = sampler.rewind(state, rewinds)
    state = sampler.force(state, forced)
    state = sampler.finish(state, finished) if finished else state
  return state, episodes


def _grade(ends, answers, grade_fn) -> list:
  """Grade.status per ended attempt with a box (one grade_fn call); None elsewhere."""
  todo = [b for b, end in enumerate(ends) if end is not None and rules.needs_grading(end)]
  statuses = [None] * len(ends)
  if todo:
    grades = list(grade_fn([ends[b].text for b in todo], [answers[b] for b in todo]))
    if len(grades) != len(todo):
      raise ValueError(f"grade_fn returned {len(grades)} grades for {len(todo)} responses.")
    for b, grade in zip(todo, grades):
      statuses[b] = grade.status
  return statuses


def _result(out, episodes, problems, G, tokenizer, cfg) -> EpisodeResult:
  rows = rows_from_output(out)[:len(episodes)]  # padding episodes dropped
  meta = []
  for b, (row, ep) in enumerate(zip(rows, episodes)):
    row.group_id = b // G
    row.reward = rules.episode_reward(ep, cfg)
    row.truncated = ep.status == "budget"
    answered = [a for a in ep.answers if a is not None]
    meta.append(dict(
        problem_id=problems[b // G]["id"], group_id=b // G, num_attempts=ep.num_attempts,
        attempts_used=ep.attempts_used, success_attempt=ep.success_attempt, status=ep.status,
        answers=list(ep.answers), grades=list(ep.grades), attempt_ends=list(ep.ends),
        extracted=answered[-1] if answered else None, reward=row.reward,
        model_tokens=int(row.is_model.sum()), response=tokenizer.decode(row.response),
        off_policy=False))
  max_k = max([int(cfg.max_attempts)] + [ep.num_attempts for ep in episodes])
  return EpisodeResult(rows=rows, meta=meta, pad_id=tokenizer.pad_id,
                       metrics=episode_metrics(episodes, rows, max_k))


def episode_metrics(episodes: Sequence[rules.Episode], rows, max_k: int) -> Metrics:
  """success@k (solved within k attempts), attempts, reward histogram, tokens, budget hits."""
  success = np.array([ep.success_attempt for ep in episodes])
  correct = np.array([ep.status == "correct" for ep in episodes])
  answered = np.array([ep.answered_any for ep in episodes])
  m = Metrics()
  for k in range(1, max_k + 1):
    m.mean(f"success@{k}", (success > 0) & (success <= k))
  m.mean("reward/mean", [r.reward for r in rows])
  m.mean("reward/frac_correct", correct)
  m.mean("reward/frac_wrong", ~correct & answered)
  m.mean("reward/frac_no_answer", ~correct & ~answered)
  m.mean("attempts_used/mean", [ep.attempts_used for ep in episodes])
  m.mean("tokens_per_episode/mean", [r.is_model.sum() for r in rows])
  m.mean("feedback_tokens/mean", [(~r.is_model).sum() for r in rows])
  m.mean("budget_hit/frac", [ep.status == "budget" for ep in episodes])
  m.ratio("attempts/repeat_frac", *repeat_counts(episodes))
  return m


def repeat_counts(episodes):
  """(repeats, later attempts): of the attempts after the first, how many
  re-give an answer the episode already had rejected, the failure mode
  multi-attempt RL should fix."""
  later = repeats = 0
  for ep in episodes:
    seen = set()
    for i, answer in enumerate(ep.answers):
      if i and answer is not None:
        later += 1
        repeats += answer in seen
      if answer is not None:
        seen.add(answer)
  return repeats, later

