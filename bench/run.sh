#!/usr/bin/env bash
# Runs the benchmark program against a scratch cluster (port 55433). The extension must be
# installed (make bench does that). Environment: see bench/src/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PORT=${TT_PORT:-55433}
cargo build --release -q -p twotower-bench
scripts/cluster.sh start bench "$PORT"
mkdir -p bench/out
TT_PORT=$PORT TT_HOST=/tmp/pg_twotower-bench ./target/release/twotower-bench | tee "bench/out/bench-$(date +%Y%m%d-%H%M%S).md"
