"""One-step-off-policy rollouts (rollout.staleness = 1), as in verl's one-step-off
mode, AReaL and PipelineRL.

The batch trained at step t was sampled with the params of step t−1, while step
t−1's update ran. Each iteration prepares step t's batch (old_logp recomputed
with θ_t), samples step t+1's rollouts with θ_t, and updates θ_t → θ_{t+1} on
step t's batch. Nothing of step t+1's rollout depends on step t's update, so:
  one mesh          (rollout.devices = 0) the two interleave: the rollout runs,
                    then the update.
  split devices     (rollout.devices = k) the last k devices are the rollout
                    group. θ_t's compute-dtype copy is sent across, then the
                    rollout runs in a host thread on the group while the update
                    runs on the trainer's devices; the step waits for both. The
                    same rows are sampled either way (same params, keys and
                    prompts); only the rollout's mesh differs.
Step 0 trains on a rollout of θ_0 itself (there is no older policy): its version
lag is 0, every later step's is exactly 1 (`async/version_lag`, and
`batch.policy_version`).

Off-policy denominators, per row (docs/offpolicy.md):
  on-policy rows   the PPO/GSPO/CISPO ratio is π_θ / π_{θ_t} (old_logp: the trainer's
                   recompute with the current θ_t, the proximal policy of decoupled
                   PPO); the sampler was π_{θ_{t−1}} in its own numerics, so
                   ρ = π_{θ_t} / π_sampler,θ_{t−1} carries the staleness and the
                   kernel mismatch together, and rl.rollout_correction corrects it.
  LTE hinted rows  the ratio's denominator is the behaviour probability itself,
                   μ_{θ_{t−1}}(y | hinted prompt), rescored by the trainer with the
                   very params that sampled it (θ_{t−1}, at sampling time): the LTE
                   ratio π_θ(y | x) / μ(y | x+hint) needs no proximal policy, and ρ
                   there is the numerics gap only.
  multi-attempt    as on-policy rows; feedback tokens stay out of every loss.

Checkpoints stay exact: a checkpoint at step s holds θ_s, and the rollout already
sampled for step s (with θ_{s−1}) is saved beside it, per process, as
`inflight/<s>.p<process>.pkl` (written before the checkpoint, so one exists for
every checkpoint). A resumed run trains on that saved rollout and continues bit
for bit (tests/test_train.py). A checkpoint without one (a synchronous run
resumed with staleness 1) restarts the pipeline of rollouts with a fresh rollout
of the restored params: that step's lag is 0, and a warning says so.
"""
import logging
import os
import pickle
import queue
import threading
import time
from typing import Callable

import jax

from mars import distributed
from mars.trainer import rollout_phase, run_state, update_phase


def _inflight_dir(run) -> str:
  return os.path.join(run.workdir, "inflight")


def _inflight_path(run, step: int) -> str:
  return os.path.join(_inflight_dir(run), f"{step}.p{jax.process_index()}.pkl")


def save_inflight(run, step: int, inflight) -> None:
  """Atomically writes the rollout sampled for `step` (result, version)."""
  os.makedirs(_inflight_dir(run), exist_ok=True)
  path = _inflight_path(run, step)
  with open(path + ".tmp", "wb") as f:
    pickle.dump(inflight, f, protocol=pickle.HIGHEST_PROTOCOL)
  os.replace(path + ".tmp", path)
  # Keep the files of the checkpoints orbax may still restore (keep + the one in flight).
  suffix = f".p{jax.process_index()}.pkl"
  steps = sorted(int(n[:-len(suffix)]) for n in os.listdir(_inflight_dir(run))
                 if n.endswith(suffix) and n[:-len(suffix)].isdigit())
  for old in steps[:-(run.config.train.keep + 1)]:
    os.remove(_inflight_path(run, old))


def load_inflight(run, step: int):
  path = _inflight_path(run, step)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return pickle.load(f)


