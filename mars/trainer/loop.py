"""The training loop: rollout phase, update phase, eval and checkpoint per step; resumes exactly.

Step keys are fold_in(seed_key, step), so a resumed run draws the same
randomness as an uninterrupted one.
"""
import time
from typing import Callable, Optional

from mars.trainer import async_loop, evaluation, rollout_phase, run_state, summary, update_phase


def train_one_step(run: run_state.Run, step: int, adv_fn) -> dict:
  t0 = time.perf_counter()
  result = rollout_phase.sample_rollout(run, step)
  return update_phase.update_on_rollout(run, step, adv_fn, result,
                                        rollout_s=time.perf_counter() - t0)


def maybe_eval(run: run_state.Run, step: int) -> dict:
  """The periodic eval at `step` (every train.eval_every steps, and at the last step)."""
  c = run.config
  if not c.train.eval_every or (step % c.train.eval_every and step != c.train.steps):
    return {}
  return evaluation.evaluate_for_trainer(run, step)


def is_checkpoint_step(config, step: int) -> bool:
  return step % config.train.ckpt_every == 0 or step == config.train.steps


def train(config, workdir: str, grade_fn: Optional[Callable] = None,
          max_steps: Optional[int] = None) -> dict:
  """Runs (or resumes) training; returns the last step's metrics."""
  run = run_state.setup(config, workdir, grade_fn)
  adv_fn = update_phase.make_advantages_fn(
      dict(config.rl.to_dict(), max_attempts=config.episode.max_attempts),
      config.data.prompts_per_step)
  last = {}
  try:
    end = config.train.steps if max_steps is None else min(config.train.steps,
                                                            run.start_step + max_steps)
    if config.train.eval_before and run.start_step == 0:
      run.writer.write(0, evaluation.evaluate_for_trainer(run, 0))  # before RL: the summary's baseline
    if config.rollout.staleness:  # one-step-off-policy rollouts
      last = async_loop.train_loop(run, adv_fn, end, maybe_eval=maybe_eval,
                                   is_checkpoint_step=is_checkpoint_step)
    else:
      for step in range(run.start_step, end):
        metrics = train_one_step(run, step, adv_fn)
        metrics.update(maybe_eval(run, step + 1))
        run.writer.write(step + 1, metrics)
        last = metrics
        if is_checkpoint_step(config, step + 1):
          run_state.save_checkpoint(run, step + 1)
    run.ckpt.wait()
    if end == config.train.steps:
      run.writer.plot()
      summary.print_summary(run)
  finally:
    run.close()
  return last
