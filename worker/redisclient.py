"""Redis clients: one URL, a plain Redis or a Redis Cluster, found out from the server.

``FLOWTRACK_REDIS_URL`` may name a plain Redis or any node of a cluster (a primary or a replica): the node is asked
``INFO cluster`` and ``cluster_enabled:1`` gets redis-py's cluster client, built with the plain client's options. No
setting says which: the server knows, and a setting could only disagree with it. A plain Redis keeps the very client
the detection used (same options, same connection), so its path is what it always was.

Choices, and why:
- RESP2 pinned for both: redis-py 8 defaults to RESP3, whose stream replies have another shape.
- ``INFO`` refused by an ACL (NOPERM) means "plain": users with the older, narrower ACL rules keep working on a plain
  Redis; on a cluster the rules must allow INFO (``WORKER_ACL_RULES`` / ``PRODUCER_ACL_RULES`` do).
- ``reinitialize_steps=0``: redis-py by default rebuilds its topology on every 5th MOVED by closing *every*
  connection of the client, in-flight ones of other tasks included (research note, section 1). A MOVED patches the
  one slot instead; failovers (CLUSTERDOWN, connection errors) still refresh the whole map.
- Few retries inside redis-py (2, short backoff; its default is 10): they are spent within the failover they should
  outlast anyway; the pipeline's own backoff (SourceUnavailableError) waits it out instead, and a sync caller
  (tail, status) gets its answer or its error promptly.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import redis
import redis.asyncio as aioredis
from redis._parsers import Encoder
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import PythonRespSerializer
from redis.exceptions import NoPermissionError
from redis.retry import Retry as SyncRetry

from worker.errors import ConfigError
from worker.settings import Settings, redact_url

log = logging.getLogger(__name__)

AsyncClient = aioredis.Redis | aioredis.RedisCluster
SyncClient = redis.Redis | redis.RedisCluster

# redis-py's own retries within one call; the worker's backoff does the waiting.
CLUSTER_RETRY_ATTEMPTS = 2


def _no_client_info() -> dict[str, Any]:
    """Client options that skip CLIENT SETINFO on connect: the worker and producer ACLs leave it out (Redis < 7.2
    does not know it; on >= 7.2 every refused call would add an ACL LOG entry). redis-py 8 takes ``driver_info``,
    5-7 ``lib_name``/``lib_version``."""
    if "driver_info" in inspect.signature(aioredis.Redis.__init__).parameters:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


NO_CLIENT_INFO = _no_client_info()


def client_options(settings: Settings) -> dict[str, Any]:
    """The options every flowtrack client of Redis uses, plain or cluster."""
    tls: dict[str, Any] = {}
    if settings.redis_url.startswith("rediss://") and settings.tls_ca_file:
        tls["ssl_ca_certs"] = settings.tls_ca_file
    # Keys and names from Redis are bytes and need not be UTF-8: they are decoded with surrogateescape (``text``)
    # and encoded back the same way, so every command addresses the exact key the reply named.
    return dict(protocol=2, decode_responses=False, encoding_errors="surrogateescape",
                socket_timeout=settings.socket_timeout_s, socket_connect_timeout=min(5.0, settings.socket_timeout_s),
                health_check_interval=30, **tls, **NO_CLIENT_INFO)


def _cluster_options(retry: AsyncRetry | SyncRetry) -> dict[str, Any]:
    return dict(reinitialize_steps=0, retry=retry)


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=0.5)


def plain_client(settings: Settings) -> aioredis.Redis:
    """The plain (single-node) async client, exactly as the worker always built it."""
    return aioredis.Redis.from_url(settings.redis_url, **client_options(settings))


def _raise_if_misconfigured(exc: BaseException, settings: Settings) -> None:
    """A refusal no retry can change (a database index the server does not have) is a configuration error."""
    if isinstance(exc, redis.ResponseError) and "DB index" in str(exc):
        raise ConfigError(f"FLOWTRACK_REDIS_URL {redact_url(settings.redis_url)}: {exc}") from None


def _says_cluster(info: Any) -> bool:
    return str(info.get("cluster_enabled", 0)) == "1"


async def connect(settings: Settings) -> AsyncClient:
    """A client for FLOWTRACK_REDIS_URL: the cluster client if the node says it belongs to a cluster.

    Raises redis-py's ConnectionError/TimeoutError when the node cannot be reached (callers wrap it in ``guarded``).
    """
    plain = plain_client(settings)
    try:
        info = await plain.info("cluster")
    except NoPermissionError:
        return plain  # an ACL without INFO: see the module docstring
    except BaseException as exc:
        await plain.aclose()
        _raise_if_misconfigured(exc, settings)
        raise
    if not _says_cluster(info):
        return plain
    await plain.aclose()
    cluster = aioredis.RedisCluster.from_url(settings.redis_url, **client_options(settings),
                                              **_cluster_options(AsyncRetry(_backoff(), CLUSTER_RETRY_ATTEMPTS)))
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    log.info("Redis Cluster detected: %d primaries", len(cluster.get_primaries()))
    return cluster


def connect_sync(settings: Settings) -> SyncClient:
    """The same for synchronous callers (tail, status, the CLI's look-ups): ``worker.flows.connect_sync``'s client
    on a plain Redis, ``redis.RedisCluster`` with the same options on a cluster."""
    from worker.flows import connect_sync as plain_sync  # flows imports source, which imports this module

    plain = plain_sync(settings)
    try:
        info = plain.info("cluster")
    except NoPermissionError:
        return plain
    except BaseException as exc:
        plain.close()
        _raise_if_misconfigured(exc, settings)
        raise
    if not _says_cluster(info):
        return plain
    # The plain client's options carry over to every node. Its command packer does not (redis-py's cluster client
    # passes only known connection options on): it comes with the connection class instead.
    options = {k: v for k, v in plain.get_connection_kwargs().items()
               if k not in ("host", "port", "db", "connection_class", "retry", "command_packer")}
    # (With rediss:// the URL's SSLConnection overrides it: non-UTF-8 names then fail to pack in sync commands.)
    plain.close()
    return redis.RedisCluster.from_url(settings.redis_url, **options, connection_class=_SurrogateConnection,
                                      **_cluster_options(SyncRetry(_backoff(), CLUSTER_RETRY_ATTEMPTS)))


def _surrogate_packer() -> Any:
    """redis-py's hiredis packer encodes str strictly (ignoring encoding_errors): names from Redis that are not
    UTF-8 (decoded with surrogateescape) are packed by its Python packer with the client's encoder instead, as
    ``worker.flows.connect_sync`` does for a plain Redis."""
    from worker.flows import SYNC_PACKER_BUFFER_CUTOFF

    encoder = Encoder("utf-8", "surrogateescape", decode_responses=False)  # type: ignore[no-untyped-call]
    return PythonRespSerializer(SYNC_PACKER_BUFFER_CUTOFF, encoder.encode)


class _SurrogateConnection(redis.Connection):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("command_packer", _surrogate_packer())
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]



def is_cluster(client: Any) -> bool:
    """True for redis-py's cluster clients (async or sync)."""
    return isinstance(client, aioredis.RedisCluster | redis.RedisCluster)

