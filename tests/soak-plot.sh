#!/usr/bin/env bash
# Plots a soak report (tps.tsv, rss.tsv, phases.tsv of tests/t/014_soak.pl) into a PNG: the
# client load's throughput every 10 s above the backends' private memory every 2 s.
# usage: tests/soak-plot.sh REPORT_DIR OUT.png
set -euo pipefail
report=$1; out=$2
# Vertical lines: the kills between phases.
arrows=$(awk -F'\t' 'NR > 1 && $4 != "" { printf "set arrow from first %f, graph 0 to first %f, graph 1 nohead dt 2 lc rgb \"#aa3333\"\n", $3 / 60, $3 / 60 }' "$report/phases.tsv")
gnuplot <<GP
set terminal pngcairo size 900,720 font "sans,10"
set output "$out"
set multiplot layout 2,1
set key top left
set xlabel "minutes"
set yrange [0:*]
$arrows
set title "make soak: transactions per second of the 6 load clients, every 10 s (pgbench --progress); dashed: kill -9 between phases"
set ylabel "TPS"
plot "$report/tps.tsv" using (\$1 / 60):3 every ::1 with linespoints pt 7 ps 0.3 lc rgb "#228833" title "all scripts"
set title "private memory (RssAnon) of the pgbench backends every 2 s"
set ylabel "MB"
plot "$report/rss.tsv" using (\$1 / 60):(\$5 / 1024) every ::1 with points pt 7 ps 0.2 lc rgb "#3366aa" title "each backend"
unset multiplot
GP
