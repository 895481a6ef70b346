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
  # The machine's own Debian mirror (its first URIs: line, or the first deb line of
  # sources.list), with the suite changed to trixie: no mirror is named in this repository.
  uri=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -h -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
  fi
  if [ -z "$uri" ]; then
    echo "pgvector: no Debian mirror found in the apt sources; skipping" >&2; exit 1
  fi
  printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
    | $SUDO tee "$src" >/dev/null
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
