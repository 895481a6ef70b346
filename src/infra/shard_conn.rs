//! A direct libpq client for the foreign partitions (shards) of a partitioned item table: one
//! prepared statement per shard, sent to every shard before any answer is read, one round trip
//! each (postgres_fdw's statement path costs a remote transaction and a cursor: five).
//!
//! The connection details are postgres_fdw's: the foreign server's options and the caller's
//! user mapping (libpq keywords only). The same rule as postgres_fdw keeps a role from using the
//! server's own identity: a non-superuser's mapping must carry a password and the connection
//! must have used it (unless a superuser set `password_required 'false'` on the mapping).
//! Connections are cached per backend by (server, user), reopened when the options change. A
//! cancel or `statement_timeout` while waiting sends a cancel to every shard still busy, and
//! those connections are closed. No other thread: the backend waits on its latch and the
//! sockets, as postgres_fdw does.

use crate::infra::error::{TtError, TtResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};

/// One open connection and what it has been told.
struct Conn {
    conninfo: Vec<(String, String)>,
    raw: *mut pq_sys::PGconn,
    prepared: HashSet<String>,
    ef_search: Option<i32>,
}

thread_local! {
    /// Idle connections by (server, role): several when several partitions live on one
    /// server (a connection runs one statement at a time).
    static CONNS: RefCell<HashMap<(u32, u32), Vec<Conn>>> = RefCell::new(HashMap::new());
}

/// A foreign partition as the direct client asks it.
pub struct Remote {
    pub server: pg_sys::Oid,
    pub server_name: String,
    /// The remote table, schema-qualified and quoted.
    pub table: String,
    pub id_column: String,
    pub vector_column: String,
}

/// `(name, value)` of each option in a `List` of `DefElem`s.
///
/// # Safety
/// `list` must be NULL or a valid List of DefElem with string values.
unsafe fn options(list: *mut pg_sys::List) -> Vec<(String, String)> {
    // SAFETY: forwarded; defGetString returns a NUL-terminated string for string options.
    unsafe {
        pgrx::PgList::<pg_sys::DefElem>::from_pg(list)
            .iter_ptr()
            .map(|d| {
                let name = CStr::from_ptr((*d).defname).to_string_lossy().into_owned();
                let value = CStr::from_ptr(pg_sys::defGetString(d))
                    .to_string_lossy()
                    .into_owned();
                (name, value)
            })
            .collect()
    }
}

fn quote(s: &str) -> String {
    pgrx::spi::quote_identifier(s)
}

/// The remote names of foreign table `rel` (whose local id and vector columns are named).
pub fn remote(rel: pg_sys::Oid, id_column: &str, vector_column: &str) -> TtResult<Remote> {
    // SAFETY: catalogue lookups of an existing foreign table (the caller found it in the
    // partition tree); the returned structs are palloc'd in the current context.
    unsafe {
        let ft = pg_sys::GetForeignTable(rel);
        let server = pg_sys::GetForeignServer((*ft).serverid);
        let server_name = CStr::from_ptr((*server).servername)
            .to_string_lossy()
            .into_owned();
        let opts = options((*ft).options);
        let get = |k: &str| opts.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(rel));
        let schema = get("schema_name")
            .unwrap_or_else(|| CStr::from_ptr(nsp).to_string_lossy().into_owned());
        let name = pg_sys::get_rel_name(rel);
        let table = get("table_name")
            .unwrap_or_else(|| CStr::from_ptr(name).to_string_lossy().into_owned());
        let column = |local: &str| -> String {
            let c = CString::new(local).unwrap_or_default();
            let att = pg_sys::get_attnum(rel, c.as_ptr());
            if att <= 0 {
                return local.to_owned();
            }
            options(pg_sys::GetForeignColumnOptions(rel, att))
                .into_iter()
                .find(|(n, _)| n == "column_name")
                .map(|(_, v)| v)
                .unwrap_or_else(|| local.to_owned())
        };
        Ok(Remote {
            server: (*ft).serverid,
            server_name,
            table: format!("{}.{}", quote(&schema), quote(&table)),
            id_column: column(id_column),
            vector_column: column(vector_column),
        })
    }
}

