//! The interaction log a channel is built from: (user, item, time, weight) rows, users by any
//! text id, items by bigint id.

use crate::error::{CfError, Result};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub user: u32,
    pub item: u32,
    pub ts: f64,
    pub weight: f32,
}

#[derive(Debug, Default)]
pub struct Log {
    pub(crate) user_index: HashMap<String, u32>,
    pub(crate) user_ids: Vec<String>,
    pub(crate) item_index: HashMap<i64, u32>,
    pub(crate) item_ids: Vec<i64>,
    pub(crate) rows: Vec<Row>,
}

impl Log {
    /// Adds one interaction. The time is in any unit (seconds for timestamps); the weight must
    /// be finite and non-negative (0 keeps the pair in the counts with no weight).
    pub fn push(&mut self, user: &str, item: i64, ts: f64, weight: f32) -> Result<()> {
        if !ts.is_finite() {
            return Err(CfError::BadInput(format!(
                "user {user}, item {item}: the time {ts} is not finite"
            )));
        }
        if !weight.is_finite() || weight < 0.0 {
            return Err(CfError::BadInput(format!(
                "user {user}, item {item}: the weight {weight} must be finite and >= 0"
            )));
        }
        let n = self.user_index.len() as u32;
        let u = *self.user_index.entry(user.to_owned()).or_insert_with(|| {
            self.user_ids.push(user.to_owned());
            n
        });
        let m = self.item_index.len() as u32;
        let i = *self.item_index.entry(item).or_insert_with(|| {
            self.item_ids.push(item);
            m
        });
        self.rows.push(Row {
            user: u,
            item: i,
            ts,
            weight,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn users(&self) -> usize {
        self.user_ids.len()
    }

    pub fn items(&self) -> usize {
        self.item_ids.len()
    }

    /// Bytes this log holds (for the build's memory estimate).
    pub fn bytes(&self) -> usize {
        self.rows.len() * std::mem::size_of::<Row>()
            + self.user_ids.iter().map(|s| s.len() + 48).sum::<usize>() * 2
            + self.item_ids.len() * 40
    }
}

/// A 64-bit hash of a text and a seed (FNV-1a, then a SplitMix64 finaliser): the same value on
/// every platform and build, for samples that are stable across builds.
pub(crate) fn stable_hash(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
