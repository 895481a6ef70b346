-- Settings and housekeeping no other test sets or calls: twotower.build_threads above 1,
-- twotower.cache_cleanup() and twotower.item_cache_size (0 = off; a budget bounds the entries).
-- (twotower.model_cache_size: 12_model_cache.sql.)
SET search_path = public, twotower;
\set VERBOSITY terse
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END $$;
-- A safetensors file from its JSON header and data (header shorter than 64 KiB).
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;

-- build_threads: the same rows indexed on one worker thread and on four; each index holds every
-- row and agrees with exact search (the reference: no index, a sequential scan and a sort).
CREATE TABLE st_items (id bigint PRIMARY KEY, v real[]);
INSERT INTO st_items SELECT i, ARRAY[sin(i * 0.37), cos(i * 0.53), sin(i * 0.91) * cos(i * 0.11), cos(i * 0.07),
                                     sin(i * 1.31), cos(i * 0.29), sin(i * 0.61), cos(i * 0.83)]::real[]
  FROM generate_series(1, 3000) i;
SET enable_indexscan = off;
SET enable_bitmapscan = off;
CREATE TEMP TABLE st_exact AS
SELECT q.id AS qid, ARRAY(SELECT t.id FROM st_items t ORDER BY t.v <-> q.v, t.id LIMIT 10) AS ids
  FROM st_items q WHERE q.id % 100 = 0;
RESET enable_indexscan;
RESET enable_bitmapscan;
-- Every row once through a full ordered scan, and the top 10 of 30 queries against the exact ones.
CREATE FUNCTION pg_temp.index_checks(OUT rows_in_index bigint, OUT found_of_300 bigint) LANGUAGE plpgsql AS $$
BEGIN
    SET LOCAL enable_seqscan = off;
    SET LOCAL twotower.iterative_scan = relaxed_order;
    SET LOCAL twotower.max_scan_tuples = 2147483647;
    SET LOCAL twotower.ef_search = 100;
    SELECT count(*) INTO rows_in_index
      FROM (SELECT id FROM st_items ORDER BY v <-> array_fill(0.5::real, ARRAY[8]) LIMIT 100000000) s;
    SET LOCAL twotower.iterative_scan = off;
    SELECT count(*) INTO found_of_300
      FROM st_exact e, unnest(e.ids) x(id)
     WHERE x.id = ANY (ARRAY(SELECT t.id FROM st_items t ORDER BY t.v <-> (SELECT v FROM st_items WHERE id = e.qid) LIMIT 10));
END $$;
SET twotower.build_threads = 1;
CREATE INDEX st_idx ON st_items USING twotower_hnsw (v real_l2_ops);
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM st_items ORDER BY v <-> array_fill(0.5::real, ARRAY[8]) LIMIT 10;
RESET enable_seqscan;
SELECT rows_in_index, found_of_300 >= 285 AS agrees_with_exact FROM pg_temp.index_checks();
DROP INDEX st_idx;
SET twotower.build_threads = 4;
CREATE INDEX st_idx ON st_items USING twotower_hnsw (v real_l2_ops);
RESET twotower.build_threads;
SELECT rows_in_index, found_of_300 >= 285 AS agrees_with_exact FROM pg_temp.index_checks();
SELECT graph_items, graph_orphans FROM twotower.index_info('st_idx');
SELECT pg_temp.err('SET twotower.build_threads = 65');
SELECT pg_temp.err('SET twotower.build_threads = -1');

-- cache_cleanup(): removes this database's cache files that belong to no index (here a file
-- named like one, for a relation that does not exist), keeps the live index's file.
SELECT twotower.cache_cleanup() AS removed_before \gset
SELECT cache_file AS live_file FROM twotower.index_info('st_idx') \gset
SELECT (pg_stat_file(:'live_file', true)).size > 0 AS live_file_exists;
SELECT format('%s/pg_twotower/%s_%s_4000000000_4000000001_%s_%s.img', current_setting('data_directory'),
              (SELECT dattablespace FROM pg_database WHERE datname = current_database()),
              (SELECT oid FROM pg_database WHERE datname = current_database()),
              repeat('0', 16), repeat('0', 16)) AS orphan_file \gset
