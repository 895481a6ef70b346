-- Training a pre-rank model in the database for pipeline "fn" (07_funnel's fixtures): from
-- logged requests and candidates, with labels, distillation and the cascade objective; the
-- trained model serves in a pipeline; bad input, privileges, cancellation.
SET search_path = public, twotower;
\set VERBOSITY terse
-- Training reports each epoch in a NOTICE with its speed (not stable from run to run).
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

-- 80 logged requests; every item is a candidate, and the ranking stage liked the items with
-- price 2 (ids 2, 5, 8). The teacher's score is the towers' inner product.
CREATE TABLE fn_req (request_id int PRIMARY KEY, features jsonb);
INSERT INTO fn_req SELECT r, jsonb_build_object('q', ARRAY[cos(r), sin(r)]::real[], 'history', ARRAY[r % 8 + 1])
  FROM generate_series(1, 80) r;
CREATE TABLE fn_cand (request_id int, item_id bigint, label real, teacher real, teacher_liked real);
INSERT INTO fn_cand (request_id, item_id, label, teacher) SELECT r.request_id, i.id, (i.price = 2)::int,
       twotower.inner_product(i.embedding, ARRAY[cos(r.request_id), sin(r.request_id)]::real[])
  FROM fn_req r, fn_items i;
-- Labels that agree with the teacher: its top 2 of each request.
UPDATE fn_cand c SET teacher_liked = (x.rank <= 2)::int
  FROM (SELECT request_id, item_id, rank() OVER (PARTITION BY request_id ORDER BY teacher DESC) AS rank FROM fn_cand) x
 WHERE x.request_id = c.request_id AND x.item_id = c.item_id;
INSERT INTO fn_cand VALUES (1, 99, 0, 0, 0);  -- no vector: left out (with a notice)

SELECT model, version, parameters > 0 AS has_parameters, valid_recall > 0.9 AS learned, train_examples, valid_requests
  FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{
    "model": {"features": [{"name": "price", "source": "item", "type": "numeric"},
                           {"name": "tt", "type": "cross", "of": "score"},
                           {"name": "uv", "type": "cross", "of": "product"}],
              "hidden": [8]},
    "epochs": 30, "lr": 0.05, "batch_size": 32, "k": 3, "validation": 0.25}');
SELECT name, version, active, kind, dim, features FROM twotower.models WHERE name = 'fn_student';

-- It serves: a pipeline whose last stage is the trained model ranks the liked items first.
SELECT twotower.save_pipeline('fn_trained', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_student", "keep": 3}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT array_agg(r.item_id ORDER BY r.rank) AS top, bool_and(i.price = 2) AS all_liked
  FROM twotower.recommend('fn_trained', '{"q": [0.6, 0.8], "history": [1]}') r JOIN fn_items i ON i.id = r.item_id;
-- The model is in use: it cannot be dropped.
SELECT pg_temp.err($$SELECT twotower.drop_model('fn_student')$$);
SELECT twotower.drop_pipeline('fn_trained');

-- Target attention over the history's item vectors (the request's "history"), trained and
-- served in a pipeline, with and without a history.
SELECT version, valid_recall > 0.9 AS learned
  FROM twotower.train_prerank('fn_din', 'fn', 'fn_req', 'fn_cand', '{
    "model": {"features": [{"name": "price", "source": "item", "type": "numeric"},
                           {"name": "tt", "type": "cross", "of": "score"},
                           {"name": "din", "type": "cross", "of": "target_attention", "attention_dim": 2}],
              "hidden": [8]},
    "epochs": 30, "lr": 0.05, "batch_size": 32, "k": 3, "validation": 0.25}');
SELECT spec #> '{features,2}' AS din FROM twotower.model_version WHERE model = 'fn_din';
SELECT twotower.save_pipeline('fn_din_p', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_din", "keep": 3}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT array_agg(r.item_id ORDER BY r.rank) AS top, bool_and(i.price = 2) AS all_liked
  FROM twotower.recommend('fn_din_p', '{"q": [0.6, 0.8], "history": [1, 4]}') r JOIN fn_items i ON i.id = r.item_id;
SELECT count(*) AS without_history FROM twotower.recommend('fn_din_p', '{"q": [0.6, 0.8]}');
SELECT twotower.drop_pipeline('fn_din_p');
SELECT twotower.drop_model('fn_din');
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_din', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score", "attention_dim": 4}]}}')$$);

-- Distillation from the teacher column, and the cascade objective (the teacher's top 2).
SELECT version, teacher_agreement > 0.5 AS follows_teacher
  FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{
    "model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]},
    "objective": "distill", "lambda": 2, "ramp_steps": 5, "epochs": 10, "lr": 0.05, "batch_size": 32, "k": 2}',
    label_column => 'teacher_liked', teacher_column => 'teacher');
