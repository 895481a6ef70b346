-- What a hostile tester found (issue 32), each as it must behave now: shared caches keyed by
-- everything that determines a row and invalidated from every partition, models that run only
-- for the roles they are granted to, options that a REINDEX or restore would refuse refused at
-- ALTER time, f16 queries beyond f16, duplicate refresh sources, dropped channel tables, bounded
-- merge input. Runs without SET search_path: the operators and operator classes are in public.
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
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;

-- The operators and operator classes work in a session without twotower on the search_path.
SHOW search_path;
SELECT '{1,0}'::real[] <=> '{0,1}'::real[] AS cosine, '{1,2}'::real[] <#> '{3,4}'::real[] AS neg_ip,
       '{0,0}'::real[] <-> '{3,4}'::real[] AS l2;
SELECT opcname, opcnamespace::regnamespace AS schema, opcdefault FROM pg_opclass
 WHERE opcmethod = (SELECT oid FROM pg_am WHERE amname = 'twotower_hnsw') ORDER BY opcname;

-- A user tower whose vector is the request's "q" (inner product), and a pre-ranker
-- score = two-tower score + 0.5 · price.
SELECT twotower.import_model('at_user', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 2}],
  "layers": [], "output": {"dim": 2, "metric": "ip"}}', pg_temp.st('{}', ''));
SELECT twotower.import_model('at_pre', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
  "features": [{"name": "tt", "type": "cross", "of": "score"},
               {"name": "price", "source": "item", "type": "numeric", "transform": "none"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1}}',
  pg_temp.st('{"w":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}', '\x0000803f0000003f'));

-- 1. The item cache on a partitioned table: a write to a leaf reaches the cache.
CREATE TABLE at_pf (id bigint, embedding real[], price real) PARTITION BY RANGE (id);
CREATE TABLE at_pf_1 PARTITION OF at_pf FOR VALUES FROM (1) TO (6);
CREATE TABLE at_pf_2 PARTITION OF at_pf FOR VALUES FROM (6) TO (11);
INSERT INTO at_pf SELECT i, ARRAY[cos(i * 0.7), sin(i * 0.7)]::real[], (i % 3)::real FROM generate_series(1, 10) i;
SELECT twotower.save_pipeline('at_p', '{"user_model": "at_user", "vectors": {"table": "at_pf"},
  "item_features": {"table": "at_pf"}, "stages": [{"type": "model", "model": "at_pre", "keep": 3}]}');
SELECT twotower.enable_item_cache('at_pf');
SELECT c.relname, t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE t.tgname = 'twotower_item_cache' AND c.relname LIKE 'at\_pf%' ORDER BY 1;
CREATE VIEW at_candidates AS SELECT ARRAY(SELECT g::bigint FROM generate_series(1, 10) g) AS c;
SELECT array_agg(item_id ORDER BY rank) AS cold FROM at_candidates, twotower.prerank('at_p', '{"q": [1, 0]}', c);
SELECT entries > 0 AS cached FROM twotower.item_cache_info();
UPDATE at_pf_2 SET price = 40 WHERE id = 9;         -- a leaf, not the parent
SELECT array_agg(item_id ORDER BY rank) AS after_leaf_update FROM at_candidates, twotower.prerank('at_p', '{"q": [1, 0]}', c);
UPDATE at_pf_1 SET embedding = '{5, 0}' WHERE id = 2;
SELECT array_agg(item_id ORDER BY rank) AS after_leaf_vector FROM at_candidates, twotower.prerank('at_p', '{"q": [1, 0]}', c);
-- The same from the table itself (cache off).
SET twotower.item_cache_size = 0;
SELECT array_agg(item_id ORDER BY rank) AS uncached FROM at_candidates, twotower.prerank('at_p', '{"q": [1, 0]}', c);
RESET twotower.item_cache_size;
-- A partition created later gets the trigger; one that lacks it turns the cache off for the tree.
CREATE TABLE at_pf_3 PARTITION OF at_pf FOR VALUES FROM (11) TO (21);
CREATE TABLE at_pf_4 (id bigint, embedding real[], price real);
ALTER TABLE at_pf ATTACH PARTITION at_pf_4 FOR VALUES FROM (21) TO (31);
SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE t.tgname = 'twotower_item_cache' AND c.relname LIKE 'at\_pf%' ORDER BY 1;
INSERT INTO at_pf VALUES (12, '{1, 0}', 100), (22, '{1, 0}', 90);
SELECT array_agg(item_id ORDER BY rank) AS new_partitions FROM twotower.prerank('at_p', '{"q": [1, 0]}', ARRAY[1, 2, 9, 12, 22]::bigint[]);
DROP TRIGGER twotower_item_cache ON at_pf_3;
UPDATE at_pf_3 SET price = 0 WHERE id = 12;
SELECT array_agg(item_id ORDER BY rank) AS leaf_without_trigger FROM twotower.prerank('at_p', '{"q": [1, 0]}', ARRAY[1, 2, 9, 12, 22]::bigint[]);
SELECT twotower.disable_item_cache('at_pf');
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgname = 'twotower_item_cache' AND tgrelid::regclass::text LIKE 'at\_pf%';

