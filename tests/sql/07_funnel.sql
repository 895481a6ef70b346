-- The funnel in one call: a pre-rank model imported from SQL, pipelines saved and checked,
-- recommend against the same computation in plain SQL, recommend_explain, prerank over the
-- caller's candidates, bad input, privileges, transactions.
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

-- A user tower whose vector is the request's "q" (a dense feature, no layers, inner product).
SELECT twotower.import_model('fn_user', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 2},
               {"name": "history", "type": "multi_categorical", "embedding": "e", "hash_buckets": 3, "pooling": "mean"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 2, "metric": "ip"}}',
  pg_temp.st('{"e":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]},"w":{"dtype":"F32","shape":[2,4],"data_offsets":[32,64]}}',
             '\x00000000000000000000000000000000000000000000000000000000000000000000803f000000000000000000000000000000000000803f0000000000000000'));
-- score = two-tower score + 2 · max_h cos(v, h) + 0.5 · price.
SELECT twotower.import_model('fn_pre', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
  "features": [{"name": "tt", "type": "cross", "of": "score"}, {"name": "hmax", "type": "cross", "of": "history_max"},
               {"name": "price", "source": "item", "type": "numeric", "transform": "none"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1}}',
  pg_temp.st('{"w":{"dtype":"F32","shape":[1,3],"data_offsets":[0,12]}}', '\x0000803f000000400000003f'));
SELECT name, kind, dim, features FROM twotower.models WHERE name LIKE 'fn\_%' ORDER BY name;
-- The app roles below run the models (usage granted; tests/sql/10_hardening.sql tests the right).
SELECT twotower.grant_model_usage(m, 'PUBLIC') FROM unnest(ARRAY['fn_user', 'fn_pre']) m;
SELECT twotower.embed_user('fn_user', '{"q": [3, 4], "history": [1]}');

-- Eight items on the unit circle and beyond, with prices; an index; an item-CF channel.
CREATE TABLE fn_items (id bigint PRIMARY KEY, embedding real[], price real);
INSERT INTO fn_items SELECT i, ARRAY[cos(i * 0.7) * (1 + i / 10.0), sin(i * 0.7) * (1 + i / 10.0)]::real[], (i % 3)::real
  FROM generate_series(1, 8) i;
CREATE INDEX fn_items_idx ON fn_items USING twotower_hnsw (embedding real_ip_ops);
CREATE TABLE fn_events (user_id int, item_id bigint, ts timestamptz);
INSERT INTO fn_events SELECT u, i, '2026-01-01'::timestamptz + make_interval(secs => u * 10 + i)
  FROM generate_series(1, 40) u, generate_series(1, 8) i WHERE (u + i) % 3 = 0;
SELECT channel, rows > 0 AS has_rows FROM twotower.build_channel('fn_cf', 'itemcf', 'fn_events', 'fn_cf_nb');

SELECT twotower.save_pipeline('fn', '{
  "user_model": "fn_user",
  "vectors": {"table": "fn_items"},
  "item_features": {"table": "fn_items"},
  "history": "history",
  "channels": [{"type": "twotower", "index": "fn_items_idx", "k": 7},
               {"name": "cf", "type": "i2i", "channel": "fn_cf", "k": 4, "history_len": 5, "decay": 0.5}],
  "merge": {"strategy": "rrf", "k": 8},
  "stages": [{"type": "twotower", "keep": 6}, {"type": "model", "model": "fn_pre", "keep": 3}],
  "k": 3}');
SELECT name, owner = current_user AS mine, definition -> 'stages' AS stages FROM twotower.pipelines;

-- recommend = the same steps in SQL: every item but the history (1), stage 1 keeps the 6 best
-- inner products with q = (3, 4), stage 2 re-scores them.
CREATE VIEW fn_expected AS
WITH u AS (SELECT ARRAY[3, 4]::real[] AS q),
     h AS (SELECT embedding FROM fn_items WHERE id = 1),
     s1 AS (SELECT id, embedding, price, twotower.inner_product(embedding, (SELECT q FROM u)) AS tt
              FROM fn_items WHERE id <> 1 ORDER BY tt DESC, id LIMIT 6)
