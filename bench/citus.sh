#!/usr/bin/env bash
# ORDER BY embedding <=> q LIMIT 10 and recall() top 10 on a Citus cluster on loopback (a coordinator and two
# workers, the item table distributed over TT_CITUS_SHARDS shards with a twotower_hnsw index on
# each), against one server holding all rows (a plain table on the coordinator) and against one
# shard's own query on its worker, in one run. Needs Citus (scripts/citus.sh); not part of
# `make test`.
# Environment: TT_CITUS_ITEMS (200000), TT_CITUS_DIMS (64), TT_CITUS_SHARDS (2: one per worker),
# TT_CITUS_SECONDS (15 per row).
# Prints a markdown table (p50/p99 from pgbench's per-transaction log, one client), then the
# coordinator's own work: each distributed query's latency minus the slowest shard's
# server-side time for its task (log_min_duration_statement = 0 on the workers during that run;
# tasks paired with queries by order), with a loopback round trip (SELECT 1) beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${TT_CITUS_ITEMS:-200000}
DIMS=${TT_CITUS_DIMS:-64}
SHARDS=${TT_CITUS_SHARDS:-2}
SECS=${TT_CITUS_SECONDS:-15}
C=55460
DB=citusbench
if [ ! -f "$(pg_config --pkglibdir)/citus.so" ]; then
  echo "citus not available: skipping (scripts/citus.sh installs it)" >&2; exit 0
fi
out=/tmp/pg_twotower-citusbench
rm -rf "$out"; mkdir -p "$out"; chmod 777 "$out"
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi; }
sock() { echo "/tmp/pg_twotower-citus$1"; }
psql_on() { local i=$1; shift; scripts/cluster.sh psql "citus$i" $((C + i)) -X -q -d "$DB" "$@"; }
for i in 0 1 2; do
  scripts/cluster.sh start "citus$i" $((C + i)) >/dev/null
  conf=$(sock "$i")/data/postgresql.conf
  if ! grep -q "^shared_preload_libraries = 'citus'" "$conf"; then
    printf "shared_preload_libraries = 'citus'\nmax_prepared_transactions = 20\nshared_buffers = '512MB'\n" | as_pg tee -a "$conf" >/dev/null
    as_pg /usr/lib/postgresql/15/bin/pg_ctl -D "$(sock "$i")/data" -w restart -l "$(sock "$i")/log" >/dev/null
  fi
  scripts/cluster.sh psql "citus$i" $((C + i)) -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" 2>/dev/null
  psql_on "$i" -c "CREATE EXTENSION citus; CREATE EXTENSION pg_twotower"
done
psql_on 0 -c "SELECT citus_set_coordinator_host('$(sock 0)', $C)" \
  -c "SELECT citus_add_node('$(sock 1)', $((C + 1)))" -c "SELECT citus_add_node('$(sock 2)', $((C + 2)))" >/dev/null

echo "# loading $N items × $DIMS (random) into one plain table and one distributed over $SHARDS shards" >&2
psql_on 0 -c "SELECT setseed(0.5);
  CREATE TABLE items_all (id bigint PRIMARY KEY, embedding real[]);
  INSERT INTO items_all SELECT g, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, $DIMS) WHERE g > 0)
    FROM generate_series(1, $N) g;
  SET citus.shard_count = $SHARDS;
  CREATE TABLE items (id bigint PRIMARY KEY, embedding real[]);
  SELECT create_distributed_table('items', 'id');
  INSERT INTO items SELECT * FROM items_all;" >/dev/null
echo "# building the indexes (the shards' on the workers, at once)" >&2
psql_on 0 -c "CREATE INDEX items_all_idx ON items_all USING twotower_hnsw (embedding public.real_cosine_ops)" \
  -c "CREATE INDEX items_idx ON items USING twotower_hnsw (embedding public.real_cosine_ops)" \
  -c "VACUUM ANALYZE items_all" -c "VACUUM ANALYZE items"
# Worker 1's first shard: the "one shard's own query".
shard=$(psql_on 0 -Atc "SELECT 'items_' || shardid FROM citus_shards WHERE table_name = 'items'::regclass AND nodeport = $((C + 1)) ORDER BY shardid LIMIT 1")
shard_rows=$(psql_on 1 -Atc "SELECT count(*) FROM $shard")
per_worker=$(psql_on 0 -Atc "SELECT max(n) FROM (SELECT count(*) AS n FROM citus_shards WHERE table_name = 'items'::regclass GROUP BY nodeport) s")

