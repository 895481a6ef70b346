-- Serving in production: splits (variants of a pipeline with a deterministic traffic split),
-- the pipelines' change history, the impression log and feedback, online metrics, the log as
-- training examples; bad input and privileges.
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
CREATE FUNCTION pg_temp.st(h text, d bytea) RETURNS bytea LANGUAGE sql AS $$
    SELECT set_byte(set_byte('\x0000000000000000'::bytea, 0, length(convert_to(h, 'UTF8')) % 256), 1,
                    length(convert_to(h, 'UTF8')) / 256) || convert_to(h, 'UTF8') || d $$;

-- A user tower whose vector is the request's "q"; twelve items on the unit circle; two
-- pipelines that differ in k (3 and 4), so a list's length tells which one served it.
SELECT twotower.import_model('sv_user', '{"format": "pg_twotower.tower", "spec_version": 1, "kind": "user",
  "features": [{"name": "q", "type": "dense", "dim": 2}], "layers": [], "output": {"dim": 2, "metric": "ip"}}',
  pg_temp.st('{}', ''));
SELECT twotower.grant_model_usage('sv_user', 'PUBLIC');
CREATE TABLE sv_items (id bigint PRIMARY KEY, embedding real[]);
INSERT INTO sv_items SELECT i, ARRAY[cos(i * 0.5), sin(i * 0.5)]::real[] FROM generate_series(1, 12) i;
CREATE INDEX sv_items_idx ON sv_items USING twotower_hnsw (embedding real_ip_ops);
SELECT twotower.save_pipeline(p, jsonb_build_object('user_model', 'sv_user', 'vectors', '{"table": "sv_items"}'::jsonb,
         'channels', '[{"name": "tt", "type": "twotower", "index": "sv_items_idx", "k": 8}]'::jsonb, 'k', k))
  FROM (VALUES ('sv_a', 3), ('sv_b', 4), ('sv_c', 5)) v(p, k);

-- A split: half the units to each variant. The salt defaults to the split's name and is stored.
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [
  {"name": "a", "pipeline": "sv_a", "share": 50}, {"name": "b", "pipeline": "sv_b", "share": 50}]}');
SELECT name, kind, definition FROM twotower.pipelines WHERE name LIKE 'sv\_%' ORDER BY name;
-- Buckets computed independently (Python, from the formula in docs/serving.md): 1 → 1190,
-- 2 → 4863, 42 → 5745, alice → 2772 under salt sv_home.
SELECT u, v.* FROM unnest(ARRAY['1', '2', '42', 'alice']) u, twotower.variant_of('sv_home', u) v;
-- recommend serves each unit by its variant: 300 units, each list's length is its pipeline's k;
-- an integer unit and its decimal string are the same unit.
CREATE TEMP TABLE sv_assigned AS
SELECT u, (SELECT count(*) FROM twotower.recommend('sv_home', jsonb_build_object('q', ARRAY[1, 0], 'user_id', u))) AS n,
       (SELECT variant FROM twotower.variant_of('sv_home', u::text)) AS variant
  FROM generate_series(1, 300) u;
SELECT variant, n, count(*) BETWEEN 120 AND 180 AS about_half FROM sv_assigned GROUP BY variant, n ORDER BY variant;
SELECT count(*) AS same_as_string FROM sv_assigned
 WHERE n = (SELECT count(*) FROM twotower.recommend('sv_home', jsonb_build_object('q', ARRAY[1, 0], 'user_id', u::text)));
SELECT stage FROM twotower.recommend_explain('sv_home', '{"q": [1, 0], "user_id": 42}') WHERE step = 1;
-- A strict user model never sees the unit key (it is the split's, not a feature).
SELECT count(*) FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": "alice"}');
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_a', '{"q": [1, 0], "user_id": 1}')$$);

-- Adding a variant with share 0 (anywhere) moves nobody.
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [
  {"name": "c", "pipeline": "sv_c", "share": 0}, {"name": "a", "pipeline": "sv_a", "share": 50},
  {"name": "b", "pipeline": "sv_b", "share": 50}]}');