SELECT id, (tt + 2 * (1 - ((SELECT embedding FROM h) <=> embedding)) + 0.5 * price)::real AS score FROM s1;
SELECT r.item_id, r.rank, abs(r.score - e.score) < 1e-5 AS as_in_sql, r.channels, r.channel_ranks IS NOT NULL AS has_ranks
  FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}') r JOIN fn_expected e ON e.id = r.item_id ORDER BY r.rank;
SELECT array_agg(id ORDER BY score DESC, id) AS expected_top3 FROM (SELECT * FROM fn_expected ORDER BY score DESC, id LIMIT 3) x;
-- k and exclusions.
SELECT array_agg(item_id ORDER BY rank) FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}', k => 2, exclude => ARRAY[5]::bigint[]);
-- Explain: every step, counts that add up, dropped items; each step's time (ms) is within the
-- call's (on the server's clock), and so is their sum (the steps run one after another).
SELECT clock_timestamp() AS explain_start \gset
CREATE TEMP TABLE fn_explained AS SELECT * FROM twotower.recommend_explain('fn', '{"q": [3, 4], "history": [1]}');
SELECT extract(epoch FROM clock_timestamp() - :'explain_start'::timestamptz) * 1000 AS explain_ms \gset
SELECT step, stage, received, kept, cardinality(kept_items) = kept AS kept_listed, cardinality(dropped_items) AS dropped,
       ms > 0 AND ms < :explain_ms AS timed
  FROM fn_explained ORDER BY step;
SELECT sum(ms) < :explain_ms AS steps_within_call FROM fn_explained;
DROP TABLE fn_explained;
-- prerank over the caller's candidates (99 has no vector and is left out).
SELECT item_id, rank FROM twotower.prerank('fn', '{"q": [3, 4], "history": [1]}', ARRAY[2, 3, 4, 99]::bigint[]);
-- A pipeline without channels pre-ranks the caller's candidates only.
SELECT twotower.save_pipeline('fn_pre_only', '{"user_model": "fn_user", "vectors": {"table": "fn_items"},
  "item_features": {"table": "fn_items"}, "history": "history",
  "stages": [{"type": "model", "model": "fn_pre", "keep": 2}]}');
