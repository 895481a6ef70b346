-- pg_twotower 0.4.0 -> 0.5.0
-- * New: pipelines (the table twotower.pipeline, the view twotower.pipelines,
--   twotower.save_pipeline, drop_pipeline) and the funnel in one call: twotower.recommend,
--   recommend_explain, prerank.
-- * New: the pre-ranker's hot-item cache (twotower.enable_item_cache, disable_item_cache, the
--   trigger function twotower.invalidate_item_cache, twotower.item_cache_info).
-- * Models (no schema change): the model kind 'prerank' (pre-rank DNNs with user, item and
--   cross features).

CREATE  FUNCTION twotower."recommend"(
	"pipeline" TEXT, /* Option < & str > */
	"features" jsonb, /* Option < JsonbValue > */
	"k" INT DEFAULT NULL, /* Option < i32 > */
	"exclude" bigint[] DEFAULT NULL /* :: std :: option :: Option < Vec < Option < i64 > > > */
) RETURNS TABLE (
	"item_id" bigint,  /* i64 */
	"score" real,  /* f32 */
	"rank" INT,  /* i32 */
	"channels" TEXT[],  /* Vec < String > */
	"channel_ranks" INT[]  /* Vec < i32 > */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'recommend_wrapper';

CREATE  FUNCTION twotower."save_pipeline"(
	"name" TEXT, /* & str */
	"definition" jsonb /* JsonbValue */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'save_pipeline_wrapper';

CREATE  FUNCTION twotower."prerank"(
	"pipeline" TEXT, /* Option < & str > */
	"features" jsonb, /* Option < JsonbValue > */
	"candidates" bigint[], /* :: std :: option :: Option < Vec < Option < i64 > > > */
	"k" INT DEFAULT NULL /* Option < i32 > */
) RETURNS TABLE (
	"item_id" bigint,  /* i64 */
	"score" real,  /* f32 */
	"rank" INT  /* i32 */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'prerank_wrapper';

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
	"dropped_items" bigint[]  /* Vec < i64 > */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'recommend_explain_wrapper';

CREATE  FUNCTION twotower."drop_pipeline"(
	"name" TEXT /* & str */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'drop_pipeline_wrapper';

CREATE  FUNCTION twotower."item_cache_info"() RETURNS TABLE (
	"entries" bigint,  /* i64 */
	"bytes" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'item_cache_info_wrapper';

CREATE FUNCTION twotower."invalidate_item_cache"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'invalidate_item_cache_wrapper';

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

CREATE VIEW twotower.pipelines AS
SELECT p.name, pg_catalog.pg_get_userbyid(o.lomowner) AS owner, p.definition, p.updated_by, p.updated_at
  FROM twotower.pipeline p
  LEFT JOIN pg_catalog.pg_largeobject_metadata o ON o.oid OPERATOR(pg_catalog.=) p.owner_object;
COMMENT ON VIEW twotower.pipelines IS 'recommendation pipelines (twotower.recommend): definition, owner (NULL when the owning role was removed with DROP OWNED), last change';
GRANT SELECT ON twotower.pipelines TO PUBLIC;

-- The pre-ranker's hot-item cache serves a table's rows only while the table has this trigger:
-- each statement that changes it empties every backend's cache at commit (docs/funnel.md).
-- Run as the caller (creating a trigger needs the table's ownership); ENABLE ALWAYS so that
-- changes applied by logical replication invalidate too.
CREATE FUNCTION twotower.enable_item_cache(items regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('CREATE OR REPLACE TRIGGER twotower_item_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION twotower.invalidate_item_cache()', items);
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER twotower_item_cache', items);
END $$;
COMMENT ON FUNCTION twotower.enable_item_cache(regclass) IS 'lets the pre-ranker cache the table''s item vectors and features in each backend (adds the twotower_item_cache trigger)';

CREATE FUNCTION twotower.disable_item_cache(items regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS twotower_item_cache ON %s', items);
END $$;
COMMENT ON FUNCTION twotower.disable_item_cache(regclass) IS 'drops the twotower_item_cache trigger: the pre-ranker reads the table on every call';
