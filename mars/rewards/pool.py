"""GraderPool: grading in worker processes with a hard per-answer timeout.

Why processes, and why these ones:
  * sympy can spin for minutes (or allocate without bound) on model output such
    as `\\boxed{9^{9^{9^{9}}}}`, often inside one C call that no signal can
    interrupt. Only killing a process bounds it.
  * Workers are plain `subprocess` interpreters running `mars.rewards.worker`,
    not multiprocessing children: the trainer has JAX loaded and threads
    running, so it must not fork, and multiprocessing's spawn/forkserver
    re-import the parent's `__main__` (e.g. `mars.train`, hence JAX) in every
    worker. A fresh interpreter imports only sympy + math-verify (~0.5 s).

Each worker holds at most one task, so a task's clock starts when it is sent.
A worker past `timeout_s` is killed, its item gets status "timeout", and a warm
spare takes its place at once (a new spare starts in the background). Workers
are recycled after `max_tasks_per_worker` tasks to cap sympy's cache growth.
A worker that dies mid-task (segfault, OOM kill) gives that item "error".
"""
import atexit
import collections
import os
import select
import subprocess
import sys
import threading
import time

from mars.rewards import ipc
from mars.rewards.extract import extract_boxed
from mars.rewards.grader import BOXES, Grade

# Root of the `mars` package checkout, so that workers import the same code.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class _Worker:
  """One worker process and the task it is working on."""

  def __init__(self, soft_timeout_s: float, memory_limit_mb: int):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "mars.rewards.worker", str(soft_timeout_s),
         str(memory_limit_mb), str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
    self.started = time.monotonic()
    self.ready = False
    self.tasks_done = 0
    self.task = None  # index into the current batch
    self.deadline = None
    self.sent_at = None

  def fileno(self) -> int:
    return self.proc.stdout.fileno()

  def send(self, message) -> None:
    ipc.write_frame(self.proc.stdin, message)

  def recv(self):
    return ipc.read_frame(self.proc.stdout)

  def kill(self) -> None:
    try:
      self.proc.kill()
    except OSError:
      pass
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass
    self.proc.wait()