SELECT count(*) AS moved FROM sv_assigned WHERE variant <> (SELECT variant FROM twotower.variant_of('sv_home', u::text));
-- Ramping the last variant from 50 % to 60 % moves units only from a to b.
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [
  {"name": "c", "pipeline": "sv_c", "share": 0}, {"name": "a", "pipeline": "sv_a", "share": 40},
  {"name": "b", "pipeline": "sv_b", "share": 60}]}');
SELECT s.variant AS was, v.variant AS now, count(*) > 0 AS some
  FROM sv_assigned s, twotower.variant_of('sv_home', s.u::text) v WHERE s.variant <> v.variant GROUP BY 1, 2;
-- A new salt is a new experiment: about half the units change variant.
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "salt": "sv_home-2", "variants": [
  {"name": "a", "pipeline": "sv_a", "share": 50}, {"name": "b", "pipeline": "sv_b", "share": 50}]}');
SELECT count(*) BETWEEN 100 AND 200 AS reshuffled FROM sv_assigned
 WHERE variant <> (SELECT variant FROM twotower.variant_of('sv_home', u::text));
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [
  {"name": "a", "pipeline": "sv_a", "share": 50}, {"name": "b", "pipeline": "sv_b", "share": 50}]}');

-- Bad splits and bad requests.
SELECT pg_temp.err(q) FROM unnest(ARRAY[
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 60}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 50.005}, {"name": "b", "pipeline": "sv_b", "share": 49.995}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 50}, {"name": "a", "pipeline": "sv_b", "share": 50}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_nope", "share": 100}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_home", "share": 100}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_bad", "share": 100}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": []}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"variants": [{"name": "a", "pipeline": "sv_a", "share": 100}]}')$$,
  $$SELECT twotower.save_pipeline('sv_bad', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 100}], "k": 3}')$$,
  -- A variant cannot become a split (splits do not nest), nor be dropped while listed.
  $$SELECT twotower.save_pipeline('sv_a', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_c", "share": 100}]}')$$,
  $$SELECT twotower.drop_pipeline('sv_a')$$,
  -- Requests: no unit, a unit of the wrong type, a huge one.
  $$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0]}')$$,
  $$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": null}')$$,
  $$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 1.5}')$$,
  $$SELECT * FROM twotower.recommend('sv_home', jsonb_build_object('q', ARRAY[1, 0], 'user_id', repeat('x', 2000)))$$,
  $$SELECT * FROM twotower.variant_of('sv_a', '1')$$,
  $$SELECT * FROM twotower.variant_of('sv_nope', '1')$$,
  -- Training reads a pipeline, not a split.
  $$SELECT * FROM twotower.train_prerank('sv_x', 'sv_home', 'sv_items', 'sv_items', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$
]) q;
SELECT * FROM twotower.variant_of(NULL, '1');

-- The history of every save and drop.
SELECT twotower.save_pipeline('sv_tmp', (SELECT definition FROM twotower.pipelines WHERE name = 'sv_c'));
SELECT twotower.drop_pipeline('sv_tmp');
SELECT name, action, definition ->> 'k' AS k, changed_by = current_user AS by_me
  FROM twotower.pipeline_changes WHERE name IN ('sv_home', 'sv_tmp') ORDER BY changed_at, name, action DESC;

-- The impression log: one row a list, written by recommend with a request id.
SELECT item_id, rank FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 42}', request_id => 'r42');
SELECT request_id, pipeline, variant, served_by, unit, item_id, rank, channels, channel_ranks, feedback
  FROM twotower.impressions ORDER BY request_id, rank;
-- The logged scores are recommend's.
SELECT count(*) AS same_scores FROM twotower.impressions i
  JOIN twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 42}') r ON r.item_id = i.item_id AND r.rank = i.rank AND r.score = i.score
 WHERE i.request_id = 'r42';