-- 2. Two pipelines over one table by other columns never share cache entries.
CREATE TABLE at_two (id bigint PRIMARY KEY, alt_id bigint UNIQUE, embedding real[], emb2 real[], price real);
INSERT INTO at_two SELECT i, 100 + i, ARRAY[i, 1]::real[], ARRAY[-i, -1]::real[], 0 FROM generate_series(1, 5) i;
SELECT twotower.enable_item_cache('at_two');
SELECT twotower.save_pipeline('at_a', '{"user_model": "at_user", "vectors": {"table": "at_two"},
  "stages": [{"type": "twotower", "keep": 5}]}');
SELECT twotower.save_pipeline('at_b', '{"user_model": "at_user",
  "vectors": {"table": "at_two", "id_column": "alt_id", "vector_column": "emb2"},
  "stages": [{"type": "twotower", "keep": 5}]}');
SELECT item_id, round(score::numeric, 3) AS score FROM twotower.prerank('at_a', '{"q": [1, 0]}', ARRAY[1, 2, 101, 102]::bigint[]) ORDER BY rank;
SELECT item_id, round(score::numeric, 3) AS score FROM twotower.prerank('at_b', '{"q": [1, 0]}', ARRAY[1, 2, 101, 102]::bigint[]) ORDER BY rank;
SELECT twotower.disable_item_cache('at_two');

-- 3. A model runs only for its owner, the roles it is granted to and twotower_admin.
CREATE ROLE at_alice;   -- owns the model
CREATE ROLE at_bob;     -- the application role
CREATE ROLE at_carol;   -- no grants
GRANT twotower_admin TO at_alice;
SET ROLE at_alice;
SELECT twotower.import_model('at_vocab', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "user_id", "type": "categorical", "embedding": "e", "vocabulary": ["7", "8", "9"]}],
  "layers": [], "output": {"dim": 2, "metric": "ip"}}',
  pg_temp.st('{"e":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]}}',
             '\x00000000000000000000803f00000000000000000000803f0000803f0000803f'));
RESET ROLE;
REVOKE twotower_admin FROM at_alice;
SET ROLE at_alice;
SELECT twotower.embed_user('at_vocab', '{"user_id": 8}') AS owner_embeds;
SET ROLE at_carol;
-- The attack: count distinct vectors over candidate ids (each known id has its own vector).
SELECT pg_temp.err($q$SELECT count(DISTINCT md5(twotower.embed_user('at_vocab', jsonb_build_object('user_id', u))::text)) FROM generate_series(1, 20) u$q$);
SELECT pg_temp.err($q$SELECT twotower.embed_users('at_vocab', ARRAY['{"user_id": 8}'::jsonb])$q$);
SELECT pg_temp.err($q$SELECT twotower.grant_model_usage('at_vocab', 'at_carol')$q$);
SET ROLE at_bob;
SELECT pg_temp.err($q$SELECT twotower.embed_user('at_vocab', '{"user_id": 8}')$q$);
SET ROLE at_alice;
SELECT twotower.grant_model_usage('at_vocab', 'at_bob');
SET ROLE at_bob;
SELECT twotower.embed_user('at_vocab', '{"user_id": 8}') AS granted_embeds;
SET ROLE at_carol;
SELECT pg_temp.err($q$SELECT twotower.embed_user('at_vocab', '{"user_id": 8}')$q$);
SET ROLE at_alice;
SELECT twotower.revoke_model_usage('at_vocab', 'at_bob');
SET ROLE at_bob;
SELECT pg_temp.err($q$SELECT twotower.embed_user('at_vocab', '{"user_id": 8}')$q$);
-- Pipelines run their models with the caller's right too.
SET ROLE at_bob;
SELECT pg_temp.err($q$SELECT * FROM twotower.prerank('at_a', '{"q": [1, 0]}', ARRAY[1]::bigint[])$q$);
RESET ROLE;
SELECT twotower.grant_model_usage('at_user', 'PUBLIC');
GRANT SELECT ON at_two TO at_bob;
SET ROLE at_bob;
SELECT count(*) AS public_model_runs FROM twotower.prerank('at_a', '{"q": [1, 0]}', ARRAY[1]::bigint[]);
RESET ROLE;
SELECT pg_temp.err($q$SELECT twotower.grant_model_usage('at_vocab', 'no_such_role')$q$);
SELECT pg_temp.err($q$SELECT twotower.grant_model_usage('no_such_model', 'at_bob')$q$);

