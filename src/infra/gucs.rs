//! Every setting of pg_twotower, in one place.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `twotower.ef_search`: candidate list size of index searches.
pub static EF_SEARCH: GucSetting<i32> = GucSetting::<i32>::new(100);
/// `twotower.build_threads`: worker threads of an index build (0 = all cores).
pub static BUILD_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// `twotower.model_cache_size`: memory for decoded models per backend, in MB.
pub static MODEL_CACHE_MB: GucSetting<i32> = GucSetting::<i32>::new(256);
/// `twotower.item_cache_size`: memory for hot item vectors and features per backend, in MB.
pub static ITEM_CACHE_MB: GucSetting<i32> = GucSetting::<i32>::new(64);
/// `twotower.iterative_scan`: how an ordered scan goes on once its first search is used up.
pub static ITERATIVE_SCAN: GucSetting<IterativeScan> =
    GucSetting::<IterativeScan>::new(IterativeScan::Strict);
/// `twotower.max_scan_tuples`: rows one ordered scan returns at most.
pub static LOG_IMPRESSIONS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static LOG_MAX_ITEMS: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static LOG_MAX_FEATURE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(65_536);
pub static MAX_SCAN_TUPLES: GucSetting<i32> = GucSetting::<i32>::new(20_000);

/// `twotower.unavailable_shards`: what recall() does when a foreign partition cannot answer.
pub static UNAVAILABLE_SHARDS: GucSetting<UnavailableShards> =
    GucSetting::<UnavailableShards>::new(UnavailableShards::Error);

/// `twotower.shard_protocol`: how recall() asks the foreign partitions of a table.
pub static SHARD_PROTOCOL: GucSetting<ShardProtocol> =
    GucSetting::<ShardProtocol>::new(ShardProtocol::Direct);

/// Values of `twotower.shard_protocol`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShardProtocol {
    #[name = c"direct"]
    Direct,
    #[name = c"postgres_fdw"]
    PostgresFdw,
}

/// Values of `twotower.unavailable_shards`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum UnavailableShards {
    #[name = c"error"]
    Error,
    #[name = c"skip"]
    Skip,
}

/// Values of `twotower.iterative_scan`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum IterativeScan {
    #[name = c"strict_order"]
    Strict,
    #[name = c"relaxed_order"]
    Relaxed,
    #[name = c"off"]
    Off,
}

impl IterativeScan {
    pub fn order(self) -> twotower_ann::ScanOrder {
        match self {
            IterativeScan::Strict => twotower_ann::ScanOrder::Strict,
            IterativeScan::Relaxed => twotower_ann::ScanOrder::Relaxed,
            IterativeScan::Off => twotower_ann::ScanOrder::Off,
        }
    }
}

/// Registers every setting (from `_PG_init`).
pub fn register() {
    GucRegistry::define_int_guc(
        c"twotower.ef_search",
        c"Size of the dynamic candidate list of twotower_hnsw index searches.",
        c"Larger values give better recall and slower searches. Scans widen it by themselves when filters discard rows.",
        &EF_SEARCH,
        1,
        10_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"twotower.shard_protocol",
        c"How recall() asks the foreign partitions (shards) of the searched table.",
        c"direct (the default): one prepared statement per shard over its own libpq connection, with the foreign server's options and the user mapping, and twotower.ef_search passed on; postgres_fdw: one UNION ALL statement through postgres_fdw (a remote transaction and a cursor per shard).",
        &SHARD_PROTOCOL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"twotower.unavailable_shards",
        c"What recall() does when a foreign partition of the searched table cannot answer.",
        c"error (the default) fails the call; skip leaves that partition's items out with a WARNING naming it (a partial result).",
        &UNAVAILABLE_SHARDS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"twotower.iterative_scan",
        c"How a twotower_hnsw scan goes on when its first search is used up (filters, exclusions).",
        c"strict_order widens the search and drops items nearer than rows already returned, so rows come in distance order; relaxed_order returns them too (more rows, approximate order); off stops after one search of ef_search candidates.",
        &ITERATIVE_SCAN,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"twotower.log_impressions",
        c"Whether recommend(..., request_id => ...) writes its list to the impression log.",
        c"off: calls with a request id return their list without logging it (and feedback finds no list). Only superusers (or roles granted SET on it) change it.",
        &LOG_IMPRESSIONS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.log_max_items",
        c"The most items of one list the impression log keeps (the top ones).",
        c"Items past it are returned but not logged.",
        &LOG_MAX_ITEMS,
        1,
        10_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.log_max_feature_bytes",
        c"The largest request features (JSON text, bytes) the impression log keeps.",
        c"A list whose request's features are larger is logged without them (NULL; not a training example). With twotower.log_max_items it bounds a logged row.",
        &LOG_MAX_FEATURE_BYTES,
        0,
        1_048_576,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.max_scan_tuples",
        c"Rows one ordered twotower_hnsw scan returns at most before it ends.",
        c"Bounds the work of a query whose filter rejects most rows; the scan then ends early and the query returns fewer rows.",
        &MAX_SCAN_TUPLES,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.build_threads",
        c"Worker threads used to insert vectors into the graph during an index build (0 = one per core).",
        c"",
        &BUILD_THREADS,
        0,
        64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"twotower.item_cache_size",
        c"Memory for hot item vectors and item features kept by each backend for pre-ranking, in megabytes (0 = off).",
        c"Only tables with the twotower_item_cache trigger (twotower.enable_item_cache) are cached; a change to such a table empties the caches at commit.",
        &ITEM_CACHE_MB,
        0,
        1_048_576,
        GucContext::Userset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"twotower.model_cache_size",
        c"Memory for decoded models kept by each backend, in megabytes.",
        c"The least recently used model versions are dropped first; the one in use is always kept.",
        &MODEL_CACHE_MB,
        1,
        1_048_576,
        GucContext::Userset,
        GucFlags::UNIT_MB,
    );
    // Unknown twotower.* names are refused from here on (a typo such as twotower.ef_serch is
    // an error, not a silent placeholder), and placeholders set before the library was loaded
    // are reported, as PostgreSQL does for reserved prefixes.
    // SAFETY: called once from _PG_init with a NUL-terminated literal.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"twotower".as_ptr()) };
}

/// Worker threads for batched forward passes: one per core.
pub fn inference_threads() -> usize {
    // Asked once per backend: the answer reads cgroup files (a syscall per call otherwise).
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}
