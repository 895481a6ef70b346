#!/usr/bin/env bash
# The main job of this milestone: 100k generated item vectors, a twotower_hnsw index, a top-10
# query with EXPLAIN showing the index, index health, and recall against exact search.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TT_DEMO_PORT:-55432}
scripts/cluster.sh start demo "$PORT"
psql_demo() { scripts/cluster.sh psql demo "$PORT" -d postgres "$@"; }
psql_demo -q <<'SQL'
DROP TABLE IF EXISTS items;
DROP EXTENSION IF EXISTS pg_twotower CASCADE;
CREATE EXTENSION pg_twotower;
SQL
echo "== loading 100000 item vectors (64 dims, 50 clusters, deterministic)"
psql_demo -q <<'SQL'
SELECT setseed(0.2);
CREATE TEMP TABLE centres AS SELECT c, j, (random() * 2 - 1)::real AS x
  FROM generate_series(1, 50) c, generate_series(1, 64) j;
CREATE TABLE items (id bigint PRIMARY KEY, category int NOT NULL, embedding real[]);
INSERT INTO items
SELECT i, i % 20, twotower.l2_normalize(array_agg((c.x + (random() - 0.5) * 0.8)::real ORDER BY c.j))
  FROM generate_series(1, 100000) i JOIN centres c ON c.c = 1 + i % 50
 GROUP BY i;
ANALYZE items;
SQL
psql_demo <<'SQL'
\timing on
SET maintenance_work_mem = '1GB';
CREATE INDEX items_embedding_idx ON items USING twotower_hnsw (embedding twotower.real_cosine_ops)
  WITH (m = 16, ef_construction = 64);
\timing off
SET search_path = public, twotower;
\echo == the planner uses the index
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
SELECT id, embedding <=> (SELECT embedding FROM items WHERE id = 42) AS distance
  FROM items ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = 42) LIMIT 10;
\echo == top-10 items nearest to item 42
SELECT id, category, round((embedding <=> (SELECT embedding FROM items WHERE id = 42))::numeric, 4) AS distance
  FROM items ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = 42) LIMIT 10;
\echo == with a filter (category = 3 keeps 5% of the rows): still 10 rows
SELECT count(*) FROM (SELECT id FROM items WHERE category = 3
  ORDER BY embedding <=> (SELECT embedding FROM items WHERE id = 42) LIMIT 10) s;
\echo == index health
SELECT * FROM index_info('items_embedding_idx') \gx
\echo == recall@10 of the index against exact search, 50 queries
CREATE TEMP TABLE qs AS SELECT id AS qid, embedding AS q FROM items WHERE id % 2000 = 1;
CREATE TEMP TABLE approx AS
  SELECT qid, (SELECT array_agg(id) FROM (SELECT id FROM items ORDER BY embedding <=> q LIMIT 10) s) AS ids FROM qs;
SET enable_indexscan = off;
CREATE TEMP TABLE exact AS
  SELECT qid, (SELECT array_agg(id) FROM (SELECT id FROM items ORDER BY embedding <=> q LIMIT 10) s) AS ids FROM qs;
RESET enable_indexscan;
SELECT round(avg((SELECT count(*) FROM unnest(a.ids) x WHERE x = ANY (e.ids)) / 10.0), 4) AS recall_at_10
  FROM approx a JOIN exact e USING (qid);
SQL
echo "== demo cluster left running: scripts/cluster.sh psql demo $PORT -d postgres   (stop: scripts/cluster.sh stop demo $PORT)"
