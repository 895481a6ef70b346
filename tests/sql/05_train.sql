-- Training in the database: twotower.train on synthetic data with a known structure (users and
-- items in 5 taste groups), the trained towers served like imported ones, bad input, privileges
-- and cancellation (no partial model version).
SET search_path = public, twotower;
\set VERBOSITY terse
CREATE FUNCTION pg_temp.err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN st || ': ' || msg || coalesce(' | ' || nullif(det, ''), '');
END $$;
CREATE TABLE tr_items AS SELECT i AS item_id, 'g' || (i % 5) AS genre FROM generate_series(0, 99) i;
CREATE TABLE tr_users AS SELECT u AS user_id, 20 + u % 30 AS age FROM generate_series(0, 199) u;
-- 15 interactions per user, 90 % of them with items of the user's group (u % 5).
CREATE TABLE tr_events AS
SELECT u AS user_id,
       CASE WHEN (u * 7 + t * 13) % 10 < 9 THEN (u % 5) + 5 * ((u * 31 + t * 17) % 20)
            ELSE (u * 37 + t * 11) % 100 END AS item_id,
       timestamptz '2026-01-01' + make_interval(hours => t * 24 + u % 24) AS ts
  FROM generate_series(0, 199) u, generate_series(0, 14) t;
\set opts '{"dim": 8, "epochs": 6, "k": 10, "batch_size": 64, "lr": 0.01, "sparse_lr": 0.05, "temperature": 0.1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "age", "type": "numeric"}, {"name": "history", "type": "history", "max_len": 10, "decay": {"position": 0.8}}], "hidden": [16]}, "item": {"features": [{"name": "item_id", "type": "categorical"}, {"name": "genre", "type": "categorical", "dim": 4}], "hidden": [16]}}'
-- Per-epoch NOTICEs carry timings: not part of the expected output.
SET client_min_messages = warning;
-- (Training is deterministic, seed 42: validation recall@10 first reaches 1 in epoch 3 and
-- never beats it, so the best epoch is 3, not the last.)
SELECT model, version, kind, parameters > 0 AS has_parameters, best_epoch,
       valid_recall > 0.5 AS learned, valid_ndcg > 0.2 AS ndcg_ok, train_examples
  FROM twotower.train('tr_user', 'tr_item', 'tr_events', :'opts',
                      user_features => 'tr_users', item_features => 'tr_items');
RESET client_min_messages;
SELECT name, version, kind, dim, metric, active FROM twotower.models WHERE name LIKE 'tr\_%' ORDER BY name;

-- The trained towers are ordinary models: item vectors, an index, recall.
CREATE TABLE tr_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT inserted FROM twotower.refresh_item_vectors('tr_item', 'tr_items', 'tr_vectors', id_column => 'item_id');
CREATE INDEX ON tr_vectors USING twotower_hnsw (embedding real_cosine_ops);
-- A user of group 3 with a group-3 history gets mostly group-3 items.
SELECT count(*) FILTER (WHERE item_id % 5 = 3) >= 7 AS mostly_own_group
  FROM twotower.recall('tr_user', 'tr_vectors_embedding_idx',
       '{"user_id": 8, "age": 28, "history": {"ids": [3, 13, 23], "weights": [1, 0.8, 0.64]}}', 10);
-- Serving inputs come from the training sources, built by the same function as in training:
-- user 8's row of tr_users (its other columns left out) and its history up to the moment.
SELECT twotower.user_features('tr_user', '8', at => timestamptz '2026-01-01' + interval '2 days 9 hours');
SELECT twotower.user_features('tr_user', '8', at => timestamptz '2026-01-01' - interval '1 day');
-- An integer id is the same id as its text.
SELECT twotower.user_features('tr_user', 8) = twotower.user_features('tr_user', '8') AS same_input;
SELECT pg_temp.err($q$SELECT twotower.user_features('tr_item', '8')$q$);
-- A user's row holding a number beyond double precision is 22003 naming the source (the row
-- was read as missing: every feature's default, silently).
BEGIN;
ALTER TABLE tr_users ADD COLUMN huge numeric;
UPDATE tr_users SET huge = 1e400 WHERE user_id = 8;
SELECT pg_temp.err($q$SELECT twotower.user_features('tr_user', '8')$q$);
ROLLBACK;
-- A feature column named like the readers' own alias (t) is read as the column, in training
-- and in user_features.
CREATE TABLE tr_users_t AS SELECT user_id, age AS t FROM tr_users;
SET client_min_messages = warning;
SELECT model, train_examples > 0 AS trained FROM twotower.train('tr_user_t', 'tr_item_t', 'tr_events',
  '{"dim": 4, "epochs": 1, "k": 10, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "t", "type": "numeric"}]}, "item": {"features": [{"name": "item_id", "type": "categorical"}]}}',
  user_features => 'tr_users_t');
