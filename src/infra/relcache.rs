//! One relcache callback per backend for the per-backend caches that describe relations (the
//! leaves of a partitioned index, the shards of a partitioned table, the open index images):
//! each cache subscribes a function that forgets what mentions the invalidated relation (0:
//! every relation).
//! PostgreSQL has room for few relcache callbacks; they share this one.

use pgrx::pg_sys;
use std::cell::{Cell, RefCell};

thread_local! {
    static HOOKS: RefCell<Vec<fn(u32)>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Calls `forget(relid)` on every relcache invalidation from now on in this backend.
pub fn subscribe(forget: fn(u32)) {
    HOOKS.with(|h| {
        let mut h = h.borrow_mut();
        if !h.iter().any(|f| std::ptr::fn_addr_eq(*f, forget)) {
            h.push(forget);
        }
    });
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers this backend's callback once.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidated), pg_sys::Datum::from(0)) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let hooks = HOOKS.with(|h| h.try_borrow().map(|h| h.clone()).unwrap_or_default());
    for f in hooks {
        f(relid.to_u32());
    }
}

/// A per-backend cache of values keyed by a relation, each forgotten when any relation it
/// mentions is invalidated.
pub struct RelCache<V: Clone> {
    entries: RefCell<Vec<(u32, Vec<u32>, V)>>,
}

impl<V: Clone> RelCache<V> {
    pub const fn new() -> Self {
        RelCache {
            entries: RefCell::new(Vec::new()),
        }
    }

    pub fn get(&self, key: u32) -> Option<V> {
        self.entries
            .borrow()
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| v.clone())
    }

    /// Keeps `value` for `key` until one of `mentions` (or `key`) is invalidated.
    pub fn put(&self, key: u32, mut mentions: Vec<u32>, value: V) {
        mentions.push(key);
        let mut e = self.entries.borrow_mut();
        e.retain(|(k, _, _)| *k != key);
        if e.len() >= 64 {
            e.remove(0);
        }
        e.push((key, mentions, value));
    }

    pub fn forget(&self, relid: u32) {
        if let Ok(mut e) = self.entries.try_borrow_mut() {
            e.retain(|(_, m, _)| relid != 0 && !m.contains(&relid));
        }
    }
}

impl<V: Clone> Default for RelCache<V> {
    fn default() -> Self {
        Self::new()
    }
}
