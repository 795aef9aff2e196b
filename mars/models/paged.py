"""The decoder over a paged KV cache: a pool of fixed-size pages and a page table per row.

The pool holds K/V for `num_pages` pages of `page_size` tokens, per layer:
[L, N, KVH, page, hd] (heads before slots: the attention dots read gathered
pages without a transpose). A row's transcript token t lives in page
`table[row, t // page]` at offset `t % page`. Rows that share a prompt point
their tables at the same pages (mars/sampling/pages.py counts the references).

`forward` feeds C new tokens per row on top of the row's `cached` tokens,
attends to the cached pages (gathered through the table: the XLA reference
implementation of paged attention) and causally to the new tokens, writes the
new K/V into the row's pages after the layer scan, and returns the logits of
each row's last fed token. Decode is C = 1; a prompt, a forced turn or the
re-prefill of a preempted row is C > 1.

Sharding: pages are split over the batch mesh axes into one pool per
data-parallel group, kv heads over the tensor axis; a row's table holds page
ids local to its group, and gather/scatter run under `shard_map`, so no page
ever crosses devices. Page 0 of every group is never allocated: padding rows
and padded token positions write there.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mars import sharding
from mars.models import qwen
from mars.models.config import ModelConfig

TRASH_PAGE = 0


class KVPool(NamedTuple):
  k: jax.Array  # [L, N, KVH, page, hd]
  v: jax.Array

  @property
  def page_size(self) -> int:
    return self.k.shape[3]


def pool_axes() -> KVPool:
  axes = ("layers", "pages", "kv_heads", None, "head_dim")
  return KVPool(k=axes, v=axes)


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int):
  return (cfg.num_layers, num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> KVPool:
  shape = pool_shape(cfg, num_pages, page_size)
  dtype = jnp.dtype(dtype or cfg.dtype)
  return KVPool(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def kv_bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype or cfg.dtype).itemsize


# ----------------------------------------------------------------------------
# Per-group kernels (run inside shard_map: page ids are local to the group).

def _attend_local(q, k, v, pool_k, pool_v, layer, tables, cached, feed_len, *, cfg):
  """GQA attention of C new tokens to the row's cached pages and causally to each other.

  q [R, C, H, hd]; k/v [R, C, KVH, hd]; pool [L, N, KVH, p, hd]. The layer's
  pages are gathered straight from the stacked pool (one gather, no per-layer
  copy of the pool) and scored page by page: [R, KVH, G, C, M, p].
  """
  R, C, H, hd = q.shape
  K = k.shape[2]
  q = q.reshape(R, C, K, H // K, hd)
  gk = pool_k[layer, tables].astype(q.dtype)  # [R, M, KVH, p, hd]
  gv = pool_v[layer, tables].astype(q.dtype)
  M, p = gk.shape[1], gk.shape[3]
  scale = hd ** -0.5
  s_cache = jnp.einsum("rckgd,rmkpd->rkgcmp", q, gk,
                       preferred_element_type=jnp.float32).reshape(R, K, H // K, C, M * p)
  cache_mask = jnp.arange(M * p)[None, :] < cached[:, None]                        # [R, S]
  s_cache = jnp.where(cache_mask[:, None, None, None, :], s_cache * scale, qwen.NEG_INF)
  s_self = jnp.einsum("rckgd,rskd->rkgcs", q, k, preferred_element_type=jnp.float32) * scale
  fed = jnp.arange(C)[None, :] < feed_len[:, None]
  self_mask = jnp.tril(jnp.ones((C, C), bool))[None] & fed[:, None, :]              # [R, C, C]
  s_self = jnp.where(self_mask[:, None, None], s_self, qwen.NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], -1), axis=-1)
  p_cache = probs[..., :M * p].reshape(R, K, H // K, C, M, p).astype(gv.dtype)
  out = (jnp.einsum("rkgcmp,rmkpd->rckgd", p_cache, gv)
         + jnp.einsum("rkgcs,rskd->rckgd", probs[..., M * p:].astype(v.dtype), v))
  return out.reshape(R, C, H, hd)


def _write_local(pool_k, pool_v, new_k, new_v, tables, cached, feed_len):
  """Scatters new K/V [L, R, C, KVH, hd] at positions cached + [0, feed_len)."""
  p = pool_k.shape[3]
  C = new_k.shape[2]
  pos = cached[:, None] + jnp.arange(C)[None, :]
  fed = jnp.arange(C)[None, :] < feed_len[:, None]
  slot = jnp.minimum(pos // p, tables.shape[1] - 1)
  page = jnp.where(fed, jnp.take_along_axis(tables, slot, 1), TRASH_PAGE)
  offset = jnp.where(fed, pos % p, 0)
  # pool[:, page, :, offset] (page/offset [R, C], split by a slice) indexes as [R, C, L, KVH, hd].
  put = lambda pool, new: pool.at[:, page, :, offset].set(
      new.transpose(1, 2, 0, 3, 4).astype(pool.dtype))
  return put(pool_k, new_k), put(pool_v, new_v)


def _specs(cfg: ModelConfig, mesh):
  """PartitionSpecs for the shard_map'd kernels (rows/pages by group, heads by tensor)."""
  batch = sharding.LOGICAL_RULES["batch"]
  tensor = sharding.LOGICAL_RULES["kv_heads"]
  # GQA groups stay whole on a device only if kv heads split over the tensor axis.
  heads = tensor if cfg.num_kv_heads % sharding.mesh_axis_size(mesh, tensor) == 0 else None
  rows = PartitionSpec(batch)
  return dict(q=PartitionSpec(batch, None, heads, None), kv=PartitionSpec(batch, None, heads, None),
              pool=PartitionSpec(None, batch, heads, None, None),
              new_kv=PartitionSpec(None, batch, None, heads, None),
              tables=PartitionSpec(batch, None), rows=rows, scalar=PartitionSpec())