/// The libpq connection keywords (what postgres_fdw passes on from the options).
fn libpq_keywords() -> &'static HashSet<String> {
    static KEYWORDS: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    KEYWORDS.get_or_init(|| {
        let mut out = HashSet::new();
        // SAFETY: PQconndefaults returns an array ended by a NULL keyword (or NULL when out of
        // memory), freed with PQconninfoFree.
        unsafe {
            let d = pq_sys::PQconndefaults();
            if !d.is_null() {
                let mut p = d;
                while !(*p).keyword.is_null() {
                    out.insert(CStr::from_ptr((*p).keyword).to_string_lossy().into_owned());
                    p = p.add(1);
                }
                pq_sys::PQconninfoFree(d);
            }
        }
        out
    })
}

/// Conninfo for `server` as `user`, and whether the mapping waives the password rule.
fn conninfo(server: pg_sys::Oid, user: pg_sys::Oid) -> (Vec<(String, String)>, bool, bool) {
    // SAFETY: catalogue lookups; GetUserMapping raises a clear ERROR when there is none.
    let (srv, map) = unsafe {
        let s = pg_sys::GetForeignServer(server);
        let m = pg_sys::GetUserMapping(user, server);
        (options((*s).options), options((*m).options))
    };
    let keys = libpq_keywords();
    let mut out: Vec<(String, String)> = srv
        .iter()
        .chain(map.iter())
        .filter(|(k, _)| keys.contains(k))
        .cloned()
        .collect();
    let has_password = map.iter().any(|(k, v)| k == "password" && !v.is_empty());
    let required = !map
        .iter()
        .any(|(k, v)| k == "password_required" && v == "false");
    out.push(("fallback_application_name".into(), "pg_twotower".into()));
    // SAFETY: the database encoding's name, a static string.
    let enc = unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned();
    out.push(("client_encoding".into(), enc));
    (out, has_password, required)
}

fn conn_error(raw: *const pq_sys::PGconn) -> String {
    // SAFETY: PQerrorMessage of a live connection is a NUL-terminated string it owns.
    unsafe { CStr::from_ptr(pq_sys::PQerrorMessage(raw)) }
        .to_string_lossy()
        .trim()
        .to_owned()
}