SELECT features FROM twotower.logged_requests;
-- A request id is logged once; a rolled back call leaves nothing; a read-only transaction
-- (or a standby) cannot log.
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 42}', request_id => 'r42')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 42}', request_id => '')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 42}', request_id => repeat('r', 201))$$);
BEGIN;
SELECT count(*) FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 7}', request_id => 'r-rolled-back');
ROLLBACK;
BEGIN READ ONLY;
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 7}', request_id => 'r-ro')$$);
SELECT count(*) AS without_log FROM twotower.recommend('sv_home', '{"q": [1, 0], "user_id": 7}');
SELECT pg_temp.err($$SELECT twotower.feedback('r42', 1)$$);
ROLLBACK;
-- The settings: at most log_max_items items a list; log_impressions = off logs nothing.
SET twotower.log_max_items = 2;
SELECT count(*) AS returned FROM twotower.recommend('sv_a', '{"q": [0, 1]}', request_id => 'r-short');
RESET twotower.log_max_items;
SET twotower.log_impressions = off;
SELECT count(*) AS returned FROM twotower.recommend('sv_a', '{"q": [0, 1]}', request_id => 'r-off');
RESET twotower.log_impressions;
-- Features larger than log_max_feature_bytes: the list is logged without them (and is no
-- training example).
SET twotower.log_max_feature_bytes = 10;
SELECT count(*) AS returned FROM twotower.recommend('sv_a', '{"q": [0, 1]}', request_id => 'r-big');
RESET twotower.log_max_feature_bytes;
SELECT request_id, features IS NULL AS without_features, cardinality(items) FROM twotower.impression_log WHERE request_id = 'r-big';
SELECT count(*) AS as_training FROM twotower.logged_requests WHERE request_id LIKE '%:r-big';
SELECT l.request_id, r.request_id = l.logged_by || ':' || l.request_id AS training_id, r.variant, r.served_by, r.unit,
       cardinality(l.items) AS items
  FROM twotower.logged_requests r JOIN twotower.impression_log l ON r.request_id = l.logged_by || ':' || l.request_id
 ORDER BY l.request_id;

-- Feedback against a logged list.
SELECT twotower.feedback('r42', (SELECT items[2] FROM twotower.impression_log WHERE request_id = 'r42'));
SELECT twotower.feedback('r42', (SELECT items[3] FROM twotower.impression_log WHERE request_id = 'r42'), 'dwell', 12.5);
SELECT twotower.feedback('r42', (SELECT items[4] FROM twotower.impression_log WHERE request_id = 'r42'), 'dislike');
-- Recorded again: one row, the value replaced.
SELECT twotower.feedback('r42', (SELECT items[3] FROM twotower.impression_log WHERE request_id = 'r42'), 'dwell', 30);
SELECT rank, feedback FROM twotower.impressions WHERE request_id = 'r42' ORDER BY rank;
SELECT rank, label, disliked FROM twotower.logged_candidates WHERE request_id LIKE '%:r42' ORDER BY rank;
SELECT kind, value FROM twotower.feedback_events ORDER BY kind;
-- At most 16 kinds an item: the 17th is refused, a known one is still replaced.
SELECT count(twotower.feedback('r42', (SELECT items[1] FROM twotower.impression_log WHERE request_id = 'r42'), 'k' || k))
  FROM generate_series(1, 16) k;
SELECT pg_temp.err($$SELECT twotower.feedback('r42', (SELECT items[1] FROM twotower.impression_log WHERE request_id = 'r42'), 'k17')$$);
SELECT pg_temp.err($$SELECT twotower.feedback('r42', (SELECT items[1] FROM twotower.impression_log WHERE request_id = 'r42'), 'k16', 2)$$);
DELETE FROM twotower.feedback_log WHERE kind LIKE 'k%';
SELECT pg_temp.err(q) FROM unnest(ARRAY[
  $$SELECT twotower.feedback('r42', 999)$$,
  $$SELECT twotower.feedback('r-none', 1)$$,
  $$SELECT twotower.feedback('r-off', 1)$$,
  $$SELECT twotower.feedback('r42', 1, 'Click!')$$,
  $$SELECT twotower.feedback('r42', 1, '')$$,
  $$SELECT twotower.feedback('r42', 1, 'dwell', 'NaN')$$,
  $$SELECT twotower.feedback('r42', 1, 'dwell', 'Infinity')$$,
  $$SELECT twotower.feedback(NULL, 1)$$,
  $$SELECT twotower.feedback('r42', NULL)$$,
  $$SELECT twotower.feedback('r42', 1, NULL)$$
]) q;