-- 4. ALTER INDEX ... SET is checked against the operator class and the data.
CREATE TABLE at_vec (id bigint PRIMARY KEY, v real[]);
INSERT INTO at_vec SELECT i, ARRAY[i, 1]::real[] FROM generate_series(1, 50) i;
INSERT INTO at_vec VALUES (51, '{70000, 1}');
CREATE INDEX at_vec_ip ON at_vec USING twotower_hnsw (v real_ip_ops);
CREATE INDEX at_vec_l2 ON at_vec USING twotower_hnsw (v real_l2_ops);
SELECT pg_temp.err($q$ALTER INDEX at_vec_ip SET (quantization = 'i8')$q$);
SELECT pg_temp.err($q$ALTER INDEX at_vec_l2 SET (quantization = 'f16')$q$);
SELECT c.relname, c.reloptions FROM pg_class c WHERE c.relname LIKE 'at\_vec\_%' ORDER BY 1;
SELECT pg_temp.err($q$ALTER INDEX at_vec_ip SET (m = 8)$q$);
DELETE FROM at_vec WHERE id = 51;
SELECT pg_temp.err($q$ALTER INDEX at_vec_l2 SET (quantization = 'f16')$q$);
REINDEX INDEX at_vec_l2;

-- (issue 24) index_info shows the delta graph, the rows waiting for it and the folds; an index
-- left invalid by a failed CREATE INDEX CONCURRENTLY gives a clear error.
CREATE TABLE at_fold (id bigint PRIMARY KEY, v real[]);
INSERT INTO at_fold SELECT i, ARRAY[sin(i), cos(i), sin(2 * i)]::real[] FROM generate_series(1, 300) i;
CREATE INDEX at_fold_idx ON at_fold USING twotower_hnsw (v) WITH (fold_threshold = 100);
SELECT graph_items, delta_items, delta_graph_items, delta_pending, folds FROM twotower.index_info('at_fold_idx');
INSERT INTO at_fold SELECT i, ARRAY[sin(i), cos(i), sin(2 * i)]::real[] FROM generate_series(301, 650) i;
SELECT graph_items, delta_items, delta_graph_items + delta_pending = 350 AS all_delta_rows, folds > 0 AS folded,
       delta_generation <> '0000000000000000' AS has_delta_graph
  FROM twotower.index_info('at_fold_idx');
CREATE INDEX CONCURRENTLY at_vec_bad ON at_vec USING twotower_hnsw (v real_l2_ops) WITH (quantization = 'i8');
SELECT indisvalid FROM pg_index WHERE indexrelid = 'at_vec_bad'::regclass;
SELECT pg_temp.err($q$SELECT * FROM twotower.index_info('at_vec_bad')$q$);
DROP INDEX at_vec_bad;

-- 5. An f16 index refuses an L2 query beyond f16's range (its graph distances would overflow).
SET enable_seqscan = off;
SELECT pg_temp.err($q$SELECT id FROM at_vec ORDER BY v <-> '{70000, 0}' LIMIT 5$q$);
SELECT array_agg(id) AS near_origin FROM (SELECT id FROM at_vec ORDER BY v <-> '{0, 0}' LIMIT 3) x;
RESET enable_seqscan;

