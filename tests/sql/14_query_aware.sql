-- Query-aware indexes: WITH (query_sample = ...) tunes the graph to a sample of real queries at
-- every build (CREATE INDEX, REINDEX, REINDEX CONCURRENTLY); index_info shows it.
SET search_path = public, twotower;
\getenv golden TT_GOLDEN
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

-- A case built to be hard for the plain graph: 4000 items in 40 tight clusters, a graph with few
-- links (m 4, ef_construction 8), and users whose vectors are means of six items from anywhere
-- (a user tower's output lies between the item clusters: out-of-distribution queries).
CREATE TABLE qa_items (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO qa_items
SELECT i, array_agg(((hashint4(i % 40 * 1000 + j) % 1000) / 1000.0
                     + 0.25 * ((hashint4(i * 7919 + j) % 1000) / 1000.0))::real ORDER BY j)
  FROM generate_series(1, 4000) i, generate_series(1, 16) j GROUP BY i;
CREATE TABLE qa_users (id int PRIMARY KEY, v real[]);
INSERT INTO qa_users
SELECT u, array_agg(s ORDER BY j) FROM (
    SELECT u, j, (avg(it.embedding[j]) + 0.01 * (hashint4(u * 31 + j) % 100) / 100.0)::real AS s
      FROM generate_series(1, 300) u, generate_series(0, 5) k, generate_series(1, 16) j,
           LATERAL (SELECT embedding FROM qa_items WHERE id = (u * 37 + k * 1013) % 4000 + 1) it
     GROUP BY u, j) x GROUP BY u;
ANALYZE qa_items, qa_users;

-- The exact top 20 of every user, never through an index.
SET enable_indexscan = off;
SET enable_bitmapscan = off;
CREATE TABLE qa_truth AS
SELECT u.id AS uid, t.rank, t.id, t.d
  FROM qa_users u, LATERAL (SELECT id, embedding <=> u.v AS d, row_number() OVER (ORDER BY embedding <=> u.v, id) AS rank
                              FROM qa_items ORDER BY embedding <=> u.v, id LIMIT 20) t;
RESET enable_indexscan;
RESET enable_bitmapscan;
SET enable_seqscan = off;
SET twotower.ef_search = 20;

-- recall(users): mean share of each user's exact top 20 that the index scan returns.
CREATE FUNCTION pg_temp.recall(users text) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE r numeric;
BEGIN
    EXECUTE format($q$
        SELECT round(avg(hit), 3) FROM (
            SELECT u.id, (SELECT count(*) FROM qa_truth t
                           WHERE t.uid = u.id
                             AND t.id IN (SELECT id FROM qa_items ORDER BY embedding <=> u.v LIMIT 20)) / 20.0 AS hit
              FROM qa_users u WHERE %s) x $q$, users) INTO r;
    RETURN r;
END $$;
-- mismatches(users): users whose index scan does not return their exact top 20 in distance
-- order (ties may come in either order: compared by distance).
CREATE FUNCTION pg_temp.mismatches(users text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE r bigint;
BEGIN
    EXECUTE format($q$
        SELECT count(*) FROM qa_users u
         WHERE %s AND (SELECT array_agg(round((d)::numeric, 5) ORDER BY rank) FROM qa_truth t WHERE t.uid = u.id)
               IS DISTINCT FROM
               (SELECT array_agg(round((embedding <=> u.v)::numeric, 5) ORDER BY embedding <=> u.v)
                  FROM (SELECT embedding FROM qa_items ORDER BY embedding <=> u.v LIMIT 20) g) $q$, users)
      INTO r;
    RETURN r;
END $$;

-- The plain graph misses many of the users' nearest items at ef_search 20.
CREATE INDEX qa_idx ON qa_items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (m = 4, ef_construction = 8);
SELECT pg_temp.recall('id % 2 = 0') < 0.97 AS plain_graph_misses, pg_temp.mismatches('id % 2 = 0') > 10 AS many_users_wrong;
SELECT tuned_queries, tuned_k, tuned_links FROM index_info('qa_idx');

-- Tuned to the even users: every one of them gets exactly its top 20 at ef_search 20.
ALTER INDEX qa_idx SET (query_sample = 'SELECT v FROM qa_users WHERE id % 2 = 0 ORDER BY id',
                        query_k = 20, query_ef = 20, query_extra = 8);
-- (Options change what the next build does; the graph is as it was until then.)
SELECT tuned_queries FROM index_info('qa_idx');
REINDEX INDEX qa_idx;
SELECT tuned_queries, tuned_k, tuned_links > 0 AS linked, tuned_recall_before < 0.97 AS was_missing,
       tuned_recall_after FROM index_info('qa_idx');
SELECT pg_temp.mismatches('id % 2 = 0') AS sample_users_wrong;
-- The odd users were not in the sample: they gain too (the links serve nearby queries).
SELECT pg_temp.recall('id % 2 = 1') AS held_out_recall_tuned \gset
DROP INDEX qa_idx;
CREATE INDEX qa_idx ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (m = 4, ef_construction = 8);
SELECT :held_out_recall_tuned > pg_temp.recall('id % 2 = 1') AS held_out_users_gain;
DROP INDEX qa_idx;

-- CREATE INDEX tunes; REINDEX and REINDEX CONCURRENTLY tune again (the options are the index's).
CREATE INDEX qa_idx ON qa_items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (m = 4, ef_construction = 8, query_sample = 'SELECT v FROM qa_users WHERE id % 2 = 0',
        query_k = 20, query_ef = 20, query_extra = 8);
SELECT tuned_queries, tuned_k, tuned_recall_after FROM index_info('qa_idx');
SELECT pg_temp.mismatches('id % 2 = 0') AS sample_users_wrong;
REINDEX INDEX CONCURRENTLY qa_idx;
SELECT tuned_queries, tuned_k, tuned_recall_after FROM index_info('qa_idx');
SELECT pg_temp.mismatches('id % 2 = 0') AS sample_users_wrong;
SELECT reloptions FROM pg_class WHERE relname = 'qa_idx';
-- Rows inserted after the build are searchable at once (the delta), the tuning kept.
INSERT INTO qa_items SELECT id + 100000, embedding FROM qa_items WHERE id <= 20;
SELECT count(*) FROM (SELECT id FROM qa_items ORDER BY embedding <=> (SELECT embedding FROM qa_items WHERE id = 100007) LIMIT 2) x
 WHERE id IN (7, 100007);
SELECT tuned_queries, delta_items FROM index_info('qa_idx');
DELETE FROM qa_items WHERE id > 100000;
-- RESET: the next build is plain again.
ALTER INDEX qa_idx RESET (query_sample, query_k, query_ef, query_extra);
REINDEX INDEX qa_idx;
SELECT tuned_queries, tuned_links FROM index_info('qa_idx');

-- A sample of features through a model's user tower (query_model): the golden user tower (8
-- dimensions) embeds the golden inputs.
SELECT twotower.import_model_file('qa_user', :'golden' || '/spec.json', :'golden' || '/weights.safetensors');
CREATE TABLE qa_features AS
SELECT ord::int AS id, x AS features FROM jsonb_array_elements(pg_read_file(:'golden' || '/inputs.json')::jsonb) WITH ORDINALITY AS i(x, ord);
CREATE TABLE qa_items8 AS
SELECT i AS id, array_agg(((hashint4(i * 13 + j) % 1000) / 1000.0)::real ORDER BY j) AS embedding
  FROM generate_series(1, 3000) i, generate_series(1, 8) j GROUP BY i;
CREATE INDEX qa_idx8 ON qa_items8 USING twotower_hnsw (embedding real_cosine_ops)
  WITH (query_sample = 'SELECT features FROM qa_features', query_model = 'qa_user', query_k = 10);
SELECT tuned_queries = (SELECT count(*) FROM qa_features) AS every_row, tuned_k, tuned_recall_after FROM index_info('qa_idx8');
-- The same through vectors the caller computes (query_model left out).
ALTER INDEX qa_idx8 SET (query_sample = 'SELECT twotower.embed_user(''qa_user'', features) FROM qa_features');
ALTER INDEX qa_idx8 RESET (query_model);
REINDEX INDEX qa_idx8;
SELECT tuned_queries = (SELECT count(*) FROM qa_features) AS every_row, tuned_k FROM index_info('qa_idx8');

-- Hostile options and samples: refused with a SQLSTATE, never a crashed backend or a silently
-- untuned index.
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_k = 0)$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_extra = 257)$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_limit = 0)$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = '  ')$q$);
SELECT pg_temp.err(format($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = %L)$q$, repeat('x', 20000)));
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_model = '')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT ARRAY[1/0]::real[]')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT no_such_column FROM qa_users')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT ''{1,2,3}''::real[]')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT array_fill(''NaN''::real, ARRAY[16])')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT ARRAY[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,NULL]::real[]')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT ''not a vector''::text')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT features FROM qa_features', query_model = 'no_such_model')$q$);
-- The sample is one query: no second statement rides along, whatever the text closes.
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT v FROM qa_users; DROP TABLE qa_users')$q$);
SELECT pg_temp.err($q$CREATE INDEX qa_bad ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT v FROM qa_users) AS s(v); DROP TABLE qa_users; --')$q$);
SELECT count(*) FROM qa_users;
-- NULL rows are left out; a sample with no rows (or only zero vectors) builds a plain graph.
CREATE INDEX qa_nulls ON qa_items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (query_sample = 'SELECT CASE WHEN id <= 10 THEN v END FROM qa_users', query_k = 5);
SELECT tuned_queries FROM index_info('qa_nulls');
DROP INDEX qa_nulls;
CREATE INDEX qa_none ON qa_items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (query_sample = 'SELECT v FROM qa_users WHERE false');
SELECT tuned_queries FROM index_info('qa_none');
DROP INDEX qa_none;
-- query_limit caps the rows read.
CREATE INDEX qa_lim ON qa_items USING twotower_hnsw (embedding real_cosine_ops)
  WITH (query_sample = 'SELECT v FROM qa_users', query_limit = 7, query_k = 5);