-- Privileges: an application role logs its own lists and records feedback on them; it reads
-- nothing of the log, and another role's list reads as no list at all.
CREATE ROLE sv_app;
CREATE ROLE sv_other;
GRANT SELECT ON sv_items TO sv_app, sv_other;
SET ROLE sv_app;
SELECT count(*) FROM twotower.recommend('sv_home', '{"q": [0, 1], "user_id": 5}', request_id => 'app-1');
SELECT twotower.feedback('app-1', (SELECT item_id FROM twotower.recommend('sv_home', '{"q": [0, 1], "user_id": 5}') WHERE rank = 1));
SELECT pg_temp.err(q) FROM unnest(ARRAY[
  $$SELECT twotower.feedback('r42', 1)$$,
  $$SELECT * FROM twotower.impression_log$$,
  $$SELECT * FROM twotower.feedback_log$$,
  $$SELECT * FROM twotower.impressions$$,
  $$SELECT * FROM twotower.feedback_events$$,
  $$SELECT * FROM twotower.logged_candidates$$,
  $$SELECT * FROM twotower.logged_requests$$,
  $$SELECT * FROM twotower.online_metrics('sv_home')$$,
  $$INSERT INTO twotower.impression_log VALUES ('x', now(), 1, 'p', NULL, 'p', NULL, '{}', '{}', '{}', '{}', '{}')$$,
  $$DELETE FROM twotower.feedback_log$$,
  $$SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 100}]}')$$,
  $$SET twotower.log_impressions = off$$,
  $$SET twotower.log_max_items = 10000$$
]) q;
SELECT count(*) AS history_is_public FROM twotower.pipeline_changes WHERE name = 'sv_home';
RESET ROLE;
-- A split lists only pipelines its saver owns (it keeps their owners from dropping them): the
-- owner of sv_app_p (no longer an admin) cannot turn it into a split over the superuser's sv_a.
GRANT twotower_admin TO sv_app;
SET ROLE sv_app;
SELECT twotower.save_pipeline('sv_app_p', (SELECT definition FROM twotower.pipelines WHERE name = 'sv_c'));
RESET ROLE;
REVOKE twotower_admin FROM sv_app;
SET ROLE sv_app;
SELECT pg_temp.err($$SELECT twotower.save_pipeline('sv_app_p', '{"unit": "user_id", "variants": [{"name": "a", "pipeline": "sv_a", "share": 100}]}')$$);
SET ROLE sv_other;
SELECT pg_temp.err($$SELECT twotower.feedback('app-1', 1)$$);
-- Another role's request ids are neither visible nor in the way: sv_other logs its own app-1
-- (and r42, the superuser's).
SELECT count(*) FROM twotower.recommend('sv_home', '{"q": [0, 1], "user_id": 6}', request_id => 'app-1');
SELECT count(*) FROM twotower.recommend('sv_home', '{"q": [0, 1], "user_id": 6}', request_id => 'r42');
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('sv_home', '{"q": [0, 1], "user_id": 6}', request_id => 'app-1')$$);
RESET ROLE;
SELECT request_id, logged_by, rank, feedback FROM twotower.impressions WHERE request_id = 'app-1' AND feedback <> '{}';
-- twotower_admin records feedback on anyone's list, unless the id is ambiguous.
SELECT pg_temp.err($$SELECT twotower.feedback('app-1', 1)$$);
SELECT logged_by::regrole AS role, count(*) FROM twotower.impression_log WHERE request_id IN ('app-1', 'r42') GROUP BY logged_by ORDER BY 1::text;
DELETE FROM twotower.impression_log WHERE logged_by = 'sv_other'::regrole;
-- A member of twotower_admin who is not a superuser reads the log, its metrics, and trims it.
CREATE ROLE sv_admin IN ROLE twotower_admin;
SET ROLE sv_admin;
SELECT variant, requests FROM twotower.online_metrics('sv_home') ORDER BY variant;
SELECT count(*) > 0 AS reads FROM twotower.impressions;
SELECT twotower.feedback('app-1', (SELECT items[2] FROM twotower.impression_log WHERE request_id = 'app-1'), 'like');
WITH d AS (DELETE FROM twotower.pipeline_history WHERE name = 'sv_tmp' RETURNING 1) SELECT count(*) AS trimmed FROM d;
RESET ROLE;

