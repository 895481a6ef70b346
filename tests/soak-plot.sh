#!/usr/bin/env bash
# Plots a soak report's backend memory (rss.tsv, phases.tsv of tests/t/014_soak.pl) into a PNG.
# usage: tests/soak-plot.sh REPORT_DIR OUT.png
set -euo pipefail
report=$1; out=$2
# Vertical lines: the kills between phases.
arrows=$(awk -F'\t' 'NR > 1 && $4 != "" { printf "set arrow from first %f, graph 0 to first %f, graph 1 nohead dt 2 lc rgb \"#aa3333\"\n", $3 / 60, $3 / 60 }' "$report/phases.tsv")
gnuplot <<GP
set terminal pngcairo size 900,420 font "sans,10"
set output "$out"
set title "make soak: private memory (RssAnon) of the pgbench backends every 2 s; dashed: kill -9 between phases"
set xlabel "minutes"
set ylabel "MB"
set key top left
set yrange [0:*]
$arrows
plot "$report/rss.tsv" using (\$1 / 60):(\$5 / 1024) every ::1 with points pt 7 ps 0.2 lc rgb "#3366aa" title "each backend"
GP
