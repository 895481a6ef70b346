//! The node-local cache file. The image's truth is in the index pages; each node copies it once
//! into `$PGDATA/pg_twotower/<spc>_<db>_<relfilenode>_<generation>_<checksum>.img` (written to a
//! temporary name and renamed), maps it read-only, and every backend shares it through the page
//! cache. A file is used only after its full checksum matches the metapage, so a file left by a
//! crash, copied by a base backup or written by an older build is never trusted blindly.

use super::pages::{read_image_into, Meta};
use crate::error::{TtError, TtResult};
use memmap2::Mmap;
use pgrx::pg_sys;
use std::cell::RefCell;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use twotower_ann::Image;

pub const CACHE_DIR: &str = "pg_twotower";
/// Open images kept per backend (they are mappings, not copies).
const MAX_OPEN: usize = 16;

/// A verified image mapped from the cache file.
pub struct Loaded {
    pub generation: u64,
    pub checksum: u64,
    pub path: PathBuf,
    pub image: Image<Mmap>,
}

type Key = (u32, u32, u32);

thread_local! {
    static OPEN: RefCell<Vec<(Key, Rc<Loaded>)>> = const { RefCell::new(Vec::new()) };
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

fn prefix(k: Key) -> String {
    format!("{}_{}_{}_", k.0, k.1, k.2)
}

pub fn file_path(k: Key, meta: &Meta) -> PathBuf {
    Path::new(CACHE_DIR).join(format!(
        "{}{:016x}_{:016x}.img",
        prefix(k),
        meta.generation,
        meta.image_checksum
    ))
}

/// State of the cache file for index_info.
pub fn file_state(k: Key, meta: &Meta) -> &'static str {
    if !meta.has_image() {
        return "none (no graph yet)";
    }
    let open = OPEN.with(|o| {
        o.borrow()
            .iter()
            .any(|(key, l)| *key == k && l.generation == meta.generation)
    });
    if open {
        "verified (mapped by this backend)"
    } else if file_path(k, meta).exists() {
        "present (verified on first use)"
    } else {
        "absent (materialized on first use)"
    }
}

/// The verified, mapped image of `index` for the build recorded in `meta`.
///
/// # Safety
/// `index` must be an open twotower_hnsw index and `meta` its current metapage.
pub unsafe fn image(index: pg_sys::Relation, meta: &Meta) -> TtResult<Rc<Loaded>> {
    // SAFETY: forwarded.
    let k = unsafe { rel_key(index) };
    if let Some(l) = OPEN.with(|o| {
        o.borrow()
            .iter()
            .find(|(key, l)| {
                *key == k && l.generation == meta.generation && l.checksum == meta.image_checksum
            })
            .map(|(_, l)| l.clone())
    }) {
        return Ok(l);
    }
    let path = file_path(k, meta);
    let loaded = match open_file(&path, meta) {
        Ok(l) => l,
        Err(_) => {
            // Missing, stale or damaged: rebuild it from the pages (the source of truth).
            let _ = fs::remove_file(&path);
            // SAFETY: forwarded.
            unsafe { materialize(index, k, meta, &path)? };
            open_file(&path, meta).map_err(|e| match e {
                TtError::Ann(a) => TtError::IndexCorrupt(format!(
                    "image read from the index pages failed verification: {a}"
                )),
                other => other,
            })?
        }
    };
    let l = Rc::new(loaded);
    OPEN.with(|o| {
        let mut o = o.borrow_mut();
        o.retain(|(key, _)| *key != k);
        if o.len() >= MAX_OPEN {
            o.remove(0);
        }
        o.push((k, l.clone()));
    });
    Ok(l)
}

fn open_file(path: &Path, meta: &Meta) -> TtResult<Loaded> {
    let f =
        fs::File::open(path).map_err(|e| TtError::CacheIo(format!("{}: {e}", path.display())))?;
    // SAFETY: cache files are only ever created complete (rename) and never modified in place;
    // the checksum in Image::open verifies the mapped bytes.
    let map = unsafe { Mmap::map(&f) }
        .map_err(|e| TtError::CacheIo(format!("{}: {e}", path.display())))?;
    if map.len() as u64 != meta.image_len {
        return Err(TtError::CacheIo("cache file has the wrong length".into()));
    }
    let image = Image::open(map, meta.image_checksum)?;
    Ok(Loaded {
        generation: meta.generation,
        checksum: meta.image_checksum,
        path: path.to_path_buf(),
        image,
    })
}

/// Writes the image from the pages to `path` atomically and removes stale files of this relation.
unsafe fn materialize(index: pg_sys::Relation, k: Key, meta: &Meta, path: &Path) -> TtResult<()> {
    let io = |e: std::io::Error| TtError::CacheIo(format!("{}: {e}", path.display()));
    fs::create_dir_all(CACHE_DIR).map_err(io)?;
    // SAFETY: MyProcPid is set for every backend.
    let tmp = path.with_extension(format!("tmp.{}", unsafe { pg_sys::MyProcPid }));
    {
        let f = fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        // SAFETY: forwarded.
        let r = unsafe { read_image_into(index, meta, &mut w) };
        if let Err(e) = r.and_then(|_| w.flush().map_err(io)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    fs::rename(&tmp, path).map_err(io)?;
    remove_stale(k, path);
    Ok(())
}

/// Removes other cache files of the same relation (older builds, temporaries of dead backends).
fn remove_stale(k: Key, keep: &Path) {
    let p = prefix(k);
    if let Ok(rd) = fs::read_dir(CACHE_DIR) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&p) && e.path() != keep && !name.contains(".tmp.") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Removes every cache file of database `db` whose relfilenode is not in `live`; returns how many.
pub fn cleanup(db: u32, live: &[(u32, u32)]) -> i64 {
    let mut removed = 0;
    if let Ok(rd) = fs::read_dir(CACHE_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let parts: Vec<&str> = name.split('_').collect();
            if parts.len() < 4 {
                continue;
            }
            let (Ok(spc), Ok(d), Ok(rel)) = (
                parts[0].parse::<u32>(),
                parts[1].parse::<u32>(),
                parts[2].parse::<u32>(),
            ) else {
                continue;
            };
            if d == db && !live.contains(&(spc, rel)) && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    OPEN.with(|o| {
        o.borrow_mut()
            .retain(|((s, d, r), _)| *d != db || live.contains(&(*s, *r)))
    });
    removed
}

/// Forgets this backend's mapping of an index (e.g. after a rebuild in this backend).
pub fn forget(k: Key) {
    OPEN.with(|o| o.borrow_mut().retain(|(key, _)| *key != k));
}

/// Writes the cache file for a freshly built image (best effort: the pages are the truth, and a
/// missing file is materialized from them on first use).
pub fn store(k: Key, meta: &Meta, image: &[u8]) {
    if image.is_empty() {
        return;
    }
    let path = file_path(k, meta);
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(CACHE_DIR)?;
        // SAFETY: MyProcPid is set for every backend.
        let tmp = path.with_extension(format!("tmp.{}", unsafe { pg_sys::MyProcPid }));
        fs::write(&tmp, image)?;
        fs::rename(&tmp, &path)
    };
    if write().is_ok() {
        remove_stale(k, &path);
    }
}
