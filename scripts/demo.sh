#!/usr/bin/env bash
# The main job: MovieLens-100k trained, served and evaluated in SQL (scripts/movielens.sh).
# The second target: 100k generated item vectors, a twotower_hnsw index, a top-10 query with
# EXPLAIN showing the index, index health, and recall against exact search; then towers in SQL:
# a user and an item tower imported (the golden fixtures of tests/golden), the nightly item
# refresh, and one-call recall joined with the item table.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TT_DEMO_PORT:-55432}
scripts/cluster.sh start demo "$PORT"
bash scripts/movielens.sh
echo
echo "== the second target: 100k generated item vectors and imported towers (database postgres)"
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
CREATE INDEX items_embedding_idx ON items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (m = 16, ef_construction = 64);
\timing off
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
SELECT * FROM twotower.index_info('items_embedding_idx') \gx
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
# Towers: the server reads the model files, so give it a copy it can read.
G=/tmp/pg_twotower-demo/golden
rm -rf "$G"; cp -r tests/golden "$G"; chmod -R a+rX "$G"
echo "== towers: import a user tower and an item tower (tests/golden, see docs/model-format.md)"
psql_demo -v g="$G" <<'SQL'
SELECT twotower.import_model_file('demo_user', :'g' || '/spec.json', :'g' || '/weights.safetensors') AS user_tower_version;
SELECT twotower.import_model_file('demo_item', :'g' || '/item/spec.json', :'g' || '/item/weights.safetensors') AS item_tower_version;
SELECT name, version, active, kind, dim, metric, parameters FROM twotower.models ORDER BY name;
\echo == the vector of one user, from features in jsonb
SELECT twotower.embed_user('demo_user', '{"user_id": 42, "country": "fr", "history": [1001, 1002], "age": 31}');
\echo == the nightly item refresh: the item tower over 50000 catalogue rows, into a vector table
DROP TABLE IF EXISTS catalog, catalog_vectors;
CREATE TABLE catalog (item_id bigint PRIMARY KEY, title text, category text, tags text[],
                      price numeric, img_vec real[]);
INSERT INTO catalog
SELECT i, 'item ' || i, (ARRAY['shoes', 'shirts', 'hats', 'bags'])[1 + i % 4],
       ARRAY[(ARRAY['red', 'blue', 'sale', 'new', 'eco', 'kids'])[1 + i % 6]], 5 + i % 200,
       ARRAY[sin(i), cos(i), sin(3 * i)]::real[]
  FROM generate_series(1, 50000) i;
CREATE TABLE catalog_vectors (id bigint PRIMARY KEY, embedding real[]);
\timing on
SELECT twotower.refresh_item_vectors('demo_item', 'catalog', 'catalog_vectors', id_column => 'item_id') AS items_written;
CREATE INDEX catalog_vectors_idx ON catalog_vectors USING twotower_hnsw (embedding);
\echo == one-call recall: user tower + top-10 from the index, seen items excluded, joined with the catalogue
SELECT r.rank, r.item_id, c.title, c.category, round(r.score::numeric, 4) AS score
  FROM twotower.recall('demo_user', 'catalog_vectors_idx',
                       '{"user_id": 42, "country": "fr", "history": [1001, 1002], "age": 31}', 10,
                       exclude => ARRAY[1001, 1002]::bigint[]) r
  JOIN catalog c ON c.item_id = r.item_id
 ORDER BY r.rank;
\timing off
SQL
echo "== demo cluster left running: scripts/cluster.sh psql demo $PORT -d postgres   (stop: scripts/cluster.sh stop demo $PORT)"
