-- Partitioned item tables: a twotower_hnsw index on the partitioned table (one per leaf),
-- ORDER BY ... LIMIT through it, and recall() and pipelines over the partitioned index
-- (each leaf searched, the leaves' top k merged), with the partitioned table's privileges.
SET search_path = public, twotower;
\set VERBOSITY terse
SET client_min_messages = warning;
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END $$;
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;

-- A user tower whose vector is the request's "q" (no layers, L2).
SELECT twotower.import_model('pt_user', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 3}], "layers": [], "output": {"dim": 3, "metric": "l2"}}',
  pg_temp.st('{}', ''));
SELECT twotower.grant_model_usage('pt_user', 'PUBLIC');  -- the reader roles below run it

-- 400 items over four leaves, one of them under a sub-partitioned table.
CREATE TABLE pt_items (id bigint PRIMARY KEY, embedding real[]) PARTITION BY RANGE (id);
CREATE TABLE pt_a PARTITION OF pt_items FOR VALUES FROM (1) TO (101);
CREATE TABLE pt_b PARTITION OF pt_items FOR VALUES FROM (101) TO (201);
CREATE TABLE pt_c PARTITION OF pt_items FOR VALUES FROM (201) TO (401) PARTITION BY RANGE (id);
CREATE TABLE pt_c1 PARTITION OF pt_c FOR VALUES FROM (201) TO (301);
CREATE TABLE pt_c2 PARTITION OF pt_c FOR VALUES FROM (301) TO (401);
INSERT INTO pt_items SELECT i, ARRAY[sin(i * 0.37), cos(i * 0.53), sin(i * 0.91) * cos(i * 0.11)]::real[]
  FROM generate_series(1, 400) i;
CREATE INDEX pt_idx ON pt_items USING twotower_hnsw (embedding real_l2_ops);
-- One index per leaf, attached to the partitioned one.
SELECT c.relname, c.relkind, p.isleaf FROM pg_partition_tree('pt_idx') p JOIN pg_class c ON c.oid = p.relid ORDER BY 1;
SET twotower.ef_search = 400;

-- ORDER BY ... LIMIT through the partitioned table: an ordered scan of each leaf, merged (the
-- tables are small enough for a sequential scan to look cheaper: it is turned off).
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM pt_items ORDER BY embedding <-> '{0.2,0.4,-0.1}'::real[] LIMIT 10;
CREATE TEMP TABLE pt_exact AS
  SELECT id, (SELECT sqrt(sum((a - b) ^ 2)) FROM unnest(embedding, '{0.2,0.4,-0.1}'::real[]) u(a, b)) AS d
    FROM pt_items;
SELECT array_agg(id) = (SELECT array_agg(id ORDER BY d, id) FROM (SELECT * FROM pt_exact ORDER BY d, id LIMIT 10) e) AS index_order_is_exact
  FROM (SELECT id FROM pt_items ORDER BY embedding <-> '{0.2,0.4,-0.1}'::real[] LIMIT 10) s;
RESET enable_seqscan;

-- recall() over the partitioned index: the exact top 10 over all leaves, in order, with scores.
SELECT r.rank, r.item_id, r.item_id = e.id AS same_item, abs(-r.score - e.d) < 1e-5 AS same_distance
  FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10) r
  JOIN (SELECT id, d, row_number() OVER (ORDER BY d, id) AS rank FROM pt_exact) e ON e.rank = r.rank
 ORDER BY r.rank;
-- The items come from several leaves.
SELECT count(DISTINCT tableoid::regclass) > 1 AS several_leaves
  FROM pt_items WHERE id IN (SELECT item_id FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10));
-- Exclusions apply in every leaf; k larger than one leaf; a leaf's own index still works alone.
SELECT array_agg(item_id ORDER BY rank) = (SELECT array_agg(id ORDER BY d, id) FROM
         (SELECT * FROM pt_exact WHERE id NOT IN (SELECT id FROM pt_exact ORDER BY d, id LIMIT 5) ORDER BY d, id LIMIT 150) e) AS excluded_and_k_150
  FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 150,
                       (SELECT array_agg(id) FROM (SELECT id FROM pt_exact ORDER BY d, id LIMIT 5) x));
SELECT count(*) = 100 AND bool_and(item_id BETWEEN 101 AND 200) AS leaf_alone
  FROM twotower.recall('pt_user', 'pt_b_embedding_idx', '{"q": [0.2, 0.4, -0.1]}', 100);

