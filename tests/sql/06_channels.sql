-- Item-to-item channels: item-CF and Swing against hand-computed values, recall from a history,
-- incremental refresh equal to a full build, bad input, privileges and cancellation.
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

-- A: 1 2 3, B: 1 2, C: 2 3, D: 3.
CREATE TABLE ch_tiny (user_id text, item_id bigint, ts timestamptz);
INSERT INTO ch_tiny VALUES ('A', 1, '2026-01-01'), ('A', 2, '2026-01-02'), ('A', 3, '2026-01-03'),
  ('B', 1, '2026-01-01'), ('B', 2, '2026-01-02'), ('C', 2, '2026-01-01'), ('C', 3, '2026-01-02'),
  ('D', 3, '2026-01-01');
SELECT channel, kind, items, users, interactions, rows FROM twotower.build_channel('ch_cf', 'itemcf', 'ch_tiny', 'ch_cf_nb');
-- sim(i, j) = Σ_u 1/ln(1 + |I_u|) / √(|N(i)|·|N(j)|)
SELECT item_id, neighbor_id,
       abs(score - CASE (item_id::int, neighbor_id::int)
           WHEN (1, 2) THEN (1 / ln(4) + 1 / ln(3)) / sqrt(6) WHEN (2, 1) THEN (1 / ln(4) + 1 / ln(3)) / sqrt(6)
           WHEN (1, 3) THEN (1 / ln(4)) / sqrt(6) WHEN (3, 1) THEN (1 / ln(4)) / sqrt(6)
           ELSE (1 / ln(4) + 1 / ln(3)) / 3 END) < 1e-6 AS as_by_hand
  FROM ch_cf_nb ORDER BY 1, 2;
SELECT channel, rows FROM twotower.build_channel('ch_sw', 'swing', 'ch_tiny', 'ch_sw_nb');
-- Ordered user pairs: sim(1, 2) = 2·w_A·w_B / (1 + |I_A ∩ I_B|), w_u = (|I_u| + 5)^-0.3.
SELECT item_id, neighbor_id, abs(score - 2 * power(8, -0.3) * power(7, -0.3) / 3) < 1e-6 AS as_by_hand
  FROM ch_sw_nb ORDER BY 1, 2;
SELECT name, kind, neighbors, owner = current_user AS mine, interactions, options, items, users, interactions_read, rows
  FROM twotower.channels ORDER BY name;

-- Recall from a history: 300 users in 6 groups; items of a group are each other's neighbours.
CREATE TABLE ch_events AS
SELECT 'u' || u AS user_id, ((u % 6) + 6 * ((u * 7 + t * 5) % 20))::bigint AS item_id,
       timestamptz '2026-01-01' + make_interval(hours => t * 24 + u % 24) AS ts
  FROM generate_series(0, 299) u, generate_series(0, 11) t;
SELECT channel, items, rows > 0 AS has_rows FROM twotower.build_channel('ch_events_sw', 'swing', 'ch_events', 'ch_events_sw', '{"top_n": 30}');
SELECT channel, items, rows > 0 AS has_rows FROM twotower.build_channel('ch_events_cf', 'itemcf', 'ch_events', 'ch_events_cf', '{"top_n": 30, "half_life": 864000}');
SELECT c, count(*) AS hits, count(*) FILTER (WHERE item_id % 6 = 2) AS own_group,
       bool_and(via IN (2, 8, 14)) AS via_history, min(rank) AS first, max(rank) AS last,
       count(*) FILTER (WHERE item_id IN (2, 8, 14, 20)) AS excluded
  FROM (SELECT 'swing' AS c, * FROM twotower.i2i_recall('ch_events_sw', ARRAY[2, 8, 14]::bigint[], ARRAY[1, 0.8, 0.64]::real[], 10, exclude => ARRAY[20]::bigint[])
        UNION ALL
        SELECT 'itemcf', * FROM twotower.i2i_recall('ch_events_cf', ARRAY[2, 8, 14]::bigint[], k => 10, exclude => ARRAY[20]::bigint[])) r
 GROUP BY c ORDER BY c;
