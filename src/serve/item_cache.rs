//! The per-backend hot-item cache of the pre-ranker: item vectors and encoded item features by
//! item id, bounded by `twotower.item_cache_size` (a CLOCK map on shelves, `twotower_funnel::cache`;
//! a shelf per table, what is cached of it and how it was read).
//!
//! A table's rows are cached only while it has the `twotower_item_cache` trigger
//! (`twotower.enable_item_cache`): after every statement that changes the table, the trigger
//! sends a relcache invalidation for it, which reaches every backend (and standbys, through
//! the commit record) at commit, and the backend's callback empties the cache. A rolled-back
//! change is undone the same way. Without the trigger every call reads the table.
//!
//! The cache serves only what the caller may read: a role without table-level SELECT, a table
//! with row-level security, or a transaction with a snapshot older than the latest commit
//! (REPEATABLE READ, SERIALIZABLE) reads the table instead.

use crate::infra::error::OrReport;
use pgrx::pg_sys;
use pgrx::prelude::*;
use rustc_hash::FxHashMap as HashMap;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::Arc;
use twotower_funnel::cache::HotMap;
use twotower_tower::Part;

/// What an entry holds.
#[derive(Clone)]
pub enum Entry {
    Vector(Arc<[f32]>),
    Part(Arc<Part>),
    /// An item's attribute row (a rerank stage's columns).
    Attrs(Arc<serde_json::Map<String, serde_json::Value>>),
}

/// A shelf: (what: 0 vector / 1 item part / 2 attributes, table oid, source: a hash of everything
/// else that determines the entry — the id and vector columns, the model checksum —). Its
/// entries are by item id.
type Shelf = (u8, u32, u64);

/// The `source` part of a key: a hash of the columns an entry was read by and the model (its
/// checksum, or 0) it was encoded for. Two pipelines that read one table by other columns
/// never share entries.
pub fn source(columns: &[&str], model: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    columns.hash(&mut h);
    model.hash(&mut h);
    h.finish()
}

struct State {
    map: HotMap<Shelf, Entry>,
    /// The EPOCH the map and `enabled` are valid for.
    epoch: u64,
    /// Tables known to have (true) or lack (false) the trigger.
    enabled: HashMap<pg_sys::Oid, bool>,
}

thread_local! {
    static EPOCH: Cell<u64> = const { Cell::new(0) };
    static WATCHED: RefCell<HashSet<pg_sys::Oid>> = RefCell::new(HashSet::new());
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Never fails: a watched set in use (borrowed) counts as a match.
    let hit = relid == pg_sys::InvalidOid
        || WATCHED.with(|w| w.try_borrow().map(|w| w.contains(&relid)).unwrap_or(true));
    if hit {
        EPOCH.with(|e| e.set(e.get() + 1));
    }
}

/// Registers the invalidation callback (from `_PG_init`).
pub fn register() {
    // SAFETY: registering a callback once per backend, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0))
    };
}

fn budget() -> usize {
    crate::infra::gucs::ITEM_CACHE_MB.get().max(0) as usize * 1024 * 1024
}

/// Runs `f` on the current state (emptied first if an invalidation came since it was used).
fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let epoch = EPOCH.with(|e| e.get());
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let st = s.get_or_insert_with(|| State {
            map: HotMap::new(budget()),
            epoch,
            enabled: HashMap::default(),
        });
        st.map.set_budget(budget());
        if st.epoch != epoch {
            st.map.clear();
            st.enabled.clear();
            st.epoch = epoch;
        }
        f(st)
    })
}

/// Whether `rel`'s rows may be served from the cache to this caller now.
pub fn usable(rel: pg_sys::Oid) -> bool {
    if budget() == 0 {
        return false;
    }
    // SAFETY: reads of backend globals and catalogue lookups on a valid relation oid.
    let (snapshot_per_statement, readable, rls) = unsafe {
        (
            pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32,
            pg_sys::pg_class_aclcheck(
                rel,
                crate::infra::catalog::caller(),
                pg_sys::ACL_SELECT as pg_sys::AclMode,
            ) == pg_sys::AclResult::ACLCHECK_OK,
            pg_sys::check_enable_rls(rel, pg_sys::InvalidOid, true)
                != pg_sys::CheckEnableRlsResult::RLS_NONE as i32,
        )
    };
    if !snapshot_per_statement || !readable || rls {
        return false;
    }
    if let Some(known) = with_state(|s| s.enabled.get(&rel).copied()) {
        return known;
    }
    // The table and every member of its partition tree (pg_partition_tree lists nothing for a
    // table that is not partitioned)
    // must have the trigger, and none may be foreign (its rows change where no trigger sees
    // them). Each member is watched: dropping a member's trigger, attaching or detaching a
    // partition invalidates what this backend knows.
    let tree = crate::infra::catalog::read_row::<bool, Vec<pg_sys::Oid>>(
        "SELECT pg_catalog.bool_and(c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::\"char\"[]) AND EXISTS (
                    SELECT 1 FROM pg_catalog.pg_trigger t
                     WHERE t.tgrelid OPERATOR(pg_catalog.=) m.relid
                       AND t.tgname OPERATOR(pg_catalog.=) 'twotower_item_cache'
                       AND t.tgenabled OPERATOR(pg_catalog.=) 'A'
                       AND t.tgfoid OPERATOR(pg_catalog.=) 'twotower.invalidate_item_cache()'::pg_catalog.regprocedure)),
                pg_catalog.array_agg(m.relid::pg_catalog.oid)
           FROM (SELECT $1::pg_catalog.regclass AS relid UNION SELECT p.relid FROM pg_catalog.pg_partition_tree($1) p) m
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) m.relid",
        &[rel.into()],
    )
    .ok()
    .flatten();
    let (has, members) = match tree {
        Some((Some(has), Some(members))) => (has, members),
        _ => (false, Vec::new()),
    };
    WATCHED.with(|w| {
        let mut w = w.borrow_mut();
        w.insert(rel);
        w.extend(members);
    });
    with_state(|s| s.enabled.insert(rel, has));
    has
}

