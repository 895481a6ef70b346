-- Rows inserted after the build: folded into the delta graph, so scans stay fast, exact in
-- order, and never return removed rows; VACUUM rebuilds the delta graph without dead rows.
SET search_path = public, twotower;
SELECT setseed(0.25);
CREATE TABLE fresh (id bigint PRIMARY KEY, embedding real[]);
CREATE FUNCTION vec(i bigint) RETURNS real[] LANGUAGE sql IMMUTABLE
  AS $$ SELECT ARRAY(SELECT sin(i * 0.37 + j * 1.3)::real FROM generate_series(1, 64) j) $$;
INSERT INTO fresh SELECT i, vec(i) FROM generate_series(1, 1000) i;

-- The threshold is an index option, checked like the others.
CREATE INDEX ON fresh USING twotower_hnsw (embedding) WITH (fold_threshold = 5);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
CREATE INDEX fresh_idx ON fresh USING twotower_hnsw (embedding) WITH (fold_threshold = 100);
ALTER INDEX fresh_idx SET (fold_threshold = 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- 4000 rows after a build of 1000: 130 delta pages if nothing were folded.
INSERT INTO fresh SELECT i, vec(i) FROM generate_series(1001, 5000) i;
SELECT graph_items, delta_items FROM index_info('fresh_idx');

-- A top-10 scan reads a handful of index blocks, not the delta pages of 4000 rows.
CREATE FUNCTION blocks_read(q real[]) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE before bigint; n bigint;
BEGIN
  before := pg_stat_get_xact_blocks_fetched('fresh_idx'::regclass);
  PERFORM id FROM (SELECT id FROM fresh ORDER BY embedding <=> q LIMIT 10) s;
  RETURN pg_stat_get_xact_blocks_fetched('fresh_idx'::regclass) - before;
END $$;
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM fresh ORDER BY embedding <=> (SELECT vec(4321)) LIMIT 10;
SELECT blocks_read(vec(4321)) < 20 AS few_index_blocks_read;

-- The index's top 10 are the exact top 10, in distance order, for rows of every age.
CREATE FUNCTION agrees(q real[], k int) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE via_index bigint[]; dists float8[]; exact bigint[];
BEGIN
  SET LOCAL enable_seqscan = off;
  SELECT array_agg(id ORDER BY n), array_agg(d ORDER BY n) INTO via_index, dists FROM (
    SELECT id, embedding <=> q AS d, row_number() OVER () AS n
      FROM (SELECT id, embedding FROM fresh ORDER BY embedding <=> q LIMIT k) s) t;
  SET LOCAL enable_indexscan = off; SET LOCAL enable_seqscan = on;
  SELECT array_agg(id ORDER BY d, id) INTO exact FROM (
    SELECT id, embedding <=> q AS d FROM fresh ORDER BY embedding <=> q, id LIMIT k) e;
  RETURN (SELECT count(*) FROM unnest(via_index) x WHERE x = ANY(exact)) >= k - 1
     AND (SELECT bool_and(dists[i] <= dists[i + 1]) FROM generate_series(1, k - 1) i);
END $$;
SELECT bool_and(agrees(vec(i), 10)) AS exact_and_ordered
  FROM (VALUES (17), (999), (1003), (2500), (4999), (5000)) v(i);

-- Deleted rows never come back once VACUUM removed them from the delta graph, and rows that
-- reuse their heap slots are found with their own vectors.
DELETE FROM fresh WHERE id % 2 = 0 AND id > 1000;
VACUUM fresh;
SELECT graph_items, delta_items FROM index_info('fresh_idx');
SET twotower.iterative_scan = relaxed_order;
SET twotower.max_scan_tuples = 2147483647;
SELECT count(*) = (SELECT count(*) FROM fresh) AS every_live_row,
       count(DISTINCT id) = count(*) AS each_once,
       count(*) FILTER (WHERE id % 2 = 0 AND id > 1000) AS deleted_returned
  FROM (SELECT id FROM fresh ORDER BY embedding <=> vec(1) LIMIT 100000) s;
RESET twotower.iterative_scan;
RESET twotower.max_scan_tuples;
INSERT INTO fresh SELECT 100000 + i, vec(-i) FROM generate_series(1, 2000) i;
SELECT bool_and(agrees(vec(-i), 10)) AS reused_slots_found
  FROM (VALUES (1), (700), (1999)) v(i);
SELECT bool_and(id = 100000 + i) AS own_vector_nearest FROM (
  SELECT i, (SELECT id FROM fresh ORDER BY embedding <=> vec(-i) LIMIT 1) AS id
    FROM (VALUES (3), (1500)) v(i)) s;

-- VACUUM folds what inserts left below the threshold.
ALTER INDEX fresh_idx SET (fold_threshold = 100000);
INSERT INTO fresh SELECT 200000 + i, vec(200000 + i) FROM generate_series(1, 3000) i;
SELECT blocks_read(vec(4321)) > 50 AS unfolded_rows_read_one_by_one;
ALTER INDEX fresh_idx SET (fold_threshold = 100);
VACUUM fresh;
SELECT blocks_read(vec(4321)) < 20 AS folded_by_vacuum;
SELECT agrees(vec(201234), 10) AS exact_after_vacuum_fold;

-- The index does not grow without bound: the delta graph's old pages and the delta pages it
-- absorbed are reused. Rounds of insert, delete, VACUUM.
INSERT INTO fresh SELECT 300000 + i, vec(300000 + i) FROM generate_series(1, 3000) i;
DELETE FROM fresh WHERE id > 300000;
VACUUM fresh;
SELECT size_bytes AS size0 FROM index_info('fresh_idx') \gset
SELECT unnest(ARRAY['INSERT INTO fresh SELECT 300000 + i, vec(300000 + i) FROM generate_series(1, 3000) i',
                     'DELETE FROM fresh WHERE id > 300000', 'VACUUM fresh'])
  FROM generate_series(1, 5) \gexec
INSERT INTO fresh SELECT 300000 + i, vec(300000 + i) FROM generate_series(1, 3000) i;
SELECT size_bytes <= :size0 * 1.2 AS size_bounded FROM index_info('fresh_idx');
SELECT agrees(vec(301234), 10) AS exact_after_rounds;

-- Rows far from all others, folded into the delta graph, are found by their own vectors at
-- the default ef_search (each fold checks the rows it adds at that width: FOLD_CHECK_EF).
ALTER INDEX fresh_idx SET (fold_threshold = 16);
INSERT INTO fresh SELECT 400000 + i, ARRAY(SELECT (1 + 0.05 * sin(i * j))::real FROM generate_series(1, 64) j)
  FROM generate_series(1, 40) i;
VACUUM fresh;
SELECT count(*) FILTER (WHERE (SELECT f.id FROM fresh f ORDER BY f.embedding <=> o.embedding LIMIT 1) = o.id)
       AS outliers_found_first
  FROM fresh o WHERE o.id > 400000;

-- REINDEX puts every row in the main graph.
REINDEX INDEX fresh_idx;
SELECT graph_items = (SELECT count(*) FROM fresh) AS all_in_graph, delta_items
  FROM index_info('fresh_idx');
RESET enable_seqscan;
DROP TABLE fresh;