RESET client_min_messages;
SELECT twotower.user_features('tr_user_t', '8') ->> 't' AS t;
SELECT twotower.drop_model('tr_user_t'), twotower.drop_model('tr_item_t');
DROP TABLE tr_users_t;
-- Evaluation: each user's last interaction as the target, the earlier ones masked.
CREATE TABLE tr_queries AS
SELECT user_id, twotower.user_features('tr_user', user_id::text, at => max(ts) - interval '1 second') AS features,
       (array_agg(item_id ORDER BY ts DESC))[1]::bigint AS target
  FROM tr_events GROUP BY user_id;
CREATE VIEW tr_seen AS
SELECT e.user_id, e.item_id FROM tr_events e
 WHERE e.ts < (SELECT max(ts) FROM tr_events x WHERE x.user_id = e.user_id);
SELECT method, metric, k, value > 0.3 AS good, queries <= 200 AS counted
  FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', seen => 'tr_seen', k => '{10}')
 WHERE metric IN ('hr', 'ndcg') ORDER BY method, metric;
-- The index loses little on 100 items: its HR@10 is within 0.05 of exact search.
SELECT abs(max(value) FILTER (WHERE method = 'exact') - max(value) FILTER (WHERE method = 'index')) < 0.05 AS close
  FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', seen => 'tr_seen', k => '{10}')
 WHERE metric = 'hr';
SELECT pg_temp.err($q$SELECT * FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', k => '{0}')$q$);
-- A NULL element of k is refused (it was a panic in pgrx's array conversion: XX000).
SELECT pg_temp.err($q$SELECT * FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', k => '{10,NULL}')$q$);
-- A row a partial index leaves out, with a NULL element in its vector, is no item (reading it
-- was a panic: XX000); evaluate runs over the others.
CREATE TABLE tr_vectors_p AS SELECT * FROM tr_vectors;
ALTER TABLE tr_vectors_p ADD PRIMARY KEY (id);
INSERT INTO tr_vectors_p SELECT 100000, array_fill(NULL::real, ARRAY[array_length(embedding, 1)]) FROM tr_vectors LIMIT 1;
CREATE INDEX tr_vectors_p_idx ON tr_vectors_p USING twotower_hnsw (embedding real_cosine_ops) WHERE id < 100000;
SELECT count(*) AS rows, bool_and(queries > 0) AS counted
  FROM twotower.evaluate('tr_user', 'tr_vectors_p_idx', 'tr_queries', seen => 'tr_seen', k => '{10}');
DROP TABLE tr_vectors_p;
-- Negative feedback: a label column (above 0 positive, below 0 negative feedback, 0 neither).
-- tr_events as positives, and per user two disliked items and one neutral one, newer than
-- everything else.
CREATE TABLE tr_fb AS
SELECT user_id, item_id, ts, 1 AS label FROM tr_events
UNION ALL
SELECT u, (u % 5) + 5 * x, timestamptz '2026-02-01' + make_interval(mins => u * 3 + x), CASE WHEN x < 2 THEN -1 ELSE 0 END
  FROM generate_series(0, 199) u, generate_series(0, 2) x;
SET client_min_messages = warning;
-- The examples are tr_events' (2800 after validation): neither feedback row is a positive.
SELECT model, train_examples FROM twotower.train('tr_nf_user', 'tr_nf_item', 'tr_fb', :'opts',
       user_features => 'tr_users', item_features => 'tr_items', label_column => 'label');
RESET client_min_messages;
-- Histories hold positive feedback only, at serving time too: user 8's input is the same as
-- the model trained on tr_events alone (the disliked and neutral rows are its newest).
SELECT twotower.user_features('tr_nf_user', '8') = twotower.user_features('tr_user', '8') AS positives_only;
-- Negative feedback as a feature: a history of the user's disliked items (rows below 0), built
-- the same way at serving time; it needs the label column.
SET client_min_messages = warning;
SELECT model, train_examples FROM twotower.train('tr_nh_user', 'tr_nh_item', 'tr_fb',
  '{"dim": 8, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"},
     {"name": "history", "type": "history", "max_len": 10},
     {"name": "disliked", "type": "history", "max_len": 5, "feedback": "negative"}]},
   "item": {"features": [{"name": "item_id", "type": "categorical"}]}}',
  label_column => 'label') WHERE kind = 'user';
