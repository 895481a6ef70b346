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
