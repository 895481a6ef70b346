-- Target attention in the cascade's pre-rank models on MovieLens (issue 12; run by
-- bench/movielens_din.sh after `make demo`, whose scripts/movielens-cascade.sql made the log,
-- the teacher's scores and the pipelines). The demo's teacher and student
-- (scripts/movielens-prerank.json) are trained again with one more input, a target_attention
-- over the history's item vectors, on the same log and the same teacher scores; the four
-- models are compared on validation (train_prerank's recall@50 and the cascade's hit rate on
-- the last 20 % of the logged requests), then the cascades are scored once on the test items.
\set ON_ERROR_STOP on
SET client_min_messages = warning;
SET maintenance_work_mem = '1GB';
\set din '[{"name": "din", "type": "cross", "of": "target_attention", "attention_dim": 16}]'
CREATE TEMP TABLE hist AS
SELECT user_id, array_agg(item_id::bigint) AS seen FROM ml_train GROUP BY user_id;

\echo == the teacher and the student with target attention (the others as the demo trained them)
SELECT model, parameters, best_epoch, round(valid_recall::numeric, 4) AS valid_recall_at_50, train_examples
  FROM twotower.train_prerank('ml_teacher_din', 'ml_recall_past', 'ml_log_requests', 'ml_log_candidates',
       jsonb_set(:'pr'::jsonb -> 'teacher', '{model,features}', (:'pr'::jsonb #> '{teacher,model,features}') || :'din'::jsonb),
       rank_column => 'rank');
SELECT model, parameters, best_epoch, round(valid_recall::numeric, 4) AS valid_recall_at_50,
       round(teacher_agreement::numeric, 4) AS agreement_with_teacher_top50
  FROM twotower.train_prerank('ml_student_din', 'ml_recall_past', 'ml_log_requests', 'ml_log_candidates',
       jsonb_set(:'pr'::jsonb -> 'student', '{model,features}', (:'pr'::jsonb #> '{student,model,features}') || :'din'::jsonb),
       teacher_column => 'teacher', rank_column => 'rank');
-- The cascades: merged 300 -> two-tower 200 -> the model keeps 100 (as the demo's).
SELECT twotower.save_pipeline(v.pipeline, (p.definition - 'k') || jsonb_build_object('stages', jsonb_build_array(
         '{"type": "twotower", "keep": 200}'::jsonb, jsonb_build_object('type', 'model', 'model', v.model, 'keep', 100)), 'k', 100))
  FROM twotower.pipelines p, (VALUES ('ml_cascade_din', 'ml_student_din'), ('ml_cascade_teacher_din', 'ml_teacher_din')) AS v(pipeline, model)
 WHERE p.name = 'ml_recall';
SELECT twotower.save_pipeline(name || '_past', jsonb_set(jsonb_set(definition, '{channels,1,channel}', '"ml_itemcf_past"'),
                                                         '{channels,2,channel}', '"ml_swing_past"'))
  FROM twotower.pipelines WHERE name IN ('ml_cascade_din', 'ml_cascade_teacher_din');

\echo == validation (the last 20 % of the logged requests): where the next rating lands
CREATE TEMP TABLE valid_ranks AS
SELECT r.request_id,
       (SELECT rank FROM ml_log_candidates c WHERE c.request_id = r.request_id AND c.label = 1) AS merged,
       (SELECT rank FROM twotower.recommend('ml_cascade_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS student,
       (SELECT rank FROM twotower.recommend('ml_cascade_din_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS student_din,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS teacher,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher_din_past', r.features, exclude => r.seen) x WHERE x.item_id = r.next_item) AS teacher_din
  FROM (SELECT * FROM ml_log_requests ORDER BY request_id OFFSET (SELECT count(*) - round(count(*) * 0.2) FROM ml_log_requests)) r;
SELECT l AS list, round(avg((coalesce(rank, 1000000) <= 50)::int), 4) AS hr_at_50,
       round(avg(CASE WHEN rank <= 50 THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg_at_50, count(*) AS requests
  FROM valid_ranks, LATERAL (VALUES ('1 merged', merged), ('2 cascade, student', student), ('3 cascade, student + target attention', student_din),
                                    ('4 cascade, teacher', teacher), ('5 cascade, teacher + target attention', teacher_din)) v(l, rank)
 GROUP BY l ORDER BY l;

\echo == test (the held-out last rating of each user, touched once)
CREATE TEMP TABLE test_ranks AS
SELECT t.user_id,
       (SELECT rank FROM twotower.recommend('ml_recall', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS merged,
       (SELECT rank FROM twotower.recommend('ml_cascade', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS student,
       (SELECT rank FROM twotower.recommend('ml_cascade_din', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS student_din,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS teacher,
       (SELECT rank FROM twotower.recommend('ml_cascade_teacher_din', q.features, exclude => h.seen) x WHERE x.item_id = t.item_id) AS teacher_din
  FROM ml_test t JOIN ml_queries q USING (user_id) JOIN hist h USING (user_id);
SELECT l AS list, round(avg((coalesce(rank, 1000000) <= 50)::int), 4) AS hr_at_50,
       round(avg(CASE WHEN rank <= 50 THEN 1 / log(2, rank + 1) ELSE 0 END), 4) AS ndcg_at_50,
       round(avg((coalesce(rank, 1000000) <= 100)::int), 4) AS hr_at_100
  FROM test_ranks, LATERAL (VALUES ('1 merged', merged), ('2 cascade, student', student), ('3 cascade, student + target attention', student_din),
                                   ('4 cascade, teacher', teacher), ('5 cascade, teacher + target attention', teacher_din)) v(l, rank)
 GROUP BY l ORDER BY l;

\echo == one request (user 1): the time of the student stage, with and without target attention
SELECT 'student' AS model, stage, received, kept, round(ms::numeric, 3) AS ms
  FROM hist h, twotower.recommend_explain('ml_cascade', twotower.user_features('ml_user', '1'), exclude => h.seen) WHERE h.user_id = 1 AND stage LIKE '%ml_student%'
UNION ALL
SELECT 'student + target attention', stage, received, kept, round(ms::numeric, 3)
  FROM hist h, twotower.recommend_explain('ml_cascade_din', twotower.user_features('ml_user', '1'), exclude => h.seen) WHERE h.user_id = 1 AND stage LIKE '%ml_student%';
