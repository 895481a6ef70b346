//! The per-backend cache of decoded models and the rights to run them.

use super::access::*;
use super::privileges::*;
use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;
use twotower_tower::Model;

/// Bumped by the relcache callback whenever the catalogue may have changed.
pub(super) static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = MODEL_TABLE.with(|t| t.get());
    if relid == pg_sys::InvalidOid || ours == pg_sys::InvalidOid || relid == ours {
        GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The catalogue's generation: it changes whenever a model or pipeline may have changed, in
/// every backend (caches of parsed catalogue rows are valid for one generation).
pub fn generation() -> u64 {
    GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// Registers the invalidation callback (from `_PG_init`).
pub fn register() {
    // SAFETY: registering a callback once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
    };
}

/// One decoded model version.
pub struct Loaded {
    pub name: String,
    pub version: i32,
    pub checksum: i64,
    pub model: Model,
}

#[derive(Default)]
pub(super) struct Cache {
    /// The GENERATION `active` is valid for.
    generation: u64,
    /// model name -> its active version, decoded, with the model's settings.
    active: Vec<Serving>,
    /// Decoded versions, least recently used first.
    decoded: Vec<Arc<Loaded>>,
}

pub(super) fn budget_bytes() -> usize {
    crate::infra::gucs::MODEL_CACHE_MB.get().max(1) as usize * 1024 * 1024
}

impl Cache {
    fn remember(&mut self, l: Arc<Loaded>) {
        self.decoded
            .retain(|d| !(d.name == l.name && d.version == l.version));
        self.decoded.push(l);
        let budget = budget_bytes();
        while self.decoded.len() > 1
            && self
                .decoded
                .iter()
                .map(|d| d.model.memory_bytes())
                .sum::<usize>()
                > budget
        {
            self.decoded.remove(0);
        }
        // A model that left is decoded (and counted) again when it is used: its serving entry
        // must not keep it alive.
        let decoded = &self.decoded;
        self.active
            .retain(|a| decoded.iter().any(|d| Arc::ptr_eq(d, &a.loaded)));
    }
    /// The serving entry of model `name`, if its version is still decoded; using it makes that
    /// version the most recently used.
    fn active_hit(&mut self, name: &str) -> Option<Serving> {
        let a = self.active.iter().position(|l| l.loaded.name == name)?;
        let Some(d) = self
            .decoded
            .iter()
            .position(|d| Arc::ptr_eq(d, &self.active[a].loaded))
        else {
            self.active.remove(a);
            return None;
        };
        let l = self.decoded.remove(d);
        self.decoded.push(l);
        Some(self.active[a].clone())
    }
    fn find(&mut self, name: &str, version: i32, checksum: i64) -> Option<Arc<Loaded>> {
        let i = self
            .decoded
            .iter()
            .position(|d| d.name == name && d.version == version && d.checksum == checksum)?;
        let l = self.decoded.remove(i);
        self.decoded.push(l.clone());
        Some(l)
    }
}

/// The active version of a model as it serves: the decoded version and the model's settings.
pub struct Serving {
    pub loaded: Arc<Loaded>,
    /// `unknown_features = 'error'`: keys that are not features are an error (else ignored).
    pub strict: bool,
    /// The model's owner object, whose large-object SELECT right is the right to run the model.
    pub owner_object: Option<pg_sys::Oid>,
}

impl std::ops::Deref for Serving {
    type Target = Loaded;
    fn deref(&self) -> &Loaded {
        &self.loaded
    }
}

impl Clone for Serving {
    fn clone(&self) -> Self {
        Serving {
            loaded: self.loaded.clone(),
            strict: self.strict,
            owner_object: self.owner_object,
        }
    }
}

impl Serving {
    /// Encodes user features under the model's `unknown_features` setting.
    pub fn encode_user(&self, features: &serde_json::Value) -> TtResult<twotower_tower::Encoded> {
        Ok(self.loaded.model.encode(features, self.strict)?)
    }

    /// The tower output for one user (a non-finite output is an error).
    pub fn embed_user(&self, features: &serde_json::Value) -> TtResult<Vec<f32>> {
        Ok(self.loaded.model.embed_with(features, self.strict)?)
    }
}

/// Whether `role` may run (embed with, recall with, serve in a pipeline) a model whose owner
/// object is `owner_object`: the SELECT right on that large object (its owner and the owner's
/// members have it; `twotower.grant_model_usage` grants it), or `twotower_admin`. A model
/// without an owner object runs for administrators only.
pub fn may_use(role: pg_sys::Oid, owner_object: Option<pg_sys::Oid>) -> bool {
    if is_admin(role) {
        return true;
    }
    let Some(lo) = owner_object else { return false };
    // SAFETY: catalogue lookups by oid; the ACL check runs only on an existing large object
    // (it raises for a missing one), with the current snapshot.
    unsafe {
        large_object_exists(lo)
            && pg_sys::pg_largeobject_aclcheck_snapshot(
                lo,
                role,
                pg_sys::ACL_SELECT as pg_sys::AclMode,
                std::ptr::null_mut(),
            ) == pg_sys::AclResult::ACLCHECK_OK
    }
}

/// Whether large object `lo` exists (PostgreSQL's `LargeObjectExists`, which pgrx does not
/// bind): one index probe of pg_largeobject_metadata.
///
/// # Safety
/// Must run in a transaction.
pub(super) unsafe fn large_object_exists(lo: pg_sys::Oid) -> bool {
    // pg_largeobject_metadata and its oid index (fixed catalogue oids).
    let (metadata, metadata_oid_index) = (pg_sys::Oid::from(2995u32), pg_sys::Oid::from(2996u32));
    // SAFETY: the standard catalogue index scan with the catalogue snapshot; opened and closed
    // here (an error in between is cleaned up by abort).
    unsafe {
        let rel = pg_sys::table_open(metadata, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::Oid::from(pg_sys::F_OIDEQ),
            pg_sys::Datum::from(lo),
        );
        let scan = pg_sys::systable_beginscan(
            rel,
            metadata_oid_index,
            true,
            std::ptr::null_mut(),
            1,
            &mut key,
        );
        let found = !pg_sys::systable_getnext(scan).is_null();
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

pub(super) fn check_use(l: &Serving) -> TtResult<()> {
    if may_use(caller(), l.owner_object) {
        return Ok(());
    }
    Err(TtError::PermissionDenied {
        action: format!("use model \"{}\"", l.loaded.name),
        hint: "A model runs for its owner, the roles it was granted to (twotower.grant_model_usage) and members of twotower_admin.".into(),
    })
}

/// The active version of model `name`, decoded (from this backend's cache when it is current).
pub fn active_model(name: &str) -> TtResult<Serving> {
    let generation = GENERATION.load(std::sync::atomic::Ordering::Relaxed);
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation != generation {
            c.active.clear();
            c.generation = generation;
        }
        c.active_hit(name)
    });
    if let Some(l) = hit {
        check_use(&l)?;
        return Ok(l);
    }
    let head = as_catalog_owner(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT v.version, v.checksum, m.unknown_features OPERATOR(pg_catalog.<>) 'ignore', m.owner_object
                   FROM twotower.model m
                   JOIN twotower.model_version v ON v.model = m.name AND v.version = m.active_version
                  WHERE m.name = $1",
                Some(1),
                &[name.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok::<_, pgrx::spi::Error>(Some((
                r.get::<i32>(1)?,
                r.get::<i64>(2)?,
                r.get::<bool>(3)?,
                r.get::<pg_sys::Oid>(4)?,
            )))
        })
    })?;
    let (version, checksum, strict, owner_object) = match head {
        Ok(Some((Some(v), Some(c), s, o))) => (v, c, s.unwrap_or(true), o),
        _ => {
            return Err(TtError::ModelNotFound {
                name: name.to_string(),
                version: None,
            })
        }
    };
    let l = Serving {
        loaded: load_version(name, version, checksum)?,
        strict,
        owner_object,
    };
    check_use(&l)?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.generation == generation {
            c.active.retain(|a| a.loaded.name != name);
            c.active.push(l.clone());
        }
    });
    Ok(l)
}

