"""Memory-efficient causal attention in plain XLA: flash attention's algorithm
(Dao et al. 2022) as nested loops over query and key blocks, with its own
backward pass.

Dense attention (qwen.attention) materialises a [B, heads, T, T] score matrix
in the forward and keeps it for the backward; at T = 10k that is most of an
update step's memory. Here the forward keeps one [bq, bk] block of scores at a
time and saves only the output and the per-query log-sum-exp; the backward
recomputes each block's probabilities from them (custom_vjp). Key blocks
wholly above the causal diagonal are skipped, in both passes, so a causal
forward does about half the dense FLOPs; so are key blocks before the first
key any query of the block sees (its packed sequence's start, or the row's
first real token), which on packed rows of short sequences is most of them.

With `segment_ids` (packed rows, mars/rl/seq_pack.py) a query attends only to
keys of its own segment, so several sequences share one row without seeing
each other (a block-diagonal causal mask).

It runs on every backend (it is what `model.attention="chunked"` selects, and
the CPU reference for kernels). Scores, softmax statistics and accumulators
are fp32 whatever the input dtype; the output is cast back to it.
"""
import functools

import jax
import jax.numpy as jnp

# Finite, so a masked score minus a running max is never inf - inf (NaN).
_BIG = 1e30


def _pad_to(x, length, axis=1, value=0):
  pad = length - x.shape[axis]
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _layout(q, k, v, key_mask, block):
  """Pads T to a multiple of the block and splits it: q [n, B, bq, KVH, G, hd],
  k/v [n, B, bk, KVH, hd], mask [n, B, bk] (the mask may be int segment ids)."""
  B, T, H, hd = q.shape
  kvh = k.shape[2]
  n = -(-T // block)
  Tp = n * block
  q = _pad_to(q, Tp).reshape(B, n, block, kvh, H // kvh, hd)
  k = _pad_to(k, Tp).reshape(B, n, block, kvh, hd)
  v = _pad_to(v, Tp).reshape(B, n, block, kvh, hd)
  m = _pad_to(key_mask, Tp, value=0).reshape(B, n, block)
  return (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0),
          jnp.moveaxis(m, 1, 0), n)


def _scores(qi, kj, mask_j, i, j, block, scale, seg_i=None):
  """fp32 scores of query block i against key block j, [B, KVH, G, bq, bk],
  and where they count (causal by column index, and the key is not padding).

  With segments, mask_j holds the key block's segment ids (0: empty slot) and
  seg_i the query block's: a key counts only in the query's own segment."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  q_idx = i * block + jnp.arange(block)
  k_idx = j * block + jnp.arange(block)
  valid = (k_idx[None, :] <= q_idx[:, None])[None, None, None]
  if seg_i is None:
    valid = valid & mask_j[:, None, None, None, :]
  else:
    same = (seg_i[:, :, None] == mask_j[:, None, :]) & (mask_j[:, None, :] > 0)
    valid = valid & same[:, None, None]
  return jnp.where(valid, s, -_BIG), valid


def _first_key_blocks(key_mask, block, packed, n):
  """lo [n]: no query of block i sees a key before block lo[i] (lo[i] <= i; lo is
  non-decreasing). A query sees keys from the start of its segment (packed) or from
  its row's first real token (padded rows); queries that see nothing (empty slots,
  left padding) set no bound. Key blocks below lo are all masked, so skipping them
  changes nothing but the work; with many short packed sequences most are skipped."""
  B, T = key_mask.shape
  t = jnp.arange(T)
  if packed:
    seg = key_mask
    boundary = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(boundary, t[None, :], 0), axis=1)
    sees = seg > 0
  else:
    first = jnp.argmax(key_mask, axis=1)
    start = jnp.broadcast_to(first[:, None], (B, T))
    sees = (t[None, :] >= first[:, None]) & key_mask.any(axis=1, keepdims=True)
  start = jnp.where(sees, start, T)
  start = _pad_to(start, n * block, value=T).reshape(B, n, block)
  lo = jnp.min(start, axis=(0, 2)) // block
  return jnp.minimum(lo, jnp.arange(n))


def _forward(q, k, v, key_mask, block, packed):
  B, T, H, hd = q.shape
  scale = hd ** -0.5
  lo = _first_key_blocks(key_mask, block, packed, -(-T // block))
  qb, kb, vb, mb, n = _layout(q, k, v, key_mask, block)

  def one_query_block(args):
    i, qi = args
    seg_i = mb[i] if packed else None

    def body(j, carry):
      m, l, acc = carry
      s, valid = _scores(qi, kb[j], mb[j], i, j, block, scale, seg_i)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb[j],
                                               preferred_element_type=jnp.float32)
      return m_new, l, acc

    stats = qi.shape[0], qi.shape[2], qi.shape[3], block
    init = (jnp.full(stats, -_BIG, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats + (hd,), jnp.float32))
    # Key blocks lo[i]..i: at or below the diagonal (same block size), from the first
    # one a query of the block can see.
    m, l, acc = jax.lax.fori_loop(lo[i], i + 1, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    # A query that sees no key (padding before the first real token): lse=+BIG
    # makes its recomputed probabilities 0 in the backward.
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), _BIG)
    return out, lse

  out, lse = jax.lax.map(one_query_block, (jnp.arange(n), qb))   # [n, B, KVH, G, bq, (hd)]
  out = jnp.moveaxis(out, 0, 3).reshape(B, k.shape[2], H // k.shape[2], n * block, hd)
  lse = jnp.moveaxis(lse, 0, 3).reshape(B, k.shape[2], H // k.shape[2], n * block)
  out = jnp.moveaxis(out, 3, 1).reshape(B, n * block, H, hd)[:, :T]
  return out.astype(v.dtype), lse


def flash_attention(q, k, v, key_mask, block: int = 512, segment_ids=None):
  """Causal GQA attention. q [B,T,H,hd], k/v [B,T,KVH,hd], key_mask [B,T] bool
  (False: padding, never attended to). Query t attends to keys s <= t (column
  index, as qwen.forward's mask); outputs at padding queries are meaningless
  (zeros here). `block` is the query and key block size (T is padded to it).
  segment_ids [B,T] int (packed rows; 0 = empty slot) replace key_mask: a query
  attends only to keys of its own segment."""
  if segment_ids is None:
    return _flash(q, k, v, key_mask.astype(bool), block, False)
  return _flash(q, k, v, segment_ids.astype(jnp.int32), block, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, key_mask, block, packed):
  return _forward(q, k, v, key_mask, min(block, q.shape[1]), packed)[0]


def _fwd(q, k, v, key_mask, block, packed):
  out, lse = _forward(q, k, v, key_mask, min(block, q.shape[1]), packed)
  return out, (q, k, v, key_mask, out, lse)


def _bwd(block, packed, res, dout):
  q, k, v, key_mask, out, lse = res
  B, T, H, hd = q.shape
  kvh = k.shape[2]
  G = H // kvh
  block = min(block, T)
  scale = hd ** -0.5
  qb, kb, vb, mb, n = _layout(q, k, v, key_mask, block)
  lo = _first_key_blocks(key_mask, block, packed, n)
  # Query blocks that see key block j: j .. hi[j] (lo is non-decreasing).
  hi = jnp.sum(lo[None, :] <= jnp.arange(n)[:, None], axis=1) - 1
  # D_t = sum_d dout·out: the softmax backward's row term, [n, B, KVH, G, bq].
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)
  delta = _pad_to(delta, n * block).reshape(B, n, block, kvh, G)
  delta = jnp.moveaxis(jnp.moveaxis(delta, 1, 0), 2, -1)
  do = jnp.moveaxis(_pad_to(dout, n * block).reshape(B, n, block, kvh, G, hd), 1, 0)
  lse = jnp.moveaxis(lse.reshape(B, kvh, G, n, block), 3, 0)

  def probs(i, j):
    s, valid = _scores(qb[i], kb[j], mb[j], i, j, block, scale, mb[i] if packed else None)
    p = jnp.where(valid, jnp.exp(s - lse[i][..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do[i], vb[j], preferred_element_type=jnp.float32)
    return p, p * (dp - delta[i][..., None])

  def dq_block(i):
    def body(j, dq):
      _, ds = probs(i, j)
      return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kb[j].astype(jnp.float32)) * scale
    return jax.lax.fori_loop(lo[i], i + 1, body, jnp.zeros(qb.shape[1:], jnp.float32))

  def dkv_block(j):
    def body(i, carry):
      dk, dv = carry
      p, ds = probs(i, j)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p, do[i].astype(jnp.float32))
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qb[i].astype(jnp.float32)) * scale
      return dk, dv
    zeros = jnp.zeros(kb.shape[1:], jnp.float32)
    return jax.lax.fori_loop(j, hi[j] + 1, body, (zeros, zeros))   # query blocks that see j

  dq = jax.lax.map(dq_block, jnp.arange(n))
  dk, dv = jax.lax.map(dkv_block, jnp.arange(n))
  dq = jnp.moveaxis(dq, 0, 1).reshape(B, n * block, H, hd)[:, :T]
  dk = jnp.moveaxis(dk, 0, 1).reshape(B, n * block, kvh, hd)[:, :T]
  dv = jnp.moveaxis(dv, 0, 1).reshape(B, n * block, kvh, hd)[:, :T]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_fwd, _bwd)
