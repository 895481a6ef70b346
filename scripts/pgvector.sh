#!/usr/bin/env bash
# Installs pgvector into the system PostgreSQL 15 so the benchmark can compare against it in the
# same server. Debian 12 ships no pgvector package; Debian 13 (trixie) ships its source
# (pgvector 0.8.0), which builds against PostgreSQL 15 with PGXS. Optional and idempotent: the
# benchmark skips the comparison when this fails. Nothing of pgvector is kept in this repository.
set -euo pipefail
if [ -f /usr/share/postgresql/15/extension/vector.control ]; then
  echo "pgvector: already installed"; exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
src=/etc/apt/sources.list.d/pg_twotower-trixie-src.sources
if [ ! -f "$src" ]; then
  $SUDO tee "$src" >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  $SUDO apt-get update -qq
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source --download-only pgvector >/dev/null 2>&1
tar xzf pgvector_*.orig.tar.gz
cd pgvector-*/
# pgvector's own default flags (-march=native): the strongest build of it on this machine.
make PG_CONFIG=/usr/bin/pg_config -j"$(nproc)" >/dev/null
$SUDO make PG_CONFIG=/usr/bin/pg_config install >/dev/null
echo "pgvector: installed $(basename "$PWD")"
