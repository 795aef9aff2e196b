"""Continuous batching: which rows run in each device call, with which pages.

Each round of `Sampler.run` first admits waiting rows and feeds every row with
more than one token to feed (a prompt, a forced turn, a re-prefill) through
`extend_and_sample`, then runs `decode_loop` over the rows that have one
pending token. Rows of a call are grouped by data-parallel group (their pages
live in that group's pool) and padded to power-of-two buckets agreed by every
process, so a call's cost follows its live rows and tokens and few shapes
compile. Pages come from the group's pool; when it is short, stopped rows give
theirs back first, then the newest running row is preempted (rollout.py).
"""
import jax.numpy as jnp
import numpy as np

from mars import distributed
from mars.sampling import decode
from mars.sampling.rollout import Rollout


# Rows per group of a device call are at least this (padding rows are cheap next to a
# compile): fewer shapes when a batch compacts down to its stragglers.
ROWS_FLOOR = 8


def bucket(n: int, lo: int = 1) -> int:
  """The power of two >= max(n, lo)."""
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


class Scheduler:
  """The Sampler's batching rounds (a mixin: it uses the Sampler's knobs and programs)."""

  # -- device batches -----------------------------------------------------------

  def table_width(self, cache_len: int, pages_needed: int) -> int:
    """Page-table columns of a device call: a power of two, so few shapes compile.
    A floor on it keeps the number of compiled shapes small; the cap on the floor
    keeps a short row's step cheap under a long budget."""
    floor = min(bucket(-(-cache_len // self.page_size) // 4), 8)
    return bucket(pages_needed, floor)

  def extend_rows_cap(self, width: int) -> int:
    """Rows per group in one extend call of `width` tokens: ~8 prefill chunks of
    tokens, so a first prefill of many unshared prompts is split into calls of
    bounded activation memory."""
    return max(1, 8 * self.prefill_chunk // width)

  def decode_rows_cap(self, pages_per_group: int, width: int) -> int:
    """Rows per group in one decode call whose gathered pages (rows × table width)
    stay within twice the group's pool: the XLA reference attention materialises
    the gathered K/V of one layer."""
    return max(1, 2 * pages_per_group // width)

  def _rows(self, state: Rollout, items: list, width: int) -> decode.Rows:
    """Device rows for `items`, group-major, each group padded to one agreed bucket."""
    G = self.local_groups
    per_group = [[it for it in items if it["group"] == g] for g in range(G)]
    Rg = bucket(max(len(x) for x in per_group), ROWS_FLOOR)
    M = self.table_width(state.cache_len, max([len(it["pages"]) for it in items] or [1]))
    Rg, M, width = distributed.agree_max(Rg, M, width)
    R = Rg * G
    a = dict(tokens=np.full((R, width), self.pad_id, np.int32), tables=np.zeros((R, M), np.int32),
             **{k: np.zeros((R,), np.int32) for k in ("feed_len", "cached", "seq_ids",
                                                       "num_generated", "max_new", "max_len",
                                                       "steps")})
    for g, group_items in enumerate(per_group):
      for j, it in enumerate(group_items):
        r = it["_row"] = g * Rg + j
        a["tokens"][r, :len(it["feed"])] = it["feed"]
        a["tables"][r, :len(it["pages"])] = it["pages"]
        a["feed_len"][r] = len(it["feed"])
        for k in ("cached", "seq_ids", "num_generated", "max_new", "max_len", "steps"):
          a[k][r] = it[k]
    return decode.Rows(**{k: self._to_device(v) for k, v in a.items()})

  def _item(self, state: Rollout, b: int, feed, steps: int) -> dict:
    return dict(group=int(state.group[b]), feed=feed, cached=int(state.cached[b]),
                pages=state.pages[b], seq_ids=int(state.seq_ids[b]),
                num_generated=int(state.num_generated[b]), max_new=int(state.max_new[b]),
                max_len=state.capacity(b), steps=steps, row=b)

  def _extend(self, params, state: Rollout, items: list, sampling):
    """Feeds each item's `feed` in prefill_chunk pieces; an item with steps=1 then
    samples its next token (item["out"])."""
    fed = [0] * len(items)
    while distributed.any_process(any(fed[i] < len(it["feed"]) for i, it in enumerate(items))):
      todo = [i for i, it in enumerate(items) if fed[i] < len(it["feed"])]
      longest = max([len(items[i]["feed"]) - fed[i] for i in todo] or [1])
      C = min(bucket(longest, min(16, self.prefill_chunk)), self.prefill_chunk)
      pieces, per_group = [], {}
      for i in todo:
        it = items[i]
        per_group[it["group"]] = per_group.get(it["group"], 0) + 1
        if per_group[it["group"]] > self.extend_rows_cap(C):
          continue  # the next call takes it
        piece = dict(it, feed=it["feed"][fed[i]:fed[i] + C], cached=it["cached"] + fed[i])
        fed[i] += len(piece["feed"])
        piece["steps"] = int(bool(it.get("steps")) and fed[i] == len(it["feed"]))
        piece.setdefault("seq_ids", 0)
        pieces.append((i, piece))
      rows = self._rows(state, [pc for _, pc in pieces], C)
      state.pool, out = self.program("extend")(params, state.pool, rows, state.key,
                                                sampling.as_arrays())
      state.stats["extend_calls"] += 1
      out = {k: distributed.host_local(v) for k, v in out.items()}
      for i, pc in pieces:
        if pc["steps"]:
          items[i]["out"] = {k: v[pc["_row"]] for k, v in out.items()}

  def _slots_per_group(self, state):
    return -(-self.max_slots // self.groups) if self.max_slots else state.batch_size

  def _admit_and_extend(self, params, state: Rollout, quota, sampling):
    runnable = ~state.done & (quota > 0)
    items, keep = [], set()
    for g in range(self.local_groups):
      rows = [b for b in np.flatnonzero(runnable & (state.group == g))]
      running = sum(bool(state.resident[b]) for b in rows)
      for b in rows:
        L = state.length(b)
        if state.resident[b] and L - state.cached[b] < 2:
          continue  # only its pending token: decode takes it
        if not state.resident[b] and running >= self._slots_per_group(state):
          continue  # waits for a slot
        if not state.grow(b, L, keep, runnable):
          if not keep and running <= int(state.resident[b]):
            state.too_small(L, self.kv_tokens)
          continue  # waits for pages
        running += not state.resident[b]
        state.resident[b] = True
        keep.add(b)
        items.append(self._item(state, b, state.transcript(b)[state.cached[b]:], steps=1))
    self._extend(params, state, items, sampling)
    for it in items:
      b, out = it["row"], it["out"]
      state.cached[b] = state.length(b)
      state.append(b, [out["token"]], [out["logp"]], [out["sampler_logp"]])
      state.end(b, out["stopped"], out["truncated"])
      quota[b] -= 1

  def _decode_round(self, params, state: Rollout, quota, sampling):
    runnable = ~state.done & (quota > 0)
    items, keep, waiting = [], set(), False
    for g in range(self.local_groups):
      rows = [b for b in np.flatnonzero(runnable & (state.group == g) & state.resident)
              if state.length(b) - state.cached[b] == 1]
      waiting |= int((runnable & (state.group == g)).sum()) > len(rows)
      for b in rows[:self._slots_per_group(state)]:
        if not state.resident[b]:
          continue  # preempted for an earlier row of this round
        L = state.length(b)
        # Pages are reserved for these steps: never more than the row can still sample.
        steps = int(min(quota[b], self.decode_chunk, state.capacity(b) - L,
                        state.max_new[b] - state.num_generated[b]))
        if steps <= 0:  # no room left in its columns
          state.end(b, False, True)
          continue
        width = self.table_width(state.cache_len, max(
            [-(-(int(state.cached[b]) + steps) // self.page_size)]
            + [len(it["pages"]) for it in items if it["group"] == g]))
        scheduled = sum(it["group"] == g for it in items)
        if scheduled and bucket(scheduled + 1) > self.decode_rows_cap(
            state.allocators[g].num_pages, width):
          waiting = True
          break
        if not state.grow(b, int(state.cached[b]) + steps, keep, runnable):
          if not keep:
            state.too_small(int(state.cached[b]) + steps, self.kv_tokens)
          waiting = True
          break
        keep.add(b)
        items.append(self._item(state, b, state.transcript(b)[-1:], steps=steps))
      waiting |= len(rows) > len([it for it in items if it["group"] == g])
    total = distributed.agree_sum(len(items))
    if not total:
      return
    waiting = distributed.any_process(waiting)
    # Return to the host when a quarter of the rows (rows are waiting) or half of
    # them (none are) have ended: refill the slots, or compact to a smaller bucket.
    min_active = total - max(1, total // 4) if waiting else total // 2
    if not waiting and total // 2 < ROWS_FLOOR * self.local_groups:
      min_active = 0  # the bucket would not shrink below its floor: run to the end
    # One loop length for every call (rows' own step counts end them earlier): the
    # output buffers are small, and a per-call bucket multiplied the compiled shapes.
    K = bucket(self.decode_chunk)
    rows = self._rows(state, items, 1)
    state.pool, out = self.program("decode", K)(params, state.pool, rows, state.key,
                                                 sampling.as_arrays(), jnp.int32(min_active))
    out = {k: distributed.host_local(v) for k, v in out.items()}
    state.stats["decode_calls"] += 1
    # Steps of the call (all processes' rows): the same figure on every process.
    state.stats["decode_steps"] += distributed.agree_max(int(out["count"].max(initial=0)))
    for it in items:
      b, r = it["row"], it["_row"]
      n = int(out["count"][r])
      state.cached[b] += n
      state.append(b, out["token"][r, :n], out["logp"][r, :n], out["sampler_logp"][r, :n])
      state.end(b, out["stopped"][r], out["truncated"][r])
      quota[b] -= n
      state.trim(b)
