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

-- * index_info shows the delta graph, the rows waiting for it and the folds.
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
	"delta_generation" TEXT  /* String */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'index_info_by_oid_wrapper';
CREATE FUNCTION twotower.index_info(index regclass)
RETURNS TABLE (dims integer, metric text, quantization text, m integer, ef_construction integer,
               generation text, graph_items bigint, graph_dead bigint, graph_orphans bigint,
               delta_items bigint, size_bytes bigint, image_bytes bigint, build_seconds double precision,
               cache_file text, cache_state text, delta_graph_items bigint, delta_pending bigint,
               folds bigint, delta_generation text)
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM twotower.index_info_by_oid($1::pg_catalog.oid) $$;
COMMENT ON FUNCTION twotower.index_info(regclass) IS 'health of a twotower_hnsw index: graph and delta sizes, dead entries, size on disk, cache file state';

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