# 50 query vectors, each its own pgbench script per setup (the vector a literal, as a client's
# parameter would be: Citus ships it inside each task's query).
psql_on 0 -Atc "SELECT setseed(0.25); SELECT '''' || ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, $DIMS) WHERE i > 0)::text || ''''
  FROM generate_series(1, 50) i" | sed -n '2,$p' > "$out/queries"
# recall() through Citus and on one server: a user tower whose vector is the request's "q".
psql_on 0 -c "SELECT twotower.import_model('qd', '{\"format\": \"pg_twotower.tower\", \"spec_version\": 1, \"kind\": \"user\",
  \"features\": [{\"name\": \"q\", \"type\": \"dense\", \"dim\": $DIMS}], \"layers\": [], \"output\": {\"dim\": $DIMS, \"metric\": \"cosine\"}}',
  '\\x02000000000000007b7d')" >/dev/null
n=0
while read -r q; do
  n=$((n + 1))
  for setup in items items_all "$shard"; do
    mkdir -p "$out/$setup"
    echo "SELECT id FROM $setup ORDER BY embedding <=> $q LIMIT 10;" > "$out/$setup/q$n.sql"
  done
  json="{\"q\": [$(echo "$q" | tr -d "'{}")]}"
  for idx in items_idx items_all_idx; do
    mkdir -p "$out/recall-$idx"
    echo "SELECT item_id FROM twotower.recall('qd', '$idx', '$json', 10);" > "$out/recall-$idx/q$n.sql"
  done
done < "$out/queries"
echo 'SELECT 1;' > "$out/one.sql"
# Citus's own cost without pg_twotower: the same shape of query (ordered, LIMIT 10, every shard)
# over the primary key's btree, through the coordinator and on the one shard.
mkdir -p "$out/pk" "$out/pk-shard"
for n in $(seq 1 50); do
  echo "SELECT id FROM items WHERE id > $((n * 997)) ORDER BY id LIMIT 10;" > "$out/pk/q$n.sql"
  echo "SELECT id FROM $shard WHERE id > $((n * 997)) ORDER BY id LIMIT 10;" > "$out/pk-shard/q$n.sql"
done

run() { # node, setup [log] -> "p50 p99 qps"; per-transaction latencies in $out/<setup><log>.lat
  local node=$1 setup=$2 log=${3:-} args=()
  if [ "$setup" = one ]; then args=(-f "$out/one.sql"); else for f in "$out/$setup"/q*.sql; do args+=(-f "$f"); done; fi
  local base=(pgbench -n -h "$(sock "$node")" -p $((C + node)) -U postgres "${args[@]}" "$DB")
  as_pg "${base[@]}" -T 3 >/dev/null 2>&1
  if [ -n "$log" ]; then
    for w in 1 2; do
      psql_on "$w" -c "ALTER SYSTEM SET log_min_duration_statement = 0" -c "SELECT pg_reload_conf()" >/dev/null
      wc -c < "$(sock "$w")/log" > "$out/logpos$w"
    done
  fi
  local qps
  qps=$(cd "$out" && as_pg "${base[@]}" -T "$SECS" -l --log-prefix="$out/pgb-$setup$log" 2>/dev/null | awk '/^tps/ {print $3}')
  if [ -n "$log" ]; then
    for w in 1 2; do
      psql_on "$w" -c "ALTER SYSTEM RESET log_min_duration_statement" -c "SELECT pg_reload_conf()" >/dev/null
      # This run's tasks, in order: their server-side time (ms). Citus sends a task through the
      # extended protocol: parse + bind (planning) + execute, logged one by one.
      tail -c +"$(( $(cat "$out/logpos$w") + 1 ))" "$(sock "$w")/log" \
        | grep -E 'duration: [0-9.]+ ms  (statement|parse|bind|execute)[^:]*: SELECT .*FROM public\.items_[0-9]+ items' \
        | sed -E 's/.*duration: ([0-9.]+) ms  (statement|parse|bind|execute).*/\1 \2/' \
        | awk '{s += $1} $2 == "execute" || $2 == "statement" {print s; s = 0}' > "$out/worker$w.ms"
    done
  fi
  cat "$out/pgb-$setup$log".* | awk '{print $3 / 1000.0}' > "$out/$setup$log.lat"
  sort -n "$out/$setup$log.lat" | awk -v qps="$qps" '{a[NR] = $1} END {printf "%.3f %.3f %.0f", a[int(NR * 0.5)], a[int(NR * 0.99)], qps}'
}

