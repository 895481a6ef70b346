//! Citus: recognising a table whose rows live in shards on other nodes. On a Citus coordinator
//! a distributed (or reference) table is a shell without rows, and so is the index Citus
//! created on it: the rows and the index entries are in the shards' tables on the workers.
//! `recall()` (and pipelines) search such an index through Citus with an ordered query, and
//! `index_info` asks every shard's index; a function that would read the index through its
//! pages would answer for the empty shell, so it refuses instead (docs/scale-out.md).

use crate::infra::error::{TtError, TtResult};
use pgrx::prelude::*;

/// Whether `relid` is a table of Citus's metadata on this node (`pg_dist_partition`: a
/// distributed, reference or Citus-managed local table). Without Citus: one catalogue lookup.
pub fn is_citus_table(relid: pg_sys::Oid) -> TtResult<bool> {
    // SAFETY: a syscache lookup by name in pg_catalog (no Citus: InvalidOid).
    let dist = unsafe {
        pg_sys::get_relname_relid(
            c"pg_dist_partition".as_ptr(),
            pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
        )
    };
    if dist == pg_sys::InvalidOid {
        return Ok(false);
    }
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid OPERATOR(pg_catalog.=) $1)",
        &[relid.into()],
    )
    .map(|b| b.unwrap_or(false))
    .map_err(|e| TtError::Internal(format!("reading Citus's pg_dist_partition: {e}")))
}

/// Whether the table of index `index_oid` is a Citus table.
pub fn is_citus_index(index_oid: pg_sys::Oid) -> TtResult<bool> {
    // SAFETY: a catalogue lookup by oid (InvalidOid for a relation that is no index).
    let heap = unsafe { pg_sys::IndexGetRelation(index_oid, true) };
    Ok(heap != pg_sys::InvalidOid && is_citus_table(heap)?)
}

/// `CitusTable` when the table of index `index_oid` is a Citus table (its rows are in shards
/// elsewhere); `who` names the calling function.
pub fn refuse_shell_index(index_oid: pg_sys::Oid, who: &str) -> TtResult<()> {
    // SAFETY: a catalogue lookup by oid (an error for a relation that is no index).
    let heap = unsafe { pg_sys::IndexGetRelation(index_oid, true) };
    if heap == pg_sys::InvalidOid || !is_citus_table(heap)? {
        return Ok(());
    }
    Err(TtError::CitusTable {
        relation: crate::infra::spi::relation_name(heap)?,
        who: who.to_string(),
    })
}

/// Whether `a` and `b` are hash-distributed Citus tables of one co-location group, distributed
/// by their columns `a_col` and `b_col` (then a statement joining them on those columns runs
/// shard by shard on the workers). Without Citus: false.
pub fn colocated_on(a: pg_sys::Oid, a_col: &str, b: pg_sys::Oid, b_col: &str) -> TtResult<bool> {
    if !is_citus_table(a)? || !is_citus_table(b)? {
        return Ok(false);
    }
    Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.count(*) OPERATOR(pg_catalog.=) 2
                AND pg_catalog.count(DISTINCT p.colocationid) OPERATOR(pg_catalog.=) 1
           FROM pg_catalog.pg_dist_partition p
          WHERE p.partmethod OPERATOR(pg_catalog.=) 'h'
            AND ((p.logicalrelid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                  AND pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) OPERATOR(pg_catalog.=) $2)
              OR (p.logicalrelid::pg_catalog.oid OPERATOR(pg_catalog.=) $3
                  AND pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) OPERATOR(pg_catalog.=) $4))",
        &[a.into(), a_col.into(), b.into(), b_col.into()],
    )
    .map(|b| b.unwrap_or(false))
    .map_err(|e| TtError::Internal(format!("reading Citus's pg_dist_partition: {e}")))
}

/// Whether this node is a Citus coordinator with workers (`citus_is_coordinator()`, and the node
/// metadata lists a primary worker). Workers hold the node metadata too: they are not
/// coordinators (a worker running a command on every worker would run it on itself, inside
/// its own transaction's locks). Without Citus: false.
pub fn is_coordinator() -> TtResult<bool> {
    // SAFETY: a syscache lookup by name in pg_catalog (no Citus: InvalidOid).
    let nodes = unsafe {
        pg_sys::get_relname_relid(
            c"pg_dist_node".as_ptr(),
            pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
        )
    };
    if nodes == pg_sys::InvalidOid {
        return Ok(false);
    }
    Spi::get_one::<bool>(
        "SELECT pg_catalog.citus_is_coordinator()
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node
                             WHERE noderole OPERATOR(pg_catalog.=) 'primary' AND groupid OPERATOR(pg_catalog.<>) 0)",
    )
    .map(|b| b.unwrap_or(false))
    .map_err(|e| TtError::Internal(format!("reading Citus's pg_dist_node: {e}")))
}
