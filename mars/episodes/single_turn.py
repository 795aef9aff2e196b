"""Single-turn GRPO groups: G samples per question, one prefill per question.

    result = single_turn.rollout(sampler, params, tok, problems, key=key,
                                 grade_fn=rewards.grade_batch, cfg=cfg)

Rows are group-major (the sampler's layout): G samples of question 0, then
question 1, ...; `group_id` is the question's index in this batch. The reward
is binary: `reward_correct` for a correct answer, `reward_wrong` otherwise
(no answer, timeout and grader errors included).
"""
from typing import Callable, Optional, Sequence


from mars import distributed
from mars import prompts
from mars.episodes.packing import EpisodeResult, rows_from_output
from mars.host_metrics import Metrics
from mars.sampling import SamplingParams
from mars.tokenizer import bucket_length, left_pad


def response_text(tokenizer, response_ids) -> str:
  """Decoded response up to (not including) the first stop token."""
  ids = list(response_ids)
  stops = [i for i, t in enumerate(ids) if t in tokenizer.stop_ids]
  return tokenizer.decode(ids[:stops[0]] if stops else ids)


def rollout(sampler, params, tokenizer, problems: Sequence[dict], *, key,
            grade_fn: Callable, cfg, prompt_fn: Callable = prompts.single_turn_prompt,
            prompts_text: Optional[Sequence[str]] = None,
            pad_prompts_to: Optional[int] = None) -> EpisodeResult:
  """Samples, grades and packs G = cfg.group_size rollouts per problem.

  Args:
    problems: dicts with `id`, `problem`, `answer`.
    grade_fn: (responses: list[str], answers: list) -> list[Grade]; called once.
    prompt_fn: problem text -> prompt text (ignored when `prompts_text` is given).
    prompts_text: one rendered prompt per problem (LTE's hinted prompts).
    pad_prompts_to: pads the prompt batch to this many rows (copies of the last
      prompt) so that a varying number of prompts compiles one shape; the extra
      samples are dropped before grading.
  """
  G = int(cfg.group_size)
  texts = list(prompts_text) if prompts_text is not None else [
      prompt_fn(p["problem"]) for p in problems]
  if len(texts) != len(problems):
    raise ValueError(f"rollout: {len(texts)} prompts for {len(problems)} problems.")
  ids = tokenizer.encode_batch(texts)
  ids += [ids[-1]] * max(0, (pad_prompts_to or 0) - len(ids))
  # One prompt length for all processes of a multi-host run.
  length = distributed.agree_max(bucket_length(max(map(len, ids)), 16))
  tokens, mask = left_pad(ids, tokenizer.pad_id, length=length)
  out = sampler.generate(params, tokens, mask, key=key, n=G,
                         max_new_tokens=int(cfg.max_new_tokens),
                         sampling=SamplingParams.from_config(cfg))
  rows = rows_from_output(out)[:len(problems) * G]

  responses = [response_text(tokenizer, r.response) for r in rows]
  answers = [p["answer"] for p in problems for _ in range(G)]
  grades = list(grade_fn(responses, answers))
  if len(grades) != len(rows):
    raise ValueError(f"rollout: grade_fn returned {len(grades)} grades for {len(rows)} responses.")
  reward_correct = float(getattr(cfg, "reward_correct", 1.0))
  reward_wrong = float(getattr(cfg, "reward_wrong", 0.0))
  # A rollout cut at the length limit is a failure (the LTE paper's "overlong"),
  # even if a box appeared before the cut: otherwise never stopping is free.
  truncated_fails = bool(getattr(cfg, "truncated_is_failure", True))
  meta = []
  for i, (row, text, grade) in enumerate(zip(rows, responses, grades)):
    row.group_id = i // G
    passed = grade.correct and not (truncated_fails and row.truncated)
    row.reward = reward_correct if passed else reward_wrong
    meta.append(dict(problem_id=problems[i // G]["id"], response=text,
                     extracted=grade.extracted, status=grade.status,
                     canonical=grade.canonical, off_policy=False))
  return EpisodeResult(rows=rows, meta=meta, pad_id=tokenizer.pad_id,
                       metrics=rollout_metrics(rows, grades))


def rollout_metrics(rows, grades) -> Metrics:
  return (Metrics()
          .mean("reward/mean", [r.reward for r in rows])
          .mean("accuracy/mean", [g.correct for g in grades])
          .mean("response_length/mean", [len(r.response) for r in rows])
          .mean("truncated/frac", [r.truncated for r in rows]))