COPY (SELECT 'not an image') TO :'orphan_file';
SELECT (pg_stat_file(:'orphan_file', true)).size > 0 AS orphan_exists;
SELECT twotower.cache_cleanup() AS removed;
SELECT pg_stat_file(:'orphan_file', true) IS NULL AS orphan_gone,
       (pg_stat_file(:'live_file', true)).size > 0 AS live_file_kept;
SELECT twotower.cache_cleanup() AS removed_again;
-- The index still answers from its file.
SET enable_seqscan = off;
SELECT rows_in_index, found_of_300 >= 285 AS agrees_with_exact FROM pg_temp.index_checks();
RESET enable_seqscan;
-- Not for PUBLIC.
CREATE ROLE st_nobody;
SET ROLE st_nobody;
SELECT pg_temp.err('SELECT twotower.cache_cleanup()');
RESET ROLE;
DROP ROLE st_nobody;

-- item_cache_size: 20 000 items with the cache trigger, pre-ranked all at once; an entry is a
-- 2-dimensional vector (104 bytes as the cache counts it), 2 MB in all.
SELECT twotower.import_model('st_u', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 2}], "layers": [], "output": {"dim": 2, "metric": "ip"}}',
  pg_temp.st('{}', ''));
CREATE TABLE st_pitems (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO st_pitems SELECT i, ARRAY[i * 0.001, sin(i)]::real[] FROM generate_series(1, 20000) i;
SELECT twotower.save_pipeline('st_p', '{"user_model": "st_u", "vectors": {"table": "st_pitems"},
  "stages": [{"type": "twotower", "keep": 5}], "k": 5}');
SELECT twotower.enable_item_cache('st_pitems');
CREATE TEMP TABLE st_all AS SELECT array_agg(id ORDER BY id) AS ids FROM st_pitems;
CREATE FUNCTION pg_temp.top5() RETURNS bigint[] LANGUAGE sql AS $$
  SELECT array_agg(item_id ORDER BY rank) FROM st_all, twotower.prerank('st_p', '{"q": [1, 0.5]}', st_all.ids) $$;
-- The exact top 5 (inner product with (1, 0.5)), for every setting below.
SELECT array_agg(id ORDER BY s DESC, id) AS exact_top5
  FROM (SELECT id, embedding[1] + 0.5 * embedding[2] AS s FROM st_pitems ORDER BY s DESC, id LIMIT 5) x;
-- The default budget (64 MB): every vector is kept.
SELECT pg_temp.top5() AS top5;
SELECT entries, bytes FROM twotower.item_cache_info();
SELECT pg_temp.top5() AS from_the_cache;
-- 1 MB: the entries stay within it (and the answer is the same).
SET twotower.item_cache_size = '1MB';
SELECT pg_temp.top5() AS top5;
SELECT entries BETWEEN 1 AND 19999 AS some_left_out, bytes <= 1048576 AS within_budget FROM twotower.item_cache_info();
SELECT pg_temp.top5() AS top5_again;
SELECT entries BETWEEN 1 AND 19999 AS some_left_out, bytes <= 1048576 AS within_budget FROM twotower.item_cache_info();
-- 0: off, nothing is kept.
SET twotower.item_cache_size = 0;
SELECT pg_temp.top5() AS top5;
SELECT entries, bytes FROM twotower.item_cache_info();
RESET twotower.item_cache_size;
SELECT pg_temp.err('SET twotower.item_cache_size = -1');

SELECT twotower.disable_item_cache('st_pitems');
SELECT twotower.drop_pipeline('st_p');
SELECT twotower.drop_model('st_u');
DROP TABLE st_items, st_pitems;