RESET client_min_messages;
SELECT twotower.user_features('tr_nh_user', '8') -> 'disliked' AS disliked,
       jsonb_array_length(twotower.user_features('tr_nh_user', '8') -> 'history') AS liked;
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb',
  '{"dim": 8, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"},
     {"name": "disliked", "type": "history", "feedback": "negative"}]},
   "item": {"features": [{"name": "item_id", "type": "categorical"}]}}')$q$);
SELECT twotower.drop_model('tr_nh_user'), twotower.drop_model('tr_nh_item');
-- A stored source dropped since: 42P01 naming it (was 22023).
CREATE TABLE tr_users_gone AS SELECT * FROM tr_users;
SET client_min_messages = warning;
SELECT model FROM twotower.train('tr_gone_user', 'tr_gone_item', 'tr_events',
  '{"dim": 4, "epochs": 1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "age", "type": "numeric"}]},
    "item": {"features": [{"name": "item_id", "type": "categorical"}]}}', user_features => 'tr_users_gone') WHERE kind = 'user';
RESET client_min_messages;
DROP TABLE tr_users_gone;
SELECT pg_temp.err($q$SELECT twotower.user_features('tr_gone_user', '8')$q$);
SELECT twotower.drop_model('tr_gone_user'), twotower.drop_model('tr_gone_item');
-- A boolean label: true positive, false negative feedback.
CREATE TABLE tr_fb_bool AS SELECT user_id, item_id, ts, label > 0 AS label FROM tr_fb WHERE label <> 0;
SET client_min_messages = warning;
SELECT model, train_examples FROM twotower.train('tr_nf_user', 'tr_nf_item', 'tr_fb_bool', :'opts',
       user_features => 'tr_users', item_features => 'tr_items', label_column => 'label', activate => false)
 WHERE kind = 'user';
RESET client_min_messages;
-- Bad labels: the wrong type, NaN, NULL, no such column.
CREATE TABLE tr_fb_bad AS SELECT user_id, item_id, ts, label::text AS tlabel, label::float8 AS flabel FROM tr_fb LIMIT 20;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb_bad', %L, label_column => 'tlabel')$q$, :'opts'));
UPDATE tr_fb_bad SET flabel = 'NaN' WHERE item_id = (SELECT min(item_id) FROM tr_fb_bad);
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb_bad', %L, label_column => 'flabel')$q$, :'opts'));
UPDATE tr_fb_bad SET flabel = NULL WHERE flabel = 'NaN';
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb_bad', %L, label_column => 'flabel')$q$, :'opts'));
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb_bad', %L, label_column => 'nolabel')$q$, :'opts'));
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_fb', %L, label_column => 'label')$q$,
  jsonb_set(:'opts'::jsonb, '{negative_feedback}', '{"weight": -1}')));
-- NEG@k: the held-out disliked items as negative_queries (two targets per user, one query
-- each). Users all of whose targets are masked as seen are not counted.
CREATE TABLE tr_negq AS
SELECT f.user_id, q.features, f.item_id::bigint AS target
  FROM tr_fb f JOIN tr_queries q USING (user_id) WHERE f.label < 0;