-- Ranks follow the scores.
SELECT bool_and(ok) AS ordered FROM (
  SELECT score >= lead(score) OVER (ORDER BY rank) OR lead(score) OVER (ORDER BY rank) IS NULL AS ok
    FROM twotower.i2i_recall('ch_events_sw', ARRAY[3, 9]::bigint[], k => 40)) s;
SELECT count(*) AS empty_history FROM twotower.i2i_recall('ch_events_sw', '{}'::bigint[]);

-- Incremental refresh: new interactions of 10 users; the refreshed table equals a full build.
INSERT INTO ch_events
SELECT 'u' || u, ((u + 1) % 6 + 6 * (u % 20))::bigint, timestamptz '2026-02-01' + make_interval(hours => u)
  FROM generate_series(0, 290, 30) u;
INSERT INTO ch_events VALUES ('u_new', 500, '2026-02-02'), ('u_new', 2, '2026-02-02');
SELECT channel, changed_users, affected_items > 0 AS some, affected_items < 121 AS not_all
  FROM twotower.refresh_channel('ch_events_sw');
SELECT channel, changed_users FROM twotower.refresh_channel('ch_events_cf');
SELECT rows > 0 AS built FROM twotower.build_channel('ch_full_sw', 'swing', 'ch_events', 'ch_full_sw', '{"top_n": 30}');
-- (Item-CF with a half-life: a refresh measures ages from its build's newest interaction, kept
-- in the options as decay_reference; a full build with that reference gives the same rows. A
-- full build with a newer reference scales every score by one constant: the same rankings.)
SELECT options -> 'decay_reference' AS reference FROM twotower.channels WHERE name = 'ch_events_cf';
SELECT rows > 0 AS built FROM twotower.build_channel('ch_full_cf', 'itemcf', 'ch_events', 'ch_full_cf',
       '{"top_n": 30, "half_life": 864000}'::jsonb
       || jsonb_build_object('decay_reference', (SELECT options -> 'decay_reference' FROM twotower.channels WHERE name = 'ch_events_cf')));
SELECT (SELECT count(*) FROM (TABLE ch_events_sw EXCEPT TABLE ch_full_sw) d) AS sw_differ,
       (SELECT count(*) FROM (TABLE ch_full_sw EXCEPT TABLE ch_events_sw) d) AS sw_missing,
       (SELECT count(*) FROM (TABLE ch_events_cf EXCEPT TABLE ch_full_cf) d) AS cf_differ,
       (SELECT count(*) FROM (TABLE ch_full_cf EXCEPT TABLE ch_events_cf) d) AS cf_missing;
-- Nothing new: nothing recomputed.
SELECT changed_users, affected_items, rows FROM twotower.refresh_channel('ch_events_sw');

