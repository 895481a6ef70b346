-- pg_twotower 0.7.0 -> 0.8.0
-- * The operators <=>, <#>, <-> on real[] and the operator classes real_cosine_ops,
--   real_ip_ops, real_l2_ops (with their families) move from schema twotower to the
--   extension's own schema (public unless CREATE EXTENSION ... SCHEMA said otherwise), so they
--   work in any session without SET search_path. Indexes keep working (they refer to the
--   classes by oid); SQL text that spelled OPERATOR(twotower.<=>) or twotower.real_cosine_ops
--   must drop the schema (or name the new one).
DO $$
BEGIN
    IF '@extschema@' <> 'twotower' THEN
        ALTER OPERATOR twotower.<=> (real[], real[]) SET SCHEMA @extschema@;
        ALTER OPERATOR twotower.<#> (real[], real[]) SET SCHEMA @extschema@;
        ALTER OPERATOR twotower.<-> (real[], real[]) SET SCHEMA @extschema@;
        ALTER OPERATOR FAMILY twotower.real_cosine_ops USING twotower_hnsw SET SCHEMA @extschema@;
        ALTER OPERATOR FAMILY twotower.real_ip_ops USING twotower_hnsw SET SCHEMA @extschema@;
        ALTER OPERATOR FAMILY twotower.real_l2_ops USING twotower_hnsw SET SCHEMA @extschema@;
        ALTER OPERATOR CLASS twotower.real_cosine_ops USING twotower_hnsw SET SCHEMA @extschema@;
        ALTER OPERATOR CLASS twotower.real_ip_ops USING twotower_hnsw SET SCHEMA @extschema@;
        ALTER OPERATOR CLASS twotower.real_l2_ops USING twotower_hnsw SET SCHEMA @extschema@;
    END IF;
END
$$;

-- * The item cache on partitioned tables: the trigger on every partition (statement triggers
--   are not cloned), partitions created or attached later get it from an event trigger, and
--   existing partitioned tables with the trigger get it on their partitions now.
CREATE OR REPLACE FUNCTION twotower.enable_item_cache(items regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r regclass;
    n integer := 0;
BEGIN
    FOR r IN SELECT t.relid FROM (SELECT items AS relid, 0 AS level
                                   UNION SELECT p.relid, p.level FROM pg_catalog.pg_partition_tree(items) p) t
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
              WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
              ORDER BY t.level, t.relid
    LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER twotower_item_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION twotower.invalidate_item_cache()', r);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER twotower_item_cache', r);
        n := n OPERATOR(pg_catalog.+) 1;
    END LOOP;
    IF n OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION '"%" is not a table', items USING ERRCODE = 'wrong_object_type';
    END IF;
END $$;
COMMENT ON FUNCTION twotower.enable_item_cache(regclass) IS 'lets the pre-ranker cache the table''s item vectors and features in each backend (adds the twotower_item_cache trigger to the table and every partition)';
CREATE OR REPLACE FUNCTION twotower.disable_item_cache(items regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r regclass;
BEGIN
    FOR r IN SELECT t.relid FROM (SELECT items AS relid UNION SELECT p.relid FROM pg_catalog.pg_partition_tree(items) p) t
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid
              WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS twotower_item_cache ON %s', r);
    END LOOP;
END $$;
COMMENT ON FUNCTION twotower.disable_item_cache(regclass) IS 'drops the twotower_item_cache trigger (from the table and every partition): the pre-ranker reads the table on every call';
CREATE FUNCTION twotower.item_cache_partitions() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root regclass;
BEGIN
    FOR root IN
        SELECT DISTINCT a.relid
          FROM pg_catalog.pg_event_trigger_ddl_commands() d,
               LATERAL pg_catalog.pg_partition_ancestors(d.objid) a
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.objsubid OPERATOR(pg_catalog.=) 0
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                        WHERE t.tgrelid OPERATOR(pg_catalog.=) a.relid AND t.tgname OPERATOR(pg_catalog.=) 'twotower_item_cache')
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_partition_tree(a.relid) m
                        JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) m.relid
                        WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
                          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                                           WHERE t.tgrelid OPERATOR(pg_catalog.=) m.relid
                                             AND t.tgname OPERATOR(pg_catalog.=) 'twotower_item_cache'))
    LOOP
        PERFORM twotower.enable_item_cache(root);
    END LOOP;