/// Opens a connection to `r`'s server as the caller (or reuses the cached one).
fn connect(r: &Remote) -> TtResult<Conn> {
    // SAFETY: reads of backend globals.
    let (user, superuser) = unsafe { (pg_sys::GetUserId(), pg_sys::superuser()) };
    let (info, has_password, required) = conninfo(r.server, user);
    let refuse = |detail: &str| TtError::ShardConnection {
        server: r.server_name.clone(),
        detail: detail.into(),
    };
    if !superuser && required && !has_password {
        return Err(refuse(
            "Non-superusers must give a password in the user mapping (as for postgres_fdw).",
        ));
    }
    let key = (r.server.to_u32(), user.to_u32());
    if let Some(c) = CONNS.with(|m| m.borrow_mut().get_mut(&key).and_then(Vec::pop)) {
        if c.conninfo == info
            // SAFETY: a cached live connection.
            && unsafe { pq_sys::PQstatus(c.raw) } == pq_sys::ConnStatusType::CONNECTION_OK
        {
            return Ok(c);
        }
        // SAFETY: closing a connection no one else holds.
        unsafe { pq_sys::PQfinish(c.raw) };
    }
    let keys: Vec<CString> = info
        .iter()
        .map(|(k, _)| CString::new(k.as_str()).unwrap_or_default())
        .collect();
    let vals: Vec<CString> = info
        .iter()
        .map(|(_, v)| CString::new(v.as_str()).unwrap_or_default())
        .collect();
    let mut kp: Vec<*const std::ffi::c_char> = keys.iter().map(|c| c.as_ptr()).collect();
    let mut vp: Vec<*const std::ffi::c_char> = vals.iter().map(|c| c.as_ptr()).collect();
    kp.push(std::ptr::null());
    vp.push(std::ptr::null());
    // SAFETY: NULL-terminated keyword and value arrays of NUL-terminated strings that outlive
    // the call; the connection is finished below on any failure.
    unsafe {
        let raw = pq_sys::PQconnectStartParams(kp.as_ptr(), vp.as_ptr(), 0);
        if raw.is_null() {
            return Err(refuse("out of memory"));
        }
        // Finished unless it becomes a `Conn` (a cancel during the wait unwinds through it).
        let guard = Unfinished(raw);
        let timeout = info
            .iter()
            .find(|(k, _)| k == "connect_timeout")
            .and_then(|(_, v)| v.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .map(|t| std::time::Duration::from_secs(t.max(2)));
        if let Err(e) = wait_connected(raw, timeout) {
            return Err(refuse(&e));
        }
        if !superuser && required && pq_sys::PQconnectionUsedPassword(raw) == 0 {
            return Err(refuse("The server did not ask for the password: non-superusers may only connect with one (as for postgres_fdw)."));
        }
        // Everything the statements name is qualified; the session's search_path is emptied.
        if pq_sys::PQsendQuery(raw, c"SET search_path = pg_catalog".as_ptr()) == 0 {
            return Err(refuse(&conn_error(raw)));
        }
        if let Err(e) = answer(raw, &mut |_| {}) {
            return Err(refuse(&e));
        }
        std::mem::forget(guard);
        Ok(Conn {
            conninfo: info,
            raw,
            prepared: HashSet::new(),
            ef_search: None,
        })
    }
}

/// A connection being opened: finished when dropped (an error or a cancel on the way).
struct Unfinished(*mut pq_sys::PGconn);

impl Drop for Unfinished {
    fn drop(&mut self) {
        // SAFETY: a connection no one else holds.
        unsafe { pq_sys::PQfinish(self.0) };
    }
}

/// Drives a connection started with PQconnectStartParams to its end without blocking the
/// backend: it waits on the latch and the socket, hears a cancel or statement_timeout (the
/// ERROR unwinds through the caller's guard), and gives up after `timeout` (the server's
/// `connect_timeout`, which libpq applies only to blocking connects).
///
/// # Safety
/// `raw` must be a connection returned by PQconnectStartParams.
unsafe fn wait_connected(
    raw: *mut pq_sys::PGconn,
    timeout: Option<std::time::Duration>,
) -> Result<(), String> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    // SAFETY: libpq calls on a connection being opened; the socket may change between polls.
    unsafe {
        if pq_sys::PQstatus(raw) == pq_sys::ConnStatusType::CONNECTION_BAD {
            return Err(conn_error(raw));
        }
        let mut wait = pg_sys::WL_SOCKET_WRITEABLE;
        loop {
            let left = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Err("timeout expired".into());
                    }
                    (d - now).as_millis().min(i32::MAX as u128) as std::ffi::c_long
                }
                None => -1,
            };
            let flags = pg_sys::WL_LATCH_SET
                | wait
                | pg_sys::WL_EXIT_ON_PM_DEATH
                | if left >= 0 { pg_sys::WL_TIMEOUT } else { 0 };
            let ev = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                flags as i32,
                pq_sys::PQsocket(raw),
                left,
                pg_sys::PG_WAIT_EXTENSION,
            );
            if ev & pg_sys::WL_LATCH_SET as i32 != 0 {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            check_for_interrupts!();
            if ev & (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE) as i32 == 0 {
                continue;
            }
            match pq_sys::PQconnectPoll(raw) {
                pq_sys::PostgresPollingStatusType::PGRES_POLLING_OK => return Ok(()),
                pq_sys::PostgresPollingStatusType::PGRES_POLLING_FAILED => {
                    return Err(conn_error(raw))
                }
                pq_sys::PostgresPollingStatusType::PGRES_POLLING_READING => {
                    wait = pg_sys::WL_SOCKET_READABLE
                }
                _ => wait = pg_sys::WL_SOCKET_WRITEABLE,
            }
        }
    }
}

