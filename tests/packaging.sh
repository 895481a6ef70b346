#!/usr/bin/env bash
# Packaging checks (issue 24): the Docker build uses the pinned toolchain of the repository (the
# rustc the project builds with, from the official image of that exact version, no installer
# script), keeps build output and the MovieLens data out of its context, installs the runtime
# libraries, and ships the companion extension; make package's instructions name the version.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
check() { if eval "$2"; then echo "ok - $1"; else echo "not ok - $1"; fail=1; fi; }
rust=$(rustc --version | awk '{print $2}')
check "Dockerfile builds FROM rust:$rust (the toolchain in use), pinned to a version" \
  "grep -Eq '^FROM rust:$rust-bookworm AS build' docker/Dockerfile"
check "no installer script piped to a shell" "! grep -Eq 'curl[^|]*\\|[[:space:]]*(ba)?sh' docker/Dockerfile"
for d in target data bench/out .git; do
  check ".dockerignore leaves out $d" "grep -qx '$d' .dockerignore"
done
check "the image installs the runtime library libpq5" \
  "grep -q 'apt-get install.* libpq5' docker/Dockerfile"
check "the image and the tarball ship pg_twotower_pgvector" \
  "grep -q 'pg_twotower\\*.control' docker/Dockerfile && grep -q 'pg_twotower_pgvector.control' scripts/package.sh"
check "make package prints install instructions with the version and the runtime libraries" \
  "grep -q 'To install pg_twotower \$version' scripts/package.sh && grep -q 'apt-get install libpq5' scripts/package.sh"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
check "docs/operations.md names the current version ($version) in its install example" \
  "grep -q \"pg_twotower-$version-pg15\" docs/operations.md"
if [ $fail = 0 ]; then echo "packaging: all checks passed"; else echo "packaging: FAILED"; exit 1; fi