SELECT item_id, rank FROM twotower.prerank('fn_pre_only', '{"q": [3, 4], "history": [1]}', ARRAY[2, 3, 4, 8]::bigint[]);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_pre_only', '{"q": [3, 4]}')$$);
SELECT twotower.drop_pipeline('fn_pre_only');
-- A rerank stage after the two-tower stage: at most one item per price among the three kept.
-- Greedy by score, that is each price's best item, best first (all three prices are among the
-- six of stage 1).
SELECT twotower.save_pipeline('fn_rr', (definition - 'stages' - 'k') || '{"stages": [{"type": "twotower", "keep": 6},
  {"type": "rerank", "keep": 3, "rules": [{"rule": "cap", "column": "price", "most": 1}]}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
CREATE VIEW fn_s1 AS
SELECT id, price, twotower.inner_product(embedding, ARRAY[3, 4]::real[]) AS tt
  FROM fn_items WHERE id <> 1 ORDER BY tt DESC, id LIMIT 6;
SELECT (SELECT array_agg(item_id ORDER BY rank) FROM twotower.recommend('fn_rr', '{"q": [3, 4], "history": [1]}'))
     = (SELECT array_agg(id ORDER BY tt DESC) FROM (SELECT DISTINCT ON (price) id, tt FROM fn_s1 ORDER BY price, tt DESC) x)
       AS one_per_price,
       (SELECT count(DISTINCT price) FROM fn_s1) AS prices_in_stage_1;
SELECT step, stage, received, kept FROM twotower.recommend_explain('fn_rr', '{"q": [3, 4], "history": [1]}')
 WHERE stage LIKE 'rerank%';
-- A filter, and MMR with λ = 1 (the score order): stage 1's items priced 1 or more, best first.
SELECT twotower.save_pipeline('fn_rr', jsonb_set(definition, '{stages,1,rules}',
  '[{"rule": "filter", "column": "price", "op": "ge", "value": 1}, {"rule": "mmr", "lambda": 1}]'))
  FROM twotower.pipelines WHERE name = 'fn_rr';
SELECT (SELECT array_agg(item_id ORDER BY rank) FROM twotower.recommend('fn_rr', '{"q": [3, 4], "history": [1]}'))
     = (SELECT array_agg(id ORDER BY tt DESC) FROM (SELECT id, tt FROM fn_s1 WHERE price >= 1 ORDER BY tt DESC LIMIT 3) x)
       AS filtered_in_score_order;
-- A rule on a column the item features lack, or a rerank that is not the last stage.
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_rr', jsonb_set(definition, '{stages,1,rules}',
  '[{"rule": "cap", "column": "colour", "most": 1}]')) FROM twotower.pipelines WHERE name = 'fn_rr'$$);
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_rr', jsonb_set(definition, '{stages}',
  jsonb_build_array(definition #> '{stages,1}', '{"type": "twotower", "keep": 2}'::jsonb))) FROM twotower.pipelines WHERE name = 'fn_rr'$$);
SELECT twotower.drop_pipeline('fn_rr');
DROP VIEW fn_s1;
-- No history: the i2i channel returns nothing, history_max is 0.
SELECT count(*) AS results FROM twotower.recommend('fn', '{"q": [1, 0]}');

-- The hot-item cache: only for tables with the trigger; a change (committed or not) is seen at
-- once, a rolled-back one is undone.
SELECT entries FROM twotower.item_cache_info();
SELECT twotower.enable_item_cache('fn_items');
SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'fn_items'::regclass;
SELECT array_agg(item_id ORDER BY rank) AS cold FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
SELECT entries > 0 AS cached FROM twotower.item_cache_info();
SELECT array_agg(item_id ORDER BY rank) AS warm FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
BEGIN;
UPDATE fn_items SET price = 40 WHERE id = 7;
SELECT array_agg(item_id ORDER BY rank) AS own_change FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
SELECT array_agg(id ORDER BY score DESC, id) AS expected FROM (SELECT * FROM fn_expected ORDER BY score DESC, id LIMIT 3) x;
ROLLBACK;
SELECT array_agg(item_id ORDER BY rank) AS after_rollback FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
-- A rerank stage's attributes come from the cache too, and a change is seen at once: the
-- items priced 1 or more of stage 1, warm, then after a price change inside a transaction.
SELECT twotower.save_pipeline('fn_rr_cached', (definition - 'stages' - 'k') || '{"stages": [{"type": "twotower", "keep": 6},
  {"type": "rerank", "keep": 3, "rules": [{"rule": "filter", "column": "price", "op": "ge", "value": 1}]}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT entries AS entries_before FROM twotower.item_cache_info() \gset
SELECT array_agg(item_id ORDER BY rank) AS rr_cold FROM twotower.recommend('fn_rr_cached', '{"q": [3, 4], "history": [1]}');
-- The six candidates' attribute rows are now cached (entries of their own).
SELECT entries - :entries_before AS attribute_entries FROM twotower.item_cache_info();
SELECT array_agg(item_id ORDER BY rank) AS rr_warm FROM twotower.recommend('fn_rr_cached', '{"q": [3, 4], "history": [1]}');
BEGIN;
UPDATE fn_items SET price = 0 WHERE id = (SELECT item_id FROM twotower.recommend('fn_rr_cached', '{"q": [3, 4], "history": [1]}') WHERE rank = 1);
SELECT array_agg(item_id ORDER BY rank) AS rr_own_change FROM twotower.recommend('fn_rr_cached', '{"q": [3, 4], "history": [1]}');
ROLLBACK;
SELECT array_agg(item_id ORDER BY rank) AS rr_after_rollback FROM twotower.recommend('fn_rr_cached', '{"q": [3, 4], "history": [1]}');
SELECT twotower.drop_pipeline('fn_rr_cached');
UPDATE fn_items SET embedding = ARRAY[30, 40]::real[] WHERE id = 6;
SELECT array_agg(item_id ORDER BY rank) AS new_vector FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
SELECT array_agg(id ORDER BY score DESC, id) AS expected FROM (SELECT * FROM fn_expected ORDER BY score DESC, id LIMIT 3) x;
SELECT twotower.disable_item_cache('fn_items');
SELECT entries FROM twotower.item_cache_info();
SELECT count(*) FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
SELECT entries AS without_trigger FROM twotower.item_cache_info();
SELECT twotower.enable_item_cache('fn_items');

-- statement_timeout stops a long call with 57014 at the timeout, within 3 s (10 times the
-- timeout, on the server's clock), and the session goes on: 100 000 candidates with vectors
-- whose item features come from a view that is slow to read (uncancelled, the call runs for
-- many seconds). The candidates are made before the call (the timeout cannot hit that part).
CREATE TABLE fn_many AS
SELECT i::bigint AS id, ARRAY[cos(i * 0.7), sin(i * 0.7)]::real[] AS embedding, (i % 3)::real AS price
  FROM generate_series(1, 100000) i;
ALTER TABLE fn_many ADD PRIMARY KEY (id);
CREATE VIEW fn_many_slow AS
SELECT id, price + 0 * (SELECT count(*) FROM generate_series(1, 1000 + (id % 2)::int)) AS price FROM fn_many;
SELECT twotower.save_pipeline('fn_slow', '{"user_model": "fn_user", "vectors": {"table": "fn_many"},
  "item_features": {"table": "fn_many_slow"}, "history": "history",
  "stages": [{"type": "model", "model": "fn_pre", "keep": 10}], "k": 10}');
CREATE TEMP TABLE fn_cands AS SELECT array_agg(id ORDER BY id) AS ids FROM fn_many;
SELECT clock_timestamp() AS cancel_start \gset
SET statement_timeout = '300ms';
SELECT count(*) FROM fn_cands, twotower.prerank('fn_slow', '{"q": [3, 4], "history": [1]}', fn_cands.ids);
RESET statement_timeout;
SELECT clock_timestamp() - :'cancel_start'::timestamptz BETWEEN interval '300 ms' AND interval '3 s' AS stopped_at_the_timeout;
SELECT count(*) AS after_timeout FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
SELECT twotower.drop_pipeline('fn_slow');
DROP VIEW fn_many_slow;
DROP TABLE fn_many, fn_cands;
-- More than 100 000 candidates.
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn', '{"q": [3, 4]}', ARRAY(SELECT g::bigint FROM generate_series(1, 100001) g))$$);

-- Bad input.
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('nope', '{}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4]}', k => 0)$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4]}', k => 4)$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', NULL)$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4], "colour": 1}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4], "history": ["x"]}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4]}', exclude => ARRAY[NULL]::bigint[])$$);
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn', '{"q": [3, 4]}', ARRAY[2, 3, 2]::bigint[])$$);
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn', '{"q": [3, 4]}', NULL)$$);
SELECT count(*) AS none FROM twotower.prerank('fn', '{"q": [3, 4]}', '{}'::bigint[]);
-- An item row holding a value serde cannot (a numeric beyond double precision) is an ERROR,
-- 22003 naming it (it was a panic in pgrx's jsonb conversion: XX000, then 22023).
CREATE TABLE fn_huge (id bigint PRIMARY KEY, price numeric);
INSERT INTO fn_huge VALUES (1, 1), (2, 1e400), (3, 2);
SELECT twotower.save_pipeline('fn_huge', definition || '{"item_features": {"table": "fn_huge"}}') FROM twotower.pipelines WHERE name = 'fn';
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn_huge', '{"q": [3, 4]}', ARRAY[1, 2, 3]::bigint[])$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_huge', '{"q": [3, 4]}')$$);
SELECT twotower.drop_pipeline('fn_huge');
DROP TABLE fn_huge;
-- Definitions are checked when saved.
CREATE FUNCTION pg_temp.def(patch jsonb) RETURNS text LANGUAGE sql AS $$
    SELECT pg_temp.err(format('SELECT twotower.save_pipeline(%L, %L)', 'fn_bad', (definition || patch)::text))
      FROM twotower.pipelines WHERE name = 'fn' $$;
