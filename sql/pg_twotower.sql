-- pg_twotower: distance functions and operators on real[], and the twotower_hnsw index access
-- method with its operator classes. Every object is schema-qualified. The operators and the
-- operator classes (and their families) live in the extension's own schema (@extschema@: public
-- unless CREATE EXTENSION ... SCHEMA says otherwise), so `ORDER BY v <=> q` and
-- `USING twotower_hnsw (v real_ip_ops)` work in any session, as pgvector's do; every function,
-- table and view lives in schema twotower and is called qualified.

CREATE FUNCTION twotower.cosine_distance(real[], real[]) RETURNS double precision
    AS 'MODULE_PATHNAME', 'twotower_cosine_distance' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION twotower.cosine_distance(real[], real[]) IS '1 - cosine similarity; NaN when a vector is all zeros';
CREATE FUNCTION twotower.inner_product(real[], real[]) RETURNS double precision
    AS 'MODULE_PATHNAME', 'twotower_inner_product' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.negative_inner_product(real[], real[]) RETURNS double precision
    AS 'MODULE_PATHNAME', 'twotower_negative_inner_product' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.l2_distance(real[], real[]) RETURNS double precision
    AS 'MODULE_PATHNAME', 'twotower_l2_distance' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.vector_dims(real[]) RETURNS integer
    AS 'MODULE_PATHNAME', 'twotower_vector_dims' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.vector_norm(real[]) RETURNS double precision
    AS 'MODULE_PATHNAME', 'twotower_vector_norm' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.l2_normalize(real[]) RETURNS real[]
    AS 'MODULE_PATHNAME', 'twotower_l2_normalize' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OPERATOR @extschema@.<=> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.cosine_distance,
    COMMUTATOR = OPERATOR(@extschema@.<=>)
);
CREATE OPERATOR @extschema@.<#> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.negative_inner_product,
    COMMUTATOR = OPERATOR(@extschema@.<#>)
);
CREATE OPERATOR @extschema@.<-> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.l2_distance,
    COMMUTATOR = OPERATOR(@extschema@.<->)
);

CREATE FUNCTION twotower.hnsw_handler(internal) RETURNS index_am_handler
    AS 'MODULE_PATHNAME', 'twotower_hnsw_handler' LANGUAGE C;
CREATE ACCESS METHOD twotower_hnsw TYPE INDEX HANDLER twotower.hnsw_handler;
COMMENT ON ACCESS METHOD twotower_hnsw IS 'usearch HNSW over real[] (pg_twotower)';