echo "# ORDER BY embedding <=> q LIMIT 10 (cosine), $N items × $DIMS, $SHARDS shards ($per_worker per worker), one client,"
echo "# ${SECS} s per row; $(nproc) cores for the three servers and the client; one shard = $shard ($shard_rows rows)"
echo
echo "| setup | p50 ms | p99 ms | QPS | p50 / one shard's own query |"
echo "|---|---|---|---|---|"
read -r s50 s99 sqps <<< "$(run 1 "$shard")"
read -r a50 a99 aqps <<< "$(run 0 items_all)"
read -r d50 d99 dqps <<< "$(run 0 items)"
read -r r50 r99 rqps <<< "$(run 1 one)"
read -r p50 p99 pqps <<< "$(run 0 pk)"
read -r ps50 ps99 psqps <<< "$(run 1 pk-shard)"
read -r ra50 ra99 raqps <<< "$(run 0 recall-items_all_idx)"
read -r rd50 rd99 rdqps <<< "$(run 0 recall-items_idx)"
# Once more with the workers logging every statement's duration (which costs a little: this
# run's latencies are the ones paired with the shards' times below).
read -r l50 l99 lqps <<< "$(run 0 items -logged)"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f×", a / b}'; }
echo "| one server, all $N rows (plain table on the coordinator) | $a50 | $a99 | $aqps | $(ratio "$a50" "$s50") |"
echo "| one shard's own query on its worker ($shard_rows rows) | $s50 | $s99 | $sqps | 1.00× |"
echo "| Citus: distributed table, $SHARDS shards, through the coordinator | $d50 | $d99 | $dqps | $(ratio "$d50" "$s50") |"
echo "| Citus, the same, workers logging each statement's duration | $l50 | $l99 | $lqps | $(ratio "$l50" "$s50") |"
echo "| \`recall()\` top 10, one server (the plain table's index) | $ra50 | $ra99 | $raqps | $(ratio "$ra50" "$s50") |"
echo "| \`recall()\` top 10 on the coordinator, through Citus | $rd50 | $rd99 | $rdqps | $(ratio "$rd50" "$s50") |"
echo "| loopback round trip (SELECT 1 on a worker) | $r50 | $r99 | $rqps | |"
echo "| no pg_twotower: \`ORDER BY id LIMIT 10\` (btree) on the one shard | $ps50 | $ps99 | $psqps | |"
echo "| no pg_twotower: the same through the coordinator, $SHARDS shards | $p50 | $p99 | $pqps | |"
echo
echo "# Citus's own cost per query, no pg_twotower involved (btree query through the coordinator - the same on one shard): p50 $(awk -v a="$p50" -v b="$ps50" 'BEGIN {printf "%.3f", a - b}') ms"
echo "# pg_twotower's query the same way (through the coordinator - one shard's own query): p50 $(awk -v a="$d50" -v b="$s50" 'BEGIN {printf "%.3f", a - b}') ms"

# The coordinator's own work, query by query.
nq=$(wc -l < "$out/items-logged.lat"); n1=$(wc -l < "$out/worker1.ms"); n2=$(wc -l < "$out/worker2.ms")
if [ "$per_worker" = 1 ] && [ "$nq" = "$n1" ] && [ "$nq" = "$n2" ]; then
  paste "$out/items-logged.lat" "$out/worker1.ms" "$out/worker2.ms" \
    | awk '{m = ($2 > $3 ? $2 : $3); print $1 - m, m}' > "$out/coord.ms"
  read -r c50 c99 <<< "$(cut -d' ' -f1 "$out/coord.ms" | sort -n | awk '{a[NR] = $1} END {printf "%.3f %.3f", a[int(NR * 0.5)], a[int(NR * 0.99)]}')"
  read -r m50 <<< "$(cut -d' ' -f2 "$out/coord.ms" | sort -n | awk '{a[NR] = $1} END {printf "%.3f", a[int(NR * 0.5)]}')"
  echo "# the slowest shard's server-side time per query (log_min_duration_statement): p50 $m50 ms"
  echo "# the coordinator's own work (latency - slowest shard's server-side time), $nq queries of the logged run: p50 $c50 ms, p99 $c99 ms"
  echo "# target: <= 0.3 ms + one concurrent round trip ($r50 ms here) = $(awk -v r="$r50" 'BEGIN {printf "%.3f", 0.3 + r}') ms: $(awk -v c="$c50" -v r="$r50" 'BEGIN {print (c <= 0.3 + r) ? "met" : "missed"}') at p50"
else
  echo "# the coordinator's own work: not computed ($per_worker shards per worker, $nq queries, $n1 and $n2 task lines logged)"
fi
for i in 0 1 2; do scripts/cluster.sh stop "citus$i" $((C + i)); done