SELECT pg_temp.def('{"user_model": "missing"}');
SELECT pg_temp.def('{"user_model": "fn_pre"}');
SELECT pg_temp.def('{"vectors": {"table": "no_such_table"}}');
SELECT pg_temp.def('{"vectors": {"table": "fn_items", "vector_column": "vec"}}');
SELECT pg_temp.def('{"channels": [{"type": "i2i", "channel": "missing", "k": 5}]}');
SELECT pg_temp.def('{"channels": [{"type": "twotower", "index": "fn_items_pkey", "k": 5}]}');
SELECT pg_temp.def('{"stages": [{"type": "twotower", "keep": 6}, {"type": "model", "model": "fn_user", "keep": 3}]}');
SELECT pg_temp.def('{"stages": [{"type": "twotower", "keep": 6}, {"type": "model", "model": "fn_pre", "keep": 7}]}');
SELECT pg_temp.def('{"stages": [{"type": "model", "model": "fn_pre", "keep": 3}], "item_features": null}');
SELECT pg_temp.def('{"merge": {"strategy": "borda"}}');
SELECT pg_temp.def('{"k": 0}');
SELECT pg_temp.def('{"pipeline": "fn"}');
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn bad', '{}')$$);
SELECT count(*) AS saved_bad FROM twotower.pipelines WHERE name = 'fn_bad';
-- What a pipeline uses cannot be dropped under it.
SELECT pg_temp.err($$SELECT twotower.drop_model('fn_pre')$$);
SELECT pg_temp.err($$SELECT twotower.drop_model('fn_user')$$);
SELECT pg_temp.err($$SELECT twotower.drop_channel('fn_cf')$$);
SELECT name FROM twotower.models WHERE name LIKE 'fn\_%' GROUP BY name ORDER BY name;
-- Saving is transactional.
BEGIN;
SELECT twotower.save_pipeline('fn_tx', definition) FROM twotower.pipelines WHERE name = 'fn';
SELECT count(*) FROM twotower.recommend('fn_tx', '{"q": [3, 4]}');
ROLLBACK;
SELECT count(*) AS after_rollback FROM twotower.pipelines WHERE name = 'fn_tx';
-- A backend keeps the definitions it parsed: a replacement, and its rollback, are seen by the
-- next call.
SELECT count(*) AS k3 FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
BEGIN;
SELECT twotower.save_pipeline('fn', definition || '{"k": 2}') FROM twotower.pipelines WHERE name = 'fn';
SELECT count(*) AS k2 FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
ROLLBACK;
SELECT count(*) AS k3_again FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');

