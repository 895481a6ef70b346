#!/usr/bin/env bash
# `make soak`: tests/t/014_soak.pl for TT_SOAK_SECONDS of load (default 3600: an hour), then
# its report: TPS and latency per script and phase, the table's state after each phase, the
# answers checked, the faults, and a plot of the load's TPS and the backends' private memory over
# time (docs/soak.png, drawn with gnuplot).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v gnuplot > /dev/null; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gnuplot-nox
fi
report=/tmp/pg_twotower-soak
rm -rf "$report"; mkdir -p "$report"
chown postgres:postgres "$report" 2>/dev/null || $SUDO chown postgres:postgres "$report"
status=0
TT_SOAK_SECONDS="${TT_SOAK_SECONDS:-3600}" TT_SOAK_REPORT="$report" bash tests/tap.sh t/014_soak.pl || status=$?
if [ -s "$report/rss.tsv" ]; then
  bash tests/soak-plot.sh "$report" docs/soak.png
  echo "soak: plot written to docs/soak.png"
fi
[ -f "$report/summary.txt" ] && cat "$report/summary.txt"
exit $status
