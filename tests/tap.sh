#!/usr/bin/env bash
# Cluster tests (Perl TAP with PostgreSQL::Test::Cluster): crash recovery, streaming replica,
# dump/restore, mixed concurrent load, TID reuse. Needs the extension installed
# (scripts/install.sh). Runs as the `postgres` OS user: initdb refuses root.
set -euo pipefail
cd "$(dirname "$0")/.."
PERLLIB=/usr/lib/postgresql/15/lib/pgxs/src/test/perl
work=${TT_TAP_WORK:-/tmp/pg_twotower-tap}
rm -rf "$work"; mkdir -p "$work"
cp -r tests/t "$work/t"
cp -r tests/golden "$work/golden"
cp README.md "$work/README.md"
cp -r docs "$work/docs"
chown -R postgres:postgres "$work" 2>/dev/null || true
tests=("$@")
cd "$work"
[ ${#tests[@]} -gt 0 ] || tests=(t/*.pl)
# The soak's cache directory on a small filesystem of its own (tests/t/014_soak.pl fills it up):
# a tmpfs, when this runs as root and may mount one; without it that fault is left out.
smallfs=/tmp/pg_twotower-smallfs
if mountpoint -q "$smallfs" 2>/dev/null; then umount "$smallfs"; fi
if [ "$(id -u)" = 0 ] && mkdir -p "$smallfs" && mount -t tmpfs -o size=64m tmpfs "$smallfs" 2>/dev/null; then
  chown postgres:postgres "$smallfs"
  trap 'umount "$smallfs" 2>/dev/null || true' EXIT
  export TT_SMALL_FS="$smallfs"
fi
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi; }
as_pg env PATH="/usr/lib/postgresql/15/bin:$PATH" TESTDIR="$work" PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress \
  TT_SOAK_SECONDS="${TT_SOAK_SECONDS:-}" TT_SMALL_FS="${TT_SMALL_FS:-}" TT_SOAK_REPORT="${TT_SOAK_REPORT:-}" TT_GOLDEN="$work/golden" \
  prove -v -I "$PERLLIB" -I t "${tests[@]}"