SELECT version, valid_recall > 0.9 AS finds_teachers_top
  FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{
    "model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]},
    "objective": "cascade", "top_n": 2, "epochs": 10, "lr": 0.05, "batch_size": 32, "k": 3}', teacher_column => 'teacher', activate => false);
SELECT name, version, active FROM twotower.models WHERE name = 'fn_student' ORDER BY version;

-- Bad input.
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}, "objective": "distill"}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'nope', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "telepathy"}]}}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}, "colour": 1}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', NULL)$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}', label_column => 'nope')$$);
CREATE TABLE fn_cand_bad AS SELECT * FROM fn_cand WHERE request_id <= 3;
INSERT INTO fn_cand_bad VALUES (1, 2, 1, 0);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand_bad', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
TRUNCATE fn_cand_bad;
INSERT INTO fn_cand_bad VALUES (1000, 2, 1, 0);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand_bad', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
TRUNCATE fn_cand_bad;
INSERT INTO fn_cand_bad VALUES (1, 2, NULL, 0);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand_bad', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
TRUNCATE fn_cand_bad;
INSERT INTO fn_cand_bad VALUES (1, 2, 'NaN', 0), (2, 2, 1, 0);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand_bad', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
TRUNCATE fn_cand_bad;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand_bad', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
-- A request whose features the user tower refuses.
CREATE TABLE fn_req_bad AS SELECT * FROM fn_req;
UPDATE fn_req_bad SET features = '{"q": [1, 2], "colour": 3}' WHERE request_id = 5;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req_bad', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
-- The memory budget is maintenance_work_mem.
SET maintenance_work_mem = '1MB';
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4096]}, "batch_size": 65536}')$$);
RESET maintenance_work_mem;

-- A cancel (statement_timeout) stops a long run with 57014 and stores nothing; it ends within
-- 3 s (10 times the timeout; 1000 epochs would run for minutes), on the server's clock.
SELECT clock_timestamp() AS cancel_start \gset
SET statement_timeout = '300ms';
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [256, 256]}, "epochs": 1000, "patience": 1000, "batch_size": 2}')$$);
RESET statement_timeout;
SELECT clock_timestamp() - :'cancel_start'::timestamptz BETWEEN interval '300 ms' AND interval '3 s' AS stopped_at_the_timeout;
SELECT count(*) AS versions FROM twotower.models WHERE name = 'fn_student';

-- Privileges: creating a model needs twotower_admin; the log is read as the caller.
CREATE ROLE fn_trainer;
SET ROLE fn_trainer;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_other_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
RESET ROLE;
GRANT twotower_admin TO fn_trainer;
SET ROLE fn_trainer;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_other_student', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}]}}')$$);
RESET ROLE;
DROP ROLE fn_trainer;

