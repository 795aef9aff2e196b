"""Sequence packing for the log-prob recompute and the update (MaxText's packing,
verl's remove-padding): each micro-batch's sequences are laid end to end in
fewer rows, and the model's per-token outputs are gathered back to [B, T].

Why gather back: every loss, KL, value, GAE and group/attempt term keeps
reading the padded [B, T] arrays it reads unpacked, so packing changes what
the model is run on and nothing else (only the [B, T] logp / entropy / value
maps, no vocabulary dim, exist in the padded layout).

Which rows share a micro-batch is the plan's choice (`order`): long-tailed
lengths put several long rows into one micro-batch by chance, and every
micro-batch is padded to the rows the fullest one needs, so the plan spreads
the long rows out (`balanced_order`). The losses have one denominator for the
whole minibatch, so the grouping changes no gradient, only the summation order.

A row's real tokens must be contiguous (left-padded prompt, response right
after it: the RolloutBatch layout). Packed rows have `length` columns (the
padded T by default, so any sequence fits), hold sequences first-fit
decreasing, and carry segment ids 1, 2, ... (0: empty slot) that qwen.forward
turns into a block-diagonal causal mask, plus each sequence's own positions.
The first token of a sequence is scored from the previous segment's last
state: it is a prompt token, outside every loss, and comes back as 0.
"""
import heapq
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mars.tokenizer import bucket_length


@flax.struct.dataclass
class PackIndex:
  """Where each packed slot comes from and where each padded token goes."""
  source: Any   # [n, P, L] int32  flat index into the reordered minibatch's [B*T]; -1: empty
  segment: Any  # [n, P, L] int32  1, 2, ... per sequence in its row; 0: empty slot
  target: Any   # [B, T] int32     per reordered row: flat index into its micro-batch's
                #                  [P*L]; -1: no score
  order: Any    # [B] int32        the minibatch row at each position of the reordered
                #                  minibatch, which micro.split_micro then splits

  @property
  def shape(self):
    return self.source.shape


def _first_fit_decreasing(lengths, capacity: int):
  """Bins (lists of item indices) and each item's (bin, offset)."""
  order = np.argsort(-np.asarray(lengths), kind="stable")
  room, where = [], {}
  for i in order:
    need = int(lengths[i])
    for b, left in enumerate(room):
      if left >= need:
        where[int(i)] = (b, capacity - left)
        room[b] -= need
        break
    else:
      where[int(i)] = (len(room), 0)
      room.append(capacity - need)
  return len(room), where


def _rows_needed(lengths, order, num_micro: int, capacity: int) -> int:
  """Packed rows of the fullest micro-batch when micro-batch i holds order[i::n]."""
  return max(_first_fit_decreasing(lengths[order[i::num_micro]], capacity)[0]
             for i in range(num_micro))


def balanced_order(lengths, num_micro: int, capacity: int) -> np.ndarray:
  """A row order whose micro-batches (order[i::n], B/n rows each) need few packed rows.

  Longest sequence first, each to the micro-batch with the fewest tokens that still
  has room (LPT scheduling under a row-count limit). Kept only if its fullest
  micro-batch needs fewer packed rows than the given order's; else the identity.
  """
  lengths = np.asarray(lengths, np.int64)
  B, n = len(lengths), num_micro
  identity = np.arange(B)
  if n == 1:
    return identity
  per = B // n
  heap = [(0, j) for j in range(n)]   # (tokens so far, micro-batch); ties: lower index
  members = [[] for _ in range(n)]
  for b in np.argsort(-lengths, kind="stable"):
    load, j = heapq.heappop(heap)
    members[j].append(int(b))
    if len(members[j]) < per:
      heapq.heappush(heap, (load + int(lengths[b]), j))
  order = np.empty(B, np.int64)
  for j, rows in enumerate(members):
    order[j::n] = rows
  if _rows_needed(lengths, order, n, capacity) < _rows_needed(lengths, identity, n, capacity):
    return order
  return identity