def _maybe_shard_map(fn, in_specs, out_specs):
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------
# The forward.

def forward(cfg: ModelConfig, params, pool: KVPool, tokens, feed_len, cached, tables):
  """Feeds tokens [R, C] (the first feed_len[r] real) after `cached` tokens per row.

  Returns (logits [R, V] at each row's last fed token, the pool with the fed
  tokens' K/V written). Rows with feed_len 0 are padding: they write to the
  trash page and their logits are meaningless.
  """
  mesh = sharding.current_mesh()
  specs = _specs(cfg, mesh) if mesh is not None and mesh.size > 1 else None
  C = tokens.shape[1]
  positions = cached[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
  attend = _maybe_shard_map(
      lambda q, k, v, pk, pv, i, t, c, f: _attend_local(q, k, v, pk, pv, i, t, c, f, cfg=cfg),
      in_specs=specs and (specs["q"], specs["kv"], specs["kv"], specs["pool"], specs["pool"],
                          specs["scalar"], specs["tables"], specs["rows"], specs["rows"]),
      out_specs=specs and specs["q"])

  # The pool is read inside the layer scan by index, not scanned over: scanning
  # would slice (copy) each layer's whole pool on every step.
  def layer(h, xs):
    lp, i = xs
    x = qwen.rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = qwen.layer_qkv(cfg, lp, x, positions)
    k, v = k.astype(pool.k.dtype), v.astype(pool.v.dtype)  # attend to K/V as stored
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), pool.k, pool.v, i, tables, cached,
                 feed_len)
    return qwen.layer_out(cfg, lp, h, out), (k, v)

  h, (new_k, new_v) = jax.lax.scan(layer, qwen.embed(cfg, params, tokens),
                                   (params["layers"], jnp.arange(cfg.num_layers)))
  write = _maybe_shard_map(
      _write_local,
      in_specs=specs and (specs["pool"], specs["pool"], specs["new_kv"],
                          specs["new_kv"], specs["tables"], specs["rows"], specs["rows"]),
      out_specs=specs and (specs["pool"], specs["pool"]))
  pool = KVPool(*write(pool.k, pool.v, new_k, new_v, tables, cached, feed_len))
  last = jnp.take_along_axis(h, jnp.maximum(feed_len - 1, 0)[:, None, None], axis=1)
  return qwen.final(cfg, params, last, return_hidden=False)[:, 0].astype(jnp.float32), pool


