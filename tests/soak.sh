#!/usr/bin/env bash
# `make soak`: tests/t/014_soak.pl for TT_SOAK_SECONDS of load (default 3600: an hour), then
# its report: TPS per script, the answers checked, the faults, and a plot of the backends'
# private memory over time (docs/soak-rss.svg, drawn with gnuplot).
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
  # Vertical lines: the kills between phases.
  arrows=$(awk -F'\t' 'NR > 1 && $4 != "" { printf "set arrow from %f, graph 0 to %f, graph 1 nohead dt 2 lc rgb \"#aa3333\"\n", $3 / 60, $3 / 60 }' "$report/phases.tsv")
  gnuplot <<GP
set terminal svg size 900,420 dynamic font "sans,11"
set output "docs/soak-rss.svg"
set title "make soak: private memory (RssAnon) of each pgbench backend; dashed: kill -9 between phases"
set xlabel "minutes"
set ylabel "MB"
set key off
set yrange [0:*]
$arrows
plot "$report/rss.tsv" using (\$1 / 60):(\$5 / 1024) every ::1 with points pt 7 ps 0.3 lc rgb "#3366aa"
GP
  echo "soak: plot written to docs/soak-rss.svg"
fi
[ -f "$report/summary.txt" ] && cat "$report/summary.txt"
exit $status
