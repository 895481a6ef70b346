#!/usr/bin/env bash
# Builds an installable tarball of pg_twotower for PostgreSQL 15 on this platform (Debian 12,
# x86-64): the shared library, the control file and every SQL script (the current version, the
# released versions and the upgrade scripts), laid out from / so that
#   sudo tar -xzf pg_twotower-<version>-pg15-<arch>.tar.gz -C /
# installs it on a server with the same PostgreSQL packages and no Rust toolchain.
# usage: scripts/package.sh   (prints the tarball's path)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cargo pgrx package --pg-config /usr/bin/pg_config >&2
root=target/release/pg_twotower-pg15
ext_dir="$root$(/usr/bin/pg_config --sharedir)/extension"
install -m 644 sql/releases/*.sql pg_twotower_pgvector.control sql/pgvector/*.sql "$ext_dir/"
out="target/pg_twotower-$version-pg15-$(uname -m).tar.gz"
tar -C "$root" -czf "$out" --owner=0 --group=0 .
tar -tzf "$out" | grep -E '\.(so|control|sql)$' >&2
cat >&2 <<MSG

To install pg_twotower $version on a Debian 12 server with PostgreSQL 15 (no Rust needed):
  sudo apt-get install libpq5                 # runtime library (usually present already)
  sudo tar -xzf $(basename "$out") -C /
  psql -c 'CREATE EXTENSION pg_twotower'      # as a superuser, in each database that uses it
  psql -c 'ALTER EXTENSION pg_twotower UPDATE'  # instead, where an older version is installed
MSG
echo "$out"
