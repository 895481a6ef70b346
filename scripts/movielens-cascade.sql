-- The cascade on MovieLens (run by scripts/movielens.sh after the channels and ml_feed):
-- a ranking DNN (the teacher) and a small pre-rank DNN (the student, distilled from it) trained
-- in SQL from a log of requests, then the funnel merged list -> two-tower stage -> student
-- scored on the held-out last ratings, next to the merged list.
--
-- The log: one request per user at the moment before the user's last training rating (the
-- validation position; the test rating is never read). Its candidates come from the same
-- funnel, with item-CF and Swing rebuilt without those ratings, so no recall model has seen
-- a log's positive (the towers hold them out for validation). Label 1: the rating that came
-- next. train_prerank validates on the last 20 % of the requests (by id); options were chosen
-- there.
\set ON_ERROR_STOP on
SET client_min_messages = warning;
SET maintenance_work_mem = '1GB';
CREATE TABLE ml_train_past AS
SELECT user_id, item_id, ts
  FROM (SELECT t.*, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, ctid DESC) AS from_end FROM ml_train t) x
 WHERE from_end > 1;
SELECT count(*) AS channels_rebuilt FROM (
  SELECT * FROM twotower.build_channel('ml_itemcf_past', 'itemcf', 'ml_train_past', 'ml_itemcf_past_nb', (:'ch'::jsonb #> '{itemcf,options}') || '{"top_n": 200}')
  UNION ALL
  SELECT * FROM twotower.build_channel('ml_swing_past', 'swing', 'ml_train_past', 'ml_swing_past_nb', (:'ch'::jsonb #> '{swing,options}') || '{"top_n": 200}')) b;
-- Recall only (no stages): the three channels merged into 300 candidates; item features for
-- the pre-rank models.
SELECT twotower.save_pipeline('ml_recall', (definition - 'k' - 'merge') || jsonb_build_object(
         'merge', (definition -> 'merge') || '{"k": 300}', 'k', 300,
         'item_features', '{"table": "ml_items", "id_column": "item_id"}'::jsonb))
  FROM twotower.pipelines WHERE name = 'ml_feed';
SELECT twotower.save_pipeline('ml_recall_past', jsonb_set(jsonb_set(definition, '{channels,1,channel}', '"ml_itemcf_past"'),
                                                          '{channels,2,channel}', '"ml_swing_past"'))
  FROM twotower.pipelines WHERE name = 'ml_recall';
CREATE TABLE ml_log_requests AS
SELECT user_id AS request_id, user_id, item_id::bigint AS next_item,
       twotower.user_features('ml_user', user_id::text, to_timestamp(ts - 1)) AS features,
       ARRAY(SELECT s.item_id::bigint FROM ml_train s WHERE s.user_id = t.user_id AND s.ts < t.ts) AS seen
  FROM (SELECT t.*, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, ctid DESC) AS from_end FROM ml_train t) t
 WHERE from_end = 1;
CREATE TABLE ml_log_candidates AS
SELECT r.request_id, c.item_id, (c.item_id = r.next_item)::int::real AS label, c.rank, NULL::real AS teacher
  FROM ml_log_requests r, twotower.recommend('ml_recall_past', r.features, exclude => r.seen) c;
SELECT count(*) AS requests, (SELECT count(*) FROM ml_log_candidates) AS candidates,
       (SELECT count(*) FROM ml_log_candidates WHERE label = 1) AS with_the_next_rating_among_them
  FROM ml_log_requests;

\echo == the teacher: a ranking DNN over user and item features, the tower vectors and the recall rank
SELECT model, parameters, best_epoch, round(valid_recall::numeric, 4) AS valid_recall_at_50, train_examples, valid_requests
  FROM twotower.train_prerank('ml_teacher', 'ml_recall_past', 'ml_log_requests', 'ml_log_candidates', :'teacher', rank_column => 'rank');
-- Its scores of every logged candidate (a one-stage pipeline over the logged candidates, in
-- their recall order).
SELECT twotower.save_pipeline('ml_teacher_scores', (definition - 'channels' - 'merge' - 'k')
         || '{"stages": [{"type": "model", "model": "ml_teacher", "keep": 300}], "k": 300}')
  FROM twotower.pipelines WHERE name = 'ml_recall_past';
UPDATE ml_log_candidates c SET teacher = s.score
  FROM ml_log_requests r,
       LATERAL twotower.prerank('ml_teacher_scores', r.features,
                                ARRAY(SELECT item_id FROM ml_log_candidates x WHERE x.request_id = r.request_id ORDER BY rank), 300) s
 WHERE c.request_id = r.request_id AND c.item_id = s.item_id;

\echo == the student: a small pre-rank DNN, distilled from the teacher (lambda ramped from 0)
SELECT model, parameters, best_epoch, round(valid_recall::numeric, 4) AS valid_recall_at_50,
       round(teacher_agreement::numeric, 4) AS agreement_with_teacher_top50
  FROM twotower.train_prerank('ml_student', 'ml_recall_past', 'ml_log_requests', 'ml_log_candidates', :'student',
                              teacher_column => 'teacher', rank_column => 'rank');

-- The cascades: the merged 300 -> the two-tower score keeps 200 -> a model keeps 100.
SELECT twotower.save_pipeline(v.pipeline, (p.definition - 'k') || jsonb_build_object('stages', jsonb_build_array(
         '{"type": "twotower", "keep": 200}'::jsonb, jsonb_build_object('type', 'model', 'model', v.model, 'keep', 100)), 'k', 100))
  FROM twotower.pipelines p, (VALUES ('ml_cascade', 'ml_student'), ('ml_cascade_teacher', 'ml_teacher')) AS v(pipeline, model)
 WHERE p.name = 'ml_recall';
SELECT twotower.save_pipeline(name || '_past', jsonb_set(jsonb_set(definition, '{channels,1,channel}', '"ml_itemcf_past"'),
                                                         '{channels,2,channel}', '"ml_swing_past"'))
  FROM twotower.pipelines WHERE name IN ('ml_cascade', 'ml_cascade_teacher');

\echo == validation (the last 20 % of the logged requests): where the next rating lands in each list
CREATE TEMP TABLE valid_ranks AS
SELECT r.request_id,
       (SELECT rank FROM ml_log_candidates c WHERE c.request_id = r.request_id AND c.label = 1) AS merged,
       (SELECT rank FROM twotower.recommend('ml_cascade_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS cascade,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS teacher
  FROM (SELECT * FROM ml_log_requests ORDER BY request_id OFFSET (SELECT count(*) - round(count(*) * 0.2) FROM ml_log_requests)) r;
SELECT l AS list, round(avg((coalesce(rank, 1000000) <= 50)::int), 4) AS hr_at_50,
       round(avg(CASE WHEN rank <= 50 THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg_at_50, count(*) AS requests
  FROM valid_ranks, LATERAL (VALUES ('merged', merged), ('cascade (student)', cascade), ('cascade (teacher)', teacher)) v(l, rank)
 GROUP BY l ORDER BY hr_at_50 DESC;

\echo == test (the held-out last rating of each user, touched once): the merged list and the cascades
CREATE TEMP TABLE test_ranks AS
SELECT t.user_id,
       (SELECT rank FROM twotower.recommend('ml_recall', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS merged,
       (SELECT rank FROM twotower.recommend('ml_cascade', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS cascade,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS teacher
  FROM ml_test t JOIN ml_queries q USING (user_id) JOIN hist h USING (user_id);
SELECT l AS list, round(avg((coalesce(rank, 1000000) <= 50)::int), 4) AS hr_at_50,
       round(avg(CASE WHEN rank <= 50 THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg_at_50,
       round(avg((coalesce(rank, 1000000) <= 100)::int), 4) AS hr_at_100
  FROM test_ranks, LATERAL (VALUES ('merged list', merged), ('cascade: merged 300 -> two-tower 200 -> student 100', cascade),
                                   ('cascade with the teacher as the last stage', teacher)) v(l, rank)
 GROUP BY l ORDER BY hr_at_50 DESC;
\echo == hits of the merged list that the cascade keeps in its top 100
SELECT count(*) FILTER (WHERE merged <= 100) AS merged_top100_hits,
       count(*) FILTER (WHERE merged <= 100 AND cascade <= 100) AS kept_in_cascade_top100,
       round(count(*) FILTER (WHERE merged <= 100 AND cascade <= 100)::numeric / nullif(count(*) FILTER (WHERE merged <= 100), 0), 4) AS share_top100,
       count(*) FILTER (WHERE merged <= 300) AS merged_300_hits,
       round(count(*) FILTER (WHERE cascade <= 100)::numeric / nullif(count(*) FILTER (WHERE merged <= 300), 0), 4) AS share_of_300_hits
  FROM test_ranks;
\echo == user 1: what each step of the cascade did
SELECT step, stage, received, kept, round(ms::numeric, 2) AS ms
  FROM hist h, twotower.recommend_explain('ml_cascade', twotower.user_features('ml_user', '1'), exclude => h.seen)
 WHERE h.user_id = 1 ORDER BY step;
