"""The flowtrack exception tree, documented in one place.

    FlowtrackError                 base of everything flowtrack raises on purpose
    ├── ConfigError                a setting or CLI option is invalid (exit code 2)
    ├── StoreError                 the ClickHouse store cannot be used
    │   ├── StoreLockedError       an embedded store is held by another process (a running worker)
    │   ├── StoreUnavailableError  transient: server down, timeouts, disk errors; retried with backoff
    │   └── StoreRejectedError     permanent: ClickHouse refused this data; rows are isolated as poison
    ├── SourceUnavailableError     transient: Redis unreachable or timing out; retried with backoff
    └── ReadOnlyQueryError         `flowtrack sql` was given a statement that could write

Transient errors are waited out and never turn good entries into rejects; permanent ones are
isolated to the `rejected_events` relation with their reason.
"""

from __future__ import annotations


class FlowtrackError(Exception):
    """Base class for errors flowtrack raises on purpose."""


class ConfigError(FlowtrackError):
    """A setting or option is invalid."""


class StoreError(FlowtrackError):
    """The ClickHouse store cannot be used."""


class StoreLockedError(StoreError):
    """An embedded chDB store is in use by another process."""


class StoreUnavailableError(StoreError):
    """A transient store failure (down, timeout, I/O); retry later."""


class StoreRejectedError(StoreError):
    """ClickHouse refused the data itself; retrying the same rows will not help."""


class SourceUnavailableError(FlowtrackError):
    """Redis is unreachable or timing out; retry later."""


class ReadOnlyQueryError(FlowtrackError):
    """A statement given to `flowtrack sql` is not read-only."""
