//! The one SPI helper of the SQL surfaces that read user tables in bulk (the item refresh
//! today; the item-CF/Swing builders and training next): relation and column lookups, a cursor
//! read in batches with one SPI connection per batch (so a batch's tuples, their text and the
//! executor state of what is done with them are freed before the next, and memory stays flat
//! however many rows), progress NOTICEs, and cancellation between batches.

use crate::infra::catalog::read_row;
use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};

/// The schema-qualified, quoted name of relation `rel` (as `regclass` prints it).
pub fn relation_name(rel: pg_sys::Oid) -> TtResult<String> {
    // From pg_class, not `$1::regclass::text`: the text of a dropped relation's oid is the bare
    // number, which pasted into SQL is a syntax error (or, once the oid is reused, another table).
    read_row::<String, bool>(
        "SELECT c.oid::pg_catalog.regclass::pg_catalog.text, true FROM pg_catalog.pg_class c
          WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[rel.into()],
    )
    .ok()
    .flatten()
    .and_then(|(n, _)| n)
    .ok_or_else(|| TtError::UndefinedTable("relation does not exist".into()))
}

/// Whether `rel` has a (not dropped) column `col`.
pub fn column_exists(rel: pg_sys::Oid, col: &str) -> bool {
    read_row::<bool, bool>(
        "SELECT true, true FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        &[rel.into(), col.into()],
    )
    .ok()
    .flatten()
    .is_some()
}

/// The quoted name of column `col` of `rel`, after checking that it exists (`what` names it in
/// the error).
pub fn column(rel: pg_sys::Oid, col: &str, what: &str) -> TtResult<String> {
    if column_exists(rel, col) {
        Ok(quote_identifier(col))
    } else {
        Err(TtError::UndefinedColumn(format!(
            "{what} column \"{col}\" does not exist"
        )))
    }
}

/// A statement prepared once for a whole bulk operation (kept until the transaction ends).
pub fn prepare(sql: &str, types: &[pg_sys::Oid]) -> SpiResult<OwnedPreparedStatement> {
    let types: Vec<pgrx::PgOid> = types.iter().map(|t| pgrx::PgOid::from(*t)).collect();
    Spi::connect(|c| c.prepare_mut(sql, &types).map(|p| p.keep()))
}

/// A query read in batches through a cursor that outlives each batch's SPI connection.
pub struct Batches {
    portal: String,
}

impl Batches {
    pub fn open(select: &str) -> SpiResult<Batches> {
        let portal = Spi::connect(|c| {
            c.try_open_cursor(select, &[])
                .map(|cur| cur.detach_into_name())
        })?;
        Ok(Batches { portal })
    }

    /// Fetches at most `n` rows and hands them, with the batch's SPI client (for the writes the
    /// batch causes), to `f`. Answers cancellation first. An empty table means the end.
    pub fn next<T>(
        &self,
        n: usize,
        f: impl FnOnce(&mut SpiClient<'_>, SpiTupleTable<'_>) -> SpiResult<T>,
    ) -> SpiResult<T> {
        check_for_interrupts!();
        Spi::connect_mut(|client| {
            let mut cursor = client.find_cursor(&self.portal)?;
            let rows = cursor.fetch(n as i64)?;
            let r = f(client, rows)?;
            cursor.detach_into_name();
            Ok(r)
        })
    }
}

/// Progress of a bulk operation: a NOTICE with the count and the rate every 10 seconds.
pub struct Progress {
    what: &'static str,
    unit: &'static str,
    started: std::time::Instant,
    last: std::time::Instant,
    pub done: u64,
}

impl Progress {
    pub fn new(what: &'static str, unit: &'static str) -> Progress {
        let now = std::time::Instant::now();
        Progress {
            what,
            unit,
            started: now,
            last: now,
            done: 0,
        }
    }

    pub fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.last.elapsed().as_secs() >= 10 {
            self.last = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            notice!(
                "{}: {} {} in {secs:.0} s ({:.0} {}/s)",
                self.what,
                self.done,
                self.unit,
                self.done as f64 / secs,
                self.unit
            );
        }
    }
}

/// Rows read per batch by [`read_rows`].
pub const BATCH: usize = 10_000;

/// The expression giving column `col` of `rel` as seconds (timestamps) or as it is
/// (numbers), as double precision.
pub fn time_expr(rel: pg_sys::Oid, col: &str) -> TtResult<String> {
    let q = column(rel, col, "time")?;
    let ty = read_row::<String, bool>(
        "SELECT pg_catalog.format_type(atttypid, NULL), true FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attname = $2",
        &[rel.into(), col.into()],
    )
    .ok()
    .flatten()
    .and_then(|(t, _)| t)
    .unwrap_or_default();
    Ok(match ty.as_str() {
        "timestamp with time zone" | "timestamp without time zone" | "date" => {
            format!("pg_catalog.date_part('epoch', t.{q})::pg_catalog.float8")
        }
        "smallint" | "integer" | "bigint" | "real" | "double precision" | "numeric" => {
            format!("t.{q}::pg_catalog.float8")
        }
        other => {
            return Err(TtError::WrongType(format!(
            "time column \"{col}\" is of type {other}; it must be a timestamp, a date or a number"
        )))
        }
    })
}