-- Support function 1 names the metric of each operator class; it is never called.
CREATE FUNCTION twotower.hnsw_support_cosine(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'twotower_hnsw_support' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.hnsw_support_ip(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'twotower_hnsw_support' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION twotower.hnsw_support_l2(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'twotower_hnsw_support' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OPERATOR CLASS @extschema@.real_cosine_ops DEFAULT FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 @extschema@.<=> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_cosine(internal);
CREATE OPERATOR CLASS @extschema@.real_ip_ops FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 @extschema@.<#> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_ip(internal);
CREATE OPERATOR CLASS @extschema@.real_l2_ops FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 @extschema@.<-> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_l2(internal);

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

-- Removing cache files is housekeeping for the owner, not for every user.
REVOKE ALL ON FUNCTION twotower.cache_cleanup() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The model catalogue. Only the extension owner reads or writes these tables directly; the
-- functions check the caller's rights (model owner or twotower_admin) and then act as the owner
-- (see src/catalog.rs). Both tables are dumped by pg_dump with their data.
--
-- A model's owner is the owner of its *owner object*, an empty large object (owner_object): a
-- role oid with a shared dependency, so DROP ROLE is refused while the role owns models,
-- REASSIGN OWNED hands them over and renames are followed. The object depends on the
-- extension, so DROP EXTENSION is refused while models exist (CASCADE drops them).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'twotower_admin') THEN
        CREATE ROLE twotower_admin NOLOGIN;
    END IF;
END $$;

-- Everyone may use the operators and call the inference functions in the schema.
GRANT USAGE ON SCHEMA twotower TO PUBLIC;

CREATE TABLE twotower.model (
    name            text PRIMARY KEY,
    active_version  integer,
    next_version    integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    owner_object    oid,
    unknown_features text NOT NULL DEFAULT 'error'
                    CONSTRAINT model_unknown_features_check CHECK (unknown_features IN ('error', 'ignore'))
);
CREATE TABLE twotower.model_version (
    model        text NOT NULL REFERENCES twotower.model (name) ON DELETE CASCADE,
    version      integer NOT NULL,
    kind         text NOT NULL,
    dim          integer NOT NULL,
    metric       text NOT NULL CHECK (metric IN ('cosine', 'ip', 'l2')),
    parameters   bigint NOT NULL,
    checksum     bigint NOT NULL,
    spec         jsonb NOT NULL,
    weights      bytea NOT NULL,
    imported_by  name NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- For versions made by twotower.train: the sources and history features it was trained
    -- with (twotower.user_features builds serving inputs from them); NULL for imports.
    train_options jsonb,
    PRIMARY KEY (model, version)
);
-- safetensors do not compress; skip pglz work on import.
ALTER TABLE twotower.model_version ALTER COLUMN weights SET STORAGE EXTERNAL;
SELECT pg_catalog.pg_extension_config_dump('twotower.model', '');
SELECT pg_catalog.pg_extension_config_dump('twotower.model_version', '');
REVOKE ALL ON twotower.model, twotower.model_version FROM PUBLIC;

CREATE VIEW twotower.models AS
SELECT v.model AS name, v.version, (v.version = m.active_version) AS active, v.kind, v.dim,
       v.metric, v.parameters, pg_catalog.octet_length(v.weights)::bigint AS weight_bytes,
       ARRAY(SELECT f OPERATOR(pg_catalog.->>) 'name'
               FROM pg_catalog.jsonb_array_elements(v.spec OPERATOR(pg_catalog.->) 'features') AS f) AS features,
       pg_catalog.pg_get_userbyid(o.lomowner) AS owner, m.unknown_features, v.imported_by, v.imported_at
  FROM twotower.model m JOIN twotower.model_version v ON v.model = m.name
  LEFT JOIN pg_catalog.pg_largeobject_metadata o ON o.oid = m.owner_object;
COMMENT ON VIEW twotower.models IS 'models and their versions with their feature names (neither weights nor vocabularies are shown); active marks the serving version; owner is NULL when the owning role was removed with DROP OWNED (then only twotower_admin manages the model)';
GRANT SELECT ON twotower.models TO PUBLIC;

-- Inference is for every role that may connect (revoke EXECUTE to restrict it); the management
-- functions check model ownership / twotower_admin themselves.
REVOKE ALL ON FUNCTION twotower.import_model_file(text, text, text, boolean) FROM PUBLIC;

-- Training runs in progress (twotower.train), like pg_stat_progress_*: rows of the caller's
-- roles (all of them for pg_read_all_stats), joined with pg_stat_activity so a file left by a
-- crashed backend never shows.
CREATE VIEW twotower.train_progress AS
SELECT p.pid, a.datname, a.usename, p.user_model, p.item_model, p.phase, p.epoch, p.epochs,
       p.step, p.steps, p.loss, p.examples_per_s, p.last_recall, p.best_recall, p.best_epoch,
       p.started_at, p.updated_at
  FROM twotower.train_progress_info() AS p
  JOIN pg_catalog.pg_stat_activity AS a
    ON a.pid OPERATOR(pg_catalog.=) p.pid AND a.backend_start OPERATOR(pg_catalog.=) p.backend_start;
COMMENT ON VIEW twotower.train_progress IS 'training runs in progress: phase (reading, preparing, training, storing), epoch and step, mean loss of the epoch so far, examples/s, validation Recall@K (last and best epoch)';
GRANT SELECT ON twotower.train_progress TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Item-to-item channels (twotower.build_channel). The neighbours are an ordinary table of the
-- channel's owner; this catalogue records what built it. Only the extension owner reads or
-- writes it directly; the functions check the caller's rights (the neighbour table's owner, or
-- twotower_admin) and act as the owner. Dumped by pg_dump with its data.
CREATE TABLE twotower.channel (
    name              text PRIMARY KEY,
    kind              text NOT NULL CONSTRAINT channel_kind_check CHECK (kind IN ('itemcf', 'swing')),
    neighbors         regclass NOT NULL,
    interactions      regclass NOT NULL,
    user_column       text NOT NULL,
    item_column       text NOT NULL,
    time_column       text NOT NULL,
    weight_column     text,
    options           jsonb NOT NULL,
    built_at          timestamptz NOT NULL,
    -- The newest interaction time read (seconds for timestamps): refresh_channel reads newer ones.
    watermark         double precision,
    items             bigint NOT NULL,
    users             bigint NOT NULL,
    interactions_read bigint NOT NULL,
    rows              bigint NOT NULL,
    seconds           double precision
);
SELECT pg_catalog.pg_extension_config_dump('twotower.channel', '');
REVOKE ALL ON twotower.channel FROM PUBLIC;


CREATE VIEW twotower.channels AS
SELECT ch.name, ch.kind, ch.neighbors, pg_catalog.pg_get_userbyid(c.relowner) AS owner, ch.interactions,
       ch.user_column, ch.item_column, ch.time_column, ch.weight_column, ch.options, ch.built_at,
       ch.items, ch.users, ch.interactions_read, ch.rows, ch.seconds
  FROM twotower.channel ch LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) ch.neighbors;
COMMENT ON VIEW twotower.channels IS 'item-to-item channels: kind, neighbour table and its owner (the channel''s owner), sources, options, and the last build (items, users, interactions read, neighbour rows, seconds)';