-- Online metrics per variant, against the same figures computed here from the log's tables.
-- Forty more logged requests through the split; a click on rank 1 for even users, rank 3 for
-- users divisible by 3.
SELECT count(*) FROM generate_series(100, 139) u,
       twotower.recommend('sv_home', jsonb_build_object('q', ARRAY[1, 0], 'user_id', u), request_id => 'm' || u);
SELECT count(twotower.feedback('m' || u, items[1])) FROM twotower.impression_log, generate_series(100, 139) u
 WHERE request_id = 'm' || u AND u % 2 = 0;
SELECT count(twotower.feedback('m' || u, items[3])) FROM twotower.impression_log, generate_series(100, 139) u
 WHERE request_id = 'm' || u AND u % 3 = 0;
CREATE TEMP TABLE sv_expected AS
WITH r AS (
  SELECT i.request_id, i.variant, cardinality(i.items) AS n,
         (SELECT count(DISTINCT f.item_id) FROM twotower.feedback_log f
           WHERE f.request_id = i.request_id AND f.kind IN ('click', 'like')) AS clicks,
         (SELECT coalesce(sum(1 / log(2, array_position(i.items, f.item_id) + 1.0)), 0) FROM
                 (SELECT DISTINCT item_id FROM twotower.feedback_log f WHERE f.request_id = i.request_id AND f.kind IN ('click', 'like')) f) AS dcg
    FROM twotower.impression_log i WHERE i.pipeline = 'sv_home')
SELECT variant, count(*) AS requests, sum(n) AS impressions, sum(clicks) AS engaged,
       avg((clicks > 0)::int) AS hit_rate,
       avg(CASE clicks WHEN 0 THEN 0 WHEN 1 THEN dcg ELSE dcg / (1 + 1 / log(2, 3.0)) END) AS ndcg,
       stddev_samp(CASE clicks WHEN 0 THEN 0 WHEN 1 THEN dcg ELSE dcg / (1 + 1 / log(2, 3.0)) END) AS ndcg_sd
  FROM r GROUP BY variant;
SELECT m.variant, m.served_by, m.requests = e.requests AS requests_ok, m.impressions = e.impressions AS impressions_ok,
       m.engaged = e.engaged AS engaged_ok, abs(m.hit_rate - e.hit_rate) < 1e-12 AS hit_rate_ok,
       abs(m.ndcg - e.ndcg) < 1e-9 AS ndcg_ok, abs(m.ctr - e.engaged::float8 / e.impressions) < 1e-12 AS ctr_ok,
       m.ctr_low < m.ctr AND m.ctr < m.ctr_high AS ctr_interval, m.hit_rate_low < m.hit_rate AND m.hit_rate < m.hit_rate_high AS hr_interval,
       abs(m.ndcg_low - (e.ndcg - 1.96 * e.ndcg_sd / sqrt(e.requests))) < 1e-9 AS ndcg_low_ok,
       abs(m.ndcg_high - (e.ndcg + 1.96 * e.ndcg_sd / sqrt(e.requests))) < 1e-9 AS ndcg_high_ok, m.coverage
  FROM twotower.online_metrics('sv_home') m JOIN sv_expected e USING (variant) ORDER BY m.variant;
-- The difference to the control (a, listed first) and its interval.
SELECT m.variant, m.hit_rate_diff IS NULL AS is_control,
       abs(m.hit_rate_diff - (m.hit_rate - (SELECT hit_rate FROM sv_expected WHERE variant = 'a'))) < 1e-12 AS diff_ok,
       m.hit_rate_diff_low < m.hit_rate_diff AND m.hit_rate_diff < m.hit_rate_diff_high AS diff_interval
  FROM twotower.online_metrics('sv_home') m ORDER BY m.variant;
