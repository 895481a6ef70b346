//! Every error pg_twotower raises, mapped to a SQLSTATE, message, detail and hint in one place.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use twotower_ann::AnnError;
use twotower_cf::CfError;
use twotower_funnel::prerank::PrerankError;
use twotower_tower::TowerError;
use twotower_train::TrainError;

#[derive(Debug)]
pub enum TtError {
    /// An error of the ANN core.
    Ann(AnnError),
    /// The argument is not a usable one-dimensional real[] (nulls, dimensions, element type).
    BadArray(String),
    /// Two vectors of different length were compared.
    LengthMismatch {
        left: usize,
        right: usize,
    },
    /// Building needs more memory than maintenance_work_mem allows.
    MemoryBudget {
        needed: usize,
        available: usize,
    },
    /// The index pages do not hold what the metapage says.
    IndexCorrupt(String),
    /// An index operation we do not support.
    Unsupported(String),
    /// A function that reads one index's pages, called on the shell of a Citus table (its rows
    /// are in shards on the workers).
    CitusTable {
        relation: String,
        who: String,
    },
    /// An I/O failure on a node-local cache file.
    CacheIo(String),
    /// A mapped cache file changed (truncated or rewritten) while a scan read it.
    CacheChanged(String),
    /// Reading or writing pg_twotower's own catalogue tables failed (an SPI failure that is
    /// not a PostgreSQL ERROR of its own, or a stored value that no longer parses).
    Catalog(String),
    /// An error of the tower core (spec, weights, feature input).
    Tower(TowerError),
    /// A features argument that is not valid JSON for serde (e.g. a number out of f64 range).
    BadJson {
        what: &'static str,
        reason: String,
    },
    /// No model of that name, or no such version.
    ModelNotFound {
        name: String,
        version: Option<i32>,
    },
    /// The model is of the other tower kind.
    ModelKind {
        name: String,
        expected: &'static str,
        got: String,
    },
    /// The model does not fit the index (metric or dimension).
    ModelIndexMismatch {
        detail: String,
    },
    /// The caller may not manage this model, or read this table.
    PermissionDenied {
        action: String,
        hint: String,
    },
    /// A model name that is not an identifier.
    BadModelName(String),
    /// Dropping the version that serves.
    ActiveVersion {
        name: String,
        version: i32,
    },
    /// More items in one call than the documented limit.
    TooMany(String),
    /// A server file that does not exist.
    FileMissing(String),
    /// A server file that cannot be read.
    FileIo(String),
    /// A server file past the size limit.
    FileTooLarge(String),
    /// An argument that must not be NULL.
    NullArgument(&'static str),
    /// A twotower_hnsw function called on another kind of index (names the function).
    WrongIndex(String),
    /// A generic invalid argument value.
    BadArgument(String),
    /// The extension's SQL objects are older than the library.
    SchemaVersion {
        installed: String,
        library: &'static str,
    },
    /// A bulk refresh source lacks the column of a feature that has no default.
    MissingFeatureColumn {
        relation: String,
        feature: String,
        tower: &'static str,
        training: bool,
    },
    /// The table an index belongs to has no usable item id column.
    NoItemId(String),
    /// A NULL in a source row where a value is required.
    NullValue(String),
    /// An index whose pages were never written (a failed CREATE INDEX CONCURRENTLY).
    NotBuilt(String),
    /// An index PostgreSQL marks invalid or not ready (says which and what to do).
    InvalidIndex(String),
    /// A value past a fixed limit of the index (says which).
    IndexLimit(String),
    /// A relation, column or role named by the caller (or stored in a definition) that does
    /// not exist (the message names it).
    UndefinedTable(String),
    UndefinedColumn(String),
    UndefinedRole(String),
    /// An object of the extension is missing or broken (a dropped or renamed catalogue table,
    /// a missing operator): the installation, not the call, is at fault (says what).
    Damaged(String),
    /// DROP EXTENSION without CASCADE while the catalogue holds rows (what it holds).
    ExtensionInUse(String),
    /// A relation of the wrong kind where a function needs another (42809: a table for an index).
    WrongObject(String),
    /// A column of a type the function cannot read there (42804: a text time column).
    WrongType(String),
    /// A number read from a user's table or function that is not finite or out of range (22003).
    OutOfRange(String),
    /// The DROP EXTENSION guard could not count what the catalogue holds (the reason).
    ExtensionUnreadable(String),
    /// A tower error for one item of a batch (its id): the tower error's own SQLSTATE.
    Item {
        id: i64,
        error: TowerError,
    },
    /// A query of PostgreSQL's own catalogue or of another extension's that should not fail
    /// (XX000, without the damaged-catalogue hint of `Catalog`).
    Internal(String),
    /// A source with more than one row for an item id (the relation, one such id).
    DuplicateItem {
        relation: String,
        id: i64,
    },
    /// An error of the training core.
    Train(TrainError),
    /// An error of the item-CF / Swing core.
    Cf(CfError),
    /// A channel that does not exist (names it).
    UnknownChannel(String),
    /// A pipeline that does not exist (names it).
    UnknownPipeline(String),
    /// An error of the cascade pre-ranker.
    Prerank(PrerankError),
    /// A split (variants of a pipeline) that cannot be assigned or saved.
    Split(twotower_funnel::split::SplitError),
    /// An impression list already logged under this request id.
    DuplicateRequest(String),
    /// No impression list of the caller's under this request id.
    UnknownRequest(String),
    /// A list to log in a read-only transaction or on a standby.
    ReadOnlyLog,
    /// A pipeline definition that cannot run (names the path, says why).
    BadPipeline {
        path: String,
        reason: String,
    },
    /// A model or channel that pipelines still use (what, its name, the pipelines).
    UsedByPipelines {
        what: &'static str,
        name: String,
        pipelines: Vec<String>,
    },
    /// A shard (foreign server) that could not be reached or refused the connection.
    ShardConnection {
        server: String,
        detail: String,
    },
    /// A shard's answer was an error (the server, its message).
    ShardError {
        server: String,
        message: String,
    },
}

impl From<TowerError> for TtError {
    fn from(e: TowerError) -> Self {
        TtError::Tower(e)
    }
}

impl From<twotower_funnel::FunnelError> for TtError {
    fn from(e: twotower_funnel::FunnelError) -> Self {
        use twotower_funnel::FunnelError as F;
        match e {
            F::BadRequest(m) => TtError::BadArgument(m),
            F::Tower(t) => TtError::Tower(t),
            F::Prerank(p) => TtError::Prerank(p),
            F::Merge(m) => m.into(),
        }
    }
}

impl From<twotower_funnel::MergeError> for TtError {
    fn from(m: twotower_funnel::MergeError) -> Self {
        match m {
            twotower_funnel::MergeError::NonFinite { .. } => {
                TtError::OutOfRange(format!("merge: {m}"))
            }
            m => TtError::BadArgument(format!("merge: {m}")),
        }
    }
}

impl From<AnnError> for TtError {
    fn from(e: AnnError) -> Self {
        TtError::Ann(e)
    }
}

pub type TtResult<T> = Result<T, TtError>;

/// The value of a required argument of a function that is not STRICT (it has optional
/// arguments): a NULL is 22004 naming the argument, not pgrx's internal error.
pub fn required<T>(v: Option<T>, name: &'static str) -> T {
    v.unwrap_or_else(|| TtError::NullArgument(name).report())
}

fn mib(bytes: usize) -> String {
    format!("{} MB", bytes.div_ceil(1024 * 1024))
}

/// A float as PostgreSQL prints it (NaN, Infinity, -Infinity).
fn pg_float(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        v.to_string()
    }
}