def plan(starts, lengths, width: int, num_micro: int, rows_multiple: int = 1,
         length: int = 0, balance: bool = True) -> PackIndex:
  """A PackIndex (numpy) for a minibatch of B rows of `width` columns whose row b
  holds its real tokens at [starts[b], starts[b] + lengths[b]).

  The minibatch is reordered by `order` (`balanced_order`, or kept as it is
  without `balance`); micro-batch i then holds reordered rows i, i + n, ...
  (mars.rl.micro.split_micro). Every micro-batch gets the same number P of
  packed rows of `length` columns (0: `width`): the most any of them needs,
  rounded up to a multiple of `rows_multiple` (the data×fsdp shards) and to one
  of four sizes per octave, so that a run compiles few packed shapes, and never
  more than the padded micro-batch's rows (with length = width, packed memory
  <= padded memory).
  """
  starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
  B, n = len(lengths), num_micro
  L = length or width
  if lengths.max(initial=0) > L:
    raise ValueError(f"sequence packing: a sequence of {lengths.max()} tokens does not fit "
                     f"a packed row of {L}; set rl.pack_length >= {lengths.max()} (or 0).")
  order = balanced_order(lengths, n, L) if balance else np.arange(B)
  starts, lengths = starts[order], lengths[order]   # from here on, reordered rows
  placed, rows_needed = [], 1
  for i in range(n):
    rows = np.arange(i, B, n)
    bins, where = _first_fit_decreasing(lengths[rows], L)
    rows_needed = max(rows_needed, bins)
    placed.append((rows, where))
  round_up = lambda x: -(-x // rows_multiple) * rows_multiple
  # Never more rows than the padded micro-batch has: packing never costs memory.
  P = min(round_up(bucket_length(rows_needed, minimum=1, per_octave=4)), round_up(-(-B // n)))
  source = np.full((n, P, L), -1, np.int32)
  segment = np.zeros((n, P, L), np.int32)
  target = np.full((B, width), -1, np.int32)
  for i, (rows, where) in enumerate(placed):
    count = np.zeros(P, np.int32)
    for k in sorted(where, key=lambda k: where[k]):
      b, (r, o) = int(rows[k]), where[k]
      s, m = int(starts[b]), int(lengths[b])
      if not m:
        continue
      count[r] += 1
      source[i, r, o:o + m] = b * width + s + np.arange(m)
      segment[i, r, o:o + m] = count[r]
      target[b, s + 1:s + m] = r * L + o + np.arange(1, m)
  return PackIndex(source=source, segment=segment, target=target,
                   order=order.astype(np.int32))


def largest_shapes(rows: int, width: int, num_micro: int, length: int = 0) -> PackIndex:
  """The shapes of the largest PackIndex `plan` can return for `rows` padded rows (as
  many packed rows per micro-batch as the padded micro-batch has): what the planner
  compiles, and what a step traced without data (jax.eval_shape) is traced with."""
  packed = (num_micro, rows // num_micro, length or width)
  return PackIndex(source=packed, segment=packed, target=(rows, width), order=(rows,))


def efficiency(index: PackIndex) -> float:
  """Real tokens / packed slots."""
  return float(np.mean(np.asarray(index.segment) > 0))


def row_spans(attention_mask):
  """(starts [B], lengths [B], contiguous) of each row's real tokens (traceable)."""
  m = attention_mask.astype(bool)
  lengths = jnp.sum(m, axis=1).astype(jnp.int32)
  starts = jnp.where(lengths > 0, jnp.argmax(m, axis=1), 0).astype(jnp.int32)
  cols = jnp.arange(m.shape[1])[None]
  span = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
  return starts, lengths, jnp.all(span == m)


def plan_batch(attention_mask, num_micro: int, rows_multiple: int = 1, length: int = 0,
               spans=None, balance: bool = True) -> PackIndex:
  """`plan` for a [B, T] attention mask; `spans` = row_spans(mask) read to the host
  (default: computed here, for an array this process can read whole)."""
  starts, lengths, contiguous = jax.device_get(
      spans if spans is not None else jax.jit(row_spans)(attention_mask))
  if not contiguous:
    raise ValueError("sequence packing needs each row's real tokens contiguous (left-padded "
                     "prompt, response after it); this batch has padding inside a row.")
  return plan(starts, lengths, attention_mask.shape[1], num_micro, rows_multiple, length,
              balance)


def reorder_rows(tree, index: PackIndex):
  """The minibatch's [B, ...] arrays in the plan's row order (in a jit)."""
  order = jnp.asarray(index.order)
  return jax.tree.map(lambda x: jnp.take(x, order, axis=0), tree)


def restore_rows(x, index: PackIndex):
  """Inverse of `reorder_rows` for one [B, ...] array."""
  return jnp.take(x, jnp.argsort(jnp.asarray(index.order)), axis=0)


def pack_inputs(index: PackIndex, tokens, positions):
  """(tokens, positions, segment_ids) of the packed rows, [n, P, L] each (in a jit),
  from the reordered minibatch's tokens and positions (`reorder_rows`)."""
  src = jnp.asarray(index.source)
  ok = src >= 0
  idx = jnp.maximum(src, 0)
  take = lambda x: jnp.where(ok, jnp.take(x.reshape(-1), idx), 0)
  return take(tokens), take(positions), jnp.asarray(index.segment)


def unpack(packed, target):
  """Packed per-token values [P, L] -> the padded layout [b, T] of `target`; 0 where
  target < 0 (padding and each sequence's first token)."""
  flat = packed.reshape(-1)
  return jnp.where(target >= 0, jnp.take(flat, jnp.maximum(target, 0)), 0.0).astype(packed.dtype)
