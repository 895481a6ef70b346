#!/usr/bin/env bash
# The code gates of `make test`: rustfmt finds nothing to change, and clippy (with the
# workspace's lints, as errors) finds nothing, in every crate and target.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    # The toolchain's own component (rustup ships both); fail if it cannot be had.
    command -v rustup >/dev/null && rustup component add "$c" || {
      echo "lint: cargo $c is not installed and could not be added" >&2; exit 1; }
  fi
done
cargo fmt --all --check
cargo clippy --workspace --all-targets --features pg_test -- -D warnings
echo "lint: rustfmt and clippy clean"