def _sample(run, step: int, version: int, rollout_params=None):
  """(result, version, seconds): step `step`'s rollout with the current params, which
  have been trained `version` steps (θ_version)."""
  t0 = time.perf_counter()
  result = rollout_phase.sample_rollout(run, step, rollout_params)
  return result, version, time.perf_counter() - t0


class RolloutThread:
  """One host thread that runs a split run's rollouts, for the whole run.

  One thread, not one per step: grader workers it spawns (a recycled or
  replaced worker) are tied to their parent thread's life (PR_SET_PDEATHSIG,
  mars/rewards/worker.py), so a per-step thread would kill them as it ended.
  """

  def __init__(self):
    self._jobs = queue.Queue()
    self._thread = threading.Thread(target=self._serve, name="rollout", daemon=True)
    self._thread.start()

  def _serve(self):
    while True:
      job = self._jobs.get()
      if job is None:
        return
      job()

  def submit(self, fn) -> Callable:
    """Runs fn() on the thread; returns a wait() that gives its result (or raises)."""
    done, box = threading.Event(), {}

    def job():
      try:
        box["result"] = fn()
      except BaseException as e:  # pylint: disable=broad-except  (re-raised by wait)
        box["error"] = e
      done.set()

    self._jobs.put(job)

    def wait():
      done.wait()
      if "error" in box:
        raise box["error"]
      return box["result"]

    return wait

  def close(self):
    self._jobs.put(None)


def _start_sample(run, thread: RolloutThread, step: int, version: int, out: dict):
  """Starts step `step`'s rollout on the rollout group (on `thread`); returns the
  wait: it stores (result, version, seconds) in out["inflight"] and returns the
  seconds (or raises what the rollout raised)."""
  # The copy crosses to the rollout group now, before the update donates θ_t.
  params = jax.block_until_ready(run.sampler.rollout_params(run.state.params))
  wait_sample = thread.submit(lambda: _sample(run, step, version, params))

  def wait() -> float:
    out["inflight"] = wait_sample()
    return out["inflight"][2]

  return wait


def train_loop(run, adv_fn, end: int, *, maybe_eval, is_checkpoint_step) -> dict:
  """The interleaved loop from run.start_step to `end`; returns the last metrics.

  maybe_eval(run, step), is_checkpoint_step(config, step): the synchronous loop's
  (mars.trainer.loop), passed in so that the two loops share them.
  """
  c = run.config
  start = run.start_step
  inflight = load_inflight(run, start) if start else None
  if inflight is None:
    if start:
      logging.warning("No in-flight rollout saved with checkpoint %d: sampling step %d with "
                      "the restored params (version lag 0 for this step).", start, start)
    inflight = _sample(run, start, start)
  thread = RolloutThread() if rollout_phase.is_split(run) else None
  try:
    return _loop(run, adv_fn, start, end, inflight, thread, maybe_eval, is_checkpoint_step)
  finally:
    if thread is not None:
      thread.close()


def _loop(run, adv_fn, start, end, inflight, thread, maybe_eval, is_checkpoint_step) -> dict:
  c = run.config
  last = {}
  for step in range(start, end):
    result, version, rollout_s = inflight
    nxt = {}

    def sample_next(step=step):
      if step + 1 >= c.train.steps:
        return None
      if thread is not None:  # runs beside the update; the step waits for it
        return _start_sample(run, thread, step + 1, step, nxt)
      nxt["inflight"] = _sample(run, step + 1, step)  # θ_step, before its update
      return None

    metrics = update_phase.update_on_rollout(run, step, adv_fn, result, rollout_s,
                                          version=version, before_update=sample_next)
    inflight = nxt.get("inflight")
    metrics.update(maybe_eval(run, step + 1))
    run.writer.write(step + 1, metrics)
    last = metrics
    if is_checkpoint_step(c, step + 1):
      if inflight is not None:
        save_inflight(run, step + 1, inflight)
      distributed.any_process(False)  # every process wrote its file before the checkpoint
      run_state.save_checkpoint(run, step + 1)
  return last
