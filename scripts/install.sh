#!/usr/bin/env bash
# Builds pg_twotower and installs it into the system PostgreSQL 15.
# usage: scripts/install.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
args=(--pg-config /usr/bin/pg_config)
[ "${1:-}" = "--release" ] && args+=(--release)
[ "$(id -u)" = 0 ] || args+=(--sudo)
cargo pgrx install "${args[@]}"
# Scripts of released versions (CREATE EXTENSION pg_twotower VERSION '0.1.0' and the upgrade
# path from it); pgrx installs the current version's script and the upgrade scripts in sql/.
ext_dir="$(/usr/bin/pg_config --sharedir)/extension"
# The companion extension for pgvector's vector columns (SQL only: CREATE EXTENSION
# pg_twotower_pgvector where pgvector is installed).
files=(sql/releases/*.sql pg_twotower_pgvector.control sql/pgvector/*.sql)
if [ "$(id -u)" = 0 ]; then
    install -m 644 "${files[@]}" "$ext_dir/"
else
    sudo install -m 644 "${files[@]}" "$ext_dir/"
fi
