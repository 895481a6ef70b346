#!/usr/bin/env bash
# Runs the benchmark program against a scratch cluster (port 55433). The extension must be
# installed (make bench does that). Environment: see bench/src/main.rs and bench/src/towers.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PORT=${TT_PORT:-55433}
cargo build --release -q -p twotower-bench
# pgvector in the same server for the side-by-side comparison (optional: skipped when it fails).
bash scripts/pgvector.sh || echo "note: pgvector could not be installed; the comparison will be skipped" >&2
scripts/cluster.sh start bench "$PORT"
mkdir -p bench/out

# The numpy baseline of the towers part runs in its own venv (idempotent). When it cannot be
# set up (no venv module, no network), the benchmark skips the comparison and says so.
VENV=bench/out/venv
if [ -z "${TT_PYTHON:-}" ]; then
  if ! "$VENV/bin/python" -c 'import numpy' >/dev/null 2>&1; then
    if { [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"; } \
       && "$VENV/bin/python" -m pip install -q --disable-pip-version-check numpy; then
      echo "bench venv ready: $VENV ($("$VENV/bin/python" -c 'import numpy; print("numpy", numpy.__version__)'))"
    else
      echo "note: could not set up $VENV with numpy; the numpy comparison will be skipped" >&2
      rm -rf "$VENV"
    fi
  fi
fi

TT_PORT=$PORT TT_HOST=/tmp/pg_twotower-bench ./target/release/twotower-bench | tee "bench/out/bench-$(date +%Y%m%d-%H%M%S).md"

# Training quality and throughput on MovieLens-100k (bench/movielens.py), with the PyTorch
# reference where torch is importable: TT_TORCH_PYTHON, or TT_TORCH=1 to create
# bench/out/torch-venv (a large download: torch with its CUDA libraries, used on the CPU).
if [ "${TT_TORCH:-0}" = 1 ] && [ -z "${TT_TORCH_PYTHON:-}" ] && ! bench/out/torch-venv/bin/python -c 'import torch, safetensors' 2>/dev/null; then
  python3 -m venv bench/out/torch-venv && bench/out/torch-venv/bin/pip install -q torch safetensors numpy \
    || echo "note: could not install torch; the PyTorch reference will be skipped" >&2
fi
python3 bench/movielens.py | tee "bench/out/movielens-$(date +%Y%m%d-%H%M%S).md"
# Item-to-item channels and the merged funnel on the same split (bench/movielens_channels.py;
# movielens.py above has loaded the data and trained the demo's two-tower model).
python3 bench/movielens_channels.py | tee "bench/out/movielens-channels-$(date +%Y%m%d-%H%M%S).md"
# Target attention in the cascade's pre-rank models (bench/movielens_din.sh; movielens.py ran
# scripts/movielens.sh, whose cascade part made the log and the teacher's scores).
bash bench/movielens_din.sh | tee "bench/out/movielens-din-$(date +%Y%m%d-%H%M%S).txt"
# Negative feedback in recall (bench/movielens_feedback.py): POS@50 / NEG@50 of the demo's model
# on all ratings, on the positive ones, and with the negative-feedback objective.
TT_SKIP_LOAD=1 python3 bench/movielens_feedback.py | tee "bench/out/movielens-feedback-$(date +%Y%m%d-%H%M%S).md"
# Popularity debiasing (bench/movielens_debias.py): HR@50, long-tail HR@50, head share and
# coverage of the two-tower channel, the merged list and the cascade, with and without it.
TT_SKIP_LOAD=1 python3 bench/movielens_debias.py | tee "bench/out/movielens-debias-$(date +%Y%m%d-%H%M%S).md"
# Multi-task pre-ranking (bench/movielens_multitask.py): rated / liked / disliked tasks, one
# multi-task model against one model per task; per-task AUC and HR@10, fused HR@50 / NEG@50.
TT_SKIP_LOAD=1 python3 bench/movielens_multitask.py | tee "bench/out/movielens-multitask-$(date +%Y%m%d-%H%M%S).md"
# A simulated A/B test (bench/movielens_ab.py): two-tower recall against the merged funnel
# through a split, the impression log and feedback, online metrics against the offline ones.
TT_SKIP_LOAD=1 python3 bench/movielens_ab.py | tee "bench/out/movielens-ab-$(date +%Y%m%d-%H%M%S).md"
# A query-aware index (WITH (query_sample = ...)) against the plain graph on held-out users of a
# two-tower model trained in the database over 1M items (bench/query_aware.py; its own scratch
# cluster, about 30 minutes). TT_SKIP_QUERY_AWARE=1 leaves it out.
if [ "${TT_SKIP_QUERY_AWARE:-0}" != 1 ]; then
  python3 bench/query_aware.py | tee "bench/out/query-aware-$(date +%Y%m%d-%H%M%S).md"
fi
# recall() over loopback shards (postgres_fdw) against one server (bench/shards.sh; four more
# scratch clusters, stopped at the end). TT_SKIP_SHARDS=1 leaves it out.
if [ "${TT_SKIP_SHARDS:-0}" != 1 ]; then
  bash bench/shards.sh | tee "bench/out/shards-$(date +%Y%m%d-%H%M%S).md"
fi
# The same query through a Citus coordinator over two workers (bench/citus.sh; three more
# scratch clusters; Citus from scripts/citus.sh, skipped with a note without it).
# TT_SKIP_CITUS=1 leaves it out.
if [ "${TT_SKIP_CITUS:-0}" != 1 ]; then
  bash scripts/citus.sh || echo "note: Citus could not be installed; the Citus part will be skipped" >&2
  bash bench/citus.sh | tee "bench/out/citus-$(date +%Y%m%d-%H%M%S).md"
fi
