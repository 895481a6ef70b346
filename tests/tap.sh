#!/usr/bin/env bash
# Cluster tests (Perl TAP with PostgreSQL::Test::Cluster): crash recovery, streaming replica,
# dump/restore, mixed concurrent load, TID reuse. Needs the extension installed
# (scripts/install.sh). Runs as the `postgres` OS user: initdb refuses root.
set -euo pipefail
cd "$(dirname "$0")/.."
PERLLIB=/usr/lib/postgresql/15/lib/pgxs/src/test/perl
work=/tmp/pg_twotower-tap
rm -rf "$work"; mkdir -p "$work"
cp -r tests/t "$work/t"
cp -r tests/golden "$work/golden"
cp README.md "$work/README.md"
chown -R postgres:postgres "$work" 2>/dev/null || true
tests=("$@")
cd "$work"
[ ${#tests[@]} -gt 0 ] || tests=(t/*.pl)
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi; }
as_pg env PATH="/usr/lib/postgresql/15/bin:$PATH" TESTDIR="$work" PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress \
  TT_SOAK_SECONDS="${TT_SOAK_SECONDS:-30}" TT_GOLDEN="$work/golden" \
  prove -v -I "$PERLLIB" -I t "${tests[@]}"
