-- pg_twotower 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_twotower UPDATE TO '0.3.0').
--
-- * New: twotower.train, training a two-tower model from an interactions table (and optional
--   user / item feature sources) into new versions of two models; twotower.user_features,
--   the serving-time input of a trained user tower; twotower.evaluate, ranking metrics of a
--   user tower against item vectors, exact and through an index.
-- * model_version.train_options: the sources and history features of trained versions.

\echo Use "ALTER EXTENSION pg_twotower UPDATE TO '0.3.0'" to load this file. \quit

ALTER TABLE twotower.model_version ADD COLUMN train_options jsonb;

CREATE  FUNCTION twotower."train"(
	"user_model" TEXT, /* & str */
	"item_model" TEXT, /* & str */
	"interactions" regclass, /* RegClass */
	"options" jsonb, /* JsonbValue */
	"user_features" regclass DEFAULT NULL, /* Option < RegClass > */
	"item_features" regclass DEFAULT NULL, /* Option < RegClass > */
	"hard_negatives" regclass DEFAULT NULL, /* Option < RegClass > */
	"user_column" TEXT DEFAULT 'user_id', /* & str */
	"item_column" TEXT DEFAULT 'item_id', /* & str */
	"time_column" TEXT DEFAULT 'ts', /* & str */
	"weight_column" TEXT DEFAULT NULL, /* Option < & str > */
	"activate" bool DEFAULT true /* bool */
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

CREATE  FUNCTION twotower."user_features"(
	"model" TEXT, /* & str */
	"user_id" TEXT, /* & str */
	"at" timestamp with time zone DEFAULT NULL, /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"interactions" regclass DEFAULT NULL /* Option < RegClass > */
) RETURNS jsonb /* pgrx :: JsonB */
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'user_features_wrapper';

CREATE  FUNCTION twotower."user_features"(
	"model" TEXT, /* & str */
	"user_id" bigint, /* i64 */
	"at" timestamp with time zone DEFAULT NULL, /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"interactions" regclass DEFAULT NULL /* Option < RegClass > */
) RETURNS jsonb /* pgrx :: JsonB */
STABLE PARALLEL RESTRICTED 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'user_features_bigint_wrapper';

CREATE  FUNCTION twotower."evaluate"(
	"user_model" TEXT, /* & str */
	"index" regclass, /* RegClass */
	"queries" regclass, /* RegClass */
	"seen" regclass DEFAULT NULL, /* Option < RegClass > */
	"k" INT[] DEFAULT '{10,50}', /* Vec < i32 > */
	"via_index" bool DEFAULT true /* bool */
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
