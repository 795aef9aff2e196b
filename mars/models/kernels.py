"""Pallas attention kernels for the full-sequence forward (update and log-prob passes).

`model.attention` picks the implementation (mars/models/qwen.py calls `attend`):
  splash      TPU: jax.experimental.pallas.ops.tpu.splash_attention (Mosaic),
              causal mask + segment ids, GQA native, fused custom backward.
  pallas_gpu  GPU: jax.experimental.pallas.ops.gpu.attention.mha (Triton flash),
              causal + segment ids; K/V heads repeated for GQA.
  auto        splash on TPU; chunked (flash attention in XLA, models/flash.py)
              elsewhere. GPU stays on chunked until pallas_gpu has run on a GPU:
              here it is checked in interpret mode only (no GPU was lent), and a
              Triton kernel that fails to compile would stop a run that chunked
              serves; set model.attention=pallas_gpu to use it.
Both kernels run on CPU in Pallas interpret mode (`interpret=True`), which is how
tests/test_attention_kernels.py checks them against the dense and chunked XLA
attention (forward and gradients) without the hardware.

Padding and packing are one mechanism for both kernels: segment ids. Unpacked
rows use the attention mask as the id (1 real, 0 padding), packed rows their
own (1, 2, ... per sequence, 0 on empty slots). A real query then sees exactly
the keys the dense mask lets it see; a padding query sees earlier padding keys
(at least itself, so its output is finite; it is never read).

Splash also skips the blocks that segments rule out, not only those above the
causal diagonal: each example's block tables (which kv block each q block
computes) are restricted by its segment ids at run time (`segment_block_overlap`),
so a packed row of n sequences computes about 1/n of the causal blocks, and a
left-padded row skips its real queries' blocks over the padding.
"""
import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mars import sharding

KERNELS = ("splash", "pallas_gpu")
# The id of the positions added to reach a multiple of the block: no real
# query shares it, and such a query sees only these keys.
_PAD_SEGMENT = -1


_interpret = False


@contextlib.contextmanager
def interpret_mode():
  """Inside, the kernels trace in Pallas interpret mode (any backend, slow): how
  tests run a whole model on them on CPU. Programs traced inside keep it."""
  global _interpret
  before, _interpret = _interpret, True
  try:
    yield
  finally:
    _interpret = before


def resolve(kind: str, platform: str | None = None) -> str:
  """`auto` -> the kernel for `platform` (default: JAX's default backend); other kinds as given."""
  if kind != "auto":
    return kind
  platform = platform or jax.default_backend()
  return "splash" if platform == "tpu" else "chunked"


def _segments(attention_mask, segment_ids):
  if segment_ids is not None:
    return segment_ids.astype(jnp.int32)
  return attention_mask.astype(jnp.int32)