SELECT method, metric, k, value BETWEEN 0 AND 1 AS in_range, queries
  FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', seen => 'tr_seen', k => '{10}',
                         negative_queries => 'tr_negq')
 ORDER BY method, metric;
-- NEG@k is the recall of those targets, ranked as queries' are.
SELECT (SELECT value FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', seen => 'tr_seen',
                                            k => '{10}', negative_queries => 'tr_negq')
         WHERE method = 'exact' AND metric = 'neg_recall')
     = (SELECT value FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_negq', seen => 'tr_seen',
                                            k => '{10}')
         WHERE method = 'exact' AND metric = 'recall') AS same_ranking;
-- Popularity (the head: the 20 % most popular items by their count in seen): the head's share
-- of the exact top-10 slots and the catalogue's share in some top 10, recomputed here with
-- sequential scans (within one slot / one item of a near-tie).
-- Only queries whose target is not masked count (184 of the 200).
CREATE TEMP TABLE tr_pop AS
SELECT metric, value, queries FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', seen => 'tr_seen',
                                                     k => '{10}', via_index => false)
 WHERE metric IN ('head_share', 'coverage', 'tail_hr');
SET enable_indexscan = off;
SET enable_bitmapscan = off;
WITH cnt AS (SELECT v.id, count(s.item_id) AS c FROM tr_vectors v LEFT JOIN tr_seen s ON s.item_id = v.id GROUP BY v.id),
head AS (SELECT id FROM cnt WHERE c > 0 ORDER BY c DESC, id LIMIT ceil(0.2 * (SELECT count(*) FROM tr_vectors))),
q AS (SELECT * FROM tr_queries q
       WHERE NOT EXISTS (SELECT 1 FROM tr_seen s WHERE s.user_id = q.user_id AND s.item_id = q.target)),
tops AS (
  SELECT q.user_id, q.target, t.id FROM q CROSS JOIN LATERAL (
    SELECT v.id FROM tr_vectors v
     WHERE NOT EXISTS (SELECT 1 FROM tr_seen s WHERE s.user_id = q.user_id AND s.item_id = v.id)
     ORDER BY v.embedding <=> twotower.embed_user('tr_user', q.features), v.id LIMIT 10) t),
tail AS (SELECT user_id, bool_or(id = target) AS hit FROM tops
          WHERE target NOT IN (SELECT id FROM head) GROUP BY user_id)
SELECT abs((SELECT value FROM tr_pop WHERE metric = 'head_share')
           - (SELECT avg((id IN (SELECT id FROM head))::int) FROM tops)) < 0.002 AS head_share_ok,
       abs((SELECT value FROM tr_pop WHERE metric = 'coverage')
           - (SELECT count(DISTINCT id)::float8 / (SELECT count(*) FROM tr_vectors) FROM tops)) < 0.02 AS coverage_ok,
       (SELECT queries FROM tr_pop WHERE metric = 'tail_hr') = (SELECT count(*) FROM tail) AS tail_users_ok,
       abs((SELECT value FROM tr_pop WHERE metric = 'tail_hr') - (SELECT avg(hit::int) FROM tail)) < 0.01 AS tail_hr_ok,
       (SELECT count(*) FROM tail) AS tail_users;
RESET enable_indexscan;
RESET enable_bitmapscan;
-- A user's second row is a second target of the same query, not a second query (still 184).
CREATE TABLE tr_queries2 AS SELECT * FROM tr_queries UNION ALL
  SELECT user_id, features, target + 1 FROM tr_queries WHERE user_id = 8;
SELECT metric, queries FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries2', seen => 'tr_seen',
                                              k => '{10}', via_index => false)
 WHERE metric = 'recall';
SELECT twotower.drop_model('tr_nf_user'), twotower.drop_model('tr_nf_item');
DROP TABLE tr_fb, tr_fb_bool, tr_fb_bad, tr_negq, tr_queries2;
-- Training is deterministic for a seed: a second run gives the same weights.
SET client_min_messages = warning;
SELECT version FROM twotower.train('tr_user', 'tr_item', 'tr_events', :'opts',
       user_features => 'tr_users', item_features => 'tr_items', activate => false);