-- Privileges: creating needs twotower_admin, replacing and dropping the owner; recommend
-- reads the sources as the caller.
CREATE ROLE fn_app;
CREATE ROLE fn_other;
GRANT SELECT ON fn_items, fn_cf_nb TO fn_app;
SET ROLE fn_app;
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_app', definition) FROM twotower.pipelines WHERE name = 'fn'$$);
SELECT count(*) AS app_can_recommend FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}');
RESET ROLE;
GRANT twotower_admin TO fn_app;
SET ROLE fn_app;
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_app', definition) FROM twotower.pipelines WHERE name = 'fn'$$);
RESET ROLE;
REVOKE twotower_admin FROM fn_app;
SELECT name, owner FROM twotower.pipelines ORDER BY name;
SET ROLE fn_other;
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_app', definition) FROM twotower.pipelines WHERE name = 'fn'$$);
SELECT pg_temp.err($$SELECT twotower.drop_pipeline('fn_app')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn', '{"q": [3, 4], "history": [1]}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.pipeline$$);
-- The cache holds fn_items' rows (filled by postgres in this backend): still not for a role
-- that may not read the table.
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn', '{"q": [3, 4]}', ARRAY[2, 3]::bigint[])$$);
RESET ROLE;
SELECT entries > 0 AS cache_filled FROM twotower.item_cache_info();
-- Column privileges are not enough for the cache: the table is read, and the vector column is
-- refused.
GRANT SELECT (id, price) ON fn_items TO fn_other;
SET ROLE fn_other;
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn', '{"q": [3, 4]}', ARRAY[2, 3]::bigint[])$$);
RESET ROLE;
REVOKE ALL ON fn_items FROM fn_other;
-- The owner is a role with a dependency: it cannot be dropped while it owns a pipeline.
SELECT pg_temp.err($$DROP ROLE fn_app$$);
SET ROLE fn_app;
SELECT twotower.drop_pipeline('fn_app') AS dropped_by_owner, twotower.drop_pipeline('fn_app') AS again;
RESET ROLE;
DROP ROLE fn_other;
REVOKE ALL ON fn_items, fn_cf_nb FROM fn_app;
DROP ROLE fn_app;