END $$;
COMMENT ON FUNCTION twotower.item_cache_partitions() IS 'gives new partitions of an item-cached table the twotower_item_cache trigger (called by the twotower_item_cache_partitions event trigger)';
CREATE FUNCTION twotower.item_cache_ddl() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'twotower_item_cache_ddl' LANGUAGE C;
COMMENT ON FUNCTION twotower.item_cache_ddl() IS 'event trigger: after CREATE TABLE ... PARTITION OF and ATTACH PARTITION, gives new partitions of an item-cached table the twotower_item_cache trigger';
CREATE EVENT TRIGGER twotower_item_cache_partitions ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION twotower.item_cache_ddl();
SELECT twotower.enable_item_cache(t.tgrelid::pg_catalog.regclass)
  FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid
 WHERE t.tgname OPERATOR(pg_catalog.=) 'twotower_item_cache' AND c.relkind OPERATOR(pg_catalog.=) 'p';

-- * Channels: refresh_channel recomputes the users whose interactions changed (fingerprints),
--   whatever their time; a dropped neighbour table takes its channel with it.
CREATE TABLE twotower.channel_user (
    channel text NOT NULL REFERENCES twotower.channel (name) ON DELETE CASCADE ON UPDATE CASCADE,
    user_id text NOT NULL,
    rows    bigint NOT NULL,
    digest  bigint NOT NULL,
    PRIMARY KEY (channel, user_id)
);
SELECT pg_catalog.pg_extension_config_dump('twotower.channel_user', '');
REVOKE ALL ON twotower.channel_user FROM PUBLIC;
DELETE FROM twotower.channel ch
 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) ch.neighbors::pg_catalog.oid);
CREATE FUNCTION twotower.channel_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.to_regclass('twotower.channel') IS NULL THEN
        RETURN;  -- the extension itself is being dropped
    END IF;
    DELETE FROM twotower.channel ch
     USING pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.objsubid OPERATOR(pg_catalog.=) 0
       AND ch.neighbors::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid;
END $$;
REVOKE ALL ON FUNCTION twotower.channel_drop() FROM PUBLIC;
COMMENT ON FUNCTION twotower.channel_drop() IS 'event trigger: removes the channels whose neighbour table was dropped';
CREATE EVENT TRIGGER twotower_channel_drop ON sql_drop
    EXECUTE FUNCTION twotower.channel_drop();

-- * DROP EXTENSION without CASCADE is refused while the catalogue holds rows, in a restored
--   database too.
CREATE FUNCTION twotower.drop_guard() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'twotower_drop_guard' LANGUAGE C;
COMMENT ON FUNCTION twotower.drop_guard() IS 'event trigger: refuses DROP EXTENSION pg_twotower without CASCADE while models, pipelines or channels exist';
CREATE EVENT TRIGGER twotower_drop_guard ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION twotower.drop_guard();