fn shelf(what: u8, rel: pg_sys::Oid, source: u64) -> Shelf {
    (what, rel.to_u32(), source)
}

/// The entries of `items` on `shelf` that `pick` accepts, cloned (in `items` order, None for
/// a miss), and the items without one (misses).
///
/// The entries of a cache lie scattered over its memory, and each lookup's reads depend on one
/// another (the index, the slot, the entry, its data). So they are done in passes over the
/// whole request, each a run of independent reads that the CPU overlaps: the index, then the
/// slots (`get_many`), then every entry's reference count and data (`touch`: one value per
/// cache line of what the caller will read), then the clones. A clone's atomic increment
/// waits for its memory and holds back every read after it; after the passes it finds its
/// line in the CPU's caches.
fn lookup<T>(
    s: &State,
    shelf: Shelf,
    items: &[i64],
    pick: impl Fn(&Entry) -> Option<&Arc<T>>,
    touch: impl Fn(&T) -> f32,
) -> (Vec<Option<Arc<T>>>, Vec<i64>)
where
    T: ?Sized,
{
    let found = s.map.get_many(&shelf, items);
    let mut sum = 0f32;
    for e in found.iter().flatten() {
        if let Some(a) = pick(e) {
            sum += Arc::strong_count(a) as f32;
        }
    }
    for e in found.iter().flatten() {
        if let Some(a) = pick(e) {
            sum += touch(a);
        }
    }
    std::hint::black_box(sum);
    let mut miss = Vec::new();
    let hit = items
        .iter()
        .zip(found)
        .map(|(&i, e)| {
            let a = e.and_then(&pick).cloned();
            if a.is_none() {
                miss.push(i);
            }
            a
        })
        .collect();
    (hit, miss)
}

/// Hits in `items` order (from [`lookup`]) by item id.
fn by_id<T: ?Sized>(
    items: &[i64],
    (hit, miss): (Vec<Option<Arc<T>>>, Vec<i64>),
) -> (HashMap<i64, Arc<T>>, Vec<i64>) {
    let mut m = HashMap::with_capacity_and_hasher(items.len(), Default::default());
    m.extend(items.iter().zip(hit).filter_map(|(&i, a)| Some((i, a?))));
    (m, miss)
}

/// The cached vectors of `items` in `rel` read by `source` (by item id); the rest are misses.
pub fn vectors(
    rel: pg_sys::Oid,
    source: u64,
    items: &[i64],
) -> (HashMap<i64, Arc<[f32]>>, Vec<i64>) {
    let found = with_state(|s| {
        lookup(
            s,
            shelf(0, rel, source),
            items,
            |e| match e {
                Entry::Vector(v) => Some(v),
                _ => None,
            },
            |v| v.iter().step_by(16).sum(),
        )
    });
    by_id(items, found)
}

pub fn put_vectors<'a>(
    rel: pg_sys::Oid,
    source: u64,
    rows: impl Iterator<Item = (i64, &'a Arc<[f32]>)>,
) {
    with_state(|s| {
        for (i, v) in rows {
            s.map.insert_sized(
                shelf(0, rel, source),
                i,
                Entry::Vector(v.clone()),
                v.len() * 4 + 96,
            );
        }
    })
}

/// The cached item parts for `items` from `rel` read by `source` (which names the model), in
/// `items` order (None for a miss), and the misses.
#[allow(clippy::type_complexity)]
pub fn parts(rel: pg_sys::Oid, source: u64, items: &[i64]) -> (Vec<Option<Arc<Part>>>, Vec<i64>) {
    with_state(|s| {
        lookup(
            s,
            shelf(1, rel, source),
            items,
            |e| match e {
                Entry::Part(p) => Some(p),
                _ => None,
            },
            |p| p.touch(),
        )
    })
}

pub fn put_parts<'a>(
    rel: pg_sys::Oid,
    source: u64,
    rows: impl Iterator<Item = (i64, &'a Arc<Part>)>,
) {
    with_state(|s| {
        for (i, p) in rows {
            s.map.insert_sized(
                shelf(1, rel, source),
                i,
                Entry::Part(p.clone()),
                p.memory_bytes() + 64,
            );
        }
    })
}

