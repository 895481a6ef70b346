#!/usr/bin/env bash
# SQL regression tests (tests/sql, tests/expected) with pg_regress against a scratch cluster.
# Needs the extension installed (scripts/install.sh). Set TT_REGRESS_UPDATE=1 to refresh the
# expected files from the results (then review the diff!).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TT_REGRESS_PORT:-55431}
NAME=${TT_REGRESS_NAME:-regress}
PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
out=${TT_REGRESS_OUT:-/tmp/pg_twotower-regress-out}
rm -rf "$out"; mkdir -p "$out"; chmod 777 "$out"
scripts/cluster.sh destroy "$NAME" "$PORT" >/dev/null 2>&1 || true
scripts/cluster.sh start "$NAME" "$PORT"
trap 'scripts/cluster.sh destroy "$NAME" "$PORT"' EXIT
tests=$(cd tests/sql && ls *.sql | sed 's/\.sql$//' | sort)
scripts/cluster.sh psql "$NAME" "$PORT" -q -d postgres -c "CREATE DATABASE twotower_regress"
status=0
# The server (running as postgres) reads the fixtures: give it a copy it can read.
cp -r tests/golden "$out/golden"; chmod -R a+rX "$out/golden"
export TT_GOLDEN="$out/golden"
$PG_REGRESS --use-existing --host="/tmp/pg_twotower-$NAME" --port="$PORT" --user=postgres \
  --inputdir=tests --outputdir="$out" --dbname=twotower_regress $tests || status=$?
if [ "${TT_REGRESS_UPDATE:-0}" = 1 ]; then
  cp "$out"/results/*.out tests/expected/
  echo "expected output refreshed from $out/results"
  exit 0
fi
if [ $status != 0 ]; then cat "$out/regression.diffs" 2>/dev/null || true; fi
exit $status
