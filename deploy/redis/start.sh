#!/bin/sh
# Renders the ACL file from the environment (passwords never live in the repo), then runs redis-server
# with AOF persistence. The rules are the ones worker/source.py documents and tests/test_security.py tests.
set -eu
: "${REDIS_WORKER_PASSWORD:?set REDIS_WORKER_PASSWORD in .env}"
: "${REDIS_PRODUCER_PASSWORD:?set REDIS_PRODUCER_PASSWORD in .env}"
umask 077
sed -e "s|\${REDIS_WORKER_PASSWORD}|${REDIS_WORKER_PASSWORD}|" \
    -e "s|\${REDIS_PRODUCER_PASSWORD}|${REDIS_PRODUCER_PASSWORD}|" \
    /etc/flowtrack/users.acl.template > /data/users.acl
exec redis-server \
    --aclfile /data/users.acl \
    --appendonly yes \
    --appendfsync everysec \
    --dir /data \
    --protected-mode no
