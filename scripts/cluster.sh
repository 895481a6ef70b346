#!/usr/bin/env bash
# A scratch PostgreSQL 15 cluster run as the `postgres` OS user on its own socket dir and port.
# usage: scripts/cluster.sh start|stop|status|psql NAME PORT [psql args...]
set -euo pipefail
cmd=$1; name=$2; port=$3; shift 3
BIN=/usr/lib/postgresql/15/bin
base=/tmp/pg_twotower-$name
data=$base/data
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi; }
case "$cmd" in
  start)
    if [ ! -f "$data/PG_VERSION" ]; then
      mkdir -p "$base"; chown postgres:postgres "$base" 2>/dev/null || true
      as_pg "$BIN/initdb" -D "$data" -A trust -U postgres --no-sync >/dev/null
      cat >> "$data/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$base'
port = $port
shared_buffers = '1GB'
maintenance_work_mem = '4GB'
max_wal_size = '8GB'
fsync = on
CONF
    fi
    if ! as_pg "$BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      as_pg "$BIN/pg_ctl" -D "$data" -l "$base/log" -w start >/dev/null
    fi
    echo "cluster $name: socket $base port $port"
    ;;
  stop)
    if [ -f "$data/PG_VERSION" ]; then as_pg "$BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true; fi
    ;;
  destroy)
    "$0" stop "$name" "$port"; rm -rf "$base"
    ;;
  psql)
    as_pg psql -h "$base" -p "$port" -U postgres -v ON_ERROR_STOP=1 "$@"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2;;
esac