-- 6. recall's ef_search replaces the setting: a lower value changes the search.
SELECT twotower.import_model('at_l2user', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 32}], "layers": [], "output": {"dim": 32, "metric": "l2"}}',
  pg_temp.st('{}', ''));
SELECT setseed(0.25);
CREATE TABLE at_hd (id bigint PRIMARY KEY, v real[]);
INSERT INTO at_hd SELECT i, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 32) WHERE i > 0)
  FROM generate_series(1, 4000) i;
CREATE INDEX at_hd_idx ON at_hd USING twotower_hnsw (v real_l2_ops) WITH (m = 4, ef_construction = 8);
CREATE TABLE at_q AS SELECT q, ARRAY(SELECT (random() * 2 - 1)::real FROM generate_series(1, 32) WHERE q > 0) AS v
  FROM generate_series(1, 20) q;
-- Exact top-10 by a function (never an index scan).
CREATE TABLE at_exact AS SELECT q.q, h.id FROM at_q q, LATERAL (
  SELECT id FROM at_hd ORDER BY twotower.l2_distance(at_hd.v, q.v), id LIMIT 10) h;
SET twotower.ef_search = 400;
CREATE TABLE at_found AS
SELECT 'setting' AS how, q.q, r.item_id FROM at_q q,
       twotower.recall('at_l2user', 'at_hd_idx', jsonb_build_object('q', q.v), 10) r
UNION ALL
SELECT 'argument', q.q, r.item_id FROM at_q q,
       twotower.recall('at_l2user', 'at_hd_idx', jsonb_build_object('q', q.v), 10, ef_search => 10) r;
SET twotower.ef_search = 10;
INSERT INTO at_found SELECT 'setting 10', q.q, r.item_id FROM at_q q,
       twotower.recall('at_l2user', 'at_hd_idx', jsonb_build_object('q', q.v), 10) r;
RESET twotower.ef_search;
CREATE FUNCTION pg_temp.found(how text) RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*) FROM at_found f JOIN at_exact e USING (q) WHERE f.how = $1 AND f.item_id = e.id $$;
SELECT pg_temp.found('argument') < pg_temp.found('setting') AS lower_ef_argument_finds_fewer,
       NOT EXISTS ((SELECT q, item_id FROM at_found WHERE how = 'argument' EXCEPT SELECT q, item_id FROM at_found WHERE how = 'setting 10')
                   UNION ALL
                   (SELECT q, item_id FROM at_found WHERE how = 'setting 10' EXCEPT SELECT q, item_id FROM at_found WHERE how = 'argument'))
         AS argument_searches_as_setting_10;

-- 7. A refresh source with two rows for one id is refused, naming an id.
SELECT twotower.import_model('at_item', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "item",
  "features": [{"name": "x", "type": "dense", "dim": 2}], "layers": [], "output": {"dim": 2, "metric": "ip"}}',
  pg_temp.st('{}', ''));
CREATE TABLE at_src (id bigint, x real[]);
INSERT INTO at_src VALUES (1, '{1, 0}'), (2, '{0, 1}'), (2, '{1, 1}'), (3, '{1, 2}');
CREATE TABLE at_dst (id bigint, embedding real[]);
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_item_vectors('at_item', 'at_src', 'at_dst')$q$);
CREATE TABLE at_dst_pk (id bigint PRIMARY KEY, embedding real[]);
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_item_vectors('at_item', 'at_src', 'at_dst_pk')$q$);
SELECT count(*) AS written FROM at_dst;
DELETE FROM at_src WHERE x = '{1, 1}';
SELECT * FROM twotower.refresh_item_vectors('at_item', 'at_src', 'at_dst');

-- 8. A dropped neighbour table takes its channel with it; merge input is bounded.
CREATE TABLE at_events (user_id int, item_id bigint, ts timestamptz);
INSERT INTO at_events SELECT u, i, '2026-01-01'::timestamptz + make_interval(secs => u * 10 + i)
  FROM generate_series(1, 20) u, generate_series(1, 6) i WHERE (u + i) % 2 = 0;