-- Rows inserted after the build (into any leaf) are found; a detached leaf is gone.
DELETE FROM pt_items WHERE id IN (150, 399);
INSERT INTO pt_items VALUES (150, '{0.2,0.4,-0.1}'), (399, '{0.2,0.4,-0.1001}');
SELECT item_id, rank FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 2);
ALTER TABLE pt_items DETACH PARTITION pt_b;
SELECT item_id, rank FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 2);
ALTER TABLE pt_items ATTACH PARTITION pt_b FOR VALUES FROM (101) TO (201);
SELECT item_id, rank FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 2);

-- Privileges are the partitioned table's, as for a query of it: SELECT on pt_items (or on its
-- id and embedding columns) is enough; none on it is 42501 even with grants on every leaf.
CREATE ROLE pt_reader;
CREATE ROLE pt_columns;
CREATE ROLE pt_leaves;
GRANT SELECT ON pt_items TO pt_reader;
GRANT SELECT (id, embedding) ON pt_items TO pt_columns;
GRANT SELECT ON pt_a, pt_b, pt_c, pt_c1, pt_c2 TO pt_leaves;
SET ROLE pt_reader;
SELECT count(*) FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10);
RESET ROLE;
SET ROLE pt_columns;
SELECT count(*) FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10);
RESET ROLE;
SET ROLE pt_leaves;
SELECT pg_temp.err($$SELECT * FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10)$$);
RESET ROLE;
-- Row-level security on the partitioned table: refused, as for a table.
ALTER TABLE pt_items ENABLE ROW LEVEL SECURITY;
SET ROLE pt_reader;
SELECT pg_temp.err($$SELECT * FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.2, 0.4, -0.1]}', 10)$$);
RESET ROLE;
ALTER TABLE pt_items DISABLE ROW LEVEL SECURITY;

-- A pipeline's two-tower channel over the partitioned index: the same items as recall().
SELECT twotower.save_pipeline('pt', '{"user_model": "pt_user", "vectors": {"table": "pt_items"},
  "channels": [{"type": "twotower", "index": "pt_idx", "k": 5}], "k": 5}');
SELECT array_agg(item_id ORDER BY rank) = (SELECT array_agg(item_id ORDER BY rank)
         FROM twotower.recall('pt_user', 'pt_idx', '{"q": [0.3, -0.2, 0.5]}', 5)) AS pipeline_as_recall
  FROM twotower.recommend('pt', '{"q": [0.3, -0.2, 0.5]}');

-- A partitioned table without partitions: nothing to return.
CREATE TABLE pt_empty (id bigint PRIMARY KEY, embedding real[]) PARTITION BY RANGE (id);
CREATE INDEX pt_empty_idx ON pt_empty USING twotower_hnsw (embedding real_l2_ops);
SELECT count(*) FROM twotower.recall('pt_user', 'pt_empty_idx', '{"q": [0.2, 0.4, -0.1]}', 10);
-- A partitioned table's btree index is not ours.
SELECT pg_temp.err($$SELECT * FROM twotower.recall('pt_user', 'pt_items_pkey', '{"q": [0.2, 0.4, -0.1]}', 10)$$);

-- REINDEX CONCURRENTLY gives the index a new oid: the old one, renamed <name>_ccold, is marked
-- invalid, then dropped. A call that resolved the name just before the swap reads the index
-- that replaced it; an invalid index of another origin (a failed CREATE INDEX CONCURRENTLY)
-- is still an error. (The catalogue update stands in for the swap's timing.)
CREATE TABLE cc_items (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO cc_items SELECT g, ARRAY[sin(g), cos(g), sin(2 * g)]::real[] FROM generate_series(1, 50) g;
CREATE INDEX cc_idx ON cc_items USING twotower_hnsw (embedding real_l2_ops);
CREATE INDEX cc_idx_ccold ON cc_items USING twotower_hnsw (embedding real_l2_ops);
CREATE INDEX cc_failed ON cc_items USING twotower_hnsw (embedding real_l2_ops);
UPDATE pg_index SET indisvalid = false WHERE indexrelid IN ('cc_idx_ccold'::regclass, 'cc_failed'::regclass);
SELECT array_agg(item_id ORDER BY rank) = (SELECT array_agg(id) FROM (SELECT id FROM cc_items
         ORDER BY embedding <-> '{0.2,0.4,-0.1}' LIMIT 5) s) AS swapped_index_answers
  FROM twotower.recall('pt_user', 'cc_idx_ccold', '{"q": [0.2, 0.4, -0.1]}', 5);
SELECT pg_temp.err($$SELECT * FROM twotower.recall('pt_user', 'cc_failed', '{"q": [0.2, 0.4, -0.1]}', 5)$$);
DROP TABLE cc_items;

SELECT twotower.drop_pipeline('pt');
DROP TABLE pt_items, pt_empty;
DROP ROLE pt_reader, pt_columns, pt_leaves;
SELECT twotower.drop_model('pt_user');