-- Wilson's interval checked by hand: 1 click in 4 impressions → [0.0456, 0.6994]; a plain
-- pipeline has one row without a variant and no difference.
SELECT count(*) FROM twotower.recommend('sv_b', '{"q": [1, 0]}', request_id => 'w1');
SELECT twotower.feedback('w1', items[1]) FROM twotower.impression_log WHERE request_id = 'w1';
SELECT variant, requests, impressions, engaged, round(ctr_low::numeric, 4), round(ctr_high::numeric, 4), hit_rate_diff,
       ndcg_low IS NULL AND ndcg_high IS NULL AS no_ndcg_interval_from_one_request
  FROM twotower.online_metrics('sv_b');
-- The long tail: items outside the top 20 % by engagement (ties alike), and items never
-- engaged with. sv_b's list of four has one engaged item: the other three are the tail.
SELECT long_tail_share FROM twotower.online_metrics('sv_b');
-- HR@1 counts only clicks at rank 1; k must be positive.
SELECT m.variant, abs(m.hit_rate - e.hr) < 1e-12 AS hr_at_1_ok
  FROM twotower.online_metrics('sv_home', k => 1) m
  JOIN (SELECT i.variant, avg((EXISTS (SELECT 1 FROM twotower.feedback_log f WHERE f.request_id = i.request_id
                                        AND f.item_id = i.items[1] AND f.kind IN ('click', 'like')))::int) AS hr
          FROM twotower.impression_log i WHERE i.pipeline = 'sv_home' GROUP BY i.variant) e USING (variant)
 ORDER BY m.variant;
SELECT pg_temp.err($$SELECT * FROM twotower.online_metrics('sv_home', k => 0)$$);
-- A stopped variant listed first is not the control: the first with traffic is.
SELECT twotower.save_pipeline('sv_home', '{"unit": "user_id", "variants": [
  {"name": "c", "pipeline": "sv_c", "share": 0}, {"name": "a", "pipeline": "sv_a", "share": 50},
  {"name": "b", "pipeline": "sv_b", "share": 50}]}');
SELECT variant, hit_rate_diff IS NULL AS is_control FROM twotower.online_metrics('sv_home') ORDER BY variant;
-- Deleting a list deletes its feedback.
SELECT count(*) AS feedback_before FROM twotower.feedback_log WHERE request_id = 'w1';
DELETE FROM twotower.impression_log WHERE request_id = 'w1';
SELECT count(*) AS feedback_after FROM twotower.feedback_log WHERE request_id = 'w1';
-- A window of time with no requests: no rows.
SELECT count(*) FROM twotower.online_metrics('sv_home', since => now() + interval '1 day');

-- The log feeds train_prerank: logged requests and candidates (exposure-aware negatives).
SELECT twotower.save_pipeline('sv_pre', (SELECT definition FROM twotower.pipelines WHERE name = 'sv_a'));
SET client_min_messages = warning;
SELECT model, train_examples > 0 AS trained
  FROM twotower.train_prerank('sv_student', 'sv_pre', 'twotower.logged_requests', 'twotower.logged_candidates', '{
    "model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]},
    "epochs": 2, "batch_size": 16, "k": 3, "validation": 0.2}', activate => false);
RESET client_min_messages;

-- Clean up: the split first (its variants cannot go while it lists them).
SELECT twotower.drop_pipeline('sv_home');
SELECT twotower.drop_pipeline(p) FROM unnest(ARRAY['sv_a', 'sv_b', 'sv_c', 'sv_pre', 'sv_app_p']) p;
SELECT twotower.drop_model('sv_student');
SELECT twotower.drop_model('sv_user');
DROP TABLE sv_items;
DROP ROLE sv_app;
DROP ROLE sv_other;
DROP ROLE sv_admin;
-- The log is data: DROP EXTENSION without CASCADE is refused while it holds lists.
SELECT pg_temp.err('DROP EXTENSION pg_twotower') LIKE '2BP01:%logged impression lists%' AS refused;
TRUNCATE twotower.impression_log, twotower.feedback_log;
