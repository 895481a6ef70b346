//! Where the bytes live. An index relation is:
//!
//! ```text
//! block 0                      metapage (Meta)
//! image_start .. +image_nblocks  the image (sorted heap TIDs + HNSW graph), raw bytes
//! tomb_start  .. +tomb_nblocks   tombstone bitmap: bit i set = graph entry i was vacuumed
//! (anywhere after the tombstones)
//!   delta pages                (heap TID, f32 vector) items added after the build, a chain
//!                              from the metapage's dl_head to dl_tail
//!   the delta graph            an f32 image over earlier delta items, a chain of pages (each
//!                              names the next and its generation)
//!   free pages                 in the index's free space map, reused by both
//! ```
//!
//! The delta graph (metapage version 2) keeps scans fast after many inserts: once the delta
//! holds enough items, they are moved into it ([`super::fold`]); its old pages and the delta
//! pages it absorbed go to the index's free space map and are reused by the next one.
//!
//! Build writes everything through shared buffers and WAL-logs it with `log_newpage_range`; every
//! later change (insert, vacuum) is a Generic WAL record, so crash recovery and physical
//! replicas see exactly what the primary wrote.

mod chain;
mod delta;
mod kinds;
mod lock;
mod meta;
mod tomb;
pub use chain::*;
pub use delta::*;
pub use kinds::*;
pub use lock::*;
pub use meta::*;
pub use tomb::*;
