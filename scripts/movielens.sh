#!/usr/bin/env bash
# The main job of `make demo`: MovieLens-100k trained, served and evaluated in SQL.
#
# 1. The data comes from the recbole wheel on the Python package index (the MovieLens licence
#    forbids redistribution: it is downloaded at setup time into data/, never committed).
# 2. Users (age, gender, occupation), movies (title, year, genres) and ratings go into tables.
#    Each user's last rating by time is the test item; the second last validates (inside
#    twotower.train). Equal timestamps keep the file's order (the tie rule: see
#    docs/training.md).
# 3. twotower.train learns both towers (options: scripts/movielens-options.json); refresh_item_vectors and CREATE INDEX serve them.
# 4. twotower.evaluate reports HR/NDCG/Recall/MRR@10/50 on the test items, exactly and through
#    the index, next to popularity computed the same way in SQL.
# 5. Item-CF and Swing channels are built (twotower.build_channel), each channel and the merged
#    list of all three (twotower.merge) are scored on the same test items; one user's
#    recommendations with titles, with the channels they came from; then the same funnel saved
#    as a pipeline and served by twotower.recommend (with its explain).
# 6. Cascade pre-ranking (scripts/movielens-cascade.sql): a ranking DNN (the teacher) and a
#    small pre-rank DNN distilled from it (the student) are trained in SQL from a log of
#    requests at the validation position (twotower.train_prerank; options:
#    scripts/movielens-prerank.json, chosen on validation); the cascade merged 300 -> two-tower
#    200 -> student 100 is scored on the test items next to the merged list.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TT_DEMO_PORT:-55432}
DATA=$(pwd)/${TT_DATA:-data}/ml-100k
scripts/cluster.sh start demo "$PORT" >/dev/null
psql_ml() { scripts/cluster.sh psql demo "$PORT" -d movielens "$@"; }

if [ ! -s "$DATA/ml-100k.inter" ]; then
  echo "== downloading MovieLens-100k (inside the recbole 1.2.1 wheel, from the package index)"
  mkdir -p "$DATA/wheel"
  python3 -m pip download -q --no-deps recbole==1.2.1 -d "$DATA/wheel"
  python3 - "$DATA" <<'PY'
import glob, sys, zipfile
out = sys.argv[1]
z = zipfile.ZipFile(glob.glob(out + "/wheel/recbole-1.2.1-*.whl")[0])
for ext in ("inter", "item", "user"):
    with open(f"{out}/ml-100k.{ext}", "wb") as f:
        f.write(z.read(f"recbole/dataset_example/ml-100k/ml-100k.{ext}"))
PY
  rm -rf "$DATA/wheel"
fi
chmod -R a+rX "$(dirname "$DATA")"

echo "== loading users, movies and ratings (database movielens)"
scripts/cluster.sh psql demo "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS movielens" -c "CREATE DATABASE movielens"
psql_ml -q -v data="$DATA" <<'SQL'
CREATE EXTENSION pg_twotower;
CREATE TABLE ml_users (user_id int PRIMARY KEY, age int, gender text, occupation text, zip text);
CREATE TABLE ml_items_raw (item_id int, title text, year text, class text);
-- seq keeps the file's order: the tie rule for equal timestamps.
CREATE TABLE ml_ratings (seq bigserial, user_id int NOT NULL, item_id int NOT NULL, rating real, ts bigint NOT NULL);
\set users :data '/ml-100k.user'
\set items :data '/ml-100k.item'
\set inter :data '/ml-100k.inter'
COPY ml_users FROM :'users' WITH (FORMAT csv, DELIMITER E'\t', HEADER true, QUOTE E'\b');
COPY ml_items_raw FROM :'items' WITH (FORMAT csv, DELIMITER E'\t', HEADER true, QUOTE E'\b');
COPY ml_ratings (user_id, item_id, rating, ts) FROM :'inter' WITH (FORMAT csv, DELIMITER E'\t', HEADER true, QUOTE E'\b');
CREATE TABLE ml_items AS
SELECT item_id, title, CASE WHEN year ~ '^[0-9]{4}$' THEN year::int END AS year,
       string_to_array(nullif(class, ''), ' ') AS genres
  FROM ml_items_raw;
