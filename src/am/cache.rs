//! The node-local cache files. An image's truth is in the index pages; each node copies it once
//! into `$PGDATA/pg_twotower/<spc>_<db>_<relfilenode>_<index oid>_<generation>_<checksum>.img`
//! (written to a temporary name, fsynced and renamed), maps it read-only, and every backend
//! shares it through the page cache. An index has up to two: its main graph's and its delta
//! graph's (each with its own generation); a new delta graph's file replaces the previous one.
//!
//! Trust: a file is used only after its full checksum matched the metapage once on this node;
//! that verification is recorded in a marker (`.img.ok`) holding the file's inode, size, mtime
//! and ctime, written only after the file was fsynced (a build records the file it writes from
//! the very bytes it checksummed at once, so the first query after a build does not read the
//! whole file again). A later backend that finds a marker
//! matching the file skips the checksum; a file left by a crash, copied by a base backup
//! (another inode), written by an older build (another name) or touched since (another
//! ctime) is verified again. Each scan start re-checks the open file (fstat): a file truncated
//! or rewritten under a mapping is dropped and verified again instead of read.
//!
//! Availability: when the directory cannot be written (full disk, permissions) the image is
//! read from the index pages into backend memory (one WARNING per backend), so a broken cache
//! costs speed, never answers. Temporary indexes always use backend memory.
//!
//! Cleanup: files of dropped indexes and databases are removed when the dropping transaction
//! commits (object access hook + transaction callback), files of a rebuilt index's old
//! relfilenode when the rebuild commits, and any file whose relation file is gone (a standby
//! replaying a drop, a crash) by a sweep when a backend loads the library and after every
//! materialization.

use super::pages::{read_ref_into, ImageRef, Level, Meta};
use crate::infra::error::{TtError, TtResult};
use memmap2::Mmap;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use twotower_ann::Image;

pub const CACHE_DIR: &str = "pg_twotower";
/// Open images kept per backend (they are mappings, not copies).
const MAX_OPEN: usize = 16;

/// The bytes behind an image: the mapped cache file, or a copy in backend memory.
pub enum Bytes {
    Map(Mmap),
    Mem(Vec<u8>),
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Mem(v) => v,
        }
    }
}

/// Identity of a file as fstat sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.ino, self.size, self.mtime_ns, self.ctime_ns
        )
    }
}

/// A verified image, mapped from the cache file or held in memory.
pub struct Loaded {
    pub generation: u64,
    pub checksum: u64,
    /// The cache file, when mapped (None: backend memory).
    pub path: Option<PathBuf>,
    file: Option<(fs::File, Stamp)>,
    pub image: Image<Bytes>,
    /// The SIGBUS guard of the mapping (dropped after the image, field order).
    guard: Option<super::mapguard::Guard>,
}

impl Loaded {
    /// True when the mapped file has been removed (a dropped or rebuilt index): the mapping
    /// still holds its disk space until it is unmapped.
    fn unlinked(&self) -> bool {
        match &self.file {
            None => false,
            Some((f, _)) => f.metadata().map_or(true, |m| m.nlink() == 0),
        }
    }

    /// False when the mapped file was truncated or rewritten since it was verified.
    fn still_valid(&self) -> bool {
        match &self.file {
            None => true,
            Some((f, stamp)) => {
                !self.poisoned() && f.metadata().is_ok_and(|m| Stamp::of(&m) == *stamp)
            }
        }
    }

    /// False when the mapped file's content may have changed since it was verified (another
    /// size or mtime; a new ctime alone is a rename, link or unlink, which leaves a mapping's
    /// content as it was: a fold or rebuild unlinks the files that scans still read).
    fn same_content(&self) -> bool {
        match &self.file {
            None => true,
            Some((f, stamp)) => f.metadata().is_ok_and(|m| {
                let now = Stamp::of(&m);
                (now.ino, now.size, now.mtime_ns) == (stamp.ino, stamp.size, stamp.mtime_ns)
            }),
        }
    }

