#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 machine for building and testing pg_twotower.
# Used by `make demo`, `make test` (via .ci/run) and docker/Dockerfile.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

pkgs=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 postgresql-contrib
      clang libclang-dev sudo pkg-config libssl-dev make gcc g++ perl libipc-run-perl python3
      python3-pip python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# pgvector (the benchmark's comparison) is installed by scripts/pgvector.sh from `make bench`.

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if [ ! -f "$HOME/.pgrx/config.toml" ] || ! grep -q "pg15" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG"
fi
echo "setup: done"