# ----------------------------------------------------------------------------
# Decode on a dense working copy of the rows' pages.
#
# A decode call runs K steps over fixed rows and page tables, so it gathers
# the rows' pages once into a dense [L, KVH, R, M·p, hd] working cache, decodes
# on it with direct reads and one-slot writes (the per-step cost of a static
# cache of the live length, not of the longest possible sequence), and
# scatters the pages back at the end. The XLA attention pays the gather once
# per call instead of once per step and layer, and scores every slot up to the
# table width; the Pallas paged-attention kernels (sampling.decode_attention,
# models/kernels.py) read one layer of the working cache as pages and stop at
# each row's length. Reading the pool itself in place (no working copy) would
# need the pool in the kernels' [KVH, pages, p, hd] layout: not done.

def gather_rows(pool: KVPool, tables):
  """Pool → working cache [L, KVH, R, M·p, hd] of the rows' pages, in token order.
  Heads first: one layer's [KVH, R·M, p, hd] is also the page layout the paged
  decode kernels read (row r's pages are r·M .. r·M + M − 1), with no copy."""
  def gather(pool_k, pool_v, tables):
    def one(x):
      g = x[:, tables]  # [L, R, M, KVH, p, hd]
      L, R, M, K, p, hd = g.shape
      return g.transpose(0, 3, 1, 2, 4, 5).reshape(L, K, R, M * p, hd)
    return one(pool_k), one(pool_v)
  mesh = sharding.current_mesh()
  specs = _work_specs(mesh, pool.k.shape[2])
  return _maybe_shard_map(gather, in_specs=specs and (specs["pool"], specs["pool"], specs["tables"]),
                          out_specs=specs and (specs["work"], specs["work"]))(pool.k, pool.v, tables)