RESET client_min_messages;
SELECT count(DISTINCT checksum) AS distinct_weights FROM twotower.model_version WHERE model = 'tr_user';

-- Incremental: 20 new users (200..219) with interactions of their group; the run continues
-- from the active versions (their options, dense layers frozen) and adds the new ids.
CREATE TABLE tr_new AS
SELECT u AS user_id, (u % 5) + 5 * ((u * 13 + t * 7) % 20) AS item_id,
       timestamptz '2026-02-01' + make_interval(hours => t * 24 + u % 24) AS ts
  FROM generate_series(200, 219) u, generate_series(0, 9) t;
SET client_min_messages = warning;
SELECT model, version, kind, valid_recall > 0.3 AS learned
  FROM twotower.train('tr_user', 'tr_item', 'tr_new', '{"incremental": true, "epochs": 3}');
RESET client_min_messages;
SELECT v.version, jsonb_array_length(v.spec -> 'features' -> 0 -> 'vocabulary') AS user_ids,
       v.train_options -> 'options' -> 'freeze_dense' AS frozen
  FROM twotower.model_version v WHERE v.model = 'tr_user' ORDER BY v.version;
-- The new user 205 (group 0) is served by the updated towers (item vectors refreshed).
SELECT updated > 0 AS refreshed FROM twotower.refresh_item_vectors('tr_item', 'tr_items', 'tr_vectors', id_column => 'item_id');
SELECT count(*) FILTER (WHERE item_id % 5 = 0) >= 6 AS mostly_own_group
  FROM twotower.recall('tr_user', 'tr_vectors_embedding_idx', twotower.user_features('tr_user', '205', interactions => 'tr_new'), 10);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_user', 'tr_item', 'tr_new', '{"incremental": true, "dim": 4}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_nobase_u', 'tr_nobase_i', 'tr_new', '{"incremental": true}')$q$);
-- Hard negatives (here: items of the next group) mixed into a per-row loss's negatives.
CREATE TABLE tr_hard AS
SELECT u AS user_id, ((u % 5) + 1) % 5 + 5 * k AS item_id FROM generate_series(0, 199) u, generate_series(0, 3) k;
SET client_min_messages = warning;
SELECT kind, valid_recall > 0.5 AS learned
  FROM twotower.train('tr_user_h', 'tr_item_h', 'tr_events',
                      :'opts'::jsonb || '{"loss": "pointwise", "negatives": 3, "hard_ratio": 0.34}',
                      user_features => 'tr_users', item_features => 'tr_items', hard_negatives => 'tr_hard');
RESET client_min_messages;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', %L)$q$, :'opts'::jsonb || '{"hard_ratio": 0.5}'));
-- Every layer and feature kind the engine trains, from SQL columns: a real[] column as a dense
-- feature, numbers in buckets (quantiles of the data, or given boundaries), SENet and BatchNorm;
-- the result is served like any model.
CREATE TABLE tr_items2 AS
SELECT item_id, genre, (item_id % 5) * 10 + (item_id % 7) AS price,
       ARRAY[cos(item_id % 5), sin(item_id % 5), 0.5]::real[] AS vec FROM tr_items;
\set opts2 '{"dim": 8, "epochs": 6, "k": 10, "batch_size": 64, "lr": 0.01, "sparse_lr": 0.05, "temperature": 0.1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "age", "type": "bucketize", "buckets": 5, "dim": 4}, {"name": "history", "type": "history", "max_len": 10}], "hidden": [16], "senet": 2, "batch_norm": true}, "item": {"features": [{"name": "item_id", "type": "categorical"}, {"name": "price", "type": "bucketize", "boundaries": [10, 20, 30, 40], "dim": 4}, {"name": "vec", "type": "dense", "dim": 3}], "hidden": [16], "senet": 2, "batch_norm": true, "shortcut": ["vec"]}}'
SET client_min_messages = warning;
SELECT kind, valid_recall > 0.5 AS learned
  FROM twotower.train('tr_user_x', 'tr_item_x', 'tr_events', :'opts2', user_features => 'tr_users', item_features => 'tr_items2');