def _pad_length(x, length, value=0):
  pad = length - x.shape[1]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _block_for(T: int, block: int, minimum: int) -> tuple[int, int]:
  """(block, padded T): the block is a multiple of `minimum` (the kernels' tiling)
  no larger than needed, and T is padded to a multiple of it."""
  block = max(minimum, min(block, -(-T // minimum) * minimum))
  block = -(-block // minimum) * minimum
  return block, -(-T // block) * block


# ----------------------------------------------------------------------------
# TPU: splash attention.

@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, length: int, block: int, interpret: bool):
  """The causal kernel for one example, per q head; splash_attention restricts its block
  tables by each example's segments."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(num_heads)])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  # Its mask tables become device arrays: concrete even when first built inside a
  # trace, so the cached kernel can serve later traces.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def segment_block_overlap(segments, block: int):
  """segments [T] (T a multiple of `block`) -> [T/block, T/block] bool: whether q block
  i and kv block j can hold a (query, key) pair of one segment.

  Compares each block's [min, max] interval of positive ids (sequences), and apart
  from them its interval of ids <= 0 (empty slots 0, the block padding -1). That is
  exact for the runs that packing and padding make, and conservative for any ids: two
  blocks that share an id have overlapping intervals on that id's side. Keeping the
  two sides apart means a block that holds a row's last sequence and its empty tail
  only meets blocks of that sequence and of the tail.
  """
  s = segments.reshape(-1, block)

  def meets(side):
    big = jnp.iinfo(s.dtype).max
    lo = jnp.where(side, s, big).min(axis=1)    # a block with no id on this side:
    hi = jnp.where(side, s, -big).max(axis=1)   # lo > hi, so it meets nothing
    return (hi[:, None] >= lo[None, :]) & (hi[None, :] >= lo[:, None])
  return meets(s > 0) | meets(s <= 0)


def _restrict_blocks(mask_info, overlap, grid_axis: int):
  """A splash MaskInfo with the blocks `overlap` rules out skipped.

  block_mask [heads, q blocks, kv blocks] says which blocks run (0 = skip);
  data_next is the block each grid step fetches. A skipped step fetches what the
  step before it fetched (forward-filled along the axis the grid walks fastest,
  `grid_axis`: kv for the forward and dq passes, q for dkv), so skipping also
  saves the copy; steps before a row's first kept block fetch that block.
  """
  if mask_info is None:
    return None
  keep = (mask_info.block_mask > 0) & overlap[None]
  n = keep.shape[grid_axis]
  position = jnp.arange(n).reshape([n if a == grid_axis else 1 for a in range(keep.ndim)])
  last = jax.lax.cummax(jnp.where(keep, position, -1), axis=grid_axis)
  first = jnp.argmax(keep, axis=grid_axis, keepdims=True)
  source = jnp.where(last >= 0, last, first)
  return mask_info._replace(
      block_mask=jnp.where(keep, mask_info.block_mask, 0).astype(mask_info.block_mask.dtype),
      data_next=jnp.take_along_axis(mask_info.data_next, source, axis=grid_axis))


def splash_attention(q, k, v, segments, *, block: int = 512, interpret: bool = False):
  """q [B, T, H, hd], k/v [B, T, KVH, hd], segments [B, T] int -> [B, T, H, hd]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H, hd = q.shape
  block, Tp = _block_for(T, block, 128)
  kernel = _splash_kernel(H, Tp, block, interpret)
  seg = _pad_length(segments, Tp, _PAD_SEGMENT)
  # The kernel does not scale the scores; heads-major layout [B, H, T, hd].
  qh = jnp.moveaxis(_pad_length(q * jnp.asarray(hd ** -0.5, q.dtype), Tp), 2, 1)
  kh = jnp.moveaxis(_pad_length(k, Tp), 2, 1)
  vh = jnp.moveaxis(_pad_length(v, Tp), 2, 1)

  def one(a, b, c, s):
    # Per-example block tables are batched scalar-prefetch operands, which
    # pallas_call's vmap runs as a loop over the examples, each a full grid.
    overlap = segment_block_overlap(s, block)
    restricted = sk.SplashAttentionKernel(
        _restrict_blocks(kernel.fwd_mask_info, overlap, 2),
        _restrict_blocks(kernel.dq_mask_info, overlap, 2),
        _restrict_blocks(kernel.dkv_mask_info, overlap, 1), **kernel.kwargs)
    return restricted(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s))
  out = jax.vmap(one)(qh, kh, vh, seg)
  return jnp.moveaxis(out, 1, 2)[:, :T].astype(q.dtype)


# ----------------------------------------------------------------------------
# GPU: the Pallas (Triton) flash attention.

def gpu_flash_attention(q, k, v, segments, *, block: int = 128, interpret: bool = False):
  """q [B, T, H, hd], k/v [B, T, KVH, hd], segments [B, T] int -> [B, T, H, hd]."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  B, T, H, hd = q.shape
  block, Tp = _block_for(T, min(block, 128), 16)
  groups = H // k.shape[2]
  # The kernel has one K/V head per q head: repeat (q head h reads kv head h // groups).
  k = jnp.repeat(k, groups, axis=2) if groups > 1 else k
  v = jnp.repeat(v, groups, axis=2) if groups > 1 else v
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  out = gpu_attention.mha(_pad_length(q, Tp), _pad_length(k, Tp), _pad_length(v, Tp),
                          _pad_length(segments, Tp, _PAD_SEGMENT), sm_scale=hd ** -0.5,
                          causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :T].astype(q.dtype)


# ----------------------------------------------------------------------------
# Decode: one query token per row over its live pages (the rollout engine).

DECODE_KINDS = ("xla", "paged_tpu", "paged_gpu", "auto")


def resolve_decode(kind: str, platform: str | None = None) -> str:
  """`auto` -> the TPU Pallas paged-attention kernel on TPU, the XLA attention elsewhere
  (GPU: paged_gpu is opt-in until it has run on a GPU, as for the update's kernel)."""
  if kind != "auto":
    return kind
  return "paged_tpu" if (platform or jax.default_backend()) == "tpu" else "xla"


def _paged_decode_local(kind, q, work_k, work_v, lengths, page_size, interpret):
  """q [R, H, hd]; work_k/v [KVH, R, S, hd] (S = M pages of `page_size`); lengths [R]."""
  K, R, S, hd = work_k.shape
  M = S // page_size
  pages = lambda w: w.reshape(K, R * M, page_size, hd)   # row r owns pages r·M .. r·M + M - 1
  indices = (jnp.arange(R)[:, None] * M + jnp.arange(M)[None, :]).astype(jnp.int32)
  q = q * jnp.asarray(hd ** -0.5, q.dtype)              # neither kernel scales the scores
  if kind == "paged_tpu":
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as tpa
    # Pages per compute block: a divisor of M, ~128 keys a block.
    block = math.gcd(M, max(1, 128 // page_size))
    ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with ctx:
      return tpa.paged_attention(q, pages(work_k), pages(work_v), lengths, indices,
                                 pages_per_compute_block=block)
  if kind == "paged_gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as gpa
    block = min(M, 8)
    return gpa.paged_attention(q, pages(work_k), pages(work_v), indices, lengths,
                               pages_per_compute_block=block, k_splits=max(1, min(16, M // block)),
                               block_h=16, interpret=interpret)
  raise ValueError(f"unknown decode attention {kind!r}; choose one of {DECODE_KINDS}.")


def paged_decode_attention(kind: str, q, work_k, work_v, lengths, page_size: int, *,
                           interpret: bool | None = None):
  """Attention of one new token per row (q [R, H, hd], already in the cache) over the
  row's first `lengths` keys of the working cache work_k/v [KVH, R, S, hd], reading
  only live pages. Returns [R, H, hd]. Under a mesh: per device (shard_map; rows over
  the batch axes, kv heads over the tensor axis), page ids local to the device."""
  interpret = _interpret if interpret is None else interpret
  fn = functools.partial(_paged_decode_local, kind, page_size=page_size, interpret=interpret)

  def specs(batch, heads):
    work, qs = PartitionSpec(heads, batch, None, None), PartitionSpec(batch, heads, None)
    return (qs, work, work, PartitionSpec(batch)), qs
  return _per_device(fn, work_k.shape[0], specs, q, work_k, work_v, lengths)


def _per_device(fn, num_kv_heads: int, specs, *args):
  """fn(*args); under a mesh, per device (shard_map): `specs(batch, heads)` gives the
  (in, out) PartitionSpecs from the mesh axes of rows and of kv heads. GQA groups stay
  whole on a device only if the kv heads split over the tensor axis, else heads stay
  unsplit."""
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*args)
  tensor = sharding.LOGICAL_RULES["kv_heads"]
  heads = tensor if num_kv_heads % sharding.mesh_axis_size(mesh, tensor) == 0 else None
  in_specs, out_specs = specs(sharding.LOGICAL_RULES["batch"], heads)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


# ----------------------------------------------------------------------------
# The interface.

def attend(kind: str, q, k, v, attention_mask, segment_ids=None, *, block: int = 512,
           interpret: bool | None = None):
  """Causal attention of a full sequence with `kind` in KERNELS; padding and
  packing as in qwen.forward. Under a mesh the kernel runs per device
  (shard_map: rows over the batch axes, heads over the tensor axis).
  `interpret`: None follows `interpret_mode`."""
  interpret = _interpret if interpret is None else interpret
  segments = _segments(attention_mask, segment_ids)
  if kind == "splash":
    fn = functools.partial(splash_attention, block=block, interpret=interpret)
  elif kind == "pallas_gpu":
    fn = functools.partial(gpu_flash_attention, block=block, interpret=interpret)
  else:
    raise ValueError(f"unknown attention kernel {kind!r}; choose one of {KERNELS}.")
  def specs(batch, heads):
    qkv = PartitionSpec(batch, None, heads, None)
    return (qkv, qkv, qkv, PartitionSpec(batch, None)), qkv
  return _per_device(fn, k.shape[2], specs, q, k, v, segments)
