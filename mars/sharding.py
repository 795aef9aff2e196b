"""Device mesh and logical-axis rules: the only place that names mesh axes.

Every parameter and key activation carries logical axis names (batch, length,
embed, heads, kv_heads, mlp, vocab, ...). `LOGICAL_RULES` maps them to the
mesh axes (data, fsdp, tensor). Change the table, not the model, to change
the parallelism strategy.
"""
import contextlib
import logging
import math
import threading
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = {
    "batch": ("data", "fsdp"),
    "length": None,
    "pages": ("data", "fsdp"),  # one KV page pool per data-parallel group (models/paged.py)
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
}

# Logical axes that must divide their mesh axes exactly (else: a clear error).
# Others fall back to replication (e.g. 2 KV heads on a 4-way tensor axis).
_STRICT_AXES = ("batch", "heads")


class ShardingError(ValueError):
  """A shape that cannot be laid out on the mesh."""


# Per thread: a split run's rollout thread traces its programs under the rollout
# mesh while the main thread traces the update under the trainer's.
_CURRENT_MESH = threading.local()


def _mesh_stack() -> list:
  if not hasattr(_CURRENT_MESH, "stack"):
    _CURRENT_MESH.stack = []
  return _CURRENT_MESH.stack


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """Mesh over (data, fsdp, tensor); one entry may be -1 for "the rest"."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ShardingError(f"mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}.")
  if shape.count(-1) > 1:
    raise ShardingError(f"mesh_shape {shape} has more than one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ShardingError(f"mesh_shape {shape} does not divide {len(devices)} devices.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ShardingError(f"mesh_shape {tuple(shape)} needs {math.prod(shape)} devices, "
                        f"but {len(devices)} are available.")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_axis_size(mesh: Mesh, mesh_axes) -> int:
  if mesh_axes is None:
    return 1
  if isinstance(mesh_axes, str):
    mesh_axes = (mesh_axes,)
  return math.prod(mesh.shape[a] for a in mesh_axes)


def logical_to_spec(logical_axes, mesh: Optional[Mesh] = None, shape=None,
                    rules=None, name: str = "array") -> PartitionSpec:
  """PartitionSpec for logical axes; checks divisibility when shape is given."""
  rules = LOGICAL_RULES if rules is None else rules
  spec = []
  for i, axis in enumerate(logical_axes):
    mesh_axes = rules.get(axis) if axis is not None else None
    if mesh_axes is not None and mesh is not None and shape is not None:
      size = mesh_axis_size(mesh, mesh_axes)
      if shape[i] % size:
        if axis in _STRICT_AXES:
          raise ShardingError(
              f"{name}: {axis} dimension {shape[i]} does not divide mesh axes "
              f"{mesh_axes} of size {size} (mesh {dict(mesh.shape)}).")
        logging.info("%s: %s=%d not divisible by %s=%d; replicating that dim.",
                     name, axis, shape[i], mesh_axes, size)
        mesh_axes = None
    spec.append(mesh_axes)
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes, shape=None, name="array") -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape, name=name))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
  """NamedShardings for a pytree given matching trees of logical axes and shapes."""
  is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  paths_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_leaf)[0]
  shapes = jax.tree.leaves(shapes_tree, is_leaf=lambda x: isinstance(x, tuple) and all(
      isinstance(a, int) for a in x))
  treedef = jax.tree.structure(axes_tree, is_leaf=is_leaf)
  out = [named_sharding(mesh, ax, shape, name=jax.tree_util.keystr(path))
         for (path, ax), shape in zip(paths_axes, shapes)]
  return jax.tree.unflatten(treedef, out)


def batch_shards(mesh: Mesh) -> int:
  """How many shards the logical batch axis is split into (batches must divide it)."""
  return mesh_axis_size(mesh, LOGICAL_RULES["batch"])


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch"):
  """Clear error before any compile if a batch doesn't divide data×fsdp."""
  size = mesh_axis_size(mesh, LOGICAL_RULES["batch"])
  if batch_size % size:
    raise ShardingError(f"{what} size {batch_size} is not divisible by the data×fsdp "
                        f"mesh size {size} (mesh {dict(mesh.shape)}).")


def check_heads(num_heads: int, mesh: Mesh):
  size = mesh_axis_size(mesh, LOGICAL_RULES["heads"])
  if num_heads % size:
    raise ShardingError(f"num_attention_heads {num_heads} is not divisible by the tensor "
                        f"mesh axis of size {size}.")


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh]):
  """Activation sharding constraints inside this context use `mesh`."""
  _mesh_stack().append(mesh)
  try:
    yield mesh
  finally:
    _mesh_stack().pop()


def current_mesh() -> Optional[Mesh]:
  stack = _mesh_stack()
  return stack[-1] if stack else None


def constrain(x, logical_axes):
  """with_sharding_constraint by logical names; a no-op without a mesh.

  Non-divisible dims are replicated rather than raising: activations shapes
  (e.g. a batch of 1 during a single decode) are the caller's business.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  spec, used = [], set()
  for dim, axis in zip(x.shape, logical_axes):
    mesh_axes = LOGICAL_RULES.get(axis)
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    # A mesh axis can shard one dim only: under FSDP the batch already takes
    # `fsdp`, so the activation's embed dim stays whole (only params use it).
    if mesh_axes is not None and (used & set(names) or dim % mesh_axis_size(mesh, mesh_axes)):
      mesh_axes = None
    used |= set(names) if mesh_axes is not None else set()
    spec.append(mesh_axes)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over data×fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def micro_rows_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
  """[micro, rows, ...] arrays (e.g. packed rows per micro-batch): rows over data×fsdp."""
  return NamedSharding(mesh, PartitionSpec(None, LOGICAL_RULES["batch"], *([None] * (ndim - 2))))
