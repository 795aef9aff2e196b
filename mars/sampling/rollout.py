"""Host state of one rollout (`Rollout`: every sequence's transcript, counters and
pages) and its finished view (`SampleOutput`); the engine (engine.py) drives it.

Column layout, shared with SampleOutput: row b's prompt is right-aligned in
[0, P) (P = the padded prompt length), its response runs from column P on.
A row's transcript invariant: every token but the last is cached in its pages.
"""
import dataclasses
from typing import List, Optional

import jax
import numpy as np

from mars.models import paged
from mars.sampling.pages import PagePool


@dataclasses.dataclass
class SampleOutput:
  """Host (numpy) view of a finished rollout."""
  tokens: np.ndarray         # [B, S]
  prompt_mask: np.ndarray    # [B, S]
  gen_mask: np.ndarray       # [B, S]
  forced_mask: np.ndarray    # [B, S]
  logp: np.ndarray           # [B, S] policy logprob (T=1, unfiltered) of sampled tokens
  sampler_logp: np.ndarray   # [B, S] logprob under the sampling distribution
  lengths: np.ndarray        # [B] sampled tokens per row
  truncated: np.ndarray      # [B]
  stopped: np.ndarray        # [B]
  prompt_len: int

  def response_tokens(self, row: int) -> list:
    """Sampled + forced tokens of a row, in order (what follows the prompt)."""
    keep = self.gen_mask[row] | self.forced_mask[row]
    return self.tokens[row][keep].tolist()


@dataclasses.dataclass
class Rollout:
  """Host state of one rollout: this process's sequences and the device page pool."""
  tokens: np.ndarray         # [B, S] int32, SampleOutput's layout
  gen_mask: np.ndarray       # [B, S] bool
  forced_mask: np.ndarray    # [B, S] bool
  logp: np.ndarray           # [B, S] f32
  sampler_logp: np.ndarray   # [B, S] f32
  prompt_mask: np.ndarray    # [B, S] bool
  prompt_tokens: np.ndarray  # [B] real prompt tokens per row
  response_len: np.ndarray   # [B]
  cached: np.ndarray         # [B] transcript tokens whose K/V are in the row's pages
  num_generated: np.ndarray  # [B]
  max_new: np.ndarray        # [B]
  done: np.ndarray           # [B] bool
  stopped: np.ndarray        # [B] bool
  truncated: np.ndarray      # [B] bool
  resident: np.ndarray       # [B] bool: holds pages (its cached K/V are valid)
  group: np.ndarray          # [B] local data-parallel group of the row
  seq_ids: np.ndarray        # [B] global sequence ids
  pages: List[List[int]]
  allocators: List[PagePool]
  pool: Optional[paged.KVPool]
  key: jax.Array
  prompt_len: int
  page_size: int
  stats: dict

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def cache_len(self) -> int:
    return self.tokens.shape[1]

  def length(self, b) -> int:
    return int(self.prompt_tokens[b] + self.response_len[b])

  def first_col(self, b) -> int:
    return self.prompt_len - int(self.prompt_tokens[b])

  def transcript(self, b) -> np.ndarray:
    return self.tokens[b, self.first_col(b):self.prompt_len + self.response_len[b]]

  def capacity(self, b) -> int:
    return self.cache_len - self.first_col(b)

  def append(self, b: int, tokens, logp=None, sampler_logp=None):
    """Appends sampled (with logps) or forced (without) tokens to row b's transcript."""
    start = self.prompt_len + int(self.response_len[b])
    cols = slice(start, start + len(tokens))
    self.tokens[b, cols] = tokens
    sampled = logp is not None
    self.gen_mask[b, cols] = sampled
    self.forced_mask[b, cols] = not sampled
    if sampled:
      self.logp[b, cols], self.sampler_logp[b, cols] = logp, sampler_logp
      self.num_generated[b] += len(tokens)
    self.response_len[b] += len(tokens)

  def end(self, b: int, stopped, truncated):
    self.stopped[b] |= bool(stopped)
    self.truncated[b] |= bool(truncated)
    self.done[b] |= bool(stopped) or bool(truncated)

  def evict(self, b: int):
    self.allocators[self.group[b]].release(self.pages[b])
    self.pages[b], self.cached[b], self.resident[b] = [], 0, False

  def reserve(self, g: int, need: int, keep: set, runnable) -> bool:
    """Frees pages in group g until `need` are free: stopped rows' pages first, then
    the newest running row outside `keep` is preempted (re-prefilled later)."""
    alloc = self.allocators[g]
    while alloc.free < need:
      held = [b for b in range(self.batch_size)
              if self.group[b] == g and self.resident[b] and b not in keep]
      idle = [b for b in held if not runnable[b]]
      if idle:
        self.evict(idle[0])
      elif held:
        self.evict(max(held, key=lambda b: self.seq_ids[b]))
        self.stats["preemptions"] += 1
      else:
        return False
    return True

  def grow(self, b: int, tokens: int, keep: set, runnable) -> bool:
    """Row b's pages cover transcript positions [0, tokens)."""
    need = -(-tokens // self.page_size) - len(self.pages[b])
    if need <= 0:
      return True
    if not self.reserve(int(self.group[b]), need, keep | {b}, runnable):
      return False
    self.pages[b] = self.pages[b] + self.allocators[self.group[b]].alloc(need)
    return True

  def too_small(self, tokens: int, kv_tokens: int):
    raise ValueError(f"Sampler: the KV pool ({self.allocators[0].capacity} pages of "
                     f"{self.page_size} tokens per group) cannot hold one sequence of {tokens} "
                     f"tokens; raise kv_tokens (now {kv_tokens}).")

  def trim(self, b: int):
    """Gives back pages past the row's cached tokens and its pending one."""
    keep = -(-(int(self.cached[b]) + 1) // self.page_size)
    if len(self.pages[b]) > keep:
      self.allocators[self.group[b]].release(self.pages[b][keep:])
      self.pages[b] = self.pages[b][:keep]