class GraderPool:
  """A pool of grader processes; `grade_batch` never hangs and never raises on model output.

  Args:
    num_workers: processes grading concurrently.
    timeout_s: hard per-answer bound; the worker is killed past it.
    max_tasks_per_worker: recycle a worker after this many tasks.
    spare_workers: warm processes kept ready to replace killed ones.
    memory_limit_mb: RLIMIT_AS per worker (0: none).
    startup_timeout_s: how long a new worker may take to import (environment
      errors raise RuntimeError; they are not model output).
    boxes: which box(es) hold the answer: "math_verify" (math-verify's own
      reading: `\\boxed{1}, \\boxed{2}` is the set {1, 2}) or "last" (the last
      box only, as the multi-attempt paper's reference grader reads it). See
      `answers.read_answer`.
    allow_set_relation_comp: `math_verify.verify`'s option; True lets an
      inequality match an interval (`3 \\le x \\le 4` == `[3,4]`). math-verify's
      default, False, is ours.
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 2.0,
               max_tasks_per_worker: int = 2000, spare_workers: int = 1,
               memory_limit_mb: int = 4096, startup_timeout_s: float = 120.0,
               boxes: str = "math_verify", allow_set_relation_comp: bool = False):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if boxes not in BOXES:
      raise ValueError(f"boxes must be one of {BOXES}, got {boxes!r}")
    # Sent with every task, so that the workers need no restart to change them.
    self.options = {"boxes": boxes, "allow_set_relation_comp": bool(allow_set_relation_comp)}
    self.num_workers = num_workers
    self.timeout_s = float(timeout_s)
    self.max_tasks_per_worker = max_tasks_per_worker
    self.spare_workers = spare_workers
    self.memory_limit_mb = memory_limit_mb
    self.startup_timeout_s = startup_timeout_s
    # The worker stops itself a little before the hard kill: cheaper, keeps the process.
    self._soft_timeout_s = 0.8 * self.timeout_s
    self._lock = threading.Lock()
    self._workers = [self._new_worker() for _ in range(num_workers)]
    self._spares = [self._new_worker() for _ in range(spare_workers)]
    self._closed = False
    self._startup_failures = 0
    self.num_killed = 0
    self.num_recycled = 0
    # Seconds from send to reply (or kill) per item of the last batch.
    self.last_latencies_s: list[float] = []

  def _new_worker(self) -> _Worker:
    return _Worker(self._soft_timeout_s, self.memory_limit_mb)

  # ---- public API

  def grade_batch(self, responses, answers) -> list[Grade]:
    """Grades responses[i] against answers[i] (str, number or list of str)."""
    responses, answers = list(responses), list(answers)
    if len(responses) != len(answers):
      raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    tasks = [("grade", r, a, self.options) for r, a in zip(responses, answers)]
    replies = self._run(tasks)
    return [reply if isinstance(reply, Grade) else Grade(*reply)
            for reply in replies]

  def canonical_batch(self, texts) -> list[str]:
    """`answers.canonical_answer` of each text, computed in the workers."""
    texts = [str(t) for t in texts]
    replies = self._run([("canonical", t) for t in texts])
    return [r if isinstance(r, str) else "".join(t.split())
            for r, t in zip(replies, texts)]

  def close(self) -> None:
    with self._lock:
      if self._closed:
        return
      self._closed = True
      for w in self._workers + self._spares:
        w.kill()
      self._workers, self._spares = [], []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  # ---- scheduling

  def _run(self, tasks: list) -> list:
    with self._lock:
      if self._closed:
        raise RuntimeError("GraderPool is closed")
      for w in list(self._workers):
        if w.task is not None:  # left over from an interrupted batch
          self._replace(w)
      results = [None] * len(tasks)
      latencies = [0.0] * len(tasks)
      pending = collections.deque(range(len(tasks)))
      while pending or any(w.task is not None for w in self._workers):
        self._dispatch(tasks, pending, results)
        self._wait_and_collect(tasks, pending, results, latencies)
      self.last_latencies_s = latencies
      return results

  def _dispatch(self, tasks, pending, results) -> None:
    for w in list(self._workers):
      if not pending:
        return
      if w.ready and w.task is None:
        index = pending.popleft()
        try:
          w.send(tasks[index])
        except OSError:  # died while idle: not this item's fault, resend.
          pending.appendleft(index)
          self._replace(w)
          continue
        w.task, w.sent_at = index, time.monotonic()
        w.deadline = w.sent_at + self.timeout_s

  def _wait_and_collect(self, tasks, pending, results, latencies) -> None:
    now = time.monotonic()
    watched = [w for w in self._workers + self._spares
               if w.task is not None or not w.ready]
    deadlines = [w.deadline for w in watched if w.task is not None]
    deadlines += [w.started + self.startup_timeout_s for w in watched if not w.ready]
    wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
    readable, _, _ = select.select(watched, [], [], wait_s) if watched else ([], [], [])
    for w in readable:
      reply = w.recv()
      if reply is None:  # EOF: the process died.
        if w.task is not None:
          results[w.task] = _failed(tasks[w.task], "error")
          latencies[w.task] = time.monotonic() - w.sent_at
        elif not w.ready:
          # A transient failure is retried; a broken environment is raised.
          self._startup_failures += 1
          if self._startup_failures > 3:
            raise RuntimeError(
                "grader workers keep exiting during startup (see their stderr)")
        self._replace(w)
        continue
      if not w.ready:
        w.ready = reply == ("ready",)
        self._startup_failures = 0
        continue
      results[w.task] = reply
      latencies[w.task] = time.monotonic() - w.sent_at
      w.task = None
      w.tasks_done += 1
      if w.tasks_done >= self.max_tasks_per_worker:
        self.num_recycled += 1
        self._replace(w)
    now = time.monotonic()
    for w in list(self._workers):
      if w.task is not None and now >= w.deadline:
        results[w.task] = _failed(tasks[w.task], "timeout")
        latencies[w.task] = now - w.sent_at
        self.num_killed += 1
        self._replace(w)
    for w in self._workers + self._spares:
      if not w.ready and now - w.started > self.startup_timeout_s:
        raise RuntimeError(
            f"grader worker not ready after {self.startup_timeout_s} s")

  def _replace(self, w: _Worker) -> None:
    """Kills `w` and puts a warm spare (or a new worker) in its place."""
    w.kill()
    if w in self._spares:
      self._spares.remove(w)
      self._spares.append(self._new_worker())
      return
    self._workers.remove(w)
    self._workers.append(self._spares.pop(0) if self._spares else self._new_worker())
    while len(self._spares) < self.spare_workers:
      self._spares.append(self._new_worker())


def _failed(task, status: str):
  """Reply for a task whose worker was killed or died.

  The extracted answer is still reported (extraction is linear and safe here),
  so a timed-out attempt still counts as answered for the multi-attempt reward.
  """
  if task[0] == "grade":
    response = task[1]
    if isinstance(response, bytes):
      response = response.decode("utf-8", "replace")
    return Grade(status, extract_boxed(str(response)), None)
  return "".join(str(task[1]).split())


_default_pool = None
_default_pool_lock = threading.Lock()


def default_pool() -> GraderPool:
  """The lazily created process-wide pool (2 workers), closed at exit."""
  global _default_pool
  with _default_pool_lock:
    if _default_pool is None or _default_pool._closed:  # pylint: disable=protected-access
      _default_pool = GraderPool()
      atexit.register(_default_pool.close)
    return _default_pool


def grade_batch(responses, answers, pool: GraderPool | None = None) -> list[Grade]:
  """Grades a batch in `pool` (default: the shared 2-worker pool)."""
  return (pool or default_pool()).grade_batch(responses, answers)
