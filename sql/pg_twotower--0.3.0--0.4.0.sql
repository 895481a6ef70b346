-- pg_twotower 0.3.0 -> 0.4.0
-- * New: twotower.train_progress (a view over twotower.train_progress_info()), training runs
--   in progress.
-- * New: item-to-item channels (twotower.build_channel, refresh_channel, drop_channel,
--   i2i_recall; the catalogue twotower.channel and the view twotower.channels) and
--   twotower.merge.
-- * Training (no schema change): SENet, BatchNorm, bucketize and dense features.

CREATE  FUNCTION twotower."train_progress_info"() RETURNS TABLE (
	"pid" INT,  /* i32 */
	"role" oid,  /* pg_sys :: Oid */
	"database" oid,  /* pg_sys :: Oid */
	"backend_start" timestamp with time zone,  /* TimestampWithTimeZone */
	"user_model" TEXT,  /* String */
	"item_model" TEXT,  /* String */
	"phase" TEXT,  /* String */
	"epoch" INT,  /* Option < i32 > */
	"epochs" INT,  /* Option < i32 > */
	"step" bigint,  /* Option < i64 > */
	"steps" bigint,  /* Option < i64 > */
	"loss" double precision,  /* Option < f64 > */
	"examples_per_s" double precision,  /* Option < f64 > */
	"last_recall" double precision,  /* Option < f64 > */
	"best_recall" double precision,  /* Option < f64 > */
	"best_epoch" INT,  /* Option < i32 > */
	"started_at" timestamp with time zone,  /* TimestampWithTimeZone */
	"updated_at" timestamp with time zone  /* TimestampWithTimeZone */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'train_progress_info_wrapper';
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
GRANT SELECT ON twotower.channels TO PUBLIC;

-- build_channel
CREATE  FUNCTION twotower."build_channel"(
	"name" TEXT, /* & str */
	"kind" TEXT, /* & str */
	"interactions" regclass, /* RegClass */
	"neighbors" TEXT, /* & str */
	"options" jsonb DEFAULT '{}', /* JsonbValue */
	"user_column" TEXT DEFAULT 'user_id', /* & str */
	"item_column" TEXT DEFAULT 'item_id', /* & str */
	"time_column" TEXT DEFAULT 'ts', /* & str */
	"weight_column" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TABLE (
	"channel" TEXT,  /* String */
	"kind" TEXT,  /* String */
	"items" bigint,  /* i64 */
	"users" bigint,  /* i64 */
	"interactions" bigint,  /* i64 */
	"rows" bigint,  /* i64 */
	"seconds" double precision  /* f64 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'build_channel_wrapper';

-- refresh_channel
CREATE  FUNCTION twotower."refresh_channel"(
	"name" TEXT /* & str */
) RETURNS TABLE (
	"channel" TEXT,  /* String */
	"changed_users" bigint,  /* i64 */
	"affected_items" bigint,  /* i64 */
	"rows" bigint,  /* i64 */
	"seconds" double precision  /* f64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'refresh_channel_wrapper';

-- drop_channel
CREATE  FUNCTION twotower."drop_channel"(
	"name" TEXT, /* & str */
	"drop_table" bool DEFAULT false /* bool */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'drop_channel_wrapper';

-- i2i_recall
CREATE  FUNCTION twotower."i2i_recall"(
	"channel" TEXT, /* & str */
	"history" bigint[], /* Vec < Option < i64 > > */
	"weights" real[] DEFAULT NULL, /* :: std :: option :: Option < Vec < Option < f32 > > > */
	"k" INT DEFAULT 100, /* i32 */
	"exclude" bigint[] DEFAULT NULL /* :: std :: option :: Option < Vec < Option < i64 > > > */
) RETURNS TABLE (
	"item_id" bigint,  /* i64 */
	"score" real,  /* f32 */
	"rank" INT,  /* i32 */
	"via" bigint  /* i64 */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'i2i_recall_wrapper';

-- merge
CREATE  FUNCTION twotower."merge"(
	"channel" TEXT[], /* Vec < Option < String > > */
	"item_id" bigint[], /* Vec < Option < i64 > > */
	"score" real[], /* Vec < Option < f32 > > */
	"k" INT DEFAULT 100, /* i32 */
	"strategy" TEXT DEFAULT 'rrf', /* & str */
	"options" jsonb DEFAULT '{}', /* JsonbValue */
	"exclude" bigint[] DEFAULT NULL /* :: std :: option :: Option < Vec < Option < i64 > > > */
) RETURNS TABLE (
	"item_id" bigint,  /* i64 */
	"score" double precision,  /* f64 */
	"rank" INT,  /* i32 */
	"channels" TEXT[],  /* Vec < String > */
	"channel_ranks" INT[],  /* Vec < i32 > */
	"channel_scores" real[]  /* Vec < f32 > */
)
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'merge_wrapper';

