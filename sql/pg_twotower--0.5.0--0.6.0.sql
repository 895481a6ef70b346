-- pg_twotower 0.5.0 -> 0.6.0
-- * New: twotower.train_prerank, training a pre-rank model (kind 'prerank') for a pipeline from
--   logged requests and their candidates: labels, distillation from a teacher's scores, or the
--   teacher's top n as positives (cascade-style).

CREATE  FUNCTION twotower."train_prerank"(
	"name" TEXT, /* Option < & str > */
	"pipeline" TEXT, /* Option < & str > */
	"requests" regclass, /* Option < RegClass > */
	"candidates" regclass, /* Option < RegClass > */
	"options" jsonb, /* Option < JsonbValue > */
	"request_column" TEXT DEFAULT 'request_id', /* Option < & str > */
	"features_column" TEXT DEFAULT 'features', /* Option < & str > */
	"item_column" TEXT DEFAULT 'item_id', /* Option < & str > */
	"label_column" TEXT DEFAULT 'label', /* Option < & str > */
	"teacher_column" TEXT DEFAULT NULL, /* Option < & str > */
	"rank_column" TEXT DEFAULT NULL, /* Option < & str > */
	"activate" bool DEFAULT true /* Option < bool > */
) RETURNS TABLE (
	"model" TEXT,  /* String */
	"version" INT,  /* i32 */
	"parameters" bigint,  /* i64 */
	"best_epoch" INT,  /* i32 */
	"valid_recall" double precision,  /* Option < f64 > */
	"valid_ndcg" double precision,  /* Option < f64 > */
	"teacher_agreement" double precision,  /* Option < f64 > */
	"train_examples" bigint,  /* i64 */
	"valid_requests" INT  /* i32 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'train_prerank_wrapper';
