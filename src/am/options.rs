//! Index options: `WITH (m = 16, ef_construction = 64, quantization = 'f32')`.

use pgrx::pg_sys;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU32, Ordering};
use twotower_ann::Quantization;

pub const DEFAULT_M: i32 = 16;
pub const DEFAULT_EF_CONSTRUCTION: i32 = 64;
/// Delta items at which inserts fold them into the delta graph (see `fold.rs`).
pub const DEFAULT_FOLD_THRESHOLD: i32 = 1000;

/// The parsed options varlena (layout shared with `build_reloptions`).
#[repr(C)]
#[derive(Debug)]
pub struct HnswOptions {
    vl_len_: i32,
    pub m: i32,
    pub ef_construction: i32,
    /// Offset of the quantization string from the start of this struct (0 = default).
    quantization_offset: i32,
    pub fold_threshold: i32,
    /// Offsets of the query sample's SQL and its model's name (0 = not set).
    query_sample_offset: i32,
    query_model_offset: i32,
    pub query_k: i32,
    pub query_ef: i32,
    pub query_extra: i32,
    pub query_limit: i32,
}

/// Defaults of the query-aware options (`tune.rs` in crates/ann; docs/index.md).
pub const DEFAULT_QUERY_K: i32 = 100;
pub const DEFAULT_QUERY_EF: i32 = 100;
pub const DEFAULT_QUERY_EXTRA: i32 = 8;
pub const DEFAULT_QUERY_LIMIT: i32 = 10_000;
/// The longest query_sample accepted (bytes).
const MAX_QUERY_SAMPLE: usize = 16 * 1024;

static RELOPT_KIND: AtomicU32 = AtomicU32::new(0);

/// A string option's validator, as `add_string_reloption` takes it.
type StringValidator = pg_sys::validate_string_relopt;

