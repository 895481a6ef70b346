#!/usr/bin/env python3
"""Item-to-item channels at scale (part of `make bench`; alone: `python3 bench/channels_scale.py`).

A synthetic log of TT_CF_ROWS interactions (default 10 000 000): TT_CF_USERS users (default
1 000 000), TT_CF_ITEMS items (default 1 000 000) with Zipf-like popularity (item = floor(N·u^3)
for a uniform u, so a few items have most users, like real catalogues). It measures, on the demo
cluster (database channels_bench):
- item-CF and Swing build time (default options) and the backend's peak RSS;
- i2i_recall latency over 500 histories of 20 items (p50, p99), and one SPI round trip
  (SELECT 1 through the same driver loop) as the baseline of the same run;
- merge of three 200-candidate lists into 100 (p50, p99).
Prints a markdown table.
"""

import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from movielens import ROOT, PORT  # noqa: E402

ROWS = int(os.environ.get("TT_CF_ROWS", "10000000"))
USERS = int(os.environ.get("TT_CF_USERS", "1000000"))
ITEMS = int(os.environ.get("TT_CF_ITEMS", "1000000"))


def psql(sql, db="channels_bench"):
    cmd = [os.path.join(ROOT, "scripts", "cluster.sh"), "psql", "demo", PORT, "-d", db, "-At", "-v", "ON_ERROR_STOP=1"]
    r = subprocess.run(cmd, input=sql, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"psql failed: {r.stderr}\n{sql[:400]}")
    return r.stdout


def run_timed(sql_body, n):
    cmd = [os.path.join(ROOT, "scripts", "cluster.sh"), "psql", "demo", PORT, "-d", "channels_bench", "-At", "-v", "ON_ERROR_STOP=1"]
    body = f"""
DO $$
DECLARE t0 timestamptz; ms float8[] := '{{}}';
BEGIN
  FOR s IN 1..{n} LOOP
    t0 := clock_timestamp();
    EXECUTE $q${sql_body}$q$ USING s;
    ms := ms || extract(epoch FROM clock_timestamp() - t0) * 1000;
  END LOOP;
  RAISE NOTICE 'ms %', array_to_string(ms, ',');
END $$;"""
    r = subprocess.run(cmd, input=body, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    m = re.search(r"ms ([0-9.,e-]+)", r.stderr)
    v = sorted(float(x) for x in m.group(1).split(","))
    return statistics.median(v), v[int(len(v) * 0.99) - 1]


def main():
    subprocess.run([os.path.join(ROOT, "scripts", "cluster.sh"), "start", "demo", PORT], check=True, stdout=subprocess.DEVNULL)
    print(f"# Item-to-item channels at scale: {ROWS} interactions, {USERS} users, {ITEMS} items (Zipf-like)")
    print()
    if os.environ.get("TT_CF_REUSE") != "1":
        build_all()
    latencies()


def build_all():
    psql("DROP DATABASE IF EXISTS channels_bench; CREATE DATABASE channels_bench;", db="postgres")
    psql(f"""CREATE EXTENSION pg_twotower;
CREATE TABLE log AS
SELECT (g % {USERS})::bigint AS user_id, floor({ITEMS} * power(random(), 3))::bigint AS item_id, g::float8 AS ts
  FROM generate_series(1, {ROWS}) g;
ANALYZE log;""")
    print("| build | items | neighbour rows | seconds | backend peak RSS MB |")
    print("|---|---|---|---|---|")
    for kind in ("itemcf", "swing"):
        out = psql(f"""SET maintenance_work_mem = '4GB';
SELECT items || ':' || rows || ':' || seconds FROM twotower.build_channel('{kind}', '{kind}', 'log', '{kind}_nb',
       user_column => 'user_id', item_column => 'item_id', time_column => 'ts');
SELECT (regexp_match(pg_read_file('/proc/' || pg_backend_pid() || '/status'), 'VmHWM:\\s+(\\d+)'))[1];""")
        lines = [x for x in out.strip().splitlines() if x != "SET"]
        items, rows, secs = lines[0].split(":")
        print(f"| {kind} | {items} | {rows} | {float(secs):.1f} | {int(lines[1]) / 1024:.0f} |", flush=True)


def latencies():
    psql("DROP TABLE IF EXISTS hists; CREATE INDEX IF NOT EXISTS log_user ON log (user_id);")
    psql("CREATE TABLE hists AS SELECT s, ARRAY(SELECT item_id FROM log WHERE user_id = s * 97 % " + str(USERS)
         + " LIMIT 20) AS h FROM generate_series(1, 500) s; ANALYZE hists;")
    print()
    print("| call (500 calls, server-side timing) | p50 ms | p99 ms |")
    print("|---|---|---|")
    base = run_timed("SELECT 1 FROM hists WHERE s = $1", 500)
    print(f"| baseline: one lookup of the history row | {base[0]:.3f} | {base[1]:.3f} |", flush=True)
    for kind in ("itemcf", "swing"):
        r = run_timed(f"SELECT count(*) FROM hists, twotower.i2i_recall('{kind}', h, k => 200) WHERE s = $1", 500)
        print(f"| i2i_recall {kind}, a user's history (10 items), k 200 | {r[0]:.3f} | {r[1]:.3f} |", flush=True)
    r = run_timed("""SELECT count(*) FROM (SELECT array_agg(c) c, array_agg(i) i, array_agg(sc) sc FROM (
        SELECT 'itemcf' c, item_id i, score sc FROM twotower.i2i_recall('itemcf', (SELECT h FROM hists WHERE s = $1), k => 200)
        UNION ALL SELECT 'swing', item_id, score FROM twotower.i2i_recall('swing', (SELECT h FROM hists WHERE s = $1), k => 200)) u) x,
        twotower.merge(x.c, x.i, x.sc, 100, 'rrf') m""", 500)
    print(f"| two i2i_recall channels (200 each) merged by RRF into 100 | {r[0]:.3f} | {r[1]:.3f} |", flush=True)
    r = run_timed("""SELECT count(*) FROM (SELECT array_agg(c) c, array_agg(i) i, array_agg(sc) sc FROM (
        SELECT (ARRAY['a','b','c'])[1 + g % 3] c, (g * 7919 + $1)::bigint % 100000 i, random()::real sc FROM generate_series(1, 600) g) u) x,
        twotower.merge(x.c, x.i, x.sc, 100, 'quota', '{"quotas": {"a": 50, "b": 30, "c": 20}}') m""", 500)
    print(f"| merge alone: 3 × 200 candidates into 100 (quota), with generating them | {r[0]:.3f} | {r[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
