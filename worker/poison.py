"""Poison: when an entry delivered again and again is given up on, and how the others around it are spared.

Redis counts every delivery of an entry (a re-read of our own pending entries at start, a claim from a dead
consumer). A worker that dies while holding entries (killed by an OOM, a liveness probe, or by one entry it cannot
survive) leaves every entry it held with one more delivery, the good ones with the bad. A count alone cannot tell
them apart: rejecting everything past ``FLOWTRACK_MAX_DELIVERIES`` turned a crash loop's whole in-flight window
into poison. So past that count an entry is *narrowed*: it is delivered again only in a group of at most
``NARROWING_GROUPS[level - 1]`` entries (level = deliveries over the limit), with nothing else in flight beside
it, and the group is stored and acknowledged before anything more is read (``Group``). A death then costs a
delivery to that group only: the groups stored before it are done, those after it were not read. The entry that
kills the worker is alone after ``len(NARROWING_GROUPS)`` more deaths, and is rejected only when a delivery
*alone* ended without a store; every other entry is stored as soon as a worker lives through one small insert.
"""

from __future__ import annotations

from collections.abc import Iterable

# Each level's group is an eighth of the one before: the culprit among an in-flight window of 40,000 entries is alone
# after five more deaths, and a crash loop unrelated to the data still stores whole groups between two deaths.
NARROWING_GROUPS = (4096, 512, 64, 8, 1)


def level(deliveries: int, max_deliveries: int) -> int:
    """How far past the limit this delivery (the ``deliveries``-th) is: 0 within it, 1.. while narrowing, past
    ``len(NARROWING_GROUPS)`` poison."""
    return max(0, deliveries - max_deliveries)


def is_poison(deliveries: int, max_deliveries: int) -> bool:
    """Delivered past every narrowing level: its last delivery was alone (or it would not have reached this one)
    and ended without a store."""
    return level(deliveries, max_deliveries) > len(NARROWING_GROUPS)


def is_suspect(deliveries: int, max_deliveries: int) -> bool:
    """Narrowed: delivered only in a small group, which is stored before another such group is read."""
    return 1 <= level(deliveries, max_deliveries) <= len(NARROWING_GROUPS)


def group_size(deliveries: int, max_deliveries: int) -> int:
    """The largest group a narrowed entry's delivery may share (``is_suspect`` must hold)."""
    return NARROWING_GROUPS[level(deliveries, max_deliveries) - 1]


class Group:
    """One narrowed delivery's entries, gathered across streams in read order: either a run of entries within the
    limit that ends before the first narrowed one, or a group that begins with a narrowed entry and holds no more
    than the smallest group any of its narrowed entries allows (poison entries, rejected without a store, narrow
    nothing). ``closed`` once nothing more may join."""

    def __init__(self, max_deliveries: int, limit: int) -> None:
        self.max_deliveries = max_deliveries
        self.size = max(1, limit)
        self.taken = 0
        self.narrowed = False
        self.closed = False

    def admit(self, prior_deliveries: Iterable[int]) -> int:
        """How many of these next entries of one stream (each given by its deliveries so far) join."""
        joined = 0
        for prior in prior_deliveries:
            if not self._admits(prior):
                self.closed = True
                break
            joined += 1
        if self.taken >= self.size:
            self.closed = True
        return joined

    def _admits(self, prior: int) -> bool:
        deliveries = prior + 1
        suspect = is_suspect(deliveries, self.max_deliveries)
        if suspect and self.taken and not self.narrowed:
            return False  # a run within the limit ends before the first narrowed entry
        size = min(self.size, group_size(deliveries, self.max_deliveries)) if suspect else self.size
        if self.taken >= size:
            return False
        self.size, self.taken = size, self.taken + 1
        self.narrowed = self.narrowed or suspect
        return True
