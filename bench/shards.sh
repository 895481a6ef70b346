#!/usr/bin/env bash
# recall() top-100 over 2 and 3 loopback shards (postgres_fdw, async) against one server with
# the same items, and against one shard's local call. Four scratch clusters on this machine
# (a coordinator and three shards); the coordinator also holds the single-server table.
# Environment: TT_SHARD_ITEMS (300000), TT_SHARD_DIMS (64), TT_SHARD_SECONDS (20 per run).
# Prints a markdown table (p50/p99 from pgbench's per-transaction log, TPS of one client).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${TT_SHARD_ITEMS:-300000}
DIMS=${TT_SHARD_DIMS:-64}
SECS=${TT_SHARD_SECONDS:-20}
C=55450
out=/tmp/pg_twotower-shardbench
rm -rf "$out"; mkdir -p "$out"; chmod 777 "$out"
for i in 0 1 2 3; do scripts/cluster.sh start "shard$i" $((C + i)) >/dev/null; done
psql_on() { local i=$1; shift; scripts/cluster.sh psql "shard$i" $((C + i)) -q -o /dev/null -d postgres "$@"; }
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi; }

# Vectors: a deterministic function of the id (the same rows on every node).
vec="ARRAY(SELECT (sin(g * 0.7919 + j * 1.3) * cos(g * 0.013 * j))::real FROM generate_series(1, $DIMS) j)"
echo "# loading $N items × $DIMS on the single server and splitting them over the shards" >&2
psql_on 0 -c "DROP EXTENSION IF EXISTS pg_twotower CASCADE; CREATE EXTENSION pg_twotower; CREATE EXTENSION IF NOT EXISTS postgres_fdw;
  DROP TABLE IF EXISTS items_all, queries CASCADE;
  CREATE TABLE items_all (id bigint PRIMARY KEY, embedding real[]);
  INSERT INTO items_all SELECT g, $vec FROM generate_series(1, $N) g;
  CREATE INDEX items_all_idx ON items_all USING twotower_hnsw (embedding real_l2_ops);" -c "VACUUM ANALYZE items_all"
half=$(( (N + 1) / 2 )); third=$(( (N + 2) / 3 ))
for s in 1 2 3; do
  psql_on "$s" -c "DROP EXTENSION IF EXISTS pg_twotower CASCADE; CREATE EXTENSION pg_twotower;
    DROP TABLE IF EXISTS half, third; CREATE TABLE half (id bigint PRIMARY KEY, embedding real[]);
    CREATE TABLE third (id bigint PRIMARY KEY, embedding real[]);"
done
for s in 1 2; do
  lo=$(( (s - 1) * half + 1 )); hi=$(( s * half ))
  psql_on 0 -c "\copy (SELECT id, embedding FROM items_all WHERE id BETWEEN $lo AND $hi) TO '$out/half$s.tsv'"
  psql_on "$s" -c "\copy half FROM '$out/half$s.tsv'"
done
for s in 1 2 3; do
  lo=$(( (s - 1) * third + 1 )); hi=$(( s * third ))
  psql_on 0 -c "\copy (SELECT id, embedding FROM items_all WHERE id BETWEEN $lo AND $hi) TO '$out/third$s.tsv'"
  psql_on "$s" -c "\copy third FROM '$out/third$s.tsv'"
done
for s in 1 2 3; do
  psql_on "$s" -c "CREATE INDEX ON half USING twotower_hnsw (embedding real_l2_ops);
    CREATE INDEX ON third USING twotower_hnsw (embedding real_l2_ops);" -c "VACUUM ANALYZE half, third"
done