/// The SELECT expression of label column `col` of `rel` (as `t`) as a float8: a number as it
/// is (positive feedback above 0, negative feedback below 0, neither at 0), a boolean as
/// 1 (true) or −1 (false).
pub fn label_expr(rel: pg_sys::Oid, col: &str) -> TtResult<String> {
    let q = column(rel, col, "label")?;
    Ok(match column_type(rel, col)?.as_str() {
        "boolean" => format!("CASE WHEN t.{q} THEN 1::pg_catalog.float8 WHEN NOT t.{q} THEN -1::pg_catalog.float8 END"),
        "smallint" | "integer" | "bigint" | "real" | "double precision" => {
            format!("t.{q}::pg_catalog.float8")
        }
        ty if ty.starts_with("numeric") => format!("t.{q}::pg_catalog.float8"),
        other => {
            return Err(TtError::WrongType(format!(
                "label column \"{col}\" is of type {other}; it must be a boolean or a number (above 0: positive feedback, below 0: negative feedback, 0: neither)"
            )))
        }
    })
}

/// Whether `rel` is a table (its rows have a physical order: equal timestamps keep it).
pub fn is_table(rel: pg_sys::Oid) -> bool {
    read_row::<bool, bool>(
        "SELECT relkind IN ('r', 'm'), true FROM pg_catalog.pg_class WHERE oid = $1",
        &[rel.into()],
    )
    .ok()
    .flatten()
    .and_then(|(t, _)| t)
    .unwrap_or(false)
}

/// The SQL type of column `col` of `rel` (as format_type prints it, quoted where needed).
pub fn column_type(rel: pg_sys::Oid, col: &str) -> TtResult<String> {
    read_row::<String, bool>(
        "SELECT pg_catalog.format_type(atttypid, atttypmod), true FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        &[rel.into(), col.into()],
    )
    .ok()
    .flatten()
    .and_then(|(t, _)| t)
    .ok_or_else(|| TtError::UndefinedColumn(format!("column \"{col}\" does not exist")))
}

/// Reads `select` in batches (cancellable between them), handing each row to `f`; a count
/// of rows goes to `progress` after each batch. Errors name `src`.
pub fn read_rows(
    select: &str,
    src: &str,
    mut progress: Option<&mut Progress>,
    mut f: impl FnMut(pgrx::spi::SpiHeapTupleData<'_>) -> pgrx::spi::SpiResult<()>,
) -> TtResult<()> {
    let fail = |e: pgrx::spi::Error| TtError::BadArgument(format!("reading {src}: {e}"));
    let batches = Batches::open(select).map_err(fail)?;
    loop {
        let n = batches
            .next(BATCH, |_, rows| {
                let mut n = 0usize;
                for row in rows {
                    n += 1;
                    f(row)?;
                }
                Ok(n)
            })
            .map_err(fail)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(p) = progress.as_deref_mut() {
            p.add(n);
        }
    }
}

/// The relation a name resolves to as the caller would write it (`to_regclass`, called
/// directly: no query), if any.
pub fn regclass(name: &str) -> Option<pg_sys::Oid> {
    use pgrx::IntoDatum;
    let text = name.into_datum()?;
    // SAFETY: to_regclass takes one text argument and returns a regclass datum or NULL; it
    // raises only for a syntactically invalid name (an ERROR, as the SQL call would).
    let oid = unsafe {
        pgrx::fcinfo::direct_function_call::<pg_sys::Oid>(pg_sys::to_regclass, &[Some(text)])
    };
    oid.filter(|&o| o != pg_sys::InvalidOid)
}

/// The pointers of a PostgreSQL `List` (NIL gives none).
///
/// # Safety
/// `list` must be NULL or a valid pointer List.
pub unsafe fn list_pointers(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: a List holds `length` cells at `elements`.
    unsafe {
        (0..(*list).length as usize)
            .map(|i| (*(*list).elements.add(i)).ptr_value)
            .collect()
    }
}

/// Whether column `col` of `rel` alone has a unique index (not partial, not on an expression).
pub fn unique_column(rel: pg_sys::Oid, col: &str) -> bool {
    read_row::<bool, bool>(
        "SELECT true, true FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
             ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
          WHERE i.indrelid = $1 AND i.indisunique AND i.indnkeyatts = 1
            AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = $2",
        &[rel.into(), col.into()],
    )
    .ok()
    .flatten()
    .is_some()
}

/// `bytes` in lower-case hex (a bytea literal's digits, after `\x`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}