-- Multi-task: two tasks from two columns ("liked": price 2; "top": the teacher's top 2), MMoE
-- with two shared experts and a gate per task, one hidden layer per head. A stage ranks by a
-- task or by the fused score (Σ fuse·σ(logit)); recommend_explain shows every task's scores
-- of the kept items.
SELECT version, valid_recall > 0.9 AS learned
  FROM twotower.train_prerank('fn_mt', 'fn', 'fn_req', 'fn_cand', '{
    "model": {"features": [{"name": "price", "source": "item", "type": "numeric"},
                           {"name": "tt", "type": "cross", "of": "score"},
                           {"name": "uv", "type": "cross", "of": "product"}],
              "hidden": [8], "experts": {"shared": 2}, "task_hidden": [4]},
    "tasks": [{"name": "liked", "column": "label"}, {"name": "top", "column": "teacher_liked", "fuse": 0.5}],
    "epochs": 30, "lr": 0.05, "batch_size": 32, "k": 3, "validation": 0.25}');
SELECT spec -> 'output' AS output, jsonb_array_length(spec -> 'graph') AS nodes
  FROM twotower.model_version WHERE model = 'fn_mt';
SELECT twotower.save_pipeline('fn_mt_liked', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_mt", "keep": 3, "score": "liked"}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT array_agg(r.item_id ORDER BY r.rank) AS top, bool_and(i.price = 2) AS all_liked
  FROM twotower.recommend('fn_mt_liked', '{"q": [0.6, 0.8], "history": [1]}') r JOIN fn_items i ON i.id = r.item_id;
-- Ranked by "top", the list is the teacher's top (the towers' inner product; the history item
-- 1 is not a candidate).
SELECT twotower.save_pipeline('fn_mt_top', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_mt", "keep": 2, "score": "top"}], "k": 2}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT (SELECT array_agg(item_id ORDER BY item_id) FROM twotower.recommend('fn_mt_top', '{"q": [0.6, 0.8], "history": [1]}'))
     = (SELECT array_agg(id ORDER BY id) FROM (
         SELECT id FROM fn_items WHERE id <> 1 ORDER BY twotower.inner_product(embedding, ARRAY[0.6, 0.8]::real[]) DESC LIMIT 2) t)
       AS ranks_by_the_teachers_task;
-- recommend_explain: the model stage's scores, by what it ranked by and by task, aligned with
-- kept_items; the liked items have the higher "liked" probabilities.
SELECT e.stage, (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(e.scores) k) AS keys,
       jsonb_array_length(e.scores -> 'liked') = e.kept AS aligned,
       (SELECT bool_and((s.v)::real BETWEEN 0 AND 1) FROM jsonb_array_elements_text(e.scores -> 'top') s(v)) AS probabilities
  FROM twotower.recommend_explain('fn_mt_liked', '{"q": [0.6, 0.8], "history": [1]}') e WHERE e.scores IS NOT NULL;
SELECT bool_and((x.s)::real > 0.5) AS liked_probable
  FROM twotower.recommend_explain('fn_mt_liked', '{"q": [0.6, 0.8], "history": [1]}') e,
       jsonb_array_elements_text(e.scores -> 'liked') x(s) WHERE e.stage LIKE 'pre-rank model%';
-- Ranked by "top": "top" first; a one-score model's stage shows its "score"; a two-tower stage
-- shows none.
SELECT e.stage, (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(e.scores) k) AS keys,
       e.scores -> 'top' = (SELECT jsonb_agg(v ORDER BY v DESC) FROM jsonb_array_elements(e.scores -> 'top') v) AS ranked_by_top
  FROM twotower.recommend_explain('fn_mt_top', '{"q": [0.6, 0.8], "history": [1]}') e WHERE e.stage LIKE 'pre-rank%';
SELECT twotower.save_pipeline('fn_one', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_student", "keep": 3}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT e.stage, (SELECT array_agg(k) FROM jsonb_object_keys(e.scores) k) AS keys,
       ARRAY(SELECT v::real FROM jsonb_array_elements_text(e.scores -> 'score') v)
         = (SELECT array_agg(r.score ORDER BY r.rank) FROM twotower.recommend('fn_one', '{"q": [0.6, 0.8], "history": [1]}') r) AS the_scores
  FROM twotower.recommend_explain('fn_one', '{"q": [0.6, 0.8], "history": [1]}') e WHERE e.scores IS NOT NULL;
-- "score" on a one-score model is refused at the call; "fused" is what it ranks by anyway.
SELECT twotower.save_pipeline('fn_one', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_student", "keep": 3, "score": "liked"}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_one', '{"q": [0.6, 0.8]}')$$);
SELECT twotower.save_pipeline('fn_one', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_student", "keep": 3, "score": "fused"}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT count(*) FROM twotower.recommend('fn_one', '{"q": [0.6, 0.8]}');
SELECT twotower.drop_pipeline('fn_one');
-- A stage ranking by a task the model does not have; a task column that is not there; a
-- logistic task's label out of range; a multi-task key without tasks.
SELECT twotower.save_pipeline('fn_mt_bad', (definition - 'stages' - 'k') || '{
  "stages": [{"type": "twotower", "keep": 7}, {"type": "model", "model": "fn_mt", "keep": 3, "score": "clicks"}], "k": 3}')
  FROM twotower.pipelines WHERE name = 'fn';
SELECT pg_temp.err($$SELECT * FROM twotower.recommend('fn_mt_bad', '{"q": [0.6, 0.8]}')$$);
SELECT pg_temp.err($$SELECT * FROM twotower.prerank('fn_mt_bad', '{"q": [0.6, 0.8]}', ARRAY[1, 2, 3]::bigint[])$$);
SELECT twotower.drop_pipeline('fn_mt_bad');
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_mt', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]}, "tasks": [{"name": "clicks"}]}')$$);
UPDATE fn_cand SET teacher_liked = 3 WHERE request_id = 7 AND item_id = 2;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_mt', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]}, "tasks": [{"name": "top", "column": "teacher_liked"}]}')$$);
-- A stored NaN is an error (NULL is "no label").
UPDATE fn_cand SET teacher_liked = 'NaN' WHERE request_id = 7 AND item_id = 2;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_mt', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4]}, "tasks": [{"name": "top", "column": "teacher_liked"}]}')$$);
UPDATE fn_cand SET teacher_liked = 1 WHERE request_id = 7 AND item_id = 2;
SELECT pg_temp.err($$SELECT * FROM twotower.train_prerank('fn_mt', 'fn', 'fn_req', 'fn_cand', '{"model": {"features": [{"name": "tt", "type": "cross", "of": "score"}], "hidden": [4], "experts": {"shared": 2}}}')$$);
SELECT count(*) AS versions FROM twotower.models WHERE name = 'fn_mt';
SELECT twotower.drop_pipeline('fn_mt_liked');
SELECT twotower.drop_pipeline('fn_mt_top');
SELECT twotower.drop_model('fn_mt');