fn train_parts(e: &TrainError) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
    use PgSqlErrorCode::*;
    match e {
        TrainError::Option { path, reason } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid training option \"{path}\""),
            Some(reason.clone()),
            Some("docs/training.md lists every option.".into()),
        ),
        TrainError::NoData(d) => (
            ERRCODE_DATA_EXCEPTION,
            format!("cannot train: {d}"),
            None,
            None,
        ),
        TrainError::MemoryBudget { needed, budget } => (
            ERRCODE_OUT_OF_MEMORY,
            "training needs more memory than maintenance_work_mem".into(),
            Some(format!(
                "The run needs about {}, maintenance_work_mem is {}.",
                mib(*needed),
                mib(*budget)
            )),
            Some(format!(
                "SET maintenance_work_mem = '{}' before twotower.train, or train on fewer rows.",
                mib(*needed + *needed / 8)
            )),
        ),
        TrainError::Cancelled => (
            ERRCODE_QUERY_CANCELED,
            "canceling training".into(),
            None,
            None,
        ),
        TrainError::Diverged { epoch, step, loss } => (
            ERRCODE_DATA_EXCEPTION,
            format!("training diverged at epoch {epoch}, step {step} (the loss is {loss})"),
            None,
            Some("Lower \"lr\" / \"sparse_lr\", or raise \"temperature\".".into()),
        ),
        TrainError::Export(d) => (
            ERRCODE_INTERNAL_ERROR,
            "the trained model failed its export check".into(),
            Some(d.clone()),
            None,
        ),
        TrainError::Tower(t) => tower_parts(t),
    }
}