ALTER TABLE ml_items ADD PRIMARY KEY (item_id);
DROP TABLE ml_items_raw;
-- Leave-last-out by time: each user's last rating is the test item; twotower.train holds out
-- the last of what remains (the second last) for validation.
CREATE TEMP TABLE ordered AS
SELECT r.*, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS from_end FROM ml_ratings r;
CREATE TABLE ml_train AS SELECT user_id, item_id, ts FROM ordered WHERE from_end > 1 ORDER BY seq;
CREATE TABLE ml_test AS SELECT user_id, item_id, ts FROM ordered WHERE from_end = 1 ORDER BY seq;
CREATE INDEX ON ml_train (user_id);
ANALYZE ml_users, ml_items, ml_ratings, ml_train, ml_test;
SQL
psql_ml -c "SELECT (SELECT count(*) FROM ml_users) AS users, (SELECT count(*) FROM ml_items) AS movies,
                   (SELECT count(*) FROM ml_ratings) AS ratings, (SELECT count(*) FROM ml_train) AS train,
                   (SELECT count(*) FROM ml_test) AS test"

echo "== training both towers in SQL (twotower.train; one NOTICE per epoch)"
# The options (scripts/movielens-options.json) were chosen on validation only.
psql_ml -v opts="$(cat scripts/movielens-options.json)" <<'SQL'
\timing on
SELECT model, version, kind, parameters, best_epoch, round(valid_recall::numeric, 4) AS valid_hr_at_50,
       round(valid_ndcg::numeric, 4) AS valid_ndcg_at_50, train_examples
  FROM twotower.train('ml_user', 'ml_item', 'ml_train', :'opts',
                      user_features => 'ml_users', item_features => 'ml_items');
SQL

echo "== item vectors, the index, and evaluation on each user's held-out last rating"
psql_ml <<'SQL'
\timing on
CREATE TABLE ml_item_vectors (id bigint PRIMARY KEY, embedding real[]);
SELECT * FROM twotower.refresh_item_vectors('ml_item', 'ml_items', 'ml_item_vectors', id_column => 'item_id');
CREATE INDEX ml_item_vectors_idx ON ml_item_vectors USING twotower_hnsw (embedding real_cosine_ops);
-- Each test user's input: the user's features and history up to now, built by the same
-- function training used (only ml_train is read: the test rating is not in it).
CREATE TABLE ml_queries AS
SELECT t.user_id, twotower.user_features('ml_user', t.user_id::text) AS features, t.item_id::bigint AS target
  FROM ml_test t;
\timing off
\echo == the two-tower model (exact and through the index), training items masked
SELECT method, metric, k, round(value::numeric, 4) AS value, queries
  FROM twotower.evaluate('ml_user', 'ml_item_vectors_idx', 'ml_queries', seen => 'ml_train', k => '{10,50}')
 WHERE metric IN ('hr', 'ndcg') ORDER BY method, metric, k;
\echo == popularity (the most-rated unseen movies), computed the same way
WITH pop AS (SELECT item_id, count(*) AS c FROM ml_train GROUP BY item_id),
ranked AS (
  SELECT t.user_id,
         1 + (SELECT count(*) FROM pop p
               WHERE (p.c > coalesce(tp.c, 0) OR (p.c = coalesce(tp.c, 0) AND p.item_id < t.item_id))
                 AND NOT EXISTS (SELECT 1 FROM ml_train s WHERE s.user_id = t.user_id AND s.item_id = p.item_id)) AS rank
    FROM ml_test t LEFT JOIN pop tp ON tp.item_id = t.item_id)
