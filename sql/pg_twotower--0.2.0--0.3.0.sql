-- pg_twotower 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_twotower UPDATE TO '0.3.0').
--
-- * New: twotower.train, training a two-tower model from an interactions table (and optional
--   user / item feature sources) into new versions of two models. The catalogue layout is
--   unchanged.

\echo Use "ALTER EXTENSION pg_twotower UPDATE TO '0.3.0'" to load this file. \quit

CREATE  FUNCTION twotower."train"(
	"user_model" TEXT, /* & str */
	"item_model" TEXT, /* & str */
	"interactions" regclass, /* RegClass */
	"options" jsonb, /* JsonbValue */
	"user_features" regclass DEFAULT NULL, /* Option < RegClass > */
	"item_features" regclass DEFAULT NULL, /* Option < RegClass > */
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