SELECT channel FROM twotower.build_channel('at_cf', 'itemcf', 'at_events', 'at_cf_nb');
-- (issue 24) A row committed after the build with an old timestamp is a change: the refresh
-- picks it up and equals a full build.
INSERT INTO at_events VALUES (3, 6, '2025-06-01'), (4, 1, '2025-06-01');
SELECT changed_users, affected_items > 0 AS affected FROM twotower.refresh_channel('at_cf');
SELECT channel FROM twotower.build_channel('at_cf_full', 'itemcf', 'at_events', 'at_cf_full_nb');
SELECT count(*) AS rows_differ FROM (
  (SELECT item_id, neighbor_id, score FROM at_cf_nb EXCEPT SELECT item_id, neighbor_id, score FROM at_cf_full_nb)
  UNION ALL
  (SELECT item_id, neighbor_id, score FROM at_cf_full_nb EXCEPT SELECT item_id, neighbor_id, score FROM at_cf_nb)) d;
SELECT changed_users AS nothing_new FROM twotower.refresh_channel('at_cf');
SELECT twotower.drop_channel('at_cf_full', drop_table => true);
SELECT count(*) > 0 AS recalls FROM twotower.i2i_recall('at_cf', ARRAY[2]::bigint[]);
DROP TABLE at_cf_nb;
SELECT count(*) AS channel_rows FROM twotower.channels WHERE name = 'at_cf';
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('at_cf', ARRAY[2]::bigint[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(ARRAY[repeat('x', 300)], ARRAY[1]::bigint[], ARRAY[1]::real[])$q$);
SELECT pg_temp.err($q$SELECT count(*) FROM twotower.merge(ARRAY(SELECT 'c' || g FROM generate_series(1, 1001) g),
    ARRAY(SELECT g::bigint FROM generate_series(1, 1001) g), ARRAY(SELECT 1::real FROM generate_series(1, 1001) g))$q$);
SELECT count(*) AS merged FROM twotower.merge(ARRAY(SELECT 'c' || (g % 1000) FROM generate_series(1, 2000) g),
    ARRAY(SELECT g::bigint FROM generate_series(1, 2000) g), ARRAY(SELECT 1::real FROM generate_series(1, 2000) g), k => 5000);
-- log1p: a negative value counts as 0 (the documented rule: ln(1 + max(x, 0))).
SELECT twotower.import_model('at_log', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "n", "type": "numeric", "transform": "log1p", "default": 5}], "layers": [], "output": {"dim": 1, "metric": "ip"}}',
  pg_temp.st('{}', ''));
SELECT twotower.embed_user('at_log', '{"n": -1}') AS minus_one, twotower.embed_user('at_log', '{"n": -2}') AS minus_two,
       twotower.embed_user('at_log', '{"n": 0}') AS zero, twotower.embed_user('at_log', '{}') AS missing;