-- An item feature column named like the reader's own alias (s) is read as the column.
CREATE TABLE fn_s_items (id bigint PRIMARY KEY, embedding real[], s real);
INSERT INTO fn_s_items SELECT i, ARRAY[1, i * 0.1]::real[], 10 - i FROM generate_series(1, 4) i;
CREATE INDEX fn_s_idx ON fn_s_items USING twotower_hnsw (embedding real_ip_ops);
SELECT twotower.import_model('fn_pre_s', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "prerank",
  "features": [{"name": "s", "source": "item", "type": "numeric", "transform": "none"}],
  "layers": [{"type": "linear", "weight": "w"}], "output": {"dim": 1}}',
  pg_temp.st('{"w":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}', '\x0000803f'));
SELECT twotower.save_pipeline('fn_s', '{"user_model": "fn_user", "vectors": {"table": "fn_s_items"},
  "item_features": {"table": "fn_s_items"}, "channels": [{"type": "twotower", "index": "fn_s_idx", "k": 4}],
  "stages": [{"type": "model", "model": "fn_pre_s", "keep": 4}], "k": 4}');
SELECT item_id, score, rank FROM twotower.prerank('fn_s', '{"q": [3, 4]}', '{1,2,3,4}');
SELECT twotower.drop_pipeline('fn_s');
SELECT twotower.drop_model('fn_pre_s');
DROP TABLE fn_s_items;

-- A function channel: the application's own list (here the priciest items), merged with the
-- index by quota; called as the caller with the request's features and k plus the excluded.
CREATE FUNCTION fn_priciest(features jsonb, k integer) RETURNS TABLE (item_id bigint, score real)
  LANGUAGE sql STABLE AS $$ SELECT id, price + coalesce((features ->> 'bonus')::real, 0) FROM fn_items ORDER BY price DESC, id LIMIT k $$;
SELECT twotower.save_pipeline('fn_f', '{"user_model": "fn_user", "vectors": {"table": "fn_items"}, "history": "history",
  "channels": [{"name": "pricey", "type": "function", "function": "fn_priciest", "features": ["bonus"], "k": 3},
               {"type": "twotower", "index": "fn_items_idx", "k": 3}],
  "merge": {"strategy": "quota", "options": {"quotas": {"pricey": 2, "twotower": 2}}, "k": 4}, "k": 4}');
-- The channel's list = the function's rows without the history (2), best 3 by score; the
-- request key it declares ("bonus") is allowed next to the strict user tower's.
SELECT kept_items AS pricey FROM twotower.recommend_explain('fn_f', '{"q": [3, 4], "history": [2], "bonus": 1}')
 WHERE stage = 'channel pricey';
SELECT array_agg(item_id ORDER BY score DESC, item_id) AS expected
  FROM (SELECT * FROM fn_priciest('{}', 100) WHERE item_id <> 2 ORDER BY score DESC, item_id LIMIT 3) x;