/// A version's files as stored: its spec's text and its weights (read as the catalogue's owner:
/// the caller has been allowed to use the model).
pub fn model_blobs(name: &str, version: i32) -> TtResult<(String, Vec<u8>)> {
    let row = as_catalog_owner(|| {
        read_row::<String, Vec<u8>>(
            "SELECT spec::text, weights FROM twotower.model_version WHERE model = $1 AND version = $2",
            &[name.into(), version.into()],
        )
    })?
    .map_err(|e| TtError::Catalog(format!("reading model \"{name}\": {e}")))?;
    match row {
        Some((Some(spec), Some(weights))) => Ok((spec, weights)),
        _ => Err(TtError::ModelNotFound {
            name: name.to_string(),
            version: Some(version),
        }),
    }
}

/// A given version, decoded (cached by name, version and checksum).
pub fn load_version(name: &str, version: i32, checksum: i64) -> TtResult<Arc<Loaded>> {
    if let Some(l) = CACHE.with(|c| c.borrow_mut().find(name, version, checksum)) {
        return Ok(l);
    }
    let row = as_catalog_owner(|| {
        read_row::<String, Vec<u8>>(
            "SELECT spec::text, weights FROM twotower.model_version WHERE model = $1 AND version = $2",
            &[name.into(), version.into()],
        )
    })?
    .map_err(|e| TtError::Catalog(format!("reading model \"{name}\": {e}")))?;
    let Some((Some(spec), Some(weights))) = row else {
        return Err(TtError::ModelNotFound {
            name: name.to_string(),
            version: Some(version),
        });
    };
    let model = Model::load(&spec, &weights)?;
    let l = Arc::new(Loaded {
        name: name.to_string(),
        version,
        checksum,
        model,
    });
    CACHE.with(|c| c.borrow_mut().remember(l.clone()));
    Ok(l)
}

/// Checks that a loaded model is of the wanted kind.
pub fn expect_kind(l: &Loaded, kind: twotower_tower::Kind) -> TtResult<()> {
    if l.model.kind() == kind {
        Ok(())
    } else {
        Err(TtError::ModelKind {
            name: l.name.clone(),
            expected: kind.name(),
            got: l.model.kind().name().to_string(),
        })
    }
}

/// Number of decoded models and their bytes in this backend's cache (for model_cache_info).
pub fn cache_stats() -> (i64, i64) {
    CACHE.with(|c| {
        let c = c.borrow();
        (
            c.decoded.len() as i64,
            c.decoded
                .iter()
                .map(|d| d.model.memory_bytes() as i64)
                .sum(),
        )
    })
}
