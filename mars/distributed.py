"""Multi-host setup on JAX's own distributed runtime: no cluster layer of our own.

`maybe_initialize()` calls `jax.distributed.initialize()` exactly when the
environment says this is one process of many:

* explicit: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` (> 1) and
  `JAX_PROCESS_ID`, passed through as arguments (our GKE JobSet sets them, and
  so does the 2-process localhost CPU test);
* TPU pod metadata that `jax.distributed.initialize()` detects by itself:
  `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` naming more than one host,
  `MEGASCALE_*` (multislice), or a GKE `TPU_WORKER_ID` other than 0;
* `MARS_DISTRIBUTED=1` forces auto-detection (a TPU VM slice launched with
  `gcloud ... ssh --worker=all`, where only the metadata server knows the
  hosts, which we don't want to query on every import); `MARS_DISTRIBUTED=0`
  turns it all off.

Call it first thing in a program, before anything touches `jax.devices()`:
the backend cannot join a cluster once it has started.

Data: each process feeds only its rows of the global batch (`local_rows`) and
`global_array_from_local` stitches them into one global `jax.Array`.

Importing this module does not import jax, so launchers and tests stay cheap.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Mapping

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedEnvError(ValueError):
  """The environment describes a multi-process run inconsistently."""


@dataclasses.dataclass(frozen=True)
class Detected:
  """How to initialize: `source` says why, `kwargs` go to jax.distributed.initialize."""
  source: str  # "explicit" | "tpu" | "megascale" | "forced"
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def detect(environ: Mapping[str, str] | None = None) -> Detected | None:
  """Decides from env vars alone (no jax, no network) whether we are multi-process."""
  env = os.environ if environ is None else environ
  forced = env.get("MARS_DISTRIBUTED", "").strip().lower()
  if forced in ("0", "false", "no", "off"):
    return None

  present = [k for k in _EXPLICIT if env.get(k)]
  if present:
    # Half-set coordinator vars would otherwise hang or silently run alone.
    missing = [k for k in _EXPLICIT if k not in present]
    if missing:
      raise DistributedEnvError(f"{present} set but {missing} missing; set all of {list(_EXPLICIT)}.")
    try:
      num, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError as e:
      raise DistributedEnvError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}") from None
    if not 0 <= pid < num:
      raise DistributedEnvError(f"JAX_PROCESS_ID={pid} out of range for JAX_NUM_PROCESSES={num}.")
    if num > 1:
      return Detected("explicit", dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=num, process_id=pid))
    return None  # A world of one needs no coordinator.

  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return Detected("tpu")
  if env.get("TPU_WORKER_ID", "0").strip() not in ("", "0"):
    return Detected("tpu")  # A non-zero worker is by definition one of many.
  slices = env.get("MEGASCALE_NUM_SLICES", "")
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or (slices.isdigit() and int(slices) > 1):
    return Detected("megascale")
  if forced in ("1", "true", "yes", "on"):
    return Detected("forced")
  return None


_initialized = False


def maybe_initialize(cpu_collectives: str | None = None,
                     environ: Mapping[str, str] | None = None) -> bool:
  """Initializes jax.distributed if the environment asks for it; returns whether it is up.

  Idempotent: later calls return True without re-initializing.
  cpu_collectives: e.g. "gloo", needed for cross-process collectives on CPU
  (the localhost multi-process test); the same as JAX_CPU_COLLECTIVES_IMPLEMENTATION.
  """
  global _initialized
  if _initialized:
    return True
  found = detect(environ)
  if found is None:
    # Someone may have initialized by hand; only look if jax is already loaded.
    jax = sys.modules.get("jax")
    return bool(jax is not None and jax.distributed.is_initialized())
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.distributed.is_initialized():
    if cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**found.kwargs)
  _initialized = True
  return True


def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_main_process() -> bool:
  """Process 0 alone writes metrics, logs and exports."""
  return process_index() == 0


def even_rows(global_batch_size: int, index: int, count: int) -> slice:
  """Contiguous equal split of rows by process index."""
  if global_batch_size % count:
    raise ValueError(f"global batch {global_batch_size} not divisible by {count} processes.")
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


def local_rows(global_batch_size: int, sharding=None) -> slice:
  """Rows of the global batch this process loads and does host work on.

  With a sharding, the rows are the ones its addressable devices hold along
  dim 0, which is what make_array_from_process_local_data expects; without,
  an even split by process index.
  """
  if sharding is None:
    return even_rows(global_batch_size, process_index(), process_count())
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(sharding, jax.sharding.NamedSharding):
    # Only dim 0 matters; a 1-D view avoids needing the other dims' sizes.
    spec = tuple(sharding.spec)
    sharding = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(spec[0] if spec else None))
  idx = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  spans = sorted({s[0].indices(global_batch_size)[:2] for s in idx})
  lo, hi = spans[0][0], spans[0][1]
  for start, stop in spans[1:]:
    if start > hi:
      raise ValueError(f"this process's rows are not contiguous: {spans}; "
                       "build the mesh so each process owns a block of the batch axis.")
    hi = max(hi, stop)
  return slice(lo, hi)


def global_array_from_local(local, sharding, global_shape=None):
  """One global jax.Array from each process's local rows (see local_rows)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)


# ----------------------------------------------------------------------------
# Host <-> global arrays, and the few host decisions all processes must share.
# Every helper is a no-op (no collective) in a single process, so one-process
# runs are unchanged, bit for bit.

def is_multiprocess() -> bool:
  jax = sys.modules.get("jax")
  return jax is not None and jax.process_count() > 1


def host_local(x):
  """This process's rows (dim 0) of a jax.Array as numpy (all of it in one process);
  the inverse of global_array_from_local.

  Shards are taken along dim 0 only: the arrays this is used on (sampler
  buffers, batch fields) are split over rows and replicated over the rest.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x)
  blocks = {}
  for shard in x.addressable_shards:
    idx = shard.index
    if any(s.indices(n)[:2] != (0, n) for s, n in zip(idx[1:], x.shape[1:])):
      raise ValueError(f"host_local: array of shape {x.shape} is split beyond dim 0 "
                       f"({x.sharding}); only row-sharded arrays have host-local rows.")
    blocks.setdefault(idx[0].indices(x.shape[0])[0] if idx else 0, shard.data)
  starts = sorted(blocks)
  return np.concatenate([np.asarray(blocks[s]) for s in starts], 0)


def _allgather(values):
  """[process_count, ...] numpy of every process's `values` (device all-gather)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def allgather_exact(table):
  """[process_count, ...] float64 of every process's float64 `table`, bit-exact
  (sent as int32 pairs: an x64-off all-gather would round float64 to float32)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  table = np.ascontiguousarray(table, np.float64)
  words = _allgather(table.view(np.int32))
  return np.ascontiguousarray(words).view(np.float64).reshape((-1,) + table.shape)


def agree_max(*values: int):
  """The max over processes of each int (shapes every process must share)."""
  if not is_multiprocess():
    return values[0] if len(values) == 1 else values
  import numpy as np  # pylint: disable=g-import-not-at-top
  got = _allgather(np.asarray(values, np.int64)).max(0).tolist()
  return got[0] if len(got) == 1 else tuple(got)


def agree_sum(value: int) -> int:
  """The sum over processes of an int."""
  if not is_multiprocess():
    return int(value)
  return int(_allgather([int(value)]).sum())


def any_process(flag: bool) -> bool:
  """True when `flag` holds on any process (loop conditions all processes follow)."""
  if not is_multiprocess():
    return bool(flag)
  return bool(_allgather([int(bool(flag))]).max())
