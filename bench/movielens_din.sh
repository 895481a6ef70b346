#!/usr/bin/env bash
# Target attention in the cascade on MovieLens (bench/movielens_din.sql): needs the demo's
# cluster and data (make demo). Prints psql tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TT_DEMO_PORT:-55432}
scripts/cluster.sh start demo "$PORT" >/dev/null
if [ "$(scripts/cluster.sh psql demo "$PORT" -d movielens -Atc "SELECT to_regclass('ml_log_candidates') IS NOT NULL" 2>/dev/null)" != t ]; then
  echo "bench/movielens_din.sh: the demo's cascade log is missing (run make demo first): skipped"
  exit 0
fi
scripts/cluster.sh psql demo "$PORT" -d movielens -v pr="$(cat scripts/movielens-prerank.json)" -f bench/movielens_din.sql