-- * index_info shows the delta graph, the rows waiting for it and the folds, and the main
--   graph's tuning to sample queries (WITH (query_sample = ...)).
DROP FUNCTION twotower.index_info(regclass);
DROP FUNCTION twotower.index_info_by_oid(oid);
CREATE  FUNCTION twotower."index_info_by_oid"(
	"index" oid /* pg_sys :: Oid */
) RETURNS TABLE (
	"dims" INT,  /* i32 */
	"metric" TEXT,  /* String */
	"quantization" TEXT,  /* String */
	"m" INT,  /* i32 */
	"ef_construction" INT,  /* i32 */
	"generation" TEXT,  /* String */
	"graph_items" bigint,  /* i64 */
	"graph_dead" bigint,  /* i64 */
	"graph_orphans" bigint,  /* i64 */
	"delta_items" bigint,  /* i64 */
	"size_bytes" bigint,  /* i64 */
	"image_bytes" bigint,  /* i64 */
	"build_seconds" double precision,  /* f64 */
	"cache_file" TEXT,  /* Option < String > */
	"cache_state" TEXT,  /* String */
	"delta_graph_items" bigint,  /* i64 */
	"delta_pending" bigint,  /* i64 */
	"folds" bigint,  /* i64 */
	"delta_generation" TEXT,  /* String */
	"tuned_queries" INT,  /* Option < i32 > */
	"tuned_k" INT,  /* Option < i32 > */
	"tuned_links" bigint,  /* Option < i64 > */
	"tuned_recall_before" double precision,  /* Option < f64 > */
	"tuned_recall_after" double precision  /* Option < f64 > */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'index_info_by_oid_wrapper';
CREATE FUNCTION twotower.index_info(index regclass)
RETURNS TABLE (dims integer, metric text, quantization text, m integer, ef_construction integer,
               generation text, graph_items bigint, graph_dead bigint, graph_orphans bigint,
               delta_items bigint, size_bytes bigint, image_bytes bigint, build_seconds double precision,
               cache_file text, cache_state text, delta_graph_items bigint, delta_pending bigint,
               folds bigint, delta_generation text, tuned_queries integer, tuned_k integer,
               tuned_links bigint, tuned_recall_before double precision,
               tuned_recall_after double precision)
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM twotower.index_info_by_oid($1::pg_catalog.oid) $$;
COMMENT ON FUNCTION twotower.index_info(regclass) IS 'health of a twotower_hnsw index: graph and delta sizes, dead entries, size on disk, cache file state, its tuning to sample queries';

-- * Models run only for their owner, the roles granted usage (twotower.grant_model_usage) and
--   twotower_admin. The models that exist keep running for everyone, as before the update:
--   revoke with twotower.revoke_model_usage(name, 'PUBLIC').
CREATE  FUNCTION twotower."grant_model_usage"(
	"name" TEXT, /* & str */
	"grantee" TEXT /* & str */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'grant_model_usage_wrapper';
CREATE  FUNCTION twotower."revoke_model_usage"(
	"name" TEXT, /* & str */
	"grantee" TEXT /* & str */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'revoke_model_usage_wrapper';
DO $$
DECLARE
    o oid;
BEGIN
    FOR o IN SELECT m.owner_object FROM twotower.model m
               JOIN pg_catalog.pg_largeobject_metadata l ON l.oid OPERATOR(pg_catalog.=) m.owner_object
    LOOP
        EXECUTE pg_catalog.format('GRANT SELECT ON LARGE OBJECT %s TO PUBLIC', o);
    END LOOP;
END
$$;

-- Row estimates that follow k (src/planner.rs): a call with a constant k is planned as k rows
-- (recommend and prerank without one: the pipeline's k; prerank: at most its candidates).
CREATE FUNCTION twotower.rows_support(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'twotower_rows_support' LANGUAGE C STRICT;
ALTER FUNCTION twotower.recall(text, regclass, jsonb, integer, bigint[], integer) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.i2i_recall(text, bigint[], real[], integer, bigint[]) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.merge(text[], bigint[], real[], integer, text, jsonb, bigint[]) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.recommend(text, jsonb, integer, bigint[]) ROWS 50 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.prerank(text, jsonb, bigint[], integer) ROWS 50 SUPPORT twotower.rows_support;

-- * Negative feedback: train() takes a label column (above 0 positive, below 0 negative
--   feedback, 0 neither); evaluate() groups a user's rows into one query and reports NEG@k for
--   negative_queries.
DROP FUNCTION twotower.train(text, text, regclass, jsonb, regclass, regclass, regclass, text, text, text, text, bool);
CREATE  FUNCTION twotower."train"(
	"user_model" TEXT, /* Option < & str > */
	"item_model" TEXT, /* Option < & str > */
	"interactions" regclass, /* Option < RegClass > */
	"options" jsonb, /* Option < JsonbValue > */
	"user_features" regclass DEFAULT NULL, /* Option < RegClass > */
	"item_features" regclass DEFAULT NULL, /* Option < RegClass > */
	"hard_negatives" regclass DEFAULT NULL, /* Option < RegClass > */
	"user_column" TEXT DEFAULT 'user_id', /* Option < & str > */
	"item_column" TEXT DEFAULT 'item_id', /* Option < & str > */
	"time_column" TEXT DEFAULT 'ts', /* Option < & str > */
	"weight_column" TEXT DEFAULT NULL, /* Option < & str > */
	"activate" bool DEFAULT true, /* Option < bool > */
	"label_column" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"model" TEXT,  /* String */
	"version" INT,  /* i32 */
	"kind" TEXT,  /* String */
	"parameters" bigint,  /* i64 */
	"best_epoch" INT,  /* i32 */
	"valid_recall" double precision,  /* Option < f64 > */
	"valid_ndcg" double precision,  /* Option < f64 > */
	"train_examples" bigint  /* i64 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'train_wrapper';
DROP FUNCTION twotower.evaluate(text, regclass, regclass, regclass, int[], bool);
CREATE  FUNCTION twotower."evaluate"(
	"user_model" TEXT, /* Option < & str > */
	"index" regclass, /* Option < RegClass > */
	"queries" regclass, /* Option < RegClass > */
	"seen" regclass DEFAULT NULL, /* Option < RegClass > */
	"k" INT[] DEFAULT '{10,50}', /* :: std :: option :: Option < Vec < i32 > > */
	"via_index" bool DEFAULT true, /* Option < bool > */
	"negative_queries" regclass DEFAULT NULL /* Option < RegClass > */
) RETURNS TABLE (
	"method" TEXT,  /* String */
	"metric" TEXT,  /* String */
	"k" INT,  /* i32 */
	"value" double precision,  /* f64 */
	"queries" bigint  /* i64 */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'evaluate_wrapper';

-- * Splits (variants of a pipeline under one name with a deterministic traffic split),
--   the pipelines' change history, the impression log and feedback, online metrics
--   (docs/serving.md). recommend gains request_id (and is VOLATILE: with a request id it
--   writes the log); a view or function that depends on the old recommend must be dropped
--   before this update and created again after it.
-- The old function's privileges (a DBA's REVOKE ... FROM PUBLIC, GRANTs to application roles)
-- carry over to the new one.
SELECT pg_catalog.set_config('pg_twotower_upgrade.recommend_acl',
       coalesce((SELECT p.proacl::text FROM pg_catalog.pg_proc p
                  WHERE p.oid OPERATOR(pg_catalog.=) 'twotower.recommend(text, jsonb, integer, bigint[])'::pg_catalog.regprocedure), ''),
       true);
DROP FUNCTION twotower.recommend(text, jsonb, integer, bigint[]);
CREATE  FUNCTION twotower."recommend"(
	"pipeline" TEXT, /* Option < & str > */
	"features" jsonb, /* Option < JsonbValue > */
	"k" INT DEFAULT NULL, /* Option < i32 > */
	"exclude" bigint[] DEFAULT NULL, /* :: std :: option :: Option < Vec < Option < i64 > > > */
	"request_id" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"item_id" bigint,  /* i64 */
	"score" real,  /* f32 */
	"rank" INT,  /* i32 */
	"channels" TEXT[],  /* Vec < String > */
	"channel_ranks" INT[]  /* Vec < i32 > */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'recommend_wrapper';
ALTER FUNCTION twotower.recommend(text, jsonb, integer, bigint[], text) ROWS 50 SUPPORT twotower.rows_support;
DO $$
DECLARE
    acl text := pg_catalog.current_setting('pg_twotower_upgrade.recommend_acl');
    g record;
BEGIN
    IF acl OPERATOR(pg_catalog.<>) '' THEN
        REVOKE ALL ON FUNCTION twotower.recommend(text, jsonb, integer, bigint[], text) FROM PUBLIC;
        FOR g IN SELECT a.grantee, a.privilege_type, a.is_grantable
                   FROM pg_catalog.aclexplode(acl::pg_catalog.aclitem[]) a
                  WHERE a.grantee OPERATOR(pg_catalog.<>) a.grantor
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION twotower.recommend(text, jsonb, integer, bigint[], text) TO %s%s',
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END IF;
END
$$;
CREATE  FUNCTION twotower."feedback"(
	"request_id" TEXT, /* Option < & str > */
	"item_id" bigint, /* Option < i64 > */
	"kind" TEXT DEFAULT 'click', /* Option < & str > */
	"value" real DEFAULT NULL /* Option < f32 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'feedback_wrapper';
CREATE  FUNCTION twotower."variant_of"(
	"split" TEXT, /* & str */
	"unit" TEXT /* & str */
) RETURNS TABLE (
	"variant" TEXT,  /* String */
	"pipeline" TEXT,  /* String */
	"bucket" INT  /* i32 */
)
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'variant_of_wrapper';
CREATE OR REPLACE VIEW twotower.pipelines AS
SELECT p.name, pg_catalog.pg_get_userbyid(o.lomowner) AS owner, p.definition, p.updated_by, p.updated_at,
       CASE WHEN p.definition OPERATOR(pg_catalog.?) 'variants' THEN 'split' ELSE 'pipeline' END AS kind
  FROM twotower.pipeline p
  LEFT JOIN pg_catalog.pg_largeobject_metadata o ON o.oid OPERATOR(pg_catalog.=) p.owner_object;
COMMENT ON VIEW twotower.pipelines IS 'recommendation pipelines and splits of variants (twotower.recommend): definition, owner (NULL when the owning role was removed with DROP OWNED), last change, kind (pipeline or split)';

-- ---------------------------------------------------------------------------------------------
-- Serving in production (docs/serving.md): the history of every pipeline and split saved or
-- dropped, the impression log written by recommend(..., request_id => ...), and the feedback
-- recorded against it (twotower.feedback). Append-only tables written by those functions as
-- the extension owner; nobody else writes or reads them directly. twotower_admin reads them
-- through the views below; an application role writes its own lists and feedback and reads
-- nothing. Dumped by pg_dump with their data.
CREATE TABLE twotower.pipeline_history (
    name        text NOT NULL,
    action      text NOT NULL CHECK (action IN ('save', 'drop')),
    definition  jsonb,
    changed_by  name NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
SELECT pg_catalog.pg_extension_config_dump('twotower.pipeline_history', '');
REVOKE ALL ON twotower.pipeline_history FROM PUBLIC;
CREATE INDEX pipeline_history_name ON twotower.pipeline_history (name, changed_at);
CREATE VIEW twotower.pipeline_changes AS
SELECT h.name, h.action, h.definition, h.changed_by, h.changed_at
  FROM twotower.pipeline_history h;
COMMENT ON VIEW twotower.pipeline_changes IS 'every save and drop of a pipeline or split (twotower.save_pipeline, drop_pipeline): the definition saved, by whom, when';
GRANT SELECT ON twotower.pipeline_changes TO PUBLIC;

-- One row per logged list: the items in rank order with their scores, and each item's rank in
-- each of the serving pipeline's channels (channel_ranks[(rank - 1) * cardinality(channels) + c],
-- 0 when channel c did not return it). logged_by is the role oid that called recommend; a
-- request id is unique per role (another role's ids are neither visible nor in the way).
-- features is NULL when the request's features were larger than twotower.log_max_feature_bytes.
CREATE TABLE twotower.impression_log (
    request_id    text NOT NULL,
    logged_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    logged_by     oid NOT NULL,
    pipeline      text NOT NULL,
    variant       text,
    served_by     text NOT NULL,
    unit          text,
    features      jsonb,
    items         bigint[] NOT NULL,
    scores        real[] NOT NULL,
    channels      text[] NOT NULL,
    channel_ranks integer[] NOT NULL
);
ALTER TABLE twotower.impression_log ADD CONSTRAINT impression_log_request UNIQUE (logged_by, request_id);
SELECT pg_catalog.pg_extension_config_dump('twotower.impression_log', '');
REVOKE ALL ON twotower.impression_log FROM PUBLIC;

-- One row per (list, item, kind): feedback recorded again replaces the value and time. Rows go
-- with their list (deleting an old list deletes its feedback).
CREATE TABLE twotower.feedback_log (
    logged_by    oid NOT NULL,
    request_id   text NOT NULL,
    item_id      bigint NOT NULL,
    kind         text NOT NULL,
    value        real,
    recorded_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    recorded_by  oid NOT NULL,
    PRIMARY KEY (logged_by, request_id, item_id, kind),
    FOREIGN KEY (logged_by, request_id) REFERENCES twotower.impression_log (logged_by, request_id) ON DELETE CASCADE
);
SELECT pg_catalog.pg_extension_config_dump('twotower.feedback_log', '');
REVOKE ALL ON twotower.feedback_log FROM PUBLIC;

-- One row per shown item, with the feedback recorded on it.
CREATE VIEW twotower.impressions AS
SELECT i.request_id, i.logged_at, pg_catalog.pg_get_userbyid(i.logged_by) AS logged_by,
       i.pipeline, i.variant, i.served_by, i.unit, s.item_id, s.rank::integer AS rank, s.score,
       ARRAY(SELECT i.channels[c] FROM pg_catalog.generate_subscripts(i.channels, 1) AS c
              WHERE i.channel_ranks[(s.rank OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) pg_catalog.cardinality(i.channels) OPERATOR(pg_catalog.+) c] OPERATOR(pg_catalog.>) 0
              ORDER BY c) AS channels,
       ARRAY(SELECT i.channel_ranks[(s.rank OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) pg_catalog.cardinality(i.channels) OPERATOR(pg_catalog.+) c]
               FROM pg_catalog.generate_subscripts(i.channels, 1) AS c
              WHERE i.channel_ranks[(s.rank OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.*) pg_catalog.cardinality(i.channels) OPERATOR(pg_catalog.+) c] OPERATOR(pg_catalog.>) 0
              ORDER BY c) AS channel_ranks,
       ARRAY(SELECT f.kind FROM twotower.feedback_log f
              WHERE f.logged_by OPERATOR(pg_catalog.=) i.logged_by AND f.request_id OPERATOR(pg_catalog.=) i.request_id
                AND f.item_id OPERATOR(pg_catalog.=) s.item_id
              ORDER BY f.recorded_at, f.kind) AS feedback
  FROM twotower.impression_log i
 CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(i.items), pg_catalog.unnest(i.scores)) WITH ORDINALITY AS s(item_id, score, rank);
COMMENT ON VIEW twotower.impressions IS 'the impression log (recommend with a request_id), one row per shown item: request, variant, rank, score, the channels that returned it, the feedback recorded on it';

CREATE VIEW twotower.feedback_events AS
SELECT f.request_id, pg_catalog.pg_get_userbyid(f.logged_by) AS logged_by, f.item_id, f.kind, f.value, f.recorded_at,
       pg_catalog.pg_get_userbyid(f.recorded_by) AS recorded_by
  FROM twotower.feedback_log f;
COMMENT ON VIEW twotower.feedback_events IS 'feedback recorded with twotower.feedback against logged lists';

-- The log as training examples. logged_requests/logged_candidates fit train_prerank's
-- requests and candidates (label 1: the item got positive feedback, a click or a like, as
-- online_metrics counts by default; 0: shown and not engaged with, an exposure-aware negative).
-- The request id of a training example is the role's oid and its request id, so that two
-- roles' ids never meet. Lists logged without their features are left out.
CREATE VIEW twotower.logged_requests AS
SELECT (i.logged_by::text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) i.request_id) AS request_id, i.features,
       i.logged_at, i.pipeline, i.variant, i.served_by, i.unit
  FROM twotower.impression_log i
 WHERE i.features IS NOT NULL;
COMMENT ON VIEW twotower.logged_requests IS 'logged requests with the features they were served with (train_prerank''s requests)';
CREATE VIEW twotower.logged_candidates AS
SELECT (i.logged_by::text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) i.request_id) AS request_id,
       s.item_id, s.rank::integer AS rank, s.score,
       CASE WHEN EXISTS (SELECT 1 FROM twotower.feedback_log f
                          WHERE f.logged_by OPERATOR(pg_catalog.=) i.logged_by AND f.request_id OPERATOR(pg_catalog.=) i.request_id
                            AND f.item_id OPERATOR(pg_catalog.=) s.item_id
                            AND f.kind OPERATOR(pg_catalog.=) ANY ('{click,like}'::text[]))
            THEN 1.0::real ELSE 0.0::real END AS label,
       EXISTS (SELECT 1 FROM twotower.feedback_log f
                WHERE f.logged_by OPERATOR(pg_catalog.=) i.logged_by AND f.request_id OPERATOR(pg_catalog.=) i.request_id
                  AND f.item_id OPERATOR(pg_catalog.=) s.item_id
                  AND f.kind OPERATOR(pg_catalog.=) ANY ('{dislike,skip}'::text[])) AS disliked
  FROM twotower.impression_log i
 CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(i.items), pg_catalog.unnest(i.scores)) WITH ORDINALITY AS s(item_id, score, rank)
 WHERE i.features IS NOT NULL;
COMMENT ON VIEW twotower.logged_candidates IS 'every logged (request, item) with label 1 for a click or like and 0 for shown and not engaged with (train_prerank''s candidates), and whether it was disliked or skipped';

REVOKE ALL ON twotower.impressions, twotower.feedback_events, twotower.logged_requests, twotower.logged_candidates FROM PUBLIC;
GRANT SELECT ON twotower.impressions, twotower.feedback_events, twotower.logged_requests, twotower.logged_candidates TO twotower_admin;
-- twotower_admin keeps the log bounded (DELETE old rows; docs/serving.md).
GRANT SELECT, DELETE ON twotower.impression_log, twotower.feedback_log, twotower.pipeline_history TO twotower_admin;

-- Online metrics per variant over the log (docs/serving.md): requests, impressions, positive
-- feedback (kinds in `positive`), CTR and the share of requests with a hit in the top k (HR@k),
-- NDCG@k of the engaged items, catalogue coverage and the long-tail share of impressions (items
-- outside the 20 % most engaged-with items of the window), each rate with a 95 % interval
-- (Wilson for proportions, normal for NDCG: NULL for one request), and HR@k's difference to the
-- first variant with traffic in the split's current definition (the control) with its 95 %
-- interval. Reads the log through the views above: twotower_admin only.
CREATE FUNCTION twotower.online_metrics(
    pipeline text,
    since timestamptz DEFAULT NULL,
    until timestamptz DEFAULT NULL,
    k integer DEFAULT NULL,
    positive text[] DEFAULT '{click,like}'
) RETURNS TABLE (
    variant text, served_by text, requests bigint, units bigint, impressions bigint,
    engaged bigint, ctr double precision, ctr_low double precision, ctr_high double precision,
    hit_rate double precision, hit_rate_low double precision, hit_rate_high double precision,
    ndcg double precision, ndcg_low double precision, ndcg_high double precision,
    coverage bigint, long_tail_share double precision,
    hit_rate_diff double precision, hit_rate_diff_low double precision, hit_rate_diff_high double precision
)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF k IS NOT NULL AND k < 1 THEN
        RAISE EXCEPTION 'k must be at least 1, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH shown AS (
        SELECT i.logged_by || ':' || i.request_id AS request_id, coalesce(i.variant, '') AS variant, i.served_by,
               i.unit, i.item_id, i.rank, i.feedback && online_metrics.positive AS hit
          FROM twotower.impressions i
         WHERE i.pipeline = online_metrics.pipeline
           AND (since IS NULL OR i.logged_at >= since)
           AND (until IS NULL OR i.logged_at < until)
           AND (k IS NULL OR i.rank <= k)
    ), popularity AS (
        -- The head: items with engagement whose rank by it is in the top 20 % (ties alike).
        SELECT s.item_id, count(*) FILTER (WHERE s.hit) AS hits,
               rank() OVER (ORDER BY count(*) FILTER (WHERE s.hit) DESC) AS r, count(*) OVER () AS n
          FROM shown s GROUP BY s.item_id
    ), per_request AS (
        SELECT s.request_id, s.variant, s.served_by, s.unit, bool_or(s.hit) AS hit,
               coalesce(sum(1.0 / log(2, s.rank + 1.0)) FILTER (WHERE s.hit), 0)
                 / nullif((SELECT sum(1.0 / log(2, j + 1.0)) FROM generate_series(1, count(*) FILTER (WHERE s.hit)::integer) j), 0) AS ndcg
          FROM shown s GROUP BY s.request_id, s.variant, s.served_by, s.unit
    ), v AS (
        SELECT r.variant, string_agg(DISTINCT r.served_by, ', ') AS served_by, count(*) AS requests,
               count(DISTINCT r.unit) AS units,
               avg(r.hit::integer::double precision) AS hr, avg(coalesce(r.ndcg, 0)::double precision) AS nd,
               stddev_samp(coalesce(r.ndcg, 0)::double precision) AS nd_sd
          FROM per_request r GROUP BY r.variant
    ), vi AS (
        SELECT s.variant, count(*) AS impressions, count(*) FILTER (WHERE s.hit) AS engaged,
               count(DISTINCT s.item_id) AS coverage,
               avg((p.hits = 0 OR p.r > ceil(0.2 * p.n))::integer::double precision) AS tail
          FROM shown s JOIN popularity p USING (item_id) GROUP BY s.variant
    ), ord AS (
        SELECT e.value ->> 'name' AS variant, e.o, (e.value ->> 'share')::numeric > 0 AS live
          FROM twotower.pipelines p, jsonb_array_elements(p.definition -> 'variants') WITH ORDINALITY AS e(value, o)
         WHERE p.name = online_metrics.pipeline
    ), joined AS (
        SELECT v.*, vi.impressions, vi.engaged, vi.coverage, vi.tail,
               vi.engaged::double precision / vi.impressions AS ctr_p,
               coalesce(o.o, 1000000) AS o
          FROM v JOIN vi USING (variant) LEFT JOIN ord o USING (variant)
    ), control AS (
        -- The split's first listed variant with a share above 0 (no control, no differences,
        -- if it got no requests in the window).
        SELECT j.hr AS c_hr, j.requests AS c_n, j.variant AS c_variant FROM joined j
         WHERE j.o = (SELECT min(o) FROM ord WHERE live)
    )
    SELECT nullif(j.variant, ''), j.served_by, j.requests, j.units, j.impressions, j.engaged,
           j.ctr_p,
           (j.ctr_p + 1.9208 / j.impressions - 1.96 * sqrt(j.ctr_p * (1 - j.ctr_p) / j.impressions + 0.9604 / j.impressions ^ 2)) / (1 + 3.8416 / j.impressions),
           (j.ctr_p + 1.9208 / j.impressions + 1.96 * sqrt(j.ctr_p * (1 - j.ctr_p) / j.impressions + 0.9604 / j.impressions ^ 2)) / (1 + 3.8416 / j.impressions),
           j.hr,
           (j.hr + 1.9208 / j.requests - 1.96 * sqrt(j.hr * (1 - j.hr) / j.requests + 0.9604 / j.requests ^ 2)) / (1 + 3.8416 / j.requests),
           (j.hr + 1.9208 / j.requests + 1.96 * sqrt(j.hr * (1 - j.hr) / j.requests + 0.9604 / j.requests ^ 2)) / (1 + 3.8416 / j.requests),
           j.nd,
           j.nd - 1.96 * j.nd_sd / sqrt(j.requests),
           j.nd + 1.96 * j.nd_sd / sqrt(j.requests),
           j.coverage, j.tail,
           CASE WHEN c.c_variant IS NULL OR j.variant = '' OR j.variant = c.c_variant THEN NULL ELSE j.hr - c.c_hr END,
           CASE WHEN c.c_variant IS NULL OR j.variant = '' OR j.variant = c.c_variant THEN NULL
                ELSE j.hr - c.c_hr - 1.96 * sqrt(j.hr * (1 - j.hr) / j.requests + c.c_hr * (1 - c.c_hr) / c.c_n) END,
           CASE WHEN c.c_variant IS NULL OR j.variant = '' OR j.variant = c.c_variant THEN NULL
                ELSE j.hr - c.c_hr + 1.96 * sqrt(j.hr * (1 - j.hr) / j.requests + c.c_hr * (1 - c.c_hr) / c.c_n) END
      FROM joined j LEFT JOIN control c ON true
     ORDER BY j.o, j.variant;
END $$;
REVOKE ALL ON FUNCTION twotower.online_metrics(text, timestamptz, timestamptz, integer, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION twotower.online_metrics(text, timestamptz, timestamptz, integer, text[]) TO twotower_admin;
COMMENT ON FUNCTION twotower.online_metrics(text, timestamptz, timestamptz, integer, text[]) IS 'per-variant CTR, HR@k, NDCG@k with 95 % intervals, coverage, long-tail share and the HR@k difference to the control, from the impression log (twotower_admin)';

-- * Multi-task pre-rank models (train_prerank's "tasks"; a stage's "score"): recommend_explain
--   gains a scores column (a model stage's scores of its kept items, by task). Its privileges
--   carry over as recommend's do; a view or function that depends on the old recommend_explain
--   must be dropped before this update and created again after it.
SELECT pg_catalog.set_config('pg_twotower_upgrade.explain_acl',
       coalesce((SELECT p.proacl::text FROM pg_catalog.pg_proc p
                  WHERE p.oid OPERATOR(pg_catalog.=) 'twotower.recommend_explain(text, jsonb, integer, bigint[])'::pg_catalog.regprocedure), ''),
       true);
DROP FUNCTION twotower.recommend_explain(text, jsonb, integer, bigint[]);
CREATE  FUNCTION twotower."recommend_explain"(
	"pipeline" TEXT, /* Option < & str > */
	"features" jsonb, /* Option < JsonbValue > */
	"k" INT DEFAULT NULL, /* Option < i32 > */
	"exclude" bigint[] DEFAULT NULL /* :: std :: option :: Option < Vec < Option < i64 > > > */
) RETURNS TABLE (
	"step" INT,  /* i32 */
	"stage" TEXT,  /* String */
	"received" INT,  /* Option < i32 > */
	"kept" INT,  /* i32 */
	"ms" double precision,  /* f64 */
	"kept_items" bigint[],  /* Vec < i64 > */
	"dropped_items" bigint[],  /* Vec < i64 > */
	"scores" jsonb  /* Option < pgrx::JsonB > */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'recommend_explain_wrapper';
DO $$
DECLARE
    acl text := pg_catalog.current_setting('pg_twotower_upgrade.explain_acl');
    g record;
BEGIN
    IF acl OPERATOR(pg_catalog.<>) '' THEN
        REVOKE ALL ON FUNCTION twotower.recommend_explain(text, jsonb, integer, bigint[]) FROM PUBLIC;
        FOR g IN SELECT a.grantee, a.privilege_type, a.is_grantable
                   FROM pg_catalog.aclexplode(acl::pg_catalog.aclitem[]) a
                  WHERE a.grantee OPERATOR(pg_catalog.<>) a.grantor
        LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION twotower.recommend_explain(text, jsonb, integer, bigint[]) TO %s%s',
                CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                     ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
    END IF;
END
$$;

-- * refresh_item_vectors between co-located Citus tables runs on the workers: the item tower
--   is shipped with the statement to this function (it reads no table; any role may call it).
CREATE  FUNCTION twotower."embed_item_shipped"(
	"checksum" bigint, /* i64 */
	"spec" TEXT, /* &str */
	"weights" bytea, /* &[u8] */
	"id" bigint, /* i64 */
	"features" jsonb /* JsonbValue */
) RETURNS real[] /* alloc::vec::Vec<f32> */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'embed_item_shipped_wrapper';

-- * distribute_model: a model's active version copied to every Citus worker.
CREATE  FUNCTION twotower."distribute_model"(
	"name" TEXT /* &str */
) RETURNS TABLE (
	"node" TEXT,  /* String */
	"version" INT  /* i32 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'distribute_model_wrapper';
