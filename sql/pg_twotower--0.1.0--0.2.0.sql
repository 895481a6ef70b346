-- pg_twotower 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_twotower UPDATE TO '0.2.0').
--
-- * Model owners become role oids with a shared dependency: each model gets an *owner object*
--   (an empty large object owned by the owning role, depending on the extension) replacing the
--   owner name. A model whose owner role no longer exists gets no owner (only twotower_admin
--   manages it; twotower.alter_model_owner gives it one) and a WARNING names it.
-- * model.unknown_features ('error' | 'ignore', default 'error'), set with twotower.alter_model.
-- * model_version.kind is no longer limited to ('user', 'item') by a CHECK: the core validates
--   kinds, so new model kinds need no schema change.
-- * refresh_item_vectors: errors for feature columns that are missing without a default,
--   writes only changed vectors, deletes vectors of vanished items (delete_missing), and
--   returns (inserted, updated, deleted, unchanged) instead of one count.
-- * New: twotower.alter_model_owner, twotower.alter_model, twotower.export_model.

\echo Use "ALTER EXTENSION pg_twotower UPDATE TO '0.2.0'" to load this file. \quit

ALTER TABLE twotower.model ADD COLUMN owner_object oid;
ALTER TABLE twotower.model ADD COLUMN unknown_features text NOT NULL DEFAULT 'error'
    CONSTRAINT model_unknown_features_check CHECK (unknown_features IN ('error', 'ignore'));
ALTER TABLE twotower.model_version DROP CONSTRAINT model_version_kind_check;

DROP FUNCTION twotower.refresh_item_vectors(text, regclass, regclass, text, text, text, integer);

CREATE  FUNCTION twotower."refresh_item_vectors"(
	"model" TEXT, /* & str */
	"items" regclass, /* RegClass */
	"target" regclass, /* RegClass */
	"id_column" TEXT DEFAULT 'id', /* & str */
	"target_id_column" TEXT DEFAULT 'id', /* & str */
	"target_vector_column" TEXT DEFAULT 'embedding', /* & str */
	"batch_size" INT DEFAULT 1000, /* i32 */
	"delete_missing" bool DEFAULT true /* bool */
) RETURNS TABLE (
	"inserted" bigint,  /* i64 */
	"updated" bigint,  /* i64 */
	"deleted" bigint,  /* i64 */
	"unchanged" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'refresh_item_vectors_wrapper';

CREATE  FUNCTION twotower."alter_model"(
	"name" TEXT, /* Option < & str > */
	"unknown_features" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'alter_model_wrapper';

CREATE  FUNCTION twotower."alter_model_owner"(
	"name" TEXT, /* & str */
	"new_owner" regrole /* RegRole */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'alter_model_owner_wrapper';

CREATE  FUNCTION twotower."export_model"(
	"name" TEXT, /* Option < & str > */
	"version" INT DEFAULT NULL /* Option < i32 > */
) RETURNS TABLE (
	"version" INT,  /* i32 */
	"spec" jsonb,  /* pgrx :: JsonB */
	"weights" bytea  /* Vec < u8 > */
)
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'export_model_wrapper';


-- Owners by oid. alter_model_owner creates the owner object (and its dependency on the
-- extension); this script runs as a superuser, who may give a model to any role.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT m.name, m.owner, a.oid AS role
               FROM twotower.model m LEFT JOIN pg_catalog.pg_authid a ON a.rolname = m.owner
              ORDER BY m.name
    LOOP
        IF r.role IS NULL THEN
            RAISE WARNING 'model "%": its owner role "%" no longer exists; only members of twotower_admin manage it now',
                r.name, r.owner
                USING HINT = 'Give it an owner with SELECT twotower.alter_model_owner(name, role).';
        ELSE
            PERFORM twotower.alter_model_owner(r.name, r.role::pg_catalog.regrole);
        END IF;
    END LOOP;
END $$;

DROP VIEW twotower.models;
ALTER TABLE twotower.model DROP COLUMN owner;

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