/// Registers the reloption kind and options. Called once per backend from `_PG_init`.
pub fn register() {
    // SAFETY: called from _PG_init, before any index of this AM is opened in this backend.
    unsafe {
        let kind = pg_sys::add_reloption_kind();
        RELOPT_KIND.store(kind, Ordering::Relaxed);
        pg_sys::add_int_reloption(
            kind,
            c"m".as_ptr(),
            c"Max number of connections per HNSW node".as_ptr(),
            DEFAULT_M,
            2,
            100,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
        pg_sys::add_int_reloption(
            kind,
            c"ef_construction".as_ptr(),
            c"Size of the dynamic candidate list when building the graph".as_ptr(),
            DEFAULT_EF_CONSTRUCTION,
            4,
            1000,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
        pg_sys::add_int_reloption(
            kind,
            c"fold_threshold".as_ptr(),
            c"Rows inserted after the build that are folded into the delta graph at once".as_ptr(),
            DEFAULT_FOLD_THRESHOLD,
            16,
            10_000_000,
            pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
        );
        let ints: [(&std::ffi::CStr, &std::ffi::CStr, i32, i32, i32); 4] = [
            (
                c"query_k",
                c"Nearest items of each sample query the tuned graph is to find",
                DEFAULT_QUERY_K,
                1,
                1000,
            ),
            (
                c"query_ef",
                c"Search width (ef_search) the tuned graph is held to",
                DEFAULT_QUERY_EF,
                1,
                10_000,
            ),
            (
                c"query_extra",
                c"Level-0 link slots added to every node for query-aware links",
                DEFAULT_QUERY_EXTRA,
                0,
                256,
            ),
            (
                c"query_limit",
                c"Most rows of query_sample read",
                DEFAULT_QUERY_LIMIT,
                1,
                1_000_000,
            ),
        ];
        for (name, desc, default, lo, hi) in ints {
            pg_sys::add_int_reloption(
                kind,
                name.as_ptr(),
                desc.as_ptr(),
                default,
                lo,
                hi,
                pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
            );
        }
        let strings: [(&std::ffi::CStr, &std::ffi::CStr, StringValidator); 2] = [
            (
                c"query_sample",
                c"SQL returning sample queries (real[] or vector; jsonb features with query_model) that builds tune the graph to",
                Some(validate_query_sample),
            ),
            (
                c"query_model",
                c"Model whose user tower turns query_sample's features into query vectors",
                Some(validate_query_model),
            ),
        ];
        for (name, desc, validate) in strings {
            pg_sys::add_string_reloption(
                kind,
                name.as_ptr(),
                desc.as_ptr(),
                std::ptr::null(),
                validate,
                pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
            );
        }
        pg_sys::add_string_reloption(
            kind,
            c"quantization".as_ptr(),
            c"Storage type of vectors in the graph: f32, f16 or i8".as_ptr(),
            c"f32".as_ptr(),
            Some(validate_quantization),
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn validate_quantization(value: *const core::ffi::c_char) {
    if value.is_null() {
        return;
    }
    // SAFETY: PostgreSQL passes a NUL-terminated option value.
    let s = unsafe { CStr::from_ptr(value) }.to_string_lossy();
    if let Err(e) = Quantization::parse(&s) {
        crate::infra::error::TtError::Ann(e).report();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn validate_query_sample(value: *const core::ffi::c_char) {
    if value.is_null() {
        return;
    }
    // SAFETY: PostgreSQL passes a NUL-terminated option value.
    let s = unsafe { CStr::from_ptr(value) }.to_bytes();
    let reason = if s.iter().all(|b| b.is_ascii_whitespace()) {
        "it is empty".to_string()
    } else if s.len() > MAX_QUERY_SAMPLE {
        format!(
            "it is {} bytes long, the most is {MAX_QUERY_SAMPLE}",
            s.len()
        )
    } else {
        return;
    };
    crate::infra::error::TtError::Ann(twotower_ann::AnnError::InvalidOption {
        option: "query_sample",
        reason,
    })
    .report();
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn validate_query_model(value: *const core::ffi::c_char) {
    if value.is_null() {
        return;
    }
    // SAFETY: PostgreSQL passes a NUL-terminated option value.
    let s = unsafe { CStr::from_ptr(value) }.to_bytes();
    if s.is_empty() || s.len() > 63 {
        crate::infra::error::TtError::Ann(twotower_ann::AnnError::InvalidOption {
            option: "query_model",
            reason: "a model name is 1 to 63 bytes long".into(),
        })
        .report();
    }
}

/// `amoptions`: parses and validates `WITH (...)`.
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn amoptions(
    reloptions: pg_sys::Datum,
    validate: bool,
) -> *mut pg_sys::bytea {
    let tab = [
        pg_sys::relopt_parse_elt {
            optname: c"m".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, m) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"ef_construction".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, ef_construction) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"fold_threshold".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, fold_threshold) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"quantization".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_STRING,
            offset: std::mem::offset_of!(HnswOptions, quantization_offset) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_sample".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_STRING,
            offset: std::mem::offset_of!(HnswOptions, query_sample_offset) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_model".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_STRING,
            offset: std::mem::offset_of!(HnswOptions, query_model_offset) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_k".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, query_k) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_ef".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, query_ef) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_extra".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, query_extra) as i32,
        },
        pg_sys::relopt_parse_elt {
            optname: c"query_limit".as_ptr(),
            opttype: pg_sys::relopt_type::RELOPT_TYPE_INT,
            offset: std::mem::offset_of!(HnswOptions, query_limit) as i32,
        },
    ];
    // SAFETY: `tab` describes HnswOptions; build_reloptions allocates and fills the struct.
    let opts = unsafe {
        pg_sys::build_reloptions(
            reloptions,
            validate,
            RELOPT_KIND.load(Ordering::Relaxed),
            std::mem::size_of::<HnswOptions>(),
            tab.as_ptr(),
            tab.len() as i32,
        ) as *mut HnswOptions
    };
    // Combinations are checked here too, so ALTER INDEX ... SET refuses what CREATE INDEX
    // refuses (PostgreSQL validates the merged options of ALTER with validate = true).
    if validate && !opts.is_null() {
        // SAFETY: build_reloptions returned a filled HnswOptions.
        let (m, efc) = unsafe { ((*opts).m, (*opts).ef_construction) };
        if efc < m {
            crate::infra::error::TtError::Ann(twotower_ann::AnnError::InvalidOption {
                option: "ef_construction",
                reason: format!("ef_construction ({efc}) must be at least m ({m})"),
            })
            .report();
        }
    }
    opts as *mut pg_sys::bytea
}

/// Effective options of an index: (m, ef_construction, quantization).
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn of(index: pg_sys::Relation) -> (usize, usize, Quantization) {
    // SAFETY: rd_options is either NULL or the struct amoptions built.
    unsafe {
        let opts = (*index).rd_options as *const HnswOptions;
        if opts.is_null() {
            return (
                DEFAULT_M as usize,
                DEFAULT_EF_CONSTRUCTION as usize,
                Quantization::F32,
            );
        }
        let q = if (*opts).quantization_offset == 0 {
            Quantization::F32
        } else {
            let p = (opts as *const u8).add((*opts).quantization_offset as usize)
                as *const core::ffi::c_char;
            // The validator already accepted this value.
            Quantization::parse(&CStr::from_ptr(p).to_string_lossy()).unwrap_or(Quantization::F32)
        };
        ((*opts).m as usize, (*opts).ef_construction as usize, q)
    }
}

/// The index's `fold_threshold`.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn fold_threshold(index: pg_sys::Relation) -> i32 {
    // SAFETY: rd_options is either NULL or the struct amoptions built.
    unsafe {
        let opts = (*index).rd_options as *const HnswOptions;
        if opts.is_null() {
            DEFAULT_FOLD_THRESHOLD
        } else {
            (*opts).fold_threshold
        }
    }
}

/// The query sample a build tunes the graph to (`WITH (query_sample = ...)`).
pub struct QuerySample {
    pub sql: String,
    pub model: Option<String>,
    pub limit: usize,
    pub params: twotower_ann::TuneParams,
}

/// The index's query sample, if it has one.
///
/// # Safety
/// `index` must be an open twotower_hnsw index.
pub unsafe fn query_sample(index: pg_sys::Relation) -> Option<QuerySample> {
    // SAFETY: rd_options is either NULL or the struct amoptions built; string offsets point
    // into it.
    unsafe {
        let opts = (*index).rd_options as *const HnswOptions;
        if opts.is_null() || (*opts).query_sample_offset == 0 {
            return None;
        }
        let text = |off: i32| {
            (off != 0).then(|| {
                let p = (opts as *const u8).add(off as usize) as *const core::ffi::c_char;
                CStr::from_ptr(p).to_string_lossy().into_owned()
            })
        };
        Some(QuerySample {
            sql: text((*opts).query_sample_offset)?,
            model: text((*opts).query_model_offset),
            limit: (*opts).query_limit.max(1) as usize,
            params: twotower_ann::TuneParams {
                k: (*opts).query_k.max(1) as usize,
                ef: (*opts).query_ef.max(1) as usize,
                extra: (*opts).query_extra.max(0) as usize,
                ..twotower_ann::TuneParams::default()
            },
        })
    }
}