-- (issue 24) Planner estimates follow k.
CREATE FUNCTION pg_temp.planned_rows(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE l text;
BEGIN
    FOR l IN EXECUTE 'EXPLAIN ' || q LOOP
        RETURN substring(l from 'rows=(\d+)');
    END LOOP;
END $$;
SELECT twotower.save_pipeline('at_k', '{"user_model": "at_user", "vectors": {"table": "at_two"},
  "stages": [{"type": "twotower", "keep": 5}], "k": 4}');
SELECT pg_temp.planned_rows($q$SELECT * FROM twotower.recall('at_l2user', 'at_hd_idx', '{}', 7)$q$) AS recall_k7,
       pg_temp.planned_rows($q$SELECT * FROM twotower.i2i_recall('at_cf', ARRAY[2]::bigint[], k => 9)$q$) AS i2i_k9,
       pg_temp.planned_rows($q$SELECT * FROM twotower.merge(ARRAY['a'], ARRAY[1]::bigint[], ARRAY[1]::real[], k => 5)$q$) AS merge_k5,
       pg_temp.planned_rows($q$SELECT * FROM twotower.recommend('at_k', '{}', k => 3)$q$) AS recommend_k3,
       pg_temp.planned_rows($q$SELECT * FROM twotower.recommend('at_k', '{}')$q$) AS recommend_pipeline_k,
       pg_temp.planned_rows($q$SELECT * FROM twotower.prerank('at_k', '{}', ARRAY[1, 2]::bigint[])$q$) AS prerank_2_candidates;
SELECT twotower.drop_pipeline('at_k');

-- (issue 24) A training feature whose name is no column is an error, not a tower trained on
-- nothing.
CREATE TABLE at_ratings (user_id bigint, item_id bigint, ts timestamptz);
INSERT INTO at_ratings SELECT u, (u * 7 + t * 3) % 20, '2026-01-01'::timestamptz + make_interval(hours => t)
  FROM generate_series(1, 30) u, generate_series(1, 8) t;
CREATE TABLE at_users (user_id bigint PRIMARY KEY, gender text);
INSERT INTO at_users SELECT u, CASE WHEN u % 2 = 0 THEN 'f' ELSE 'm' END FROM generate_series(1, 30) u;
SELECT pg_temp.err($q$SELECT * FROM twotower.train('at_tu', 'at_ti', 'at_ratings',
  '{"dim": 4, "epochs": 1, "user": {"features": [{"name": "userid", "type": "categorical"}]},
    "item": {"features": [{"name": "item_id", "type": "categorical"}]}}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('at_tu', 'at_ti', 'at_ratings',
  '{"dim": 4, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "gendr", "type": "categorical"}]},
    "item": {"features": [{"name": "item_id", "type": "categorical"}]}}', user_features => 'at_users')$q$);
SELECT count(*) AS stored FROM twotower.models WHERE name IN ('at_tu', 'at_ti');
SET client_min_messages = warning;  -- the progress NOTICE has timings
SELECT model, kind FROM twotower.train('at_tu', 'at_ti', 'at_ratings',
  '{"dim": 4, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "gender", "type": "categorical"}]},
    "item": {"features": [{"name": "item_id", "type": "categorical"}]}}', user_features => 'at_users') ORDER BY kind;
RESET client_min_messages;

-- Settings: the twotower prefix is reserved, so a typo is an error.
SELECT pg_temp.err($q$SET twotower.ef_serch = 5$q$);
SET twotower.ef_search = 7;
SHOW twotower.ef_search;
RESET twotower.ef_search;

-- Clean up.
RESET ROLE;
-- (issue 27) The index's dimension limit is 54000 program_limit_exceeded (it was 0A000
-- feature_not_supported), at CREATE INDEX and at INSERT.
CREATE TABLE at_wide (id bigint PRIMARY KEY, v real[]);
INSERT INTO at_wide VALUES (1, array_fill(1::real, ARRAY[2001]));
SELECT pg_temp.err('CREATE INDEX ON at_wide USING twotower_hnsw (v real_cosine_ops)');
TRUNCATE at_wide;
CREATE INDEX at_wide_idx ON at_wide USING twotower_hnsw (v real_cosine_ops);
SELECT pg_temp.err($$INSERT INTO at_wide VALUES (2, array_fill(1::real, ARRAY[2001]))$$);
DROP TABLE at_wide;
-- A renamed model catalogue is 55000 with a hint to repair the installation (it was 0A000).
BEGIN;
ALTER TABLE twotower.model_version RENAME TO model_version_gone;
SELECT pg_temp.err($$SELECT twotower.embed_user('at_user', '{}')$$);
ROLLBACK;
SELECT twotower.drop_pipeline(p) FROM unnest(ARRAY['at_p', 'at_a', 'at_b']) p;
SELECT twotower.drop_model(m) FROM unnest(ARRAY['at_user', 'at_pre', 'at_vocab', 'at_l2user', 'at_item', 'at_log', 'at_tu', 'at_ti']) m;
DROP TABLE at_pf, at_two, at_vec, at_src, at_dst, at_dst_pk, at_events, at_hd, at_q, at_exact, at_found, at_ratings, at_users, at_fold CASCADE;
DROP ROLE at_alice, at_bob, at_carol;

-- (issue 24) A new session: a twotower.* typo set before the library is loaded is reported and
-- removed when it loads; with session_preload_libraries the settings exist from the start.
\c
SET twotower.ef_serch = 5;
SELECT twotower.vector_dims('{1, 2}') AS loads_the_library;
SHOW twotower.ef_serch;
ALTER DATABASE twotower_regress SET session_preload_libraries = 'pg_twotower';
\c
SHOW twotower.ef_search;
ALTER DATABASE twotower_regress RESET session_preload_libraries;