RESET client_min_messages;
SELECT model, spec ? 'senet' AS senet, spec -> 'layers' @> '[{"type": "batchnorm"}]' AS batch_norm,
       spec #> '{features,1,type}' AS second_feature, spec #> '{features,1,boundaries}' AS boundaries
  FROM twotower.model_version WHERE model IN ('tr_user_x', 'tr_item_x') ORDER BY model;
CREATE TABLE tr_vectors_x (id bigint PRIMARY KEY, embedding real[]);
SELECT inserted FROM twotower.refresh_item_vectors('tr_item_x', 'tr_items2', 'tr_vectors_x', id_column => 'item_id');
SELECT count(*) FILTER (WHERE item_id % 5 = 3) >= 7 AS mostly_own_group
  FROM (SELECT v.id AS item_id FROM tr_vectors_x v
         ORDER BY v.embedding <=> twotower.embed_user('tr_user_x', twotower.user_features('tr_user_x', 8)) LIMIT 10) s;
-- A dense value of the wrong length is an error that names the item.
UPDATE tr_items2 SET vec = '{1,2}' WHERE item_id = 7;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_user_x', 'tr_item_x', 'tr_events', %L, user_features => 'tr_users', item_features => 'tr_items2')$q$, :'opts2'));

-- Graph towers trained in the database: branches joined by attention fusion (with SENet in
-- front), parallel two-towers (inner product, one weight per sub-tower pair), and dual
-- augmented id vectors; each served and searched like any model.
\set optsg '{"dim": 8, "epochs": 6, "k": 10, "batch_size": 64, "lr": 0.01, "sparse_lr": 0.05, "temperature": 0.1, "user": {"features": [{"name": "user_id", "type": "categorical"}, {"name": "age", "type": "numeric"}, {"name": "history", "type": "history", "max_len": 10}], "senet": 2, "branches": [{"name": "deep", "features": ["user_id", "history"], "hidden": [16]}, {"name": "wide", "features": ["user_id", "age"]}], "fusion": "attention"}, "item": {"features": [{"name": "item_id", "type": "categorical"}, {"name": "genre", "type": "categorical", "dim": 4}], "branches": [{"name": "deep", "hidden": [16]}, {"name": "wide", "features": ["item_id"]}], "fusion": "attention"}}'
SET client_min_messages = warning;
SELECT kind, valid_recall > 0.5 AS learned
  FROM twotower.train('tr_user_g', 'tr_item_g', 'tr_events', :'optsg', user_features => 'tr_users', item_features => 'tr_items');
SELECT kind, valid_recall > 0.5 AS learned
  FROM twotower.train('tr_user_p', 'tr_item_p', 'tr_events',
       jsonb_set(jsonb_set(:'optsg'::jsonb, '{user,fusion}', '"parallel"'), '{item,fusion}', '"parallel"'),
       user_features => 'tr_users', item_features => 'tr_items');
SELECT kind, valid_recall > 0.5 AS learned
  FROM twotower.train('tr_user_a', 'tr_item_a', 'tr_events',
       :'opts'::jsonb || '{"dual_augmented": {"user": "user_id", "item": "item_id", "lambda": 0.5}}'
         || jsonb_build_object('user', jsonb_set(:'opts'::jsonb -> 'user', '{features,0,dim}', '8'),
                               'item', jsonb_set(:'opts'::jsonb -> 'item', '{features,0,dim}', '8')),
       user_features => 'tr_users', item_features => 'tr_items');
RESET client_min_messages;
SELECT model, metric, spec ? 'graph' AS graph, spec ? 'layers' AS layers, spec #>> '{output,node}' AS output_node,
       (SELECT string_agg(coalesce(n ->> 'combine', 'stack'), ',') FROM jsonb_array_elements(spec -> 'graph') n) AS nodes
  FROM twotower.model_version
 WHERE model IN ('tr_user_g', 'tr_item_g', 'tr_user_p', 'tr_item_p', 'tr_user_a') ORDER BY model;
