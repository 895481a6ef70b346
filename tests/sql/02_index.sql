-- The twotower_hnsw access method: build, options, planner use, inserts, deletes, filters.
SET search_path = public, twotower;
SELECT setseed(0.5);
CREATE TABLE items (id bigint PRIMARY KEY, category int, embedding real[]);
INSERT INTO items
SELECT i, i % 10, ARRAY(SELECT (sin(i * j) + (random() - 0.5) * 0.1)::real FROM generate_series(1, 8) j)
  FROM generate_series(1, 5000) i;
INSERT INTO items VALUES (5001, 1, NULL);  -- NULL vectors are not indexed

-- Bad options are rejected with clear messages.
CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (m = 1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CREATE INDEX ON items USING twotower_hnsw (embedding) WITH (quantization = 'f64');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CREATE INDEX ON items USING twotower_hnsw (embedding real_l2_ops) WITH (quantization = 'i8');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

CREATE INDEX items_embedding_idx ON items USING twotower_hnsw (embedding real_l2_ops)
  WITH (m = 16, ef_construction = 64);
ANALYZE items;
SELECT dims, metric, quantization, m, ef_construction, graph_items, graph_dead, delta_items
  FROM index_info('items_embedding_idx');

-- The planner uses the index for ORDER BY ... LIMIT.
EXPLAIN (COSTS OFF)
SELECT id FROM items ORDER BY embedding <-> ARRAY[0,0,0,0,0,0,0,0]::real[] LIMIT 5;

-- The nearest neighbour of an item's own vector is the item.
SELECT id FROM items ORDER BY embedding <-> (SELECT embedding FROM items WHERE id = 4242) LIMIT 1;

-- Index and exact search agree on the top 10 (recall 10/10 on this small set).
CREATE TEMP TABLE q AS SELECT embedding AS v FROM items WHERE id = 77;
CREATE TEMP TABLE via_index AS SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10;
SET enable_indexscan = off;
CREATE TEMP TABLE exact AS SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10;
RESET enable_indexscan;
SELECT count(*) AS common FROM via_index JOIN exact USING (id);

-- New rows are searchable at once.
INSERT INTO items VALUES (9001, 3, ARRAY[9,9,9,9,9,9,9,9]);
SELECT id FROM items ORDER BY embedding <-> ARRAY[9,9,9,9,9,9,9,9]::real[] LIMIT 1;
SELECT delta_items FROM index_info('items_embedding_idx');

-- Deleted rows never come back.
DELETE FROM items WHERE id IN (9001, 4242);
SELECT id <> 9001 AS deleted_row_gone
  FROM items ORDER BY embedding <-> ARRAY[9,9,9,9,9,9,9,9]::real[] LIMIT 1;
-- (reading every row: relaxed order returns each live row; strict order may skip a row the
-- first searches missed rather than return it out of order)
SET twotower.iterative_scan = relaxed_order;
SELECT count(*) FROM (SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10000) s
 WHERE id IN (9001, 4242);
-- That is the executor's visibility check: the index itself still returns the two deleted rows'
-- TIDs (counted in the index's tuples_returned: every TID amgettuple gives back).
SET enable_seqscan = off;
SET twotower.max_scan_tuples = 2147483647;
BEGIN;
SELECT pg_stat_get_xact_tuples_returned('items_embedding_idx'::regclass) AS tids_before \gset
SELECT count(*) AS rows_scanned FROM (SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10000) s \gset
SELECT pg_stat_get_xact_tuples_returned('items_embedding_idx'::regclass) - :tids_before - :rows_scanned
       AS dead_tids_returned_before_vacuum;
COMMIT;
RESET enable_seqscan;
RESET twotower.max_scan_tuples;
RESET twotower.iterative_scan;

-- After VACUUM the deleted rows are gone from the index itself (tombstoned in the graph,
-- removed from the delta), not merely hidden by the executor's visibility check: the scan
-- (an index scan, shown by the plan) returns every live row once and nothing else, and a
-- row that reuses a freed slot is found with its own vector.
VACUUM items;
SELECT graph_dead, delta_items FROM index_info('items_embedding_idx');
SET enable_seqscan = off;
SET twotower.iterative_scan = relaxed_order;
SET twotower.max_scan_tuples = 2147483647;
EXPLAIN (COSTS OFF)
SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10000;
SELECT count(*) = (SELECT count(embedding) FROM items) AS every_live_row,
       count(DISTINCT id) = count(*) AS each_once,
       count(*) FILTER (WHERE id IN (9001, 4242)) AS deleted_returned
  FROM (SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10000) s;
-- The index's own output: after VACUUM it returns no TID of a deleted row at all.
BEGIN;
SELECT pg_stat_get_xact_tuples_returned('items_embedding_idx'::regclass) AS tids_before \gset
SELECT count(*) AS rows_scanned FROM (SELECT id FROM items ORDER BY embedding <-> (SELECT v FROM q) LIMIT 10000) s \gset
SELECT pg_stat_get_xact_tuples_returned('items_embedding_idx'::regclass) - :tids_before - :rows_scanned
       AS dead_tids_returned_after_vacuum;
COMMIT;
INSERT INTO items VALUES (9003, 3, ARRAY[-9,-9,-9,-9,-9,-9,-9,-9]);
SELECT id FROM items ORDER BY embedding <-> ARRAY[-9,-9,-9,-9,-9,-9,-9,-9]::real[] LIMIT 1;
DELETE FROM items WHERE id = 9003;
RESET enable_seqscan;
RESET twotower.iterative_scan;
RESET twotower.max_scan_tuples;

-- Pages the delta emptied are not read again: after every row inserted since the build is
-- deleted and vacuumed, a scan reads a handful of index blocks, not the emptied delta pages.
INSERT INTO items SELECT 10000 + i, 1, ARRAY(SELECT sin(i + j)::real FROM generate_series(1, 8) j)
  FROM generate_series(1, 5000) i;
DELETE FROM items WHERE id > 10000;
VACUUM items;
SELECT delta_items FROM index_info('items_embedding_idx');
BEGIN;
SET LOCAL enable_seqscan = off;
CREATE TEMP TABLE blocks_before AS
SELECT pg_stat_get_xact_blocks_fetched('items_embedding_idx'::regclass) AS n;
SELECT count(*) FROM (SELECT id FROM items ORDER BY embedding <-> ARRAY[1,1,1,1,1,1,1,1]::real[] LIMIT 10) s;
SELECT pg_stat_get_xact_blocks_fetched('items_embedding_idx'::regclass) - (SELECT n FROM blocks_before) < 5
       AS few_index_blocks_read;
COMMIT;
DROP TABLE blocks_before;

-- A filter keeping 10% of the rows still yields LIMIT rows (iterative scan).
SET twotower.ef_search = 10;
SELECT count(*) FROM (
  SELECT id FROM items WHERE category = 7 ORDER BY embedding <-> (SELECT v FROM q) LIMIT 100) s;
-- A filter keeping 3 rows yields those 3 (relaxed order: every row is reached).
SET twotower.iterative_scan = relaxed_order;
SELECT id FROM (
  SELECT id FROM items WHERE id IN (10, 20, 30) ORDER BY embedding <-> (SELECT v FROM q) LIMIT 100) s
 ORDER BY id;
RESET twotower.ef_search;
RESET twotower.iterative_scan;

-- A query vector of the wrong length is an error, not a crash.
SELECT id FROM items ORDER BY embedding <-> ARRAY[1,2,3]::real[] LIMIT 1;
\echo SQLSTATE :LAST_ERROR_SQLSTATE
INSERT INTO items VALUES (9002, 1, ARRAY[1,2,3]);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Empty tables and unlogged tables work too.
CREATE UNLOGGED TABLE u (id int, v real[]);
CREATE INDEX ON u USING twotower_hnsw (v);
INSERT INTO u VALUES (1, ARRAY[1,0]), (2, ARRAY[0,1]), (3, ARRAY[0.9,0.1]);
SELECT id FROM u ORDER BY v <=> ARRAY[1,0]::real[] LIMIT 2;

DROP TABLE items, u;
