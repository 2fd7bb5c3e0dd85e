#!/usr/bin/env bash
# Installs and starts the servers the `examples/redis-postgres` tests need: Redis and
# PostgreSQL, on 127.0.0.1, on non-default ports, without systemd. Idempotent: servers
# already answering are left alone.
#
# stdout carries only `export` lines, so a caller can do
#     eval "$(bash .ci/services.sh)"
# The same lines are written to "$BACKSTOP_SERVICES_DIR/env" (default
# /tmp/tower-backstop-services/env) for `source`. Progress goes to stderr.
#
# Stop them with: bash .ci/services.sh stop
set -euo pipefail

DIR=${BACKSTOP_SERVICES_DIR:-/tmp/tower-backstop-services}
REDIS_PORT=${BACKSTOP_REDIS_PORT:-6390}
PG_PORT=${BACKSTOP_PG_PORT:-5440}
PG_DB=backstop
log() { echo "services: $*" >&2; }

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$d" ] && echo "$d"
}

as_postgres() { runuser -u postgres -- "$@"; }

if [ "${1:-}" = stop ]; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    if bin=$(pg_bin) && [ -d "$DIR/pg" ]; then
        as_postgres "$bin/pg_ctl" -D "$DIR/pg" -m fast stop >&2 || true
    fi
    exit 0
fi

# Install what is missing (Debian packages; root, as in CI).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
pg_bin >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # policy-rc.d 101: the packages must not start daemons of their own (no systemd).
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
PG_BIN=$(pg_bin)
mkdir -p "$DIR"
chmod 755 "$DIR"

# Redis: in memory only, no persistence.
if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "starting redis-server on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
        --save '' --appendonly no --dir "$DIR" \
        --logfile "$DIR/redis.log" --pidfile "$DIR/redis.pid" >&2
fi

# PostgreSQL: a throwaway cluster owned by the postgres user, trust auth on loopback.
if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    if [ ! -s "$DIR/pg/PG_VERSION" ]; then
        log "initdb in $DIR/pg"
        rm -rf "$DIR/pg"
        install -d -o postgres -g postgres -m 700 "$DIR/pg"
        as_postgres "$PG_BIN/initdb" -D "$DIR/pg" -U postgres --auth=trust \
            --no-sync -E UTF8 >/dev/null
    fi
    log "starting postgres on 127.0.0.1:$PG_PORT"
    chown postgres:postgres "$DIR"
    as_postgres "$PG_BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg.log" -w -t 60 \
        -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >&2
fi

# Wait until both answer (bounded: 30 s).
for _ in $(seq 1 60); do
    if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG \
        && "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
        break
    fi
    sleep 0.5
done
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping | grep -q PONG || { log "redis does not answer"; exit 1; }
"$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { log "postgres does not answer"; exit 1; }

if ! "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $PG_DB" >&2
fi

env_lines="export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB"
printf '%s\n' "$env_lines" > "$DIR/env"
log "ready; environment in $DIR/env"
printf '%s\n' "$env_lines"