/// The cached attribute rows of `items` in `rel` read by `source` (the id and attribute
/// columns); the rest are misses.
pub fn attributes(
    rel: pg_sys::Oid,
    source: u64,
    items: &[i64],
) -> (
    HashMap<i64, Arc<serde_json::Map<String, serde_json::Value>>>,
    Vec<i64>,
) {
    let found = with_state(|s| {
        lookup(
            s,
            shelf(2, rel, source),
            items,
            |e| match e {
                Entry::Attrs(a) => Some(a),
                _ => None,
            },
            |_| 0.0,
        )
    });
    by_id(items, found)
}

pub fn put_attributes<'a>(
    rel: pg_sys::Oid,
    source: u64,
    rows: impl Iterator<Item = (i64, &'a Arc<serde_json::Map<String, serde_json::Value>>)>,
) {
    with_state(|s| {
        for (i, a) in rows {
            // An estimate: the map's nodes and the values' text.
            let bytes = 96
                + a.iter()
                    .map(|(k, v)| 64 + k.len() + v.to_string().len())
                    .sum::<usize>();
            s.map
                .insert_sized(shelf(2, rel, source), i, Entry::Attrs(a.clone()), bytes);
        }
    })
}

/// (entries, bytes) held by this backend (for `item_cache_info`).
pub fn stats() -> (i64, i64) {
    with_state(|s| (s.map.len() as i64, s.map.bytes() as i64))
}

crate::infra::pg_function_info_v1!(pg_finfo_twotower_item_cache_ddl);

/// The `ddl_command_end` event trigger (declared in `sql/pg_twotower.sql`): after a `CREATE
/// TABLE ... PARTITION OF` or an `ALTER TABLE ... ATTACH PARTITION`, runs
/// `twotower.item_cache_partitions()`, which gives the new partitions of an item-cached table
/// the trigger. Other DDL is left alone: in particular the `ALTER TABLE ... ENABLE ALWAYS
/// TRIGGER` of `enable_item_cache` itself and of a pg_restore, which restores each partition's
/// trigger on its own (adding them earlier would make those statements fail).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn twotower_item_cache_ddl(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: an event trigger is called with EventTriggerData as its context; the parse tree
    // is PostgreSQL's node for the statement, read only.
    let adds_partition = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_EventTriggerData {
            return pg_sys::Datum::from(0);
        }
        let stmt = (*(ctx as *mut pg_sys::EventTriggerData)).parsetree;
        if stmt.is_null() {
            false
        } else if (*stmt).type_ == pg_sys::NodeTag::T_CreateStmt {
            !(*(stmt as *mut pg_sys::CreateStmt)).partbound.is_null()
        } else if (*stmt).type_ == pg_sys::NodeTag::T_AlterTableStmt {
            crate::infra::spi::list_pointers((*(stmt as *mut pg_sys::AlterTableStmt)).cmds)
                .into_iter()
                .any(|c| {
                    (*(c as *mut pg_sys::AlterTableCmd)).subtype
                        == pg_sys::AlterTableType::AT_AttachPartition
                })
        } else {
            false
        }
    };
    if adds_partition {
        Spi::run("SELECT twotower.item_cache_partitions()")
            .map_err(|e| {
                crate::infra::error::TtError::Internal(format!("item cache partitions: {e}"))
            })
            .or_report();
    }
    pg_sys::Datum::from(0)
}

#[pg_schema]
pub mod twotower {
    use pgrx::prelude::*;

    /// Statement-level trigger of `twotower.enable_item_cache`: tells every backend (at commit)
    /// that the table changed, so their hot-item caches drop what they hold of it.
    #[pg_trigger]
    fn invalidate_item_cache<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let rel = trigger.relation()?;
        // The table and, for a partition, every table above it: the cache knows a partitioned
        // table's rows by the table a pipeline names.
        let mut tables = vec![rel.oid()];
        // SAFETY: rd_rel of an open relation is its valid pg_class row.
        if unsafe { (*rel.rd_rel).relispartition } {
            let above: Option<Vec<Option<pg_sys::Oid>>> = Spi::get_one_with_args::<Vec<Option<pg_sys::Oid>>>(
                "SELECT pg_catalog.array_agg(relid::pg_catalog.oid) FROM pg_catalog.pg_partition_ancestors($1)",
                &[rel.oid().into()],
            )
            .map_err(|e| crate::infra::error::TtError::Internal(format!("reading the ancestors of a partition: {e}"))).unwrap_or_else(|e| e.report());
            tables.extend(above.into_iter().flatten().flatten());
        }
        for t in tables {
            // SAFETY: queues a relcache invalidation of a relation (sent at commit, undone on
            // abort), as DDL on it would; an oid without a relation is ignored by the receivers.
            unsafe { pg_sys::CacheInvalidateRelcacheByRelid(t) };
        }
        Ok(None)
    }

    /// Entries and bytes of this backend's hot-item cache.
    #[pg_extern(volatile, parallel_restricted)]
    fn item_cache_info() -> TableIterator<'static, (name!(entries, i64), name!(bytes, i64))> {
        let (n, b) = super::stats();
        TableIterator::once((n, b))
    }
}