def scatter_rows(pool: KVPool, work_k, work_v, tables) -> KVPool:
  """Writes the working cache's pages back (shared prompt pages get their own,
  unchanged, contents; padding rows write the trash page)."""
  def scatter(pool_k, pool_v, work_k, work_v, tables):
    def one(x, w):
      L, K, R, S, hd = w.shape
      M = tables.shape[1]
      w = w.reshape(L, K, R, M, S // M, hd).transpose(0, 2, 3, 1, 4, 5)  # [L, R, M, K, p, hd]
      return x.at[:, tables].set(w.astype(x.dtype))
    return one(pool_k, work_k), one(pool_v, work_v)
  mesh = sharding.current_mesh()
  specs = _work_specs(mesh, pool.k.shape[2])
  out = _maybe_shard_map(
      scatter, in_specs=specs and (specs["pool"], specs["pool"], specs["work"], specs["work"],
                                   specs["tables"]),
      out_specs=specs and (specs["pool"], specs["pool"]))(pool.k, pool.v, work_k, work_v, tables)
  return KVPool(*out)


def _work_specs(mesh, num_kv_heads: int):
  if mesh is None or mesh.size == 1:
    return None
  batch, tensor = sharding.LOGICAL_RULES["batch"], sharding.LOGICAL_RULES["kv_heads"]
  heads = tensor if num_kv_heads % sharding.mesh_axis_size(mesh, tensor) == 0 else None
  return dict(pool=PartitionSpec(None, batch, heads, None, None),
              work=PartitionSpec(None, heads, batch, None, None),
              tables=PartitionSpec(batch, None))


def work_axes():
  return ("layers", "kv_heads", "batch", None, "head_dim")


def decode_step(cfg: ModelConfig, params, work_k, work_v, tokens, active, cached,
                attention: str = "xla", page_size: int = 0):
  """One token per row ([R] ids at position `cached`) on the working cache.

  Returns (logits [R, V], work_k, work_v) with the token's K/V written at slot
  `cached` of active rows. `attention` (kernels.DECODE_KINDS, resolved): "xla"
  scores every slot of the working cache, masked past `cached`; a paged kernel
  reads only each row's live pages (of `page_size` tokens).
  """
  if attention != "xla":
    return _decode_step_paged(cfg, params, work_k, work_v, tokens, active, cached, attention,
                              page_size)
  R = tokens.shape[0]
  S = work_k.shape[3]
  positions = cached[:, None]
  cache_mask = jnp.broadcast_to((jnp.arange(S)[None, :] < cached[:, None])[:, None, :], (R, 1, S))
  self_mask = active[:, None, None]

  def layer(h, xs):
    lp, i = xs
    x = qwen.rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = qwen.layer_qkv(cfg, lp, x, positions)
    k, v = k.astype(work_k.dtype), v.astype(work_v.dtype)
    out = qwen.attention(q, k.astype(q.dtype), v.astype(q.dtype), self_mask, cfg,
                         cached=(work_k[i].astype(q.dtype), work_v[i].astype(q.dtype), cache_mask),
                         cached_layout="kbsd")
    return qwen.layer_out(cfg, lp, h, out), (k[:, 0], v[:, 0])

  h, (new_k, new_v) = jax.lax.scan(layer, qwen.embed(cfg, params, tokens[:, None]),
                                   (params["layers"], jnp.arange(cfg.num_layers)))
  rows = jnp.arange(R)
  slot = jnp.where(active, cached, S - 1)  # inactive rows rewrite their last slot with itself
  # w[:, :, rows, slot] is [L, KVH, R, hd]; new_k / new_v are [L, R, KVH, hd].
  keep = lambda w, new: jnp.where(active[None, None, :, None], new.transpose(0, 2, 1, 3),
                                  w[:, :, rows, slot])
  put = lambda w, new: w.at[:, :, rows, slot].set(keep(w, new))
  logits = qwen.final(cfg, params, h, return_hidden=False)[:, 0].astype(jnp.float32)
  return logits, put(work_k, new_k), put(work_v, new_v)


def _decode_step_paged(cfg: ModelConfig, params, work_k, work_v, tokens, active, cached, kind,
                       page_size):
  """decode_step with a paged decode kernel (models/kernels.py): each layer writes the
  token's K/V into its slot first, then attends over the row's live pages only
  (lengths cached + 1; one layer's working cache read as [KVH, R·M, p, hd] pages)."""
  from mars.models import kernels  # pylint: disable=g-import-not-at-top
  R, S = work_k.shape[2], work_k.shape[3]
  rows = jnp.arange(R)
  slot = jnp.where(active, cached, S - 1)  # inactive rows rewrite their last slot with itself
  lengths = jnp.maximum(cached + active, 1).astype(jnp.int32)
  positions = cached[:, None]

  def write(w, i, new):  # new [R, 1, KVH, hd] -> w[i, :, rows, slot], indexed as [R, KVH, hd]
    value = jnp.where(active[:, None, None], new[:, 0].astype(w.dtype), w[i, :, rows, slot])
    return w.at[i, :, rows, slot].set(value)

  def layer(carry, xs):
    h, wk, wv = carry
    lp, i = xs
    x = qwen.rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
    q, k, v = qwen.layer_qkv(cfg, lp, x, positions)
    wk, wv = write(wk, i, k), write(wv, i, v)
    out = kernels.paged_decode_attention(kind, q[:, 0], wk[i], wv[i], lengths, page_size)
    return (qwen.layer_out(cfg, lp, h, out[:, None].astype(h.dtype)), wk, wv), None

  (h, work_k, work_v), _ = jax.lax.scan(
      layer, (qwen.embed(cfg, params, tokens[:, None]), work_k, work_v),
      (params["layers"], jnp.arange(cfg.num_layers)))
  logits = qwen.final(cfg, params, h, return_hidden=False)[:, 0].astype(jnp.float32)
  return logits, work_k, work_v