CREATE TABLE tr_vectors_g (id bigint PRIMARY KEY, embedding real[]);
SELECT inserted FROM twotower.refresh_item_vectors('tr_item_g', 'tr_items', 'tr_vectors_g', id_column => 'item_id');
CREATE INDEX tr_vectors_g_idx ON tr_vectors_g USING twotower_hnsw (embedding real_cosine_ops);
SELECT count(*) FILTER (WHERE item_id % 5 = 3) >= 7 AS mostly_own_group
  FROM twotower.recall('tr_user_g', 'tr_vectors_g_idx', twotower.user_features('tr_user_g', 8), 10);
-- Parallel towers serve inner-product vectors: an ip index, and a cosine one is refused.
CREATE TABLE tr_vectors_p (id bigint PRIMARY KEY, embedding real[]);
SELECT inserted FROM twotower.refresh_item_vectors('tr_item_p', 'tr_items', 'tr_vectors_p', id_column => 'item_id');
CREATE INDEX tr_vectors_p_idx ON tr_vectors_p USING twotower_hnsw (embedding real_ip_ops);
SELECT count(*) FILTER (WHERE item_id % 5 = 3) >= 7 AS mostly_own_group
  FROM twotower.recall('tr_user_p', 'tr_vectors_p_idx', twotower.user_features('tr_user_p', 8), 10);
SELECT pg_temp.err($q$SELECT count(*) FROM twotower.recall('tr_user_p', 'tr_vectors_g_idx', twotower.user_features('tr_user_p', 8), 10)$q$);
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u9', 'tr_i9', 'tr_events', %L)$q$,
       jsonb_set(:'optsg'::jsonb, '{user,fusion}', '"parallel"')));
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u9', 'tr_i9', 'tr_events', %L)$q$,
       jsonb_set(:'optsg'::jsonb, '{user,branches,0,features}', '["nope"]')));
-- An augmented vector is as wide as the towers' output (dim 8 here).
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u9', 'tr_i9', 'tr_events', %L)$q$,
       :'opts'::jsonb || '{"dual_augmented": {"user": "user_id", "item": "item_id"}}'
         || jsonb_build_object('item', jsonb_set(:'opts'::jsonb -> 'item', '{features,0,dim}', '4'))));
DROP TABLE tr_vectors_g, tr_vectors_p;
SELECT twotower.drop_model(m) FROM unnest(ARRAY['tr_user_g', 'tr_item_g', 'tr_user_p', 'tr_item_p', 'tr_user_a', 'tr_item_a']) m;

-- Memory: five more runs in this backend leave its resident size flat.
CREATE FUNCTION pg_temp.rss_kb() RETURNS bigint LANGUAGE sql AS $$
  SELECT (regexp_match(pg_read_file('/proc/' || pg_backend_pid() || '/status'), 'VmRSS:\s+(\d+)'))[1]::bigint $$;
SELECT pg_temp.rss_kb() AS rss_before \gset
SET client_min_messages = warning;
SELECT count(*) AS versions
  FROM generate_series(1, 5) g,
       LATERAL twotower.train('tr_rss_u', 'tr_rss_i', 'tr_events', :'opts', user_features => 'tr_users', item_features => 'tr_items') t;
