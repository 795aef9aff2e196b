"""Sequence packing for the log-prob recompute and the update (MaxText's packing,
verl's remove-padding): each micro-batch's sequences are laid end to end in
fewer rows, and the model's per-token outputs are gathered back to [B, T].

Why gather back: every loss, KL, value, GAE and group/attempt term keeps
reading the padded [B, T] arrays it reads unpacked, so packing changes what
the model is run on and nothing else (only the [B, T] logp / entropy / value
maps, no vocabulary dim, exist in the padded layout).

A row's real tokens must be contiguous (left-padded prompt, response right
after it: the RolloutBatch layout). Packed rows have `length` columns (the
padded T by default, so any sequence fits), hold sequences first-fit
decreasing, and carry segment ids 1, 2, ... (0: empty slot) that qwen.forward
turns into a block-diagonal causal mask, plus each sequence's own positions.
The first token of a sequence is scored from the previous segment's last
state: it is a prompt token, outside every loss, and comes back as 0.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mars.tokenizer import bucket_length


@flax.struct.dataclass
class PackIndex:
  """Where each packed slot comes from and where each padded token goes."""
  source: Any   # [n, P, L] int32  flat index into the minibatch's [B*T]; -1: empty slot
  segment: Any  # [n, P, L] int32  1, 2, ... per sequence in its row; 0: empty slot
  target: Any   # [B, T] int32     flat index into its micro-batch's [P*L]; -1: no score

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


def plan(starts, lengths, width: int, num_micro: int, rows_multiple: int = 1,
         length: int = 0) -> PackIndex:
  """A PackIndex (numpy) for a minibatch of B rows of `width` columns whose row b
  holds its real tokens at [starts[b], starts[b] + lengths[b]).

  Micro-batch i holds rows i, i + n, ... (mars.rl.micro.split_micro). Every
  micro-batch gets the same number P of packed rows of `length` columns (0:
  `width`): the most any of them needs, rounded up to a multiple of
  `rows_multiple` (the data×fsdp shards) and to one of four sizes per octave,
  so that a run compiles few packed shapes, and never more than the padded
  micro-batch's rows (with length = width, packed memory <= padded memory).
  """
  starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
  B, n = len(lengths), num_micro
  L = length or width
  if lengths.max(initial=0) > L:
    raise ValueError(f"sequence packing: a sequence of {lengths.max()} tokens does not fit "
                     f"a packed row of {L}; set rl.pack_length >= {lengths.max()} (or 0).")
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
  return PackIndex(source=source, segment=segment, target=target)


def largest_shapes(rows: int, width: int, num_micro: int, length: int = 0) -> PackIndex:
  """The shapes of the largest PackIndex `plan` can return for `rows` padded rows (as
  many packed rows per micro-batch as the padded micro-batch has): what the planner
  compiles, and what a step traced without data (jax.eval_shape) is traced with."""
  packed = (num_micro, rows // num_micro, length or width)
  return PackIndex(source=packed, segment=packed, target=(rows, width))


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
               spans=None) -> PackIndex:
  """`plan` for a [B, T] attention mask; `spans` = row_spans(mask) read to the host
  (default: computed here, for an array this process can read whole)."""
  starts, lengths, contiguous = jax.device_get(
      spans if spans is not None else jax.jit(row_spans)(attention_mask))
  if not contiguous:
    raise ValueError("sequence packing needs each row's real tokens contiguous (left-padded "
                     "prompt, response after it); this batch has padding inside a row.")
  return plan(starts, lengths, attention_mask.shape[1], num_micro, rows_multiple, length)


def pack_inputs(index: PackIndex, tokens, positions):
  """(tokens, positions, segment_ids) of the packed rows, [n, P, L] each (in a jit)."""
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
