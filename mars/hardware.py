"""TPU chip figures and topology names for mars.plan: what a slice holds and how fast it is.

Per-chip peaks are Google's published figures (bf16 dense matmul peak, HBM
capacity and bandwidth), one source per chip in CHIPS; the compile-only
devices of a topology (libtpu) do not report their memory, so the capacity
comes from this table too.
"""
import dataclasses
import math
import os
import re
from typing import Optional


class TopologyError(ValueError):
  """An unknown topology name, or a TPU topology without libtpu installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float      # bf16 FLOP/s per chip
  hbm_bandwidth: float   # bytes/s per chip
  hbm_bytes: float       # capacity per chip
  source: str


GIB = 2 ** 30
CHIPS = {
    # v4: 275 TFLOP/s bf16, "32 GiB, 1200 GBps" (not 1228).
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * GIB, "https://cloud.google.com/tpu/docs/v4"),
    # v5e: 197 TFLOP/s bf16, 16 GB, 819 GBps (the v6e page's comparison table).
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GIB, "https://cloud.google.com/tpu/docs/v5e"),
    # v5p: 459 TFLOP/s bf16, "HBM capacity per chip (GiB) 95", 2765 GBps.
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GIB, "https://cloud.google.com/tpu/docs/v5p"),
    # v6e (Trillium): 918 TFLOP/s bf16, 32 GB, 1640 GBps.
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GIB, "https://cloud.google.com/tpu/docs/v6e"),
}

# Accelerator type -> chip topology (AxB or AxBxC), as the Cloud TPU docs list
# them. v4 and v5p names count TensorCores (2 per chip), v5e/v6e names chips.
_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TOPOLOGIES = {f"{g}-{n}": (g, shape) for g in ("v4", "v5p") for n, shape in _3D.items()}
TOPOLOGIES.update({f"{g}-{n}": (g, shape) for g in ("v5e", "v6e") for n, shape in _2D.items()})
LOCAL = "local"


def known_names() -> list:
  order = lambda n: (n.split("-")[0], int(n.split("-")[1]))
  return [LOCAL] + sorted(TOPOLOGIES, key=order)


def has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


@dataclasses.dataclass
class Topology:
  name: str
  devices: list
  chip: Optional[Chip]   # None: local devices (no published peak)
  num_chips: int
  num_hosts: int

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // max(self.num_chips, 1))

  def per_device(self, value: float) -> float:
    """A per-chip figure split over the JAX devices of one chip (v4: 2 cores)."""
    return value / self.devices_per_chip


def get(name: str) -> Topology:
  """The devices of a named topology: compile-only TPU devices, or the local ones."""
  import jax  # pylint: disable=g-import-not-at-top
  name = name.strip().lower()
  if name == LOCAL:
    devices = jax.devices()
    return Topology(LOCAL, devices, None, len(devices), jax.process_count())
  if name not in TOPOLOGIES:
    raise TopologyError(f"unknown topology {name!r}; known: {', '.join(known_names())}.")
  if not has_libtpu():
    raise TopologyError(f"planning for {name} needs libtpu: pip install -e \".[tpu]\" "
                        f"(or plan --topology=local).")
  # A plan only compiles and never owns a chip: let several planners (pytest
  # workers, a second shell) load libtpu at once instead of failing on its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  gen, shape = TOPOLOGIES[name]
  dims = [int(x) for x in shape.split("x")]
  chips = math.prod(dims)
  kwargs = {}
  if chips < 4:  # libtpu's default host is 2x2 chips
    kwargs["chips_per_host_bounds"] = (dims + [1, 1])[:3]
  elif chips == 8 and len(dims) == 2:  # v5e-8 / v6e-8: one host with 8 chips
    kwargs["chips_per_host_bounds"] = (2, 4, 1)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{shape}", **kwargs)
  devices = list(topo.devices)
  hosts = len({d.process_index for d in devices})
  return Topology(name, devices, CHIPS[gen], chips, hosts)


def parse_names(spec: str) -> list:
  names = [n.strip().lower() for n in re.split(r"[,\s]+", spec or "") if n.strip()]
  for n in names:
    if n != LOCAL and n not in TOPOLOGIES:
      raise TopologyError(f"unknown topology {n!r}; known: {', '.join(known_names())}.")
  return names or [LOCAL]