/// Connections in use by one call: back to the cache when the call ends normally; cancelled
/// (if busy) and closed when it ends by an error or a cancel.
struct InUse {
    conns: Vec<((u32, u32), Conn, bool)>,
    done: bool,
}

impl Drop for InUse {
    fn drop(&mut self) {
        for (key, c, busy) in self.conns.drain(..) {
            if self.done {
                CONNS.with(|m| m.borrow_mut().entry(key).or_default().push(c));
                continue;
            }
            // SAFETY: libpq calls on a connection this call owns; none of them raises.
            unsafe {
                if busy {
                    let cancel = pq_sys::PQgetCancel(c.raw);
                    if !cancel.is_null() {
                        let mut buf = [0 as std::ffi::c_char; 256];
                        pq_sys::PQcancel(cancel, buf.as_mut_ptr(), buf.len() as i32);
                        pq_sys::PQfreeCancel(cancel);
                    }
                }
                pq_sys::PQfinish(c.raw);
            }
        }
    }
}

fn shard_error(r: &Remote, message: String) -> TtError {
    TtError::ShardError {
        server: r.server_name.clone(),
        message,
    }
}

/// One remote's answer: its rows (item id, distance) and the milliseconds from the first
/// statement sent to this answer read.
pub struct Answer {
    pub rows: Vec<(i64, f64)>,
    pub ms: f64,
}