RESET client_min_messages;
SELECT pg_temp.rss_kb() - :rss_before < 20000 AS rss_flat;
SELECT twotower.drop_model('tr_rss_u'), twotower.drop_model('tr_rss_i');
-- Bad options and input: clear SQLSTATEs, nothing stored.
-- A NULL where a value is required names the argument (22004), not an internal error.
SELECT pg_temp.err($q$SELECT * FROM twotower.train(NULL, 'tr_i9', 'tr_events', '{}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_u9', 'tr_i9', 'tr_events', NULL)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_u9', 'tr_i9', 'tr_events', '{}', user_column => NULL)$q$);
SELECT pg_temp.err($q$SELECT twotower.user_features(NULL::text, '8')$q$);
SELECT pg_temp.err($q$SELECT twotower.user_features('tr_user', NULL::bigint)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.evaluate('tr_user', NULL, 'tr_queries')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.evaluate('tr_user', 'tr_vectors_embedding_idx', 'tr_queries', k => NULL)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', '{"loss": "listwise", "user": {"features": [{"name": "user_id", "type": "categorical"}]}, "item": {"features": [{"name": "item_id", "type": "categorical"}]}}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', '{"user": {"features": [{"name": "user_id", "type": "categorical"}]}}')$q$);
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', %L, time_column => 'when')$q$, :'opts'));
CREATE TABLE tr_textts AS SELECT user_id, item_id, ts::text AS ts FROM tr_events LIMIT 5;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_textts', %L)$q$, :'opts'));
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_u2', 'tr_events', %L)$q$, :'opts'));
CREATE TABLE tr_empty (user_id bigint, item_id bigint, ts timestamptz);
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_empty', %L)$q$, :'opts'));
INSERT INTO tr_empty VALUES (1, 2, now()), (1, NULL, now());
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_empty', %L)$q$, :'opts'));
CREATE TABLE tr_badusers AS SELECT 1::bigint AS user_id, 'old'::text AS age;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', %L, user_features => 'tr_badusers', item_features => 'tr_items')$q$, :'opts'));
SET maintenance_work_mem = '1MB';
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', %L, user_features => 'tr_users', item_features => 'tr_items')$q$, :'opts'));
-- Dense layers count too: 16 hidden layers of 4096 (about 270 M parameters per tower) are
-- refused at once under 256MB, before any parameter is drawn.
SET maintenance_work_mem = '256MB';
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u2', 'tr_i2', 'tr_events', %L, user_features => 'tr_users', item_features => 'tr_items')$q$,
       jsonb_set(jsonb_set(:'opts'::jsonb, '{user,hidden}', to_jsonb(array_fill(4096, ARRAY[16]))), '{item,hidden}', to_jsonb(array_fill(4096, ARRAY[16])))));
RESET maintenance_work_mem;
SELECT count(*) AS stored FROM twotower.models WHERE name IN ('tr_u2', 'tr_i2');

-- Privileges: a role that may not create models is refused before anything is read; one that
-- may, but cannot read the interactions, gets the table's permission error.
CREATE ROLE tt_trainer;
GRANT USAGE ON SCHEMA public TO tt_trainer;
SET ROLE tt_trainer;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u3', 'tr_i3', 'tr_events', %L, user_features => 'tr_users', item_features => 'tr_items')$q$, :'opts'));
RESET ROLE;
GRANT twotower_admin TO tt_trainer;
SET ROLE tt_trainer;
SELECT pg_temp.err(format($q$SELECT * FROM twotower.train('tr_u3', 'tr_i3', 'tr_events', %L, user_features => 'tr_users', item_features => 'tr_items')$q$, :'opts'));
RESET ROLE;

-- A cancel (here statement_timeout) mid-training stops within the step and stores nothing:
-- it ends within 3 s (10 times the timeout; 1000 epochs would run for minutes), on the
-- server's clock.
SELECT clock_timestamp() AS cancel_start \gset
SET statement_timeout = '300ms';
SET client_min_messages = warning;
-- (PL/pgSQL handlers do not catch a cancel: the statement itself fails.)
SELECT * FROM twotower.train('tr_u4', 'tr_i4', 'tr_events', jsonb_set(:'opts'::jsonb, '{epochs}', '1000') || '{"patience": 1000}', user_features => 'tr_users', item_features => 'tr_items');
RESET statement_timeout;
RESET client_min_messages;
SELECT clock_timestamp() - :'cancel_start'::timestamptz BETWEEN interval '300 ms' AND interval '3 s' AS stopped_at_the_timeout;
SELECT count(*) AS stored FROM twotower.models WHERE name IN ('tr_u4', 'tr_i4');

DROP VIEW tr_seen;
DROP TABLE tr_items, tr_users, tr_events, tr_vectors, tr_empty, tr_badusers, tr_textts, tr_queries, tr_hard, tr_new;
SELECT twotower.drop_model('tr_user');
SELECT twotower.drop_model('tr_item');
SELECT twotower.drop_model('tr_user_h');
SELECT twotower.drop_model('tr_item_h');
REVOKE twotower_admin FROM tt_trainer;
REVOKE USAGE ON SCHEMA public FROM tt_trainer;
DROP ROLE tt_trainer;
