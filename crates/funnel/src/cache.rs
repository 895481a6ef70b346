//! A bounded map for hot items: two generations (recent and older). Lookups find entries in
//! either and move older hits to the recent generation; when the recent generation outgrows
//! half the budget, the older one is dropped and the recent one becomes older. Items in steady
//! use stay; one-off items leave within two turnovers. Sizes are in caller-given bytes.

use rustc_hash::FxHashMap as HashMap;
use std::hash::Hash;

pub struct HotMap<K, V> {
    recent: HashMap<K, (V, usize)>,
    older: HashMap<K, (V, usize)>,
    recent_bytes: usize,
    older_bytes: usize,
    budget: usize,
}

impl<K: Hash + Eq + Copy, V> HotMap<K, V> {
    /// A map that holds at most about `budget` bytes (as the callers size their entries).
    pub fn new(budget: usize) -> Self {
        HotMap {
            recent: HashMap::default(),
            older: HashMap::default(),
            recent_bytes: 0,
            older_bytes: 0,
            budget,
        }
    }

    pub fn get(&mut self, k: &K) -> Option<&V> {
        // An older hit moves to the recent generation (the insertion may turn it over).
        if let Some((v, bytes)) = self.older.remove(k) {
            self.older_bytes -= bytes;
            self.insert_sized(*k, v, bytes);
        }
        match self.recent.get(k) {
            Some(e) => Some(&e.0),
            None => self.older.get(k).map(|e| &e.0),
        }
    }

    /// Inserts `v` of `bytes` bytes (an entry over half the budget is not kept).
    pub fn insert_sized(&mut self, k: K, v: V, bytes: usize) {
        if bytes > self.budget / 2 {
            return;
        }
        if let Some((_, b)) = self.older.remove(&k) {
            self.older_bytes -= b;
        }
        if let Some((_, b)) = self.recent.insert(k, (v, bytes)) {
            self.recent_bytes -= b;
        }
        self.recent_bytes += bytes;
        if self.recent_bytes > self.budget / 2 {
            self.older = std::mem::take(&mut self.recent);
            self.older_bytes = self.recent_bytes;
            self.recent_bytes = 0;
        }
    }

    pub fn clear(&mut self) {
        self.recent.clear();
        self.older.clear();
        self.recent_bytes = 0;
        self.older_bytes = 0;
    }

    pub fn set_budget(&mut self, budget: usize) {
        if budget != self.budget {
            self.budget = budget;
            self.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as the entries were sized.
    pub fn bytes(&self) -> usize {
        self.recent_bytes + self.older_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::HotMap;

    #[test]
    fn stays_within_its_budget_and_keeps_what_is_used() {
        let mut m: HotMap<i64, Vec<u8>> = HotMap::new(1000);
        for i in 0..10_000 {
            m.insert_sized(i, vec![0; 10], 10);
            assert!(m.bytes() <= 1000, "{} bytes at {i}", m.bytes());
            // Item -1 is used all the time: it never leaves.
            if i == 0 {
                m.insert_sized(-1, vec![1; 10], 10);
            }
            assert_eq!(m.get(&-1).map(|v| v[0]), Some(1), "hot item lost at {i}");
        }
        assert!(m.get(&5).is_none(), "a one-off item from long ago is gone");
        assert!(m.get(&9_999).is_some());
        m.insert_sized(7, vec![0; 600], 600);
        assert!(m.get(&7).is_none(), "an entry over half the budget is not kept");
        m.insert_sized(9_999, vec![2; 10], 10);
        assert_eq!(m.get(&9_999).map(|v| v[0]), Some(2), "a new value replaces the old");
        m.clear();
        assert!(m.is_empty() && m.bytes() == 0);
    }
}