-- Bad input.
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'cosine', 'ch_tiny', 'ch_x_nb')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'swing', 'ch_tiny', 'ch_x_nb', '{"half_life": 3}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'ch_x_nb', '{"top_n": 0}')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'ch_x_nb', '[]')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('bad name!', 'itemcf', 'ch_tiny', 'ch_x_nb')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'ch_x_nb', user_column => 'nope')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'ch_x_nb', time_column => 'user_id')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'bad name(')$q$);
CREATE TABLE ch_wrong (item_id bigint, neighbor_id text, score real);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_tiny', 'ch_wrong')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_cf', 'itemcf', 'ch_tiny', 'ch_sw_nb')$q$);
CREATE TABLE ch_nulls (user_id text, item_id bigint, ts timestamptz);
INSERT INTO ch_nulls VALUES ('A', 1, now()), (NULL, 2, now());
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_nulls', 'ch_x_nb')$q$);
CREATE TABLE ch_textitems (user_id text, item_id text, ts timestamptz);
INSERT INTO ch_textitems VALUES ('A', 'movie-1', now());
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'itemcf', 'ch_textitems', 'ch_x_nb')$q$);
SELECT count(*) AS no_channel_left FROM twotower.channels WHERE name = 'ch_x';
SELECT to_regclass('ch_x_nb') IS NULL AS no_table_left;
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('nope', ARRAY[1]::bigint[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', ARRAY[1]::bigint[], k => 0)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', ARRAY[1, NULL]::bigint[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', ARRAY[1, 2]::bigint[], ARRAY[1]::real[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', ARRAY[1]::bigint[], ARRAY['NaN']::real[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', (SELECT array_agg(g) FROM generate_series(1, 10001) g)::bigint[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_channel('nope')$q$);

-- Privileges: creating needs twotower_admin; the table's owner manages; reading needs SELECT.
CREATE ROLE ch_app;
CREATE ROLE ch_other;
GRANT SELECT ON ch_tiny TO ch_app, ch_other;
GRANT CREATE ON SCHEMA public TO ch_app;
SET ROLE ch_app;
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_app_cf', 'itemcf', 'ch_tiny', 'ch_app_nb')$q$);
RESET ROLE;
GRANT twotower_admin TO ch_app;
SET ROLE ch_app;
SELECT channel, rows FROM twotower.build_channel('ch_app_cf', 'itemcf', 'ch_tiny', 'ch_app_nb');
RESET ROLE;
REVOKE twotower_admin FROM ch_app;
SELECT owner FROM twotower.channels WHERE name = 'ch_app_cf';
SET ROLE ch_app;
-- The owner rebuilds without twotower_admin.
SELECT channel, rows FROM twotower.build_channel('ch_app_cf', 'itemcf', 'ch_tiny', 'ch_app_nb');
RESET ROLE;
SET ROLE ch_other;
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_app_cf', 'itemcf', 'ch_tiny', 'ch_app_nb')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.refresh_channel('ch_app_cf')$q$);
SELECT pg_temp.err($q$SELECT twotower.drop_channel('ch_app_cf')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_app_cf', ARRAY[1]::bigint[])$q$);
RESET ROLE;
GRANT SELECT ON ch_app_nb TO ch_other;
SET ROLE ch_other;
SELECT item_id, rank, via FROM twotower.i2i_recall('ch_app_cf', ARRAY[1]::bigint[]);
RESET ROLE;
-- The channel follows its table's owner.
ALTER TABLE ch_app_nb OWNER TO ch_other;
SELECT owner FROM twotower.channels WHERE name = 'ch_app_cf';
SET ROLE ch_other;
SELECT twotower.drop_channel('ch_app_cf', drop_table => true);
RESET ROLE;
SELECT to_regclass('ch_app_nb') IS NULL AS table_dropped, count(*) AS channels FROM twotower.channels WHERE name = 'ch_app_cf';

-- A cancel or statement_timeout stops a build and leaves the old rows; it ends within 3 s (10
-- times the timeout), on the server's clock.
-- (1000 users with 100 of 300 items each: quick to read, seconds of Swing pairs to compute.)
CREATE TABLE ch_big AS
SELECT 'u' || u AS user_id, ((u * 7 + t * 3) % 300)::bigint AS item_id, t::double precision AS ts
  FROM generate_series(0, 999) u, generate_series(0, 99) t;
SELECT rows FROM twotower.build_channel('ch_big_sw', 'swing', 'ch_tiny', 'ch_big_sw');
SELECT clock_timestamp() AS cancel_start \gset
SET statement_timeout = '300ms';
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_big_sw', 'swing', 'ch_big', 'ch_big_sw', '{"max_item_users": 2000}')$q$);
RESET statement_timeout;
SELECT clock_timestamp() - :'cancel_start'::timestamptz BETWEEN interval '300 ms' AND interval '3 s' AS stopped_at_the_timeout;
SELECT count(*) AS old_rows_kept FROM ch_big_sw;
SELECT rows AS catalogue_unchanged FROM twotower.channels WHERE name = 'ch_big_sw';
-- Memory: a budget too small for the build is 53200 before anything large is allocated.
SET maintenance_work_mem = '1MB';
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_big_sw', 'swing', 'ch_big', 'ch_big_sw')$q$);
RESET maintenance_work_mem;

-- Merging channels from plain SQL (pg_twotower's and the application's own), with provenance.
CREATE TABLE ch_cands (channel text, item_id bigint, score real);
INSERT INTO ch_cands VALUES ('a', 2, 0.8), ('a', 1, 0.9), ('a', 3, 0.5), ('a', 4, 0.1),
                            ('b', 5, 5.0), ('b', 3, 9.0), ('b', 6, 1.0);
CREATE FUNCTION pg_temp.merged(strategy text, opts jsonb, k int = 10, excl bigint[] = NULL)
RETURNS TABLE (item_id bigint, score numeric, rank int, channels text[], channel_ranks int[], channel_scores real[])
LANGUAGE sql AS $$
  SELECT m.item_id, round(m.score::numeric, 5), m.rank, m.channels, m.channel_ranks, m.channel_scores
    FROM (SELECT array_agg(channel ORDER BY channel, item_id) AS c, array_agg(item_id ORDER BY channel, item_id) AS i,
                 array_agg(score ORDER BY channel, item_id) AS s FROM ch_cands) x,
         twotower.merge(x.c, x.i, x.s, k, strategy, opts, excl) m $$;
SELECT * FROM pg_temp.merged('quota', '{"quotas": {"a": 3, "b": 1}}', 6);
SELECT item_id, rank FROM pg_temp.merged('quota', '{"quotas": {"a": 1, "b": 5}}', 5);
SELECT item_id, rank FROM pg_temp.merged('round_robin', '{"snake": true}');
SELECT item_id, score, rank FROM pg_temp.merged('weighted_sum', '{"norm": "minmax"}');
SELECT item_id, score, rank FROM pg_temp.merged('weighted_sum', '{"norm": "rank", "weights": {"b": 2}}', 3);
SELECT item_id, score, rank, channels FROM pg_temp.merged('rrf', '{}', 10, ARRAY[6]::bigint[]);
-- The channel order of turns can be given.
SELECT item_id, rank FROM pg_temp.merged('round_robin', '{"order": ["b", "a"]}', 4);
-- A real funnel's first step: two-tower-like scores and Swing's, merged.
SELECT count(*) AS merged, count(DISTINCT item_id) AS distinct_items, bool_and(NOT item_id = ANY (ARRAY[2, 8, 14]::bigint[])) AS no_history
  FROM (SELECT array_agg(c) c, array_agg(i) i, array_agg(s) s FROM (
          SELECT 'swing' AS c, item_id AS i, score AS s FROM twotower.i2i_recall('ch_events_sw', ARRAY[2, 8, 14]::bigint[], k => 20)
          UNION ALL SELECT 'itemcf', item_id, score FROM twotower.i2i_recall('ch_events_cf', ARRAY[2, 8, 14]::bigint[], k => 20)) u) x,
       twotower.merge(x.c, x.i, x.s, 15, 'quota', '{"quotas": {"swing": 10, "itemcf": 5}}') m;
SELECT pg_temp.err($q$SELECT * FROM pg_temp.merged('borda', '{}')$q$);
SELECT pg_temp.err($q$SELECT * FROM pg_temp.merged('quota', '{}')$q$);
SELECT pg_temp.err($q$SELECT * FROM pg_temp.merged('rrf', '{"quotas": {"a": 1}}')$q$);
SELECT pg_temp.err($q$SELECT * FROM pg_temp.merged('rrf', '{"weights": {"a": -1}}')$q$);
SELECT pg_temp.err($q$SELECT * FROM pg_temp.merged('rrf', '{}', 0)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(ARRAY['a'], ARRAY[1, 2]::bigint[], ARRAY[1]::real[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(ARRAY['a', NULL], ARRAY[1, 2]::bigint[], ARRAY[1, 2]::real[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(ARRAY['a'], ARRAY[1]::bigint[], ARRAY['NaN']::real[])$q$);
SELECT count(*) AS empty_input FROM twotower.merge('{}'::text[], '{}'::bigint[], '{}'::real[]);
-- A NULL where a value is required names the argument (22004).
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(NULL, ARRAY[1]::bigint[], ARRAY[1]::real[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.merge(ARRAY['a'], ARRAY[1]::bigint[], ARRAY[1]::real[], NULL)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall('ch_cf', NULL)$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.i2i_recall(NULL, ARRAY[1]::bigint[])$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'swing', NULL, 'ch_x_nb')$q$);
SELECT pg_temp.err($q$SELECT * FROM twotower.build_channel('ch_x', 'swing', 'ch_tiny', 'ch_x_nb', NULL)$q$);
SELECT count(*) AS strict_null FROM twotower.refresh_channel(NULL);
