#!/bin/bash
# Stand-in for the official postgres image's entrypoint (see the Dockerfile beside this).
set -euo pipefail

if [ "${1:-}" != "postgres" ]; then
    exec "$@"
fi
if [ "$(id -u)" = 0 ]; then
    # The volume may come up owned by root: hand it to postgres, then drop root for good.
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?the stand-in, like the official image, needs POSTGRES_PASSWORD}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    echo "stand-in postgres: first run, initdb in $PGDATA for $user"
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
        -D "$PGDATA" >/dev/null
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    # The official image's init phase: a server on the Unix socket only, so nothing can
    # reach it over TCP until the real server starts. A health check that probes the
    # socket passes during this window; one over TCP does not.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$db" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -q --username="$user" --dbname=postgres \
            --set=db="$db" <<<'CREATE DATABASE :"db";'
    fi
    # Widen the window as the official image's init scripts would (for compose-check).
    sleep "${STANDIN_INIT_SECONDS:-3}"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "stand-in postgres: init done, starting the server"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