    /// True once a read of the mapping hit a page the file no longer has (see `mapguard`).
    pub fn poisoned(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.poisoned())
    }

    /// An error if the mapped file changed while it was being read (`full`: also re-check the
    /// file's identity with fstat, as after each search round); the image is then forgotten, so
    /// the next query verifies the file again or rewrites it from the index pages.
    pub fn check_unchanged(self: &Rc<Self>, full: bool) -> TtResult<()> {
        if self.file.is_none() || !(self.poisoned() || full && !self.same_content()) {
            return Ok(());
        }
        OPEN.with(|o| o.borrow_mut().retain(|(_, _, l)| !Rc::ptr_eq(l, self)));
        Err(TtError::CacheChanged(
            self.path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ))
    }
}

type Key = (u32, u32, u32);
/// This backend's open images: (relation, level), the index's oid and the image.
type OpenImages = Vec<((Key, Level), u32, Rc<Loaded>)>;

thread_local! {
    static OPEN: RefCell<OpenImages> = const { RefCell::new(Vec::new()) };
    /// Indexes with open images whose relcache entry was invalidated since (None: all of
    /// them): checked against the catalogue at the next `image()`.
    static SUSPECT: RefCell<Option<Vec<u32>>> = const { RefCell::new(Some(Vec::new())) };
    static WARNED: Cell<bool> = const { Cell::new(false) };
    /// Cache files to remove when this transaction commits (dropped indexes, rebuilt ones).
    static ON_COMMIT: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    /// Every file of this relfilenode (a dropped index).
    Relation { db: u32, rel: u32 },
    /// Every file of this database (DROP DATABASE).
    Database { db: u32 },
    /// Files of this index oid under another relfilenode (a rebuild), at commit; at abort the
    /// files of the new relfilenode itself.
    Rebuilt { db: u32, index: u32, rel: u32 },
}

/// The physical identity of an index relation (tablespace, database, relfilenode).
///
/// # Safety
/// `index` must be an open relation.
pub unsafe fn rel_key(index: pg_sys::Relation) -> Key {
    // SAFETY: open relations have a valid rd_node.
    let n = unsafe { (*index).rd_node };
    (n.spcNode.to_u32(), n.dbNode.to_u32(), n.relNode.to_u32())
}

/// True for indexes of temporary tables (one backend's: no file is shared).
unsafe fn is_local(index: pg_sys::Relation) -> bool {
    // SAFETY: open relation.
    unsafe { (*index).rd_backend != pg_sys::InvalidBackendId }
}

fn prefix(k: Key) -> String {
    format!("{}_{}_{}_", k.0, k.1, k.2)
}

/// The cache file of image `r` of index `oid` stored as `k` (the main image and the delta
/// graph have generations of their own, so their names differ).
pub fn file_path(k: Key, oid: u32, r: &ImageRef) -> PathBuf {
    Path::new(CACHE_DIR).join(format!(
        "{}{}_{:016x}_{:016x}.img",
        prefix(k),
        oid,
        r.generation,
        r.checksum
    ))
}

/// The cache files of the images `meta` names (the ones to keep).
fn current_paths(k: Key, oid: u32, meta: &Meta) -> Vec<PathBuf> {
    [meta.main_ref(), meta.delta_graph_ref()]
        .iter()
        .flatten()
        .map(|r| file_path(k, oid, r))
        .collect()
}

fn marker_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".ok");
    PathBuf::from(s)
}

/// The parsed name of a cache directory entry: (spc, db, rel, index oid, temporary's pid).
fn parse_name(name: &str) -> Option<(u32, u32, u32, u32, Option<i32>)> {
    let parts: Vec<&str> = name.splitn(6, '_').collect();
    if parts.len() < 6 {
        return None;
    }
    let tmp_pid = name
        .rsplit_once(".tmp.")
        .and_then(|(_, pid)| pid.parse::<i32>().ok());
    Some((
        parts[0].parse().ok()?,
        parts[1].parse().ok()?,
        parts[2].parse().ok()?,
        parts[3].parse().ok()?,
        tmp_pid,
    ))
}

/// State of the cache file for index_info.
pub fn file_state(k: Key, oid: u32, meta: &Meta) -> &'static str {
    let Some(r) = meta.main_ref() else {
        return "none (no graph yet)";
    };
    let open = OPEN.with(|o| {
        o.borrow()
            .iter()
            .find(|(key, _, l)| *key == (k, Level::Main) && l.generation == meta.generation)
            .map(|(_, _, l)| l.path.is_some())
    });
    match open {
        Some(true) => "verified (mapped by this backend)",
        Some(false) => "in backend memory (no cache file)",
        None if file_path(k, oid, &r).exists() => "present (verified on first use)",
        None => "absent (materialized on first use)",
    }
}