/// Each remote's `k` nearest rows to `query` by operator `op` (`OPERATOR(twotower.<->)` and the
/// like), leaving out `exclude`, with `ef_search` set on each shard: one answer per remote, in
/// their order.
pub fn nearest(
    remotes: &[Remote],
    op: &str,
    query: &[f32],
    k: usize,
    exclude: &[i64],
    ef_search: i32,
) -> TtResult<Vec<Answer>> {
    let start = std::time::Instant::now();
    // SAFETY: reading a backend global.
    let user = unsafe { pg_sys::GetUserId() }.to_u32();
    let mut in_use = InUse {
        conns: Vec::with_capacity(remotes.len()),
        done: false,
    };
    let vector = format!(
        "{{{}}}",
        query
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let excluded = format!(
        "{{{}}}",
        exclude
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let params = [
        CString::new(vector).unwrap_or_default(),
        CString::new(excluded).unwrap_or_default(),
        CString::new(k.to_string()).unwrap_or_default(),
    ];
    let pp: Vec<*const std::ffi::c_char> = params.iter().map(|c| c.as_ptr()).collect();
    // Send to every shard first.
    for r in remotes {
        let key = (r.server.to_u32(), user);
        in_use.conns.push((key, connect(r)?, false));
        let i = in_use.conns.len() - 1;
        let (id, v) = (quote(&r.id_column), quote(&r.vector_column));
        let sql = format!(
            "SELECT s.{id}::pg_catalog.int8, (s.{v} {op} $1::pg_catalog.float4[])::pg_catalog.float8 FROM {t} s \
             WHERE s.{id} OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.int8[]) AND s.{v} IS NOT NULL \
             ORDER BY s.{v} {op} $1::pg_catalog.float4[] LIMIT $3::pg_catalog.int8",
            t = r.table
        );
        let name = format!("twotower_{:016x}", hash(&sql));
        let cname = CString::new(name.as_str()).unwrap_or_default();
        let raw = in_use.conns[i].1.raw;
        // SAFETY: libpq calls on a connection this call owns (cancelled and closed by `in_use`
        // on an error or a cancel), with NUL-terminated strings that outlive each call. Every
        // statement is sent without blocking and waited for interruptibly.
        unsafe {
            if in_use.conns[i].1.ef_search != Some(ef_search) {
                let set = CString::new(format!("SET twotower.ef_search = {ef_search}"))
                    .unwrap_or_default();
                in_use.conns[i].2 = true;
                if pq_sys::PQsendQuery(raw, set.as_ptr()) == 0 {
                    return Err(shard_error(r, conn_error(raw)));
                }
                answer(raw, &mut |_| {}).map_err(|e| shard_error(r, e))?;
                in_use.conns[i].2 = false;
                in_use.conns[i].1.ef_search = Some(ef_search);
            }
            if !in_use.conns[i].1.prepared.contains(&name) {
                let csql = CString::new(sql).unwrap_or_default();
                in_use.conns[i].2 = true;
                if pq_sys::PQsendPrepare(raw, cname.as_ptr(), csql.as_ptr(), 0, std::ptr::null())
                    == 0
                {
                    return Err(shard_error(r, conn_error(raw)));
                }
                answer(raw, &mut |_| {}).map_err(|e| shard_error(r, e))?;
                in_use.conns[i].2 = false;
                in_use.conns[i].1.prepared.insert(name);
            }
            in_use.conns[i].2 = true;
            if pq_sys::PQsendQueryPrepared(
                raw,
                cname.as_ptr(),
                3,
                pp.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            ) == 0
            {
                return Err(shard_error(r, conn_error(raw)));
            }
        }
    }
    // Then read the answers (the shards work meanwhile).
    let mut answers = Vec::with_capacity(remotes.len());
    for (i, r) in remotes.iter().enumerate() {
        let raw = in_use.conns[i].1.raw;
        let mut out = Vec::with_capacity(k);
        // SAFETY: reading the answer of a statement sent above on a connection this call owns.
        unsafe {
            answer(raw, &mut |res| {
                for row in 0..pq_sys::PQntuples(res) {
                    let cell = |col| {
                        CStr::from_ptr(pq_sys::PQgetvalue(res, row, col))
                            .to_str()
                            .unwrap_or("")
                    };
                    if let (Ok(id), Ok(d)) = (cell(0).parse::<i64>(), cell(1).parse::<f64>()) {
                        out.push((id, d));
                    }
                }
            })
            .map_err(|e| shard_error(r, e))?;
        }
        in_use.conns[i].2 = false;
        answers.push(Answer {
            rows: out,
            ms: start.elapsed().as_secs_f64() * 1e3,
        });
    }
    in_use.done = true;
    Ok(answers)
}

/// Waits for the answer to the statement sent on `raw` (on the backend's latch and the
/// connection's socket, hearing a cancel or statement_timeout: the ERROR unwinds through the
/// caller's `InUse`, which cancels the statement), hands each result with rows to `rows`, and
/// returns the first error message, if any.
///
/// # Safety
/// `raw` must be a live connection with a statement sent.
unsafe fn answer(
    raw: *mut pq_sys::PGconn,
    rows: &mut dyn FnMut(*mut pq_sys::PGresult),
) -> Result<(), String> {
    // SAFETY: libpq calls on a live connection; results are cleared.
    unsafe {
        loop {
            if pq_sys::PQconsumeInput(raw) == 0 {
                return Err(conn_error(raw));
            }
            if pq_sys::PQisBusy(raw) == 0 {
                break;
            }
            let ev = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_SOCKET_READABLE | pg_sys::WL_EXIT_ON_PM_DEATH)
                    as i32,
                pq_sys::PQsocket(raw),
                -1,
                pg_sys::PG_WAIT_EXTENSION,
            );
            if ev & pg_sys::WL_LATCH_SET as i32 != 0 {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            check_for_interrupts!();
        }
        let mut failure = None;
        loop {
            let res = pq_sys::PQgetResult(raw);
            if res.is_null() {
                break;
            }
            match pq_sys::PQresultStatus(res) {
                pq_sys::ExecStatusType::PGRES_TUPLES_OK => rows(res),
                pq_sys::ExecStatusType::PGRES_COMMAND_OK => {}
                _ => {
                    failure.get_or_insert_with(|| {
                        CStr::from_ptr(pq_sys::PQresultErrorMessage(res))
                            .to_string_lossy()
                            .trim()
                            .to_owned()
                    });
                }
            }
            pq_sys::PQclear(res);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}