fn cf_parts(e: &CfError) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
    use PgSqlErrorCode::*;
    match e {
        CfError::Option { path, reason } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid channel option \"{path}\""),
            Some(reason.clone()),
            Some("docs/channels.md lists every option.".into()),
        ),
        CfError::BadInput(d) => (ERRCODE_INVALID_PARAMETER_VALUE, d.clone(), None, None),
        CfError::MemoryBudget { needed, budget } => (
            ERRCODE_OUT_OF_MEMORY,
            "building the channel needs more memory than maintenance_work_mem".into(),
            Some(format!("The build needs about {}, maintenance_work_mem is {}.", mib(*needed), mib(*budget))),
            Some(format!(
                "SET maintenance_work_mem = '{}' before the build, or lower \"max_user_items\" / \"user_sample\".",
                mib(*needed + *needed / 8)
            )),
        ),
    }
}

/// The message of `e`, with its detail (for a WARNING that lists several errors).
pub fn describe(e: &TtError) -> String {
    let (_, message, detail, _) = e.parts();
    match detail {
        Some(d) => format!("{message}: {d}"),
        None => message,
    }
}

impl TtError {
    fn parts(&self) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
        use PgSqlErrorCode::*;
        match self {
            TtError::Ann(e) => match e {
                AnnError::DimensionMismatch { expected, got } => (
                    ERRCODE_DATA_EXCEPTION,
                    format!("vector has {got} dimensions, the index expects {expected}"),
                    None,
                    Some("Every vector in one index must have the same number of elements.".into()),
                ),
                AnnError::TooManyDimensions(n) => (
                    ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!("vector has {n} dimensions, more than the maximum of {}", twotower_ann::MAX_DIMS),
                    None,
                    None,
                ),
                AnnError::EmptyVector => (
                    ERRCODE_DATA_EXCEPTION,
                    "vector must have at least one element".into(),
                    None,
                    None,
                ),
                AnnError::NonFinite { position, value } => (
                    ERRCODE_DATA_EXCEPTION,
                    format!("vector element {} is {}", position + 1, pg_float(*value)),
                    None,
                    Some("NaN and infinite values are not allowed in vectors.".into()),
                ),
                AnnError::OutOfRange { norm } => (
                    ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                    format!("vector norm {norm:e} is outside the range a twotower_hnsw index ranks exactly"),
                    None,
                    Some(format!(
                        "Indexed vectors need a norm between {:e} and {:e} (or zero); scale them, e.g. with twotower.l2_normalize().",
                        twotower_ann::metric::MIN_INDEX_NORM_SQ.sqrt(),
                        twotower_ann::metric::MAX_INDEX_NORM_SQ.sqrt()
                    )),
                ),
                AnnError::F16Range { position, value } => (
                    ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                    format!("vector element {} ({value}) is too large for an index with quantization 'f16'", position + 1),
                    None,
                    Some("f16 holds magnitudes up to 65504: scale the vectors, or use quantization 'f32'.".into()),
                ),
                AnnError::InvalidOption { option, reason } => (
                    ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("invalid value for index option \"{option}\""),
                    Some(reason.clone()),
                    Some("Valid options: m (2..100), ef_construction (4..1000), quantization ('f32', 'f16', 'i8'; i8 with cosine only).".into()),
                ),
                AnnError::CorruptImage(d) => (
                    ERRCODE_DATA_CORRUPTED,
                    "twotower_hnsw index image is corrupt".into(),
                    Some(d.clone()),
                    Some("REINDEX the index.".into()),
                ),
                AnnError::Cancelled => (ERRCODE_QUERY_CANCELED, "canceling index build".into(), None, None),
                AnnError::Io { detail, disk_full } => (
                    if *disk_full { ERRCODE_DISK_FULL } else { ERRCODE_IO_ERROR },
                    "could not write the index build's temporary file".into(),
                    Some(detail.clone()),
                    Some("Check free space and permissions of the server's temporary directory (base/pgsql_tmp).".into()),
                ),
                AnnError::Engine(d) => (ERRCODE_INTERNAL_ERROR, "HNSW engine failed".into(), Some(d.clone()), None),
            },
            TtError::BadArray(d) => (
                ERRCODE_DATA_EXCEPTION,
                format!("invalid vector: {d}"),
                None,
                Some("Vectors are one-dimensional real[] arrays without NULL elements.".into()),
            ),
            TtError::LengthMismatch { left, right } => (
                ERRCODE_DATA_EXCEPTION,
                format!("vectors have different lengths ({left} and {right})"),
                None,
                None,
            ),
            TtError::MemoryBudget { needed, available } => (
                ERRCODE_OUT_OF_MEMORY,
                "twotower_hnsw graph build needs more memory than maintenance_work_mem".into(),
                Some(format!("The build needs about {}, maintenance_work_mem is {}.", mib(*needed), mib(*available))),
                Some(format!("SET maintenance_work_mem = '{}' before CREATE INDEX, REINDEX or VACUUM.", mib(*needed + *needed / 8))),
            ),
            TtError::Catalog(d) => (
                ERRCODE_INTERNAL_ERROR,
                "pg_twotower catalogue operation failed".into(),
                Some(d.clone()),
                Some("This is a bug or a damaged catalogue table of the extension: please report it.".into()),
            ),
            TtError::CacheChanged(path) => (
                ERRCODE_DATA_CORRUPTED,
                "twotower_hnsw index cache file changed while a scan was reading it".into(),
                Some(format!("File \"{path}\" was truncated or rewritten in place.")),
                Some("The file is a node-local cache that nothing may modify: the next query reads the index pages again and rewrites it.".into()),
            ),
            TtError::IndexCorrupt(d) => (
                ERRCODE_INDEX_CORRUPTED,
                "twotower_hnsw index is corrupt".into(),
                Some(d.clone()),
                Some("REINDEX the index.".into()),
            ),
            TtError::Unsupported(d) => (ERRCODE_FEATURE_NOT_SUPPORTED, d.clone(), None, None),
            TtError::CitusTable { relation, who } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{who} does not read Citus tables yet: {relation} is distributed by Citus"),
                Some(format!("On this node {relation} and its index are a shell: the rows and the index entries are in the shards on the workers.")),
                Some("Query the table with ORDER BY ... LIMIT (Citus searches every shard's index and merges), or call the function on a worker with the shard's index; docs/scale-out.md.".into()),
            ),
            TtError::Tower(e) => tower_parts(e),
            TtError::BadJson { what, reason } => {
                if reason.contains("recursion limit") {
                    (
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("{what} cannot be read: nested too deeply"),
                        Some(reason.clone()),
                        Some(format!("pg_twotower reads JSON nested at most 128 levels deep; {what} should be a flat object.")),
                    )
                } else if reason.contains("number out of range") {
                    (
                        ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                        format!("{what} cannot be read: a number is out of range"),
                        Some(reason.clone()),
                        Some(format!("Numbers in {what} must fit in double precision.")),
                    )
                } else {
                    (
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("{what} cannot be read"),
                        Some(reason.clone()),
                        None,
                    )
                }
            }
            TtError::ModelNotFound { name, version } => (
                ERRCODE_UNDEFINED_OBJECT,
                match version {
                    Some(v) => format!("model \"{name}\" has no version {v}"),
                    None => format!("model \"{name}\" does not exist or has no active version"),
                },
                None,
                Some("SELECT * FROM twotower.models lists the models and their versions.".into()),
            ),
            TtError::ModelKind { name, expected, got } => (
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("model \"{name}\" is {} tower, not {} tower", article(got), article(expected)),
                None,
                Some(format!("Use a model imported with \"kind\": \"{expected}\".")),
            ),
            TtError::ModelIndexMismatch { detail } => (
                ERRCODE_DATA_EXCEPTION,
                "the model does not fit the index".into(),
                Some(detail.clone()),
                Some("The user tower's output.dim and output.metric must match the indexed vectors and the index's operator class.".into()),
            ),
            TtError::PermissionDenied { action, hint } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to {action}"),
                None,
                Some(hint.clone()),
            ),
            TtError::BadModelName(n) => (
                ERRCODE_INVALID_NAME,
                format!("invalid name \"{n}\""),
                None,
                Some("Model, channel and pipeline names are 1 to 63 characters: letters, digits, '_', '.' and '-', starting with a letter or '_'.".into()),
            ),
            TtError::ActiveVersion { name, version } => (
                ERRCODE_OBJECT_IN_USE,
                format!("version {version} of model \"{name}\" is the active version"),
                None,
                Some("Activate another version first, or drop the whole model.".into()),
            ),
            TtError::BadArgument(d) => (ERRCODE_INVALID_PARAMETER_VALUE, d.clone(), None, None),
            TtError::TooMany(d) => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                d.clone(),
                None,
                Some("Split the input into several calls.".into()),
            ),
            TtError::FileMissing(d) => (ERRCODE_UNDEFINED_FILE, d.clone(), None, None),
            TtError::FileIo(d) => (ERRCODE_IO_ERROR, d.clone(), None, None),
            TtError::FileTooLarge(d) => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                d.clone(),
                None,
                Some("Import larger weights with twotower.import_model(name, spec, weights) from the client.".into()),
            ),
            TtError::NullArgument(name) => (
                ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("argument \"{name}\" must not be NULL"),
                None,
                None,
            ),
            TtError::WrongIndex(what) => (
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("{what} works only on twotower_hnsw indexes"),
                None,
                Some("CREATE INDEX ... USING twotower_hnsw (column real_cosine_ops) makes one.".into()),
            ),
            TtError::SchemaVersion { installed, library } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_twotower's SQL objects are at version {installed}, the installed library is {library}"),
                Some("The model catalogue keeps its old layout until the extension is updated; indexes and operators keep working meanwhile.".into()),
                Some(format!("Run ALTER EXTENSION pg_twotower UPDATE TO '{library}';")),
            ),
            TtError::MissingFeatureColumn { relation, feature, tower, training } => (
                ERRCODE_UNDEFINED_COLUMN,
                format!("{relation} has no column \"{feature}\" for feature \"{feature}\" of the {tower} tower"),
                Some(format!("Without it every {tower} would get the same missing value for this feature.")),
                Some(if *training {
                    format!("Check the feature's name, or give a {tower}_features source with that column.")
                } else {
                    "Read the items through a view that provides the column, or give the feature a \"default\" in the spec.".into()
                }),
            ),
            TtError::NoItemId(d) => (
                ERRCODE_WRONG_OBJECT_TYPE,
                d.clone(),
                None,
                Some("recall() returns the table's single-column integer primary key as item_id: add PRIMARY KEY (id).".into()),
            ),
            TtError::CacheIo(d) => (
                ERRCODE_IO_ERROR,
                "could not materialize the twotower_hnsw cache file".into(),
                Some(d.clone()),
                Some("Check free space and permissions of $PGDATA/pg_twotower.".into()),
            ),
            TtError::NullValue(d) => (ERRCODE_NULL_VALUE_NOT_ALLOWED, d.clone(), None, None),
            TtError::InvalidIndex(d) => (ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, d.clone(), None, None),
            TtError::IndexLimit(d) => (ERRCODE_PROGRAM_LIMIT_EXCEEDED, d.clone(), None, None),
            TtError::UndefinedTable(d) => (ERRCODE_UNDEFINED_TABLE, d.clone(), None, None),
            TtError::UndefinedColumn(d) => (ERRCODE_UNDEFINED_COLUMN, d.clone(), None, None),
            TtError::UndefinedRole(d) => (ERRCODE_UNDEFINED_OBJECT, d.clone(), None, None),
            TtError::Damaged(d) => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                d.clone(),
                None,
                Some("The extension's objects are incomplete: ALTER EXTENSION pg_twotower UPDATE, or drop and create the extension again.".into()),
            ),
            TtError::NotBuilt(index) => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("index {index} has not been built"),
                Some("It has no pages: a CREATE INDEX CONCURRENTLY that failed leaves such an invalid index behind.".into()),
                Some("DROP INDEX it and create it again, or REINDEX INDEX CONCURRENTLY it.".into()),
            ),
            TtError::ExtensionInUse(held) => (
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!("cannot drop extension pg_twotower because its catalogue holds {held}"),
                Some("Dropping the extension would delete every model, pipeline and channel definition.".into()),
                Some("Drop them first (twotower.drop_model, drop_pipeline, drop_channel), or use DROP EXTENSION pg_twotower CASCADE.".into()),
            ),
            TtError::ExtensionUnreadable(reason) => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "cannot drop extension pg_twotower: what its catalogue holds cannot be counted".into(),
                Some(reason.clone()),
                Some("Dropping the extension would delete every model, pipeline and channel definition: use DROP EXTENSION pg_twotower CASCADE to drop them with it.".into()),
            ),
            TtError::Item { id, error } => {
                let (code, msg, detail, hint) = tower_parts(error);
                (code, format!("item {id}: {msg}"), detail, hint)
            }
            TtError::Internal(d) => (ERRCODE_INTERNAL_ERROR, d.clone(), None, None),
            TtError::WrongObject(d) => (ERRCODE_WRONG_OBJECT_TYPE, d.clone(), None, None),
            TtError::WrongType(d) => (ERRCODE_DATATYPE_MISMATCH, d.clone(), None, None),
            TtError::OutOfRange(d) => (ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE, d.clone(), None, None),
            TtError::DuplicateItem { relation, id } => (
                ERRCODE_UNIQUE_VIOLATION,
                format!("{relation} has more than one row for item id {id}"),
                None,
                Some("Each item needs exactly one row in the source: deduplicate it (e.g. a view with DISTINCT ON), or give the id column a unique index.".into()),
            ),
            TtError::Train(e) => train_parts(e),
            TtError::Cf(e) => cf_parts(e),
            TtError::UnknownChannel(n) => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("channel \"{n}\" does not exist"),
                None,
                Some("twotower.channels lists the channels; twotower.build_channel creates one.".into()),
            ),
            TtError::ShardConnection { server, detail } => (
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("could not connect to server \"{server}\""),
                Some(detail.clone()),
                Some("Check the foreign server's options and the user mapping, or SET twotower.unavailable_shards = skip for a partial result.".into()),
            ),
            TtError::ShardError { server, message } => (
                ERRCODE_FDW_ERROR,
                format!("shard \"{server}\" answered with an error: {message}"),
                None,
                None,
            ),
            TtError::UnknownPipeline(n) => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pipeline \"{n}\" does not exist"),
                None,
                Some("twotower.pipelines lists the pipelines; twotower.save_pipeline creates one.".into()),
            ),
            TtError::Prerank(PrerankError::NonFinite { model, item }) => (
                ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                format!("pre-rank model \"{model}\" gave a non-finite score"),
                Some(format!("The score of item {item} overflowed (input values or weights too large).")),
                None,
            ),
            TtError::Prerank(PrerankError::Bad(m)) => (ERRCODE_INVALID_PARAMETER_VALUE, m.clone(), None, None),
            TtError::UsedByPipelines { what, name, pipelines } => (
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!("cannot drop {what} \"{name}\" because pipelines use it"),
                Some(format!("Pipelines using it: {}.", pipelines.join(", "))),
                Some("Change or drop those pipelines first (twotower.save_pipeline, twotower.drop_pipeline).".into()),
            ),
            TtError::Split(twotower_funnel::split::SplitError::Definition { path, reason }) => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid split definition at \"{path}\": {reason}"),
                None,
                Some("docs/serving.md describes splits (variants of a pipeline).".into()),
            ),
            TtError::Split(twotower_funnel::split::SplitError::NoUnit(m)) => (
                ERRCODE_NULL_VALUE_NOT_ALLOWED,
                m.clone(),
                None,
                Some("A split assigns each request a variant by this key of its features (e.g. the user id); pass it, or call one of the variants' pipelines directly.".into()),
            ),
            TtError::Split(twotower_funnel::split::SplitError::BadUnit(m)) => {
                (ERRCODE_INVALID_PARAMETER_VALUE, m.clone(), None, None)
            }
            TtError::DuplicateRequest(id) => (
                ERRCODE_UNIQUE_VIOLATION,
                format!("request id \"{id}\" is logged already"),
                None,
                Some("Each recommend call that logs its list needs a request id of its own.".into()),
            ),
            TtError::ReadOnlyLog => (
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                "cannot write the impression log in a read-only transaction".into(),
                None,
                Some("On a hot standby (or in a read-only transaction) call recommend without request_id; log lists and feedback on the primary.".into()),
            ),
            TtError::UnknownRequest(id) => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("no impression list of yours is logged under request id \"{id}\""),
                None,
                Some("twotower.recommend(..., request_id => ...) logs one; feedback is recorded by the role that logged the list (or twotower_admin), after the list's transaction committed.".into()),
            ),
            TtError::BadPipeline { path, reason } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid pipeline definition at \"{path}\": {reason}"),
                None,
                Some("docs/funnel.md describes pipeline definitions.".into()),
            ),
        }
    }

    /// The message and detail in one line (for LOG messages about recovered problems).
    pub fn message_text(&self) -> String {
        let (_, msg, detail, _) = self.parts();
        match detail {
            Some(d) => format!("{msg}: {d}"),
            None => msg,
        }
    }

    /// Raises this error as a PostgreSQL ERROR. Never returns.
    pub fn report(self) -> ! {
        let (code, msg, detail, hint) = self.parts();
        let mut r = ErrorReport::new(code, msg, "pg_twotower");
        if let Some(d) = detail {
            r = r.set_detail(d);
        }
        if let Some(h) = hint {
            r = r.set_hint(h);
        }
        r.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps a result or raises its error.
pub trait OrReport<T> {
    fn or_report(self) -> T;
}

impl<T, E: Into<TtError>> OrReport<T> for Result<T, E> {
    fn or_report(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().report(),
        }
    }
}