/// The verified image `r` (the main image or the delta graph) of `index`, as `meta` names it.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` a metapage read from it.
pub unsafe fn image(index: pg_sys::Relation, meta: &Meta, r: &ImageRef) -> TtResult<Rc<Loaded>> {
    crate::infra::relcache::subscribe(relcache_changed);
    forget_stale();
    // SAFETY: forwarded.
    let (k, oid, local) = unsafe { (rel_key(index), (*index).rd_id.to_u32(), is_local(index)) };
    let slot = (k, r.level);
    let hit = OPEN.with(|o| {
        o.borrow()
            .iter()
            .find(|(key, _, l)| {
                *key == slot && l.generation == r.generation && l.checksum == r.checksum
            })
            .map(|(_, _, l)| l.clone())
    });
    if let Some(l) = hit {
        if l.still_valid() {
            return Ok(l);
        }
        OPEN.with(|o| o.borrow_mut().retain(|(key, _, _)| *key != slot));
    }
    let loaded = if local {
        // SAFETY: forwarded.
        unsafe { in_memory(index, meta, r)? }
    } else {
        let path = file_path(k, oid, r);
        match open_file(&path, r) {
            Ok(l) => l,
            Err(why) => {
                // Missing, stale or damaged: rebuild it from the pages (the source of truth),
                // or read the pages into memory when the file cannot be written.
                if path.exists() {
                    pgrx::log!(
                        "pg_twotower: cache file \"{}\" was rejected ({}); rebuilding it from the index pages",
                        path.display(),
                        why.message_text()
                    );
                }
                let _ = fs::remove_file(marker_path(&path));
                let _ = fs::remove_file(&path);
                // SAFETY: forwarded.
                match unsafe { materialize(index, k, oid, meta, r, &path) } {
                    Ok(()) => match open_file(&path, r) {
                        Ok(l) => l,
                        Err(TtError::Ann(a)) => {
                            return Err(TtError::IndexCorrupt(format!(
                                "image read from the index pages failed verification: {a}"
                            )))
                        }
                        // Removed or changed under us: serve from memory this time.
                        // SAFETY: forwarded.
                        Err(_) => unsafe { in_memory(index, meta, r)? },
                    },
                    Err(TtError::CacheIo(why)) => {
                        if !WARNED.with(|w| w.replace(true)) {
                            pgrx::warning!(
                                "pg_twotower: could not write the index cache file ({why}); reading index images into backend memory instead"
                            );
                        }
                        // SAFETY: forwarded.
                        unsafe { in_memory(index, meta, r)? }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let l = Rc::new(loaded);
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        // The same index's image under another relfilenode (before a REINDEX, REINDEX
        // CONCURRENTLY or VACUUM FULL) is never read again: without this, a backend reading
        // images into memory (no cache file) would keep up to MAX_OPEN stale copies.
        o.retain(|(key, o_oid, _)| *key != slot && !(*o_oid == oid && key.1 == slot.1));
        if o.len() >= MAX_OPEN {
            o.remove(0);
        }
        o.push((slot, oid, l.clone()));
    });
    Ok(l)
}

/// Reads the image from the index pages into backend memory and verifies it.
unsafe fn in_memory(index: pg_sys::Relation, meta: &Meta, r: &ImageRef) -> TtResult<Loaded> {
    let mut bytes = Vec::with_capacity(r.len as usize);
    // SAFETY: forwarded.
    unsafe { read_ref_into(index, meta, r, &mut bytes)? };
    let image = Image::open(Bytes::Mem(bytes), r.checksum).map_err(|e| {
        TtError::IndexCorrupt(format!(
            "image read from the index pages failed verification: {e}"
        ))
    })?;
    Ok(Loaded {
        generation: r.generation,
        checksum: r.checksum,
        path: None,
        file: None,
        image,
        guard: None,
    })
}

fn open_file(path: &Path, r: &ImageRef) -> TtResult<Loaded> {
    let io = |e: std::io::Error| TtError::CacheIo(format!("{}: {e}", path.display()));
    let f = fs::File::open(path).map_err(io)?;
    let md = f.metadata().map_err(io)?;
    if !md.is_file() || md.len() != r.len {
        return Err(TtError::CacheIo(
            "cache file has the wrong type or length".into(),
        ));
    }
    let stamp = Stamp::of(&md);
    let marker = marker_path(path);
    let trusted = fs::read_to_string(&marker).is_ok_and(|s| s == stamp.line());
    // SAFETY: cache files are only ever created complete (rename) and never modified in place
    // by pg_twotower; a change by anyone else is detected by the fstat on each use
    // (Loaded::still_valid) before the mapping is read again.
    let map = unsafe { Mmap::map(&f) }.map_err(io)?;
    // Reads of a page the file lost since (truncation) give zeros and a flag, not SIGBUS.
    let guard = super::mapguard::register(map.as_ptr(), map.len());
    let image = if trusted {
        Image::open_verified(Bytes::Map(map))?
    } else {
        let image = Image::open(Bytes::Map(map), r.checksum)?;
        // Recorded only for a file that is durably on disk: fsync it first.
        if f.sync_all().is_ok() {
            write_marker(path, &stamp);
        }
        image
    };
    Ok(Loaded {
        generation: r.generation,
        checksum: r.checksum,
        path: Some(path.to_path_buf()),
        file: Some((f, stamp)),
        image,
        guard: Some(guard),
    })
}

fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set for every backend.
    unsafe { pg_sys::MyProcPid }
}

/// Writes image `r` from the pages to `path` atomically and removes stale files of this relation.
unsafe fn materialize(
    index: pg_sys::Relation,
    k: Key,
    oid: u32,
    meta: &Meta,
    r: &ImageRef,
    path: &Path,
) -> TtResult<()> {
    let io = |e: std::io::Error| TtError::CacheIo(format!("{}: {e}", path.display()));
    fs::create_dir_all(CACHE_DIR).map_err(io)?;
    let tmp = path.with_extension(format!("tmp.{}", my_pid()));
    {
        let f = fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        // SAFETY: forwarded.
        let res = unsafe { read_ref_into(index, meta, r, &mut w) };
        let res = res.and_then(|_| {
            let f = w.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)
        });
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    fs::rename(&tmp, path).map_err(io)?;
    let mut keep = current_paths(k, oid, meta);
    keep.push(path.to_path_buf());
    remove_stale(k, &keep);
    sweep();
    Ok(())
}

/// Removes other cache files of the same relation (older builds and delta graphs).
fn remove_stale(k: Key, keep: &[PathBuf]) {
    let p = prefix(k);
    let kept: Vec<PathBuf> = keep
        .iter()
        .flat_map(|k| [k.clone(), marker_path(k)])
        .collect();
    if let Ok(rd) = fs::read_dir(CACHE_DIR) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&p) && !kept.contains(&e.path()) && !name.contains(".tmp.") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Removes the files in the cache directory for which `dead(spc, db, rel, index oid)` is true.
fn remove_where(mut dead: impl FnMut(u32, u32, u32, u32) -> bool) -> i64 {
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(CACHE_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((spc, db, rel, oid, _)) = parse_name(&name) else {
                continue;
            };
            if dead(spc, db, rel, oid)
                && fs::remove_file(e.path()).is_ok()
                && name.ends_with(".img")
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Whether the relation file of (spc, db, rel) is gone: dropped (PostgreSQL truncates a
/// dropped relation's first segment at commit and unlinks it at the next checkpoint) or its
/// database dropped. A live index always has at least its metapage.
fn relation_gone(spc: u32, db: u32, rel: u32) -> bool {
    // SAFETY: GetRelationPath only formats a path (palloc'd in the current context).
    let p = unsafe {
        let c = pg_sys::GetRelationPath(
            pg_sys::Oid::from(db),
            pg_sys::Oid::from(spc),
            pg_sys::Oid::from(rel),
            pg_sys::InvalidBackendId,
            pg_sys::ForkNumber::MAIN_FORKNUM,
        );
        let s = std::ffi::CStr::from_ptr(c).to_string_lossy().into_owned();
        pg_sys::pfree(c as *mut std::ffi::c_void);
        s
    };
    match fs::metadata(&p) {
        Ok(m) => m.len() == 0,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Removes cache files whose relation file is gone and temporaries of backends that are gone.
pub fn sweep() -> i64 {
    let mut removed = 0;
    let Ok(rd) = fs::read_dir(CACHE_DIR) else {
        return 0;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some((spc, db, rel, _, tmp_pid)) = parse_name(&name) else {
            continue;
        };
        let dead = match tmp_pid {
            Some(pid) => pid != my_pid() && !Path::new(&format!("/proc/{pid}")).exists(),
            None => relation_gone(spc, db, rel),
        };
        if dead && fs::remove_file(e.path()).is_ok() && name.ends_with(".img") {
            removed += 1;
        }
    }
    removed
}

/// Removes every cache file of database `db` whose relfilenode is not in `live`; returns how many.
pub fn cleanup(db: u32, live: &[(u32, u32)]) -> i64 {
    let removed = remove_where(|spc, d, rel, _| d == db && !live.contains(&(spc, rel)));
    OPEN.with(|o| {
        o.borrow_mut()
            .retain(|(((s, d, r), _), _, _)| *d != db || live.contains(&(*s, *r)))
    });
    removed + sweep()
}

/// A relcache invalidation of `relid` (0: of every relation). Images of indexes that
/// were dropped or rebuilt (REINDEX CONCURRENTLY gives the index a new oid) would otherwise stay
/// open until evicted, each mapping a removed cache file whose disk space is then not freed:
/// mappings of removed files are dropped here at once (idle backends too, when they catch up
/// with invalidations); the rest is checked against the catalogue at the next `image()`.
fn relcache_changed(relid: u32) {
    let all = relid == 0;
    OPEN.with(|o| {
        if let Ok(mut o) = o.try_borrow_mut() {
            o.retain(|(_, oid, l)| !((all || *oid == relid) && l.unlinked()));
            let held = o.iter().any(|(_, oid, _)| all || *oid == relid);
            if held {
                SUSPECT.with(|s| {
                    if let Ok(mut s) = s.try_borrow_mut() {
                        match (&mut *s, all) {
                            (Some(v), false) => v.push(relid),
                            (s, _) => *s = None,
                        }
                    }
                });
            }
        }
    });
}

/// Drops the open images of suspect indexes (see `relcache_changed`) that no longer exist or
/// have another relfilenode now.
fn forget_stale() {
    let suspects = SUSPECT.with(|s| {
        let mut s = s.borrow_mut();
        match &mut *s {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(Some(std::mem::take(v))),
            None => {
                *s = Some(Vec::new());
                Some(None)
            }
        }
    });
    let Some(suspects) = suspects else { return };
    OPEN.with(|o| {
        o.borrow_mut().retain(|((key, _), oid, _)| {
            if suspects.as_ref().is_some_and(|v| !v.contains(oid)) {
                return true;
            }
            // SAFETY: a syscache lookup by oid in a backend with a transaction (image() is
            // called from scans); the tuple is released.
            unsafe {
                let tup = pg_sys::SearchSysCache1(
                    pg_sys::SysCacheIdentifier::RELOID as i32,
                    pg_sys::Datum::from(*oid),
                );
                if tup.is_null() {
                    return false;
                }
                let form = pg_sys::GETSTRUCT(tup) as *const pg_sys::FormData_pg_class;
                let same = (*form).relfilenode.to_u32() == key.2
                    || (*form).relfilenode == pg_sys::InvalidOid;
                pg_sys::ReleaseSysCache(tup);
                same
            }
        })
    });
}

/// Forgets this backend's mapping of an index (e.g. after a rebuild in this backend).
pub fn forget(k: Key) {
    OPEN.with(|o| o.borrow_mut().retain(|((key, _), _, _)| *key != k));
}

/// Writes the cache file for a freshly built image (best effort: the pages are the truth, and a
/// missing file is materialized from them on first use), and arranges for the files of the
/// index's previous relfilenode to go when the build commits.
///
/// # Safety
/// `index` must be the open index just built.
pub unsafe fn store(index: pg_sys::Relation, meta: &Meta, image: &[u8]) {
    // SAFETY: forwarded.
    let (k, oid, local) = unsafe { (rel_key(index), (*index).rd_id.to_u32(), is_local(index)) };
    if local {
        return;
    }
    ON_COMMIT.with(|p| {
        p.borrow_mut().push(Pending::Rebuilt {
            db: k.1,
            index: oid,
            rel: k.2,
        })
    });
    ensure_callbacks();
    if let Some(r) = meta.main_ref() {
        write_file(k, oid, meta, &r, image);
    }
}

/// Writes the cache file of a new delta graph (best effort, as [`store`]) and removes the
/// files of images `meta` no longer names.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` its current metapage.
pub unsafe fn store_delta_graph(index: pg_sys::Relation, meta: &Meta, image: &[u8]) {
    // SAFETY: forwarded.
    let (k, oid, local) = unsafe { (rel_key(index), (*index).rd_id.to_u32(), is_local(index)) };
    OPEN.with(|o| {
        o.borrow_mut()
            .retain(|(key, _, _)| *key != (k, Level::Delta))
    });
    if local {
        return;
    }
    match meta.delta_graph_ref() {
        Some(r) => write_file(k, oid, meta, &r, image),
        None => remove_stale(k, &current_paths(k, oid, meta)),
    }
}

fn write_file(k: Key, oid: u32, meta: &Meta, r: &ImageRef, image: &[u8]) {
    let path = file_path(k, oid, r);
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(CACHE_DIR)?;
        let tmp = path.with_extension(format!("tmp.{}", my_pid()));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(image)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path)
    };
    if write().is_ok() {
        // The bytes are the ones the checksum was computed from (checked again here): record
        // the file as verified, so the first query after a build does not read it all again.
        if twotower_ann::checksum(image) == r.checksum {
            mark_verified(&path);
        }
        remove_stale(k, &current_paths(k, oid, meta));
    }
}

/// Records the file at `path`, as it is now, as verified (pg_twotower's writers only ever put
/// the bytes of one image under one name: the name carries the generation and the checksum).
fn mark_verified(path: &Path) {
    if let Ok(md) = fs::metadata(path) {
        write_marker(path, &Stamp::of(&md));
    }
}

/// Writes the marker of the file at `path` with identity `stamp`.
fn write_marker(path: &Path, stamp: &Stamp) {
    let marker = marker_path(path);
    let tmp = marker.with_extension(format!("tmp.{}", my_pid()));
    if fs::write(&tmp, stamp.line()).is_ok() && fs::rename(&tmp, &marker).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

// ---------------------------------------------------------------------------------------------
// removal at commit

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

thread_local! {
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

fn ensure_callbacks() {
    if !CALLBACKS.with(|c| c.replace(true)) {
        // SAFETY: registers a transaction callback once per backend.
        unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut core::ffi::c_void,
) {
    // SAFETY: chaining to the hook that was installed before ours.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
    if access != pg_sys::ObjectAccessType::OAT_DROP || sub_id != 0 {
        return;
    }
    let pending = if class_id == pg_sys::RelationRelationId {
        // SAFETY: the relation being dropped still exists (and is locked by the drop).
        unsafe {
            let r = pg_sys::RelationIdGetRelation(object_id);
            if r.is_null() {
                return;
            }
            let p = (super::rel::is_ours(r) && !is_local(r)).then(|| {
                let k = rel_key(r);
                Pending::Relation { db: k.1, rel: k.2 }
            });
            pg_sys::RelationClose(r);
            p
        }
    } else if class_id == pg_sys::DatabaseRelationId {
        Some(Pending::Database {
            db: object_id.to_u32(),
        })
    } else {
        None
    };
    if let Some(p) = pending {
        ON_COMMIT.with(|o| o.borrow_mut().push(p));
        ensure_callbacks();
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut core::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    let commit = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let pending = ON_COMMIT.with(|o| std::mem::take(&mut *o.borrow_mut()));
    if pending.is_empty() {
        return;
    }
    remove_where(|_, db, rel, oid| {
        pending.iter().any(|p| match *p {
            Pending::Relation { db: d, rel: r } => commit && d == db && r == rel,
            Pending::Database { db: d } => commit && d == db,
            Pending::Rebuilt {
                db: d,
                index,
                rel: r,
            } => d == db && index == oid && if commit { r != rel } else { r == rel },
        })
    });
}

/// Installs the drop hook and sweeps files of relations that are gone (from `_PG_init`).
pub fn register() {
    // SAFETY: hook installation from _PG_init, chaining the previous hook.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
    // In a backend (not the postmaster), with the data directory as working directory.
    // SAFETY: plain reads of process globals.
    if unsafe { pg_sys::IsUnderPostmaster } {
        sweep();
    }
}
