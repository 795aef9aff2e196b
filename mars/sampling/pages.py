"""Host-side page accounting for one data-parallel group's slice of the KV pool.

Pages are reference-counted: the G samples of a prompt share its full pages
(and so do the turns of one episode, which are one sequence). A page returns
to the free list when its last holder lets go. Page 0 is the trash page
(models/paged.py) and is never handed out.
"""
from typing import List

from mars.models.paged import TRASH_PAGE


class OutOfPages(RuntimeError):
  """The group's pool has fewer free pages than asked for."""


class PagePool:
  """Free list + reference counts over pages [1, num_pages) of one group."""

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(f"a KV page pool needs at least 2 pages (one is the trash page), got "
                       f"{num_pages}.")
    self.num_pages = num_pages
    self._refs = [0] * num_pages
    # Popped from the end: low page ids first, so small runs stay compact.
    self._free = [p for p in range(num_pages - 1, 0, -1) if p != TRASH_PAGE]
    self.peak_used = 0

  @property
  def free(self) -> int:
    return len(self._free)

  @property
  def used(self) -> int:
    return self.num_pages - 1 - len(self._free)

  @property
  def capacity(self) -> int:
    return self.num_pages - 1

  def alloc(self, n: int) -> List[int]:
    if n > len(self._free):
      raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
    pages = [self._free.pop() for _ in range(n)]
    for p in pages:
      self._refs[p] = 1
    self.peak_used = max(self.peak_used, self.used)
    return pages

  def share(self, pages: List[int]) -> List[int]:
    """Another holder for these pages (a sample of the same prompt)."""
    for p in pages:
      assert self._refs[p] > 0, f"sharing free page {p}"
      self._refs[p] += 1
    return list(pages)

  def release(self, pages: List[int]) -> None:
    for p in pages:
      assert self._refs[p] > 0, f"releasing free page {p}"
      self._refs[p] -= 1
      if not self._refs[p]:
        self._free.append(p)

  def refs(self, page: int) -> int:
    return self._refs[page]

  def is_whole(self) -> bool:
    """No page is held: every page is back on the free list exactly once."""
    return (not any(self._refs) and len(self._free) == self.capacity
            and len(set(self._free)) == self.capacity)
