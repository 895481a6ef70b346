#!/usr/bin/env bash
# Installs Citus into the system PostgreSQL 15, for the Citus cluster test
# (tests/t/018_citus.pl) and bench/citus.sh. A test dependency only: nothing of Citus is kept in
# this repository. Idempotent, in this order:
#   1. citus.so and citus.control already installed: nothing to do;
#   2. a distribution package (postgresql-15-citus*), where apt knows one;
#   3. a build from the source tarball named by TT_CITUS_TARBALL (e.g. a `git archive` of a
#      Citus release tag), patched with TT_CITUS_PATCH or with every *.patch beside the
#      tarball, in a temporary directory;
#   4. otherwise: a note that Citus is not available, and exit 0 (the test then skips, saying so).
# A build that was tried and failed exits 1 (`make test-deps` notes it and goes on, as for
# pgvector).
set -euo pipefail
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
[ -x "$PG_CONFIG" ] || PG_CONFIG=pg_config
libdir=$("$PG_CONFIG" --pkglibdir)
sharedir=$("$PG_CONFIG" --sharedir)
installed() { [ -f "$libdir/citus.so" ] && [ -f "$sharedir/extension/citus.control" ]; }
if installed; then
  echo "citus: already installed ($(sed -n "s/^default_version = '\(.*\)'/\1/p" "$sharedir/extension/citus.control"))"
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
pgmajor=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')

# 2. A distribution package: the newest postgresql-<major>-citus* apt knows (Debian's own archive
#    has none; a machine with Citus's package repository configured has several).
pkg=$(apt-cache pkgnames "postgresql-$pgmajor-citus" 2>/dev/null | grep -v -- '-dbgsym$' | sort -V | tail -1 || true)
if [ -n "$pkg" ]; then
  if $SUDO apt-get install -y -qq "$pkg" >/dev/null 2>&1 && installed; then
    echo "citus: installed the package $pkg"; exit 0
  fi
  echo "citus: the package $pkg could not be installed; trying a source tarball" >&2
fi

# 3. A source tarball.
tarball=${TT_CITUS_TARBALL:-}
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
  echo "citus not available: skipping (no postgresql-$pgmajor-citus package, and TT_CITUS_TARBALL${tarball:+=$tarball} names no file);" \
       "tests/t/018_citus.pl will be skipped"
  exit 0
fi
tarball=$(realpath "$tarball")
patches=()
if [ -n "${TT_CITUS_PATCH:-}" ]; then
  patches=("$(realpath "$TT_CITUS_PATCH")")
else
  for p in "$(dirname "$tarball")"/*.patch; do [ -f "$p" ] && patches+=("$p"); done
fi
echo "citus: building $(basename "$tarball")${patches[*]:+ with ${patches[*]##*/}} (a few minutes)"
# Citus's build dependencies beside the PostgreSQL server headers (already there for pg_twotower).
$SUDO apt-get install -y -qq libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev >/dev/null 2>&1 \
  || { echo "citus: could not install the build dependencies (apt-get)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)
[ -n "$src" ] && [ -f "$src/configure" ] || { echo "citus: $tarball holds no Citus source tree" >&2; exit 1; }
cd "$src"
for p in ${patches[@]+"${patches[@]}"}; do
  patch -p1 --batch --forward < "$p" >/dev/null || { echo "citus: $p does not apply to $(basename "$src")" >&2; exit 1; }
done
log="$work/build.log"
if ! { PG_CONFIG="$PG_CONFIG" ./configure && make -j"$(nproc)"; } >"$log" 2>&1; then
  tail -30 "$log" >&2; echo "citus: the build failed" >&2; exit 1
fi
$SUDO make install >>"$log" 2>&1 || { tail -30 "$log" >&2; echo "citus: make install failed" >&2; exit 1; }
installed || { echo "citus: make install left no citus.so / citus.control" >&2; exit 1; }
echo "citus: installed $(basename "$src") from source"