SELECT tuned_queries FROM index_info('qa_lim');
DROP INDEX qa_lim;
-- Past maintenance_work_mem while the sample is read: 53200, nothing built.
SET maintenance_work_mem = '1MB';
SELECT pg_temp.err($q$CREATE INDEX qa_mem ON qa_items USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT v FROM qa_users', query_k = 1000)$q$);
RESET maintenance_work_mem;

-- The sample runs as the table's owner, whoever builds: a role cannot read through it what it
-- may not read, and a superuser's REINDEX does not lend it the superuser's rights.
CREATE ROLE qa_owner;
CREATE TABLE qa_secret (v real[]);
INSERT INTO qa_secret SELECT v FROM qa_users LIMIT 5;
CREATE SCHEMA qa_s AUTHORIZATION qa_owner;
CREATE TABLE qa_s.qa_mine AS SELECT * FROM qa_items WHERE id <= 500;
ALTER TABLE qa_s.qa_mine OWNER TO qa_owner;
GRANT SELECT ON qa_users TO qa_owner;
GRANT USAGE ON SCHEMA twotower TO qa_owner;
SET ROLE qa_owner;
SELECT pg_temp.err($q$CREATE INDEX qa_mine_idx ON qa_s.qa_mine USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT v FROM qa_secret')$q$);
CREATE INDEX qa_mine_idx ON qa_s.qa_mine USING twotower_hnsw (embedding real_cosine_ops) WITH (query_sample = 'SELECT v FROM qa_users', query_k = 5);
ALTER INDEX qa_s.qa_mine_idx SET (query_sample = 'SELECT v FROM qa_secret');
RESET ROLE;
SELECT pg_temp.err($q$REINDEX INDEX qa_s.qa_mine_idx$q$);
SELECT tuned_queries FROM index_info('qa_s.qa_mine_idx');
-- A role that does not own the index cannot set its sample.
CREATE ROLE qa_other;
GRANT USAGE ON SCHEMA twotower, qa_s TO qa_other;
SET ROLE qa_other;
SELECT pg_temp.err($q$ALTER INDEX qa_s.qa_mine_idx SET (query_sample = 'SELECT 1')$q$);
RESET ROLE;
DROP SCHEMA qa_s CASCADE;
REVOKE ALL ON qa_users FROM qa_owner;
REVOKE ALL ON SCHEMA twotower FROM qa_owner, qa_other;
DROP ROLE qa_owner;
DROP ROLE qa_other;
SELECT twotower.drop_model('qa_user');
DROP TABLE qa_items, qa_users, qa_truth, qa_features, qa_items8, qa_secret;
