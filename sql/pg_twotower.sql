-- pg_twotower: distance functions and operators on real[], and the twotower_hnsw index access
-- method with its operator classes. Every object is schema-qualified.

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

CREATE OPERATOR twotower.<=> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.cosine_distance,
    COMMUTATOR = OPERATOR(twotower.<=>)
);
CREATE OPERATOR twotower.<#> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.negative_inner_product,
    COMMUTATOR = OPERATOR(twotower.<#>)
);
CREATE OPERATOR twotower.<-> (
    LEFTARG = real[], RIGHTARG = real[], FUNCTION = twotower.l2_distance,
    COMMUTATOR = OPERATOR(twotower.<->)
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

CREATE OPERATOR CLASS twotower.real_cosine_ops DEFAULT FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 twotower.<=> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_cosine(internal);
CREATE OPERATOR CLASS twotower.real_ip_ops FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 twotower.<#> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_ip(internal);
CREATE OPERATOR CLASS twotower.real_l2_ops FOR TYPE real[] USING twotower_hnsw AS
    OPERATOR 1 twotower.<-> (real[], real[]) FOR ORDER BY pg_catalog.float_ops,
    FUNCTION 1 twotower.hnsw_support_l2(internal);

CREATE FUNCTION twotower.index_info(index regclass)
RETURNS TABLE (dims integer, metric text, quantization text, m integer, ef_construction integer,
               generation text, graph_items bigint, graph_dead bigint, graph_orphans bigint,
               delta_items bigint, size_bytes bigint, image_bytes bigint, build_seconds double precision,
               cache_file text, cache_state text)
LANGUAGE sql VOLATILE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM twotower.index_info_by_oid($1::pg_catalog.oid) $$;
COMMENT ON FUNCTION twotower.index_info(regclass) IS 'health of a twotower_hnsw index: graph and delta sizes, dead entries, size on disk, cache file state';

-- Removing cache files is housekeeping for the owner, not for every user.
REVOKE ALL ON FUNCTION twotower.cache_cleanup() FROM PUBLIC;