# The coordinator: a user tower (the request's q), query inputs, servers, partitioned tables.
ddl="DROP TABLE IF EXISTS items2, items3 CASCADE; DROP SERVER IF EXISTS s1, s2, s3 CASCADE;
  CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS \$\$
    SELECT set_byte(set_byte('\\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d \$\$;
  SELECT twotower.import_model('u', '{\"format\": \"pg_twotower.tower\", \"spec_version\": 1, \"kind\": \"user\",
    \"features\": [{\"name\": \"q\", \"type\": \"dense\", \"dim\": $DIMS}], \"layers\": [], \"output\": {\"dim\": $DIMS, \"metric\": \"l2\"}}',
    pg_temp.st('{}', ''));
  CREATE TABLE queries AS SELECT i, jsonb_build_object('q', to_jsonb(ARRAY(SELECT (sin(i * 3.1 + j) * 0.9)::real FROM generate_series(1, $DIMS) j))) AS f
    FROM generate_series(1, 200) i;
  CREATE TABLE items2 (id bigint, embedding real[]) PARTITION BY RANGE (id);
  CREATE TABLE items3 (id bigint, embedding real[]) PARTITION BY RANGE (id);"
for s in 1 2 3; do
  ddl+="CREATE SERVER s$s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '/tmp/pg_twotower-shard$s', port '$((C + s))',
      dbname 'postgres', extensions 'pg_twotower', async_capable 'true');
    CREATE USER MAPPING FOR CURRENT_USER SERVER s$s;
    CREATE FOREIGN TABLE items3_s$s PARTITION OF items3 FOR VALUES FROM ($(( (s - 1) * third + 1 ))) TO ($(( s * third + 1 )))
      SERVER s$s OPTIONS (table_name 'third');"
  if [ "$s" -le 2 ]; then
    ddl+="CREATE FOREIGN TABLE items2_s$s PARTITION OF items2 FOR VALUES FROM ($(( (s - 1) * half + 1 ))) TO ($(( s * half + 1 )))
      SERVER s$s OPTIONS (table_name 'half');"
  fi
done
ddl+="CREATE INDEX items2_idx ON items2 USING twotower_hnsw (embedding real_l2_ops);
  CREATE INDEX items3_idx ON items3 USING twotower_hnsw (embedding real_l2_ops);"
psql_on 0 -c "$ddl"
# Shard 1 answers a local call on its half too: the model and the inputs there.
psql_on 1 -c "DROP TABLE IF EXISTS queries; $(echo "$ddl" | sed -n '/CREATE FUNCTION/,/FROM generate_series(1, 200) i;/p')"

run() { # node, index -> "p50 p99 tps"
  local node=$1 index=$2 log="$out/pgbench-$2"
  printf '\\set i random(1, 200)\nSELECT count(*) FROM twotower.recall('"'"'u'"'"', '"'"'%s'"'"', (SELECT f FROM queries WHERE i = :i), 100);\n' "$index" > "$log.sql"
  # Warm-up (caches, connections), then the timed run with a per-transaction log.
  as_pg pgbench -n -h "/tmp/pg_twotower-shard$node" -p $((C + node)) -U postgres -f "$log.sql" -T 3 postgres >/dev/null 2>&1
  local tps
  tps=$(cd "$out" && as_pg pgbench -n -h "/tmp/pg_twotower-shard$node" -p $((C + node)) -U postgres -f "$log.sql" -T "$SECS" -l --log-prefix="$log" postgres 2>/dev/null \
        | awk '/^tps/ {print $3}')
  cat "$log".* | awk '{print $3 / 1000.0}' | sort -n | awk -v tps="$tps" '{a[NR] = $1} END {printf "%.2f %.2f %.0f", a[int(NR * 0.5)], a[int(NR * 0.99)], tps}'
}
echo "# recall() top 100, $N items × $DIMS, one client, ${SECS} s per row; $(nproc) cores for all four servers"
echo
echo "| setup | p50 ms | p99 ms | QPS | p50 / one shard's local call |"
echo "|---|---|---|---|---|"
read -r l50 l99 ltps <<< "$(run 1 half_embedding_idx)"
read -r a50 a99 atps <<< "$(run 0 items_all_idx)"
read -r s250 s299 s2tps <<< "$(run 0 items2_idx)"
read -r t50 t99 ttps <<< "$(run 1 third_embedding_idx)"
read -r s350 s399 s3tps <<< "$(run 0 items3_idx)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f×", a / b}'; }
echo "| one server, all $N items | $a50 | $a99 | $atps | $(ratio "$a50" "$l50") |"
echo "| one shard's local call on its half | $l50 | $l99 | $ltps | 1.00× |"
echo "| 2 shards (halves) through the coordinator | $s250 | $s299 | $s2tps | $(ratio "$s250" "$l50") |"
echo "| one shard's local call on its third | $t50 | $t99 | $ttps | 1.00× |"
echo "| 3 shards (thirds) through the coordinator | $s350 | $s399 | $s3tps | $(ratio "$s350" "$t50") |"
echo
echo "# target: fan-out p50 ≤ 1.5× a single shard's local call: 2 shards $(ratio "$s250" "$l50"), 3 shards $(ratio "$s350" "$t50")"
for i in 0 1 2 3; do scripts/cluster.sh stop "shard$i" $((C + i)); done