-- A channel lives and dies with its neighbour table, as an index does with its table: dropping
-- the table (DROP TABLE, DROP SCHEMA ... CASCADE, DROP OWNED) removes the channel's row, so no
-- channel ever names a dropped table's oid (which a later table could reuse, e.g. after a
-- restore). SECURITY DEFINER (with a pinned search_path): the dropping role cannot write the
-- catalogue; the function deletes only rows of the relations just dropped.
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
GRANT SELECT ON twotower.channels TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Pipelines (twotower.save_pipeline): the funnel of one twotower.recommend call, as a checked
-- JSON definition. Owned like models (an owner object); only the extension owner reads or writes
-- the table directly; the view shows every pipeline. Dumped by pg_dump with its data.
CREATE TABLE twotower.pipeline (
    name          text PRIMARY KEY,
    owner_object  oid,
    definition    jsonb NOT NULL,
    updated_by    name NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
SELECT pg_catalog.pg_extension_config_dump('twotower.pipeline', '');
REVOKE ALL ON twotower.pipeline FROM PUBLIC;

-- Each user's interactions as the last build or refresh of a channel read them: their number
-- and an order-free digest. refresh_channel recomputes the users whose fingerprint changed, so
-- rows that arrive late (an old timestamp, committed after the build) count, and a restored
-- database (fingerprints dumped with the catalogue) finds nothing new.
CREATE TABLE twotower.channel_user (
    channel text NOT NULL REFERENCES twotower.channel (name) ON DELETE CASCADE ON UPDATE CASCADE,
    user_id text NOT NULL,
    rows    bigint NOT NULL,
    digest  bigint NOT NULL,
    PRIMARY KEY (channel, user_id)
);
SELECT pg_catalog.pg_extension_config_dump('twotower.channel_user', '');
REVOKE ALL ON twotower.channel_user FROM PUBLIC;

CREATE VIEW twotower.pipelines AS
SELECT p.name, pg_catalog.pg_get_userbyid(o.lomowner) AS owner, p.definition, p.updated_by, p.updated_at,
       CASE WHEN p.definition OPERATOR(pg_catalog.?) 'variants' THEN 'split' ELSE 'pipeline' END AS kind
  FROM twotower.pipeline p
  LEFT JOIN pg_catalog.pg_largeobject_metadata o ON o.oid OPERATOR(pg_catalog.=) p.owner_object;
COMMENT ON VIEW twotower.pipelines IS 'recommendation pipelines and splits of variants (twotower.recommend): definition, owner (NULL when the owning role was removed with DROP OWNED), last change, kind (pipeline or split)';
GRANT SELECT ON twotower.pipelines TO PUBLIC;

-- The pre-ranker's hot-item cache serves a table's rows only while the table has this trigger:
-- each statement that changes it empties every backend's cache at commit (docs/funnel.md).
-- Run as the caller (creating a trigger needs the table's ownership); ENABLE ALWAYS so that
-- changes applied by logical replication invalidate too. A partitioned table gets the trigger
-- on every member of its tree (statement triggers are not cloned to partitions, and a write to
-- a leaf fires only the leaf's); partitions created or attached later get it from the event
-- trigger below, and the cache serves a tree only while every member has it.
CREATE FUNCTION twotower.enable_item_cache(items regclass) RETURNS void
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

CREATE FUNCTION twotower.disable_item_cache(items regclass) RETURNS void
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

-- Partitions created (CREATE TABLE ... PARTITION OF) or attached (ALTER TABLE ... ATTACH
-- PARTITION) under a table whose item cache is enabled get the trigger too: the event trigger
-- (a C function: it reads the statement, src/item_cache.rs) calls item_cache_partitions() for
-- those two statements only. Runs as the user who ran the DDL (who owns the new partition).
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

-- DROP EXTENSION pg_twotower without CASCADE is refused while the catalogue holds models,
-- pipelines or channels, in a restored database too (src/guard.rs); with CASCADE the models'
-- owner objects are unlinked first.
CREATE FUNCTION twotower.drop_guard() RETURNS event_trigger
    AS 'MODULE_PATHNAME', 'twotower_drop_guard' LANGUAGE C;
COMMENT ON FUNCTION twotower.drop_guard() IS 'event trigger: refuses DROP EXTENSION pg_twotower without CASCADE while models, pipelines or channels exist';
CREATE EVENT TRIGGER twotower_drop_guard ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION twotower.drop_guard();

-- Row estimates that follow k (src/planner.rs): a call with a constant k is planned as k rows
-- (recommend and prerank without one: the pipeline's k; prerank: at most its candidates).
CREATE FUNCTION twotower.rows_support(internal) RETURNS internal
    AS 'MODULE_PATHNAME', 'twotower_rows_support' LANGUAGE C STRICT;
ALTER FUNCTION twotower.recall(text, regclass, jsonb, integer, bigint[], integer) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.i2i_recall(text, bigint[], real[], integer, bigint[]) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.merge(text[], bigint[], real[], integer, text, jsonb, bigint[]) ROWS 100 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.recommend(text, jsonb, integer, bigint[], text) ROWS 50 SUPPORT twotower.rows_support;
ALTER FUNCTION twotower.prerank(text, jsonb, bigint[], integer) ROWS 50 SUPPORT twotower.rows_support;

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
