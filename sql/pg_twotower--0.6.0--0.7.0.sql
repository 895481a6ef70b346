-- pg_twotower 0.6.0 -> 0.7.0
-- * New: twotower.fanout_report(), the foreign partitions (shards) that this session's last
--   fan-out asked: whether each answered, its items, its time and its error.

CREATE  FUNCTION twotower."fanout_report"() RETURNS TABLE (
	"partition" TEXT,  /* String */
	"server" TEXT,  /* String */
	"answered" bool,  /* bool */
	"items" INT,  /* i32 */
	"ms" double precision,  /* Option < f64 > */
	"error" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'fanout_report_wrapper';