SELECT item_id, rank, channels FROM twotower.recommend('fn_f', '{"q": [3, 4], "history": [2]}') ORDER BY rank;
-- The stored definition names the function the save found, schema-qualified: a caller whose
-- search_path finds another fn_priciest still runs the saved one.
SELECT definition -> 'channels' -> 0 ->> 'function' AS stored_function FROM twotower.pipelines WHERE name = 'fn_f';
CREATE SCHEMA fn_shadow;
CREATE FUNCTION fn_shadow.fn_priciest(features jsonb, k integer) RETURNS TABLE (item_id bigint, score real)
  LANGUAGE sql STABLE AS $$ SELECT 999::bigint, 1e6::real $$;
SET search_path = fn_shadow, public, twotower;
SELECT bool_and(item_id <> 999) AS saved_function_ran FROM twotower.recommend('fn_f', '{"q": [3, 4], "history": [2]}');
SET search_path = public, twotower;
DROP SCHEMA fn_shadow CASCADE;
-- An item a function returns twice counts once, at its best score.
CREATE FUNCTION fn_twice(features jsonb, k integer) RETURNS TABLE (item_id bigint, score real)
  LANGUAGE sql STABLE AS $$ VALUES (3::bigint, 0.9::real), (4, 0.8), (3, 0.5), (5, 0.1) $$;
SELECT twotower.save_pipeline('fn_f3', '{"user_model": "fn_user", "vectors": {"table": "fn_items"},
  "channels": [{"name": "twice", "type": "function", "function": "fn_twice", "k": 3}], "k": 3}');
SELECT kept_items AS twice FROM twotower.recommend_explain('fn_f3', '{"q": [3, 4]}') WHERE stage = 'channel twice';
SELECT twotower.drop_pipeline('fn_f3');
DROP FUNCTION fn_twice(jsonb, integer);
-- What a function channel names is checked when saved.
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_f2', '{"user_model": "fn_user", "vectors": {"table": "fn_items"},
  "channels": [{"type": "function", "function": "no_such_function", "k": 3}]}')$$);
CREATE FUNCTION fn_scalar(features jsonb, k integer) RETURNS bigint LANGUAGE sql AS $$ SELECT 1::bigint $$;
SELECT pg_temp.err($$SELECT twotower.save_pipeline('fn_f2', '{"user_model": "fn_user", "vectors": {"table": "fn_items"},
  "channels": [{"type": "function", "function": "fn_scalar", "k": 3}]}')$$);
-- A score that is not finite is an error naming the function and the item.
CREATE FUNCTION fn_nan(features jsonb, k integer) RETURNS TABLE (item_id bigint, score real)
  LANGUAGE sql STABLE AS $$ VALUES (3::bigint, 'NaN'::real), (4, 1) $$;
SELECT twotower.save_pipeline('fn_f2', '{"user_model": "fn_user", "vectors": {"table": "fn_items"},
  "channels": [{"type": "function", "function": "fn_nan", "k": 3}]}');
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_f2', '{"q": [3, 4]}')$$);
-- The function runs as the caller: without EXECUTE, 42501.
CREATE ROLE fn_noexec;
GRANT SELECT ON fn_items TO fn_noexec;
REVOKE EXECUTE ON FUNCTION fn_priciest(jsonb, integer) FROM PUBLIC;
SET ROLE fn_noexec;
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_f', '{"q": [3, 4]}')$$);
RESET ROLE;
GRANT EXECUTE ON FUNCTION fn_priciest(jsonb, integer) TO fn_noexec;
SET ROLE fn_noexec;
SELECT count(*) AS with_execute FROM twotower.recommend('fn_f', '{"q": [3, 4]}');
RESET ROLE;
REVOKE ALL ON fn_items FROM fn_noexec;
REVOKE ALL ON FUNCTION fn_priciest(jsonb, integer) FROM fn_noexec;
DROP ROLE fn_noexec;
-- A function dropped under a pipeline: the pipeline's calls fail naming it.
SELECT twotower.drop_pipeline('fn_f2');
DROP FUNCTION fn_nan(jsonb, integer);
DROP FUNCTION fn_scalar(jsonb, integer);
DROP FUNCTION fn_priciest(jsonb, integer);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_f', '{"q": [3, 4]}')$$);
SELECT twotower.drop_pipeline('fn_f');