/// "a user", "an item".
fn article(kind: &str) -> String {
    if kind.starts_with(['a', 'e', 'i', 'o']) {
        format!("an {kind}")
    } else {
        format!("a {kind}")
    }
}

/// SQLSTATE, message, detail and hint of a tower-core error. Malformed weights are a binary
/// representation problem; a spec, weights or input that does not fit is an invalid argument;
/// sizes past the documented limits are program limits.
fn tower_parts(e: &TowerError) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
    use PgSqlErrorCode::*;
    let msg = e.to_string();
    match e {
        TowerError::SpecJson { .. } => (
            ERRCODE_INVALID_JSON_TEXT,
            "invalid model spec".into(),
            Some(msg),
            Some("See docs/model-format.md for the spec format.".into()),
        ),
        TowerError::Spec { .. } | TowerError::SpecVersion { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid model spec".into(),
            Some(msg),
            Some("See docs/model-format.md for the spec format.".into()),
        ),
        TowerError::Safetensors { .. } => (
            ERRCODE_INVALID_BINARY_REPRESENTATION,
            "invalid safetensors weights".into(),
            Some(msg),
            Some("Write the weights with safetensors.torch.save_file (F32, F16 or BF16 tensors).".into()),
        ),
        TowerError::MissingTensor { .. }
        | TowerError::StrayTensor { .. }
        | TowerError::TensorDtype { .. }
        | TowerError::TensorShape { .. }
        | TowerError::NonFiniteWeight { .. }
        | TowerError::WeightValue { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "the weights do not match the model spec".into(),
            Some(msg),
            Some("Every tensor the spec names must exist with the shape the spec implies, and every tensor must be named by the spec.".into()),
        ),
        TowerError::UnknownFeature { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "unknown feature in features".into(),
            Some(msg),
            Some("twotower.models shows each model; its spec lists the feature names.".into()),
        ),
        TowerError::FeatureType { .. } | TowerError::FeatureValue { .. } | TowerError::NotAnObject { .. } => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid feature value".into(),
            Some(msg),
            Some("Features are a jsonb object: ids as strings or integers, numbers as JSON numbers, lists as arrays.".into()),
        ),
        TowerError::TooLarge { .. } => (ERRCODE_PROGRAM_LIMIT_EXCEEDED, msg, None, None),
        TowerError::NonFiniteOutput { .. } => (
            ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            msg,
            None,
            Some("Check the magnitude of numeric features (normalise them in the spec).".into()),
        ),
    }
}
