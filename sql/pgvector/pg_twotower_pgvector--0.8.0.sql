-- pg_twotower_pgvector: twotower_hnsw operator classes on pgvector's `vector` type, with
-- pgvector's own operators and pgvector's operator class names (for the twotower_hnsw access
-- method: the names do not clash with pgvector's hnsw and ivfflat classes). Moving an index
-- from pgvector's hnsw to ours is one statement:
--   CREATE INDEX ON items USING twotower_hnsw (embedding vector_cosine_ops);
-- and queries keep `ORDER BY embedding <=> $1 LIMIT k` unchanged.
\echo Use "CREATE EXTENSION pg_twotower_pgvector" to load this file. \quit

DO $$
DECLARE
    -- pgvector's schema: its type and operators are named with it.
    v text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                 JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
                WHERE e.extname OPERATOR(pg_catalog.=) 'vector');
    s text := '@extschema@';
BEGIN
    EXECUTE pg_catalog.format(
        'CREATE OPERATOR CLASS %s.vector_cosine_ops DEFAULT FOR TYPE %s.vector USING twotower_hnsw AS
             OPERATOR 1 %s.<=> (%s.vector, %s.vector) FOR ORDER BY pg_catalog.float_ops,
             FUNCTION 1 twotower.hnsw_support_cosine(internal)', s, v, v, v, v);
    EXECUTE pg_catalog.format(
        'CREATE OPERATOR CLASS %s.vector_ip_ops FOR TYPE %s.vector USING twotower_hnsw AS
             OPERATOR 1 %s.<#> (%s.vector, %s.vector) FOR ORDER BY pg_catalog.float_ops,
             FUNCTION 1 twotower.hnsw_support_ip(internal)', s, v, v, v, v);
    EXECUTE pg_catalog.format(
        'CREATE OPERATOR CLASS %s.vector_l2_ops FOR TYPE %s.vector USING twotower_hnsw AS
             OPERATOR 1 %s.<-> (%s.vector, %s.vector) FOR ORDER BY pg_catalog.float_ops,
             FUNCTION 1 twotower.hnsw_support_l2(internal)', s, v, v, v, v);
END
$$;