SELECT 'popularity' AS method, k,
       round(avg((rank <= k)::int), 4) AS hr,
       round(avg(CASE WHEN rank <= k THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg
  FROM ranked, (VALUES (10), (50)) AS ks(k) GROUP BY k ORDER BY k;
SQL

echo "== item-to-item channels (item-CF and Swing) and the merged funnel, on the same test items"
# Options, history lengths and the merge strategy were chosen on validation only
# (bench/movielens_channels.py writes the table of candidates; scripts/movielens-channels.json).
prerank() { python3 -c 'import json, sys; print(json.dumps(json.load(open("scripts/movielens-prerank.json"))[sys.argv[1]]))' "$1"; }
psql_ml -v ch="$(cat scripts/movielens-channels.json)" -v teacher="$(prerank teacher)" -v student="$(prerank student)" <<'SQL'
\timing on
SELECT channel, kind, items, rows, round(seconds::numeric, 1) AS seconds
  FROM twotower.build_channel('ml_itemcf', 'itemcf', 'ml_train', 'ml_itemcf_nb', (:'ch'::jsonb #> '{itemcf,options}') || '{"top_n": 200}');
SELECT channel, kind, items, rows, round(seconds::numeric, 1) AS seconds
  FROM twotower.build_channel('ml_swing', 'swing', 'ml_train', 'ml_swing_nb', (:'ch'::jsonb #> '{swing,options}') || '{"top_n": 200}');
\timing off
-- Each test user's history (most recent first) and every training item (masked).
CREATE TEMP TABLE hist AS
SELECT user_id, array_agg(item_id::bigint ORDER BY ts DESC, ctid DESC) AS items, array_agg(item_id::bigint) AS seen
  FROM ml_train GROUP BY user_id;
-- A channel's recall with the chosen history length and recency weights decay^i.
CREATE FUNCTION pg_temp.i2i(channel text, kind text, items bigint[], seen bigint[], k int, ch jsonb)
RETURNS TABLE (item_id bigint, score real, rank int) LANGUAGE sql STABLE AS $$
  SELECT r.item_id, r.score, r.rank
    FROM twotower.i2i_recall(channel, items[1:(ch #>> ARRAY[kind, 'history'])::int],
           ARRAY(SELECT power((ch #>> ARRAY[kind, 'decay'])::float8, g - 1)::real
                   FROM generate_series(1, least(cardinality(items), (ch #>> ARRAY[kind, 'history'])::int)) g), k, seen) r $$;
-- The funnel's first stages: k candidates from each channel, merged into n.
CREATE FUNCTION pg_temp.merged(features jsonb, items bigint[], seen bigint[], k int, n int, ch jsonb)
RETURNS TABLE (item_id bigint, rank int, channels text[], channel_ranks int[]) LANGUAGE sql STABLE AS $$
  SELECT m.item_id, m.rank, m.channels, m.channel_ranks
    FROM (SELECT array_agg(c) AS c, array_agg(i) AS i, array_agg(s) AS s FROM (
            SELECT 'twotower' AS c, item_id AS i, score AS s
              FROM twotower.recall('ml_user', 'ml_item_vectors_idx', features, k, exclude => seen)
            UNION ALL SELECT 'itemcf', item_id, score FROM pg_temp.i2i('ml_itemcf', 'itemcf', items, seen, k, ch)
            UNION ALL SELECT 'swing', item_id, score FROM pg_temp.i2i('ml_swing', 'swing', items, seen, k, ch)) u) x,
         twotower.merge(x.c, x.i, x.s, n, ch #>> '{merge,strategy}', ch #> '{merge,options}') m $$;
CREATE TEMP TABLE ranked AS
SELECT t.user_id,
       (SELECT rank FROM twotower.recall('ml_user', 'ml_item_vectors_idx', q.features, 50, exclude => h.seen) r
         WHERE r.item_id = t.item_id) AS twotower,
       (SELECT rank FROM pg_temp.i2i('ml_itemcf', 'itemcf', h.items, h.seen, 50, :'ch') r WHERE r.item_id = t.item_id) AS itemcf,
       (SELECT rank FROM pg_temp.i2i('ml_swing', 'swing', h.items, h.seen, 50, :'ch') r WHERE r.item_id = t.item_id) AS swing,
       (SELECT rank FROM pg_temp.merged(q.features, h.items, h.seen, 200, 50, :'ch') m WHERE m.item_id = t.item_id) AS merged
  FROM ml_test t JOIN ml_queries q USING (user_id) JOIN hist h USING (user_id);
\echo == HR and NDCG on the held-out last ratings: each channel alone, and the merged list
SELECT c AS channel, k,
       round(avg((coalesce(rank, 1000000) <= k)::int), 4) AS hr,
       round(avg(CASE WHEN rank <= k THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg
  FROM ranked, LATERAL (VALUES ('two-tower', twotower), ('item-CF', itemcf), ('Swing', swing), ('merged', merged)) AS v(c, rank),
       (VALUES (10), (50)) AS ks(k)
 GROUP BY c, k ORDER BY k, hr DESC;
\echo == user 1: the last five movies rated, then the top-10 of the merged list (unseen), with titles and provenance
SELECT i.title, i.year, i.genres FROM ml_train r JOIN ml_items i USING (item_id)
 WHERE r.user_id = 1 ORDER BY r.ts DESC LIMIT 5;
SELECT m.rank, i.title, i.year, m.channels, m.channel_ranks
  FROM hist h, pg_temp.merged(twotower.user_features('ml_user', '1'), h.items, h.seen, 200, 10, :'ch') m
       JOIN ml_items i ON i.item_id = m.item_id
 WHERE h.user_id = 1 ORDER BY m.rank;
\echo == the same funnel as one saved pipeline: twotower.recommend, and what each step did
SELECT twotower.save_pipeline('ml_feed', jsonb_build_object(
  'user_model', 'ml_user', 'vectors', '{"table": "ml_item_vectors"}'::jsonb, 'history', 'history',
  'channels', jsonb_build_array(
     '{"name": "twotower", "type": "twotower", "index": "ml_item_vectors_idx", "k": 200}'::jsonb,
     jsonb_build_object('name', 'itemcf', 'type', 'i2i', 'channel', 'ml_itemcf', 'k', 200,
                        'history_len', (:'ch'::jsonb #>> '{itemcf,history}')::int, 'decay', (:'ch'::jsonb #>> '{itemcf,decay}')::float8),
     jsonb_build_object('name', 'swing', 'type', 'i2i', 'channel', 'ml_swing', 'k', 200,
                        'history_len', (:'ch'::jsonb #>> '{swing,history}')::int, 'decay', (:'ch'::jsonb #>> '{swing,decay}')::float8)),
  'merge', jsonb_build_object('strategy', :'ch'::jsonb #>> '{merge,strategy}', 'options', :'ch'::jsonb #> '{merge,options}', 'k', 50),
  'k', 10));
SELECT r.rank, i.title, i.year, r.channels, r.channel_ranks
  FROM hist h, twotower.recommend('ml_feed', twotower.user_features('ml_user', '1'), exclude => h.seen) r
       JOIN ml_items i ON i.item_id = r.item_id
 WHERE h.user_id = 1 ORDER BY r.rank;
SELECT step, stage, received, kept, round(ms::numeric, 2) AS ms
  FROM hist h, twotower.recommend_explain('ml_feed', twotower.user_features('ml_user', '1'), exclude => h.seen)
 WHERE h.user_id = 1 ORDER BY step;
SELECT bool_and(same) AS recommend_equals_the_merged_list FROM (
  SELECT (SELECT array_agg(item_id ORDER BY rank) FROM twotower.recommend('ml_feed', q.features, exclude => h.seen))
       = (SELECT array_agg(item_id ORDER BY rank) FROM pg_temp.merged(q.features, h.items, h.seen, 200, 10, :'ch')) AS same
    FROM ml_queries q JOIN hist h USING (user_id) WHERE q.user_id <= 100) x;
\echo == cascade pre-ranking: a teacher and a distilled student trained in SQL (scripts/movielens-cascade.sql)
\i scripts/movielens-cascade.sql
SQL
