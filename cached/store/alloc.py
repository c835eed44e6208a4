"""First-fit allocation of page-aligned byte ranges within one arena, with coalescing on free."""

from __future__ import annotations

import bisect

__all__ = ["Allocator", "PAGE"]

PAGE = 4096


def round_up(n: int, align: int = PAGE) -> int:
    return (n + align - 1) // align * align


class Allocator:
    """Hands out [offset, offset + n) ranges of a `size`-byte region; n is rounded up to a page."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"arena size must be a positive multiple of {PAGE}, got {size!r}")
        self.size = size
        self._starts: list[int] = [0]       # sorted starts of free blocks
        self._free: dict[int, int] = {0: size}  # start -> length
        self.used = 0

    def alloc(self, n: int) -> int | None:
        n = round_up(n)
        for start in self._starts:
            length = self._free[start]
            if length >= n:
                self._take(start, length, n)
                return start
        return None

    def _take(self, start: int, length: int, n: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        del self._free[start]
        if length > n:
            self._starts.insert(i, start + n)
            self._free[start + n] = length - n
        self.used += n

    def free(self, start: int, n: int) -> None:
        n = round_up(n)
        i = bisect.bisect_left(self._starts, start)
        assert start not in self._free, f"double free at {start}"
        self.used -= n
        # merge with the following block, then with the preceding one
        if i < len(self._starts) and self._starts[i] == start + n:
            n += self._free.pop(self._starts.pop(i))
        if i > 0 and self._starts[i - 1] + self._free[self._starts[i - 1]] == start:
            self._free[self._starts[i - 1]] += n
            return
        self._starts.insert(i, start)
        self._free[start] = n

    @property
    def largest_free(self) -> int:
        return max(self._free.values(), default=0)
