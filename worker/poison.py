"""Poison: when an entry delivered again and again is given up on, and how the others around it are spared.

Redis counts every delivery of an entry (a re-read of our own pending entries at start, a claim from a dead
consumer). A worker that dies while holding entries (killed by an OOM, a liveness probe, or by one entry it cannot
survive) leaves every entry it held with one more delivery, the good ones with the bad. A count alone cannot tell
them apart: rejecting everything past ``FLOWTRACK_MAX_DELIVERIES`` turned a crash loop's whole in-flight window
into poison. So past that count an entry is *narrowed*: it is delivered again only in a group of at most
``NARROWING_GROUPS[level - 1]`` such entries (level = deliveries over the limit), the group stored and acknowledged
before the next one is read. A death then costs a delivery to that group only: the entries of the groups stored
before it are done, those after it were not read. The entry that kills the worker is alone after
``len(NARROWING_GROUPS)`` more deaths, and is rejected only when a delivery *alone* ended without a store; every
other entry is stored as soon as a worker lives through one small insert.
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


def group_take(prior_deliveries: Iterable[int], max_deliveries: int, limit: int) -> int:
    """How many of these entries (in the order they would be read, each given by its deliveries so far) one
    delivery may take, at most ``limit``: stop before the group of suspects would outgrow the smallest group any
    of its suspects allows. Entries within the limit, and poison (rejected, never stored), narrow nothing.
    At least 1: a lone entry is always its own group."""
    taken = 0
    group = limit
    for prior in prior_deliveries:
        over = level(prior + 1, max_deliveries)
        if 1 <= over <= len(NARROWING_GROUPS):
            group = min(group, NARROWING_GROUPS[over - 1])
        if taken >= group:
            break
        taken += 1
    return max(1, taken)
