//! The index image: a self-describing byte container holding the sorted item keys and the
//! serialized usearch HNSW graph. The extension stores it in the index's WAL-logged pages and
//! materializes it as a cache file that every backend maps read-only.
//!
//! Layout (all integers little-endian):
//! ```text
//! 0   magic "TTHNSW01"
//! 8   format version u32 (2; 1 for images written before 0.9), header length u32 (128; 64)
//! 16  dims u32, metric u32, quantization u32, connectivity u32
//! 32  count u64
//! 40  keys offset u64, usearch offset u64, usearch length u64
//! 64  navigation tables' offset u64 (format 2)
//! 72  the tuning (format 2; zeros if the graph was not tuned to queries: `tune.rs`): sample
//!     queries u32, k u32, ef u32, extra links a node u32, links added u64, recall@k of the
//!     sample before and after (f32 each), then zeros to the header length
//! ..  keys: count × u64, ascending
//! ..  orphans: orphan count u64, then that many u64 keys, ascending
//! ..  padding to 8 bytes, navigation tables (format 2; `layout.rs`)
//! ..  padding to a 64-byte boundary
//! ..  usearch image (the serialized graph, `graph.rs`)
//! ```
//!
//! Searches read the serialized graph in place through the navigation tables (`hnsw.rs`):
//! opening a format 2 image checks its header and the graph's head only, O(1) in the number of
//! items. Our own builder (`build.rs`) makes the graph and writes it in usearch's serialized
//! layout (usearch is no longer linked, except by the tests that check its loader reads our
//! images); a format 1 image gets its navigation tables computed when it is opened (O(n),
//! until its next rebuild or fold).
//!
//! Orphans are items a graph search may not find: items no link path reaches from the entry
//! point (found by walking the links; their nearest items are made to link to them first), and
//! items the build's self-check ([`SELF_CHECK_EF`]) does not find by their own vector. Scans
//! rank the orphans exactly, so every item stays findable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{AnnError, Result};
use crate::metric::{validate_vector, Metric, Quantization};

pub const MAGIC: &[u8; 8] = b"TTHNSW01";
pub const FORMAT_VERSION: u32 = 2;
/// Items inserted on one thread before the parallel insertion starts.
const WARM_UP_ITEMS: usize = 10_000;
/// The build's self-check: once a graph is built, each item is searched for by its own stored
/// vector, as the first round of a scan at these `ef` widths would search: it must rank among
/// the first 10 at one of them (or tie with the 10th at its own distance: exact duplicates).
/// The cheap width checks every item, the wide one only what the cheap one missed. What both
/// miss is linked again (a wide search for its neighbours, links both ways) and the whole
/// check runs again on the new image; what that misses goes to the orphan list, which scans
/// rank exactly, and the graph is not changed after the check. So a scan at either width finds
/// every item by its own vector, whatever the build's thread interleaving.
pub const SELF_CHECK_EF: [usize; 2] = [16, 256];
/// The self-check of the rows a fold adds ([`ImageBuilder::self_check_from_here`]): at the
/// default `twotower.ef_search` alone. A search is not monotone in its width (an item found at
/// 256 can be missed at 100); a fold adds few rows, so holding them to the width scans use costs
/// little, and its orphans are few.
pub const FOLD_CHECK_EF: [usize; 1] = [100];
const HEADER_LEN: usize = 128;
/// Where a format 2 header records a tuning (`tune.rs`; zeros: not tuned): queries u32, k u32,
/// ef u32, extra u32, links u64, recall before f32, recall after f32.
const TUNING_AT: usize = 72;
const HEADER_LEN_V1: usize = 64;

/// Parameters of an HNSW build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildParams {
    pub dims: usize,
    pub metric: Metric,
    pub quantization: Quantization,
    /// Graph connectivity (M).
    pub m: usize,
    pub ef_construction: usize,
}

impl BuildParams {
    pub fn validate(&self) -> Result<()> {
        if !(2..=100).contains(&self.m) {
            return Err(AnnError::InvalidOption {
                option: "m",
                reason: format!("{} is outside 2..100", self.m),
            });
        }
        if !(4..=1000).contains(&self.ef_construction) {
            return Err(AnnError::InvalidOption {
                option: "ef_construction",
                reason: format!("{} is outside 4..1000", self.ef_construction),
            });
        }
        if self.ef_construction < self.m {
            return Err(AnnError::InvalidOption {
                option: "ef_construction",
                reason: format!("must be at least m ({})", self.m),
            });
        }
        self.quantization.check_metric(self.metric)
    }
}

/// Items added to the graph per batch while a build streams its input (see [`ImageBuilder`]).
pub const BUILD_BATCH: usize = 8192;

/// Peak memory of building an image of `n` items with [`ImageBuilder`] on `threads` worker
/// threads, in bytes: the graph (every item's f32 input vector, its key and level, for cosine
/// its inverse norm and, with `unit_copy`, its unit vector in f16, its lists of links with their
/// lock and allocation, upper levels amortised), each worker thread's visited stamps (4 bytes an
/// item), the keys of serialization and the orphan search, and one input batch. The serialized image
/// itself goes through a temporary file when the builder is given a spill directory (as
/// `CREATE INDEX` does), so it is not counted.
pub fn estimate_build_memory(p: &BuildParams, n: usize, threads: usize, unit_copy: bool) -> usize {
    let m = p.m.max(2);
    // A node: its f32 vector (for cosine its inverse norm, and with `unit_copy` its unit vector
    // in f16); its level-0 list (a count and 2m slots); its upper lists' box (16 bytes) and, on 1/(m - 1) of the nodes on average, their allocation
    // (a count and m slots, plus ~16 bytes of allocator overhead); its lock, key and level.
    let unit = match p.metric {
        Metric::Cosine if unit_copy => 4 + p.dims * 2,
        Metric::Cosine => 4,
        _ => 0,
    };
    let node = p.dims * 4 + unit + (2 * m + 1) * 4 + 16 + (m * 4 + 20) / (m - 1) + 8 + 8 + 1;
    // Beside the graph: each thread's visited stamps, and at the finish the keys in slot order
    // and sorted plus the navigation tables (16 bytes an item).
    let beside = threads.clamp(1, 64) * 4 + 2 * 8 + 16;
    // Tables grow by half when the input outgrows the capacity the build was sized for.
    let graph = (n * node) / 10 * 11;
    let batch = BUILD_BATCH * (p.dims * 4 + 8);
    graph + n * beside + batch + (1 << 20)
}

/// What the build loop tells the caller's poll function, and what the poll function answers.
pub enum Poll {
    Continue,
    Cancel,
}

/// Bytes of a built image: in memory, or in an already unlinked temporary file mapped
/// read-only (so a large image is not counted twice in the backend's memory).
pub enum ImageBytes {
    Mem(Vec<u8>),
    Map(memmap2::Mmap),
}

impl AsRef<[u8]> for ImageBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            ImageBytes::Mem(v) => v,
            ImageBytes::Map(m) => m,
        }
    }
}

impl ImageBytes {
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            ImageBytes::Mem(v) => v,
            ImageBytes::Map(m) => m.to_vec(),
        }
    }
}

/// A zero-filled writable buffer of `len` bytes: in memory, or a temporary file in `spill`
/// (unlinked at once: nothing is left behind, even by a crash).
enum Scratch {
    Mem(Vec<u8>),
    Map(memmap2::MmapMut),
}

static SCRATCH_SEQ: AtomicUsize = AtomicUsize::new(0);

impl Scratch {
    fn new(len: usize, spill: Option<&std::path::Path>) -> Result<Scratch> {
        let Some(dir) = spill else {
            return Ok(Scratch::Mem(vec![0u8; len]));
        };
        let io = |e: std::io::Error| AnnError::Io {
            disk_full: e.kind() == std::io::ErrorKind::StorageFull,
            detail: format!("temporary file in {}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // PostgreSQL removes pgsql_tmp* files at start-up; the name follows its convention.
        let path = dir.join(format!(
            "pgsql_tmp{}.twotower.{}",
            std::process::id(),
            SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        let _ = std::fs::remove_file(&path);
        f.set_len(len as u64).map_err(io)?;
        if len == 0 {
            return Ok(Scratch::Mem(Vec::new()));
        }
        // SAFETY: the file was created by this process and unlinked at once: no other process
        // can open it, so the mapping cannot change under us.
        let m = unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(io)?;
        Ok(Scratch::Map(m))
    }
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Scratch::Mem(v) => v,
            Scratch::Map(m) => m,
        }
    }
    fn freeze(self) -> Result<ImageBytes> {
        match self {
            Scratch::Mem(v) => Ok(ImageBytes::Mem(v)),
            Scratch::Map(m) => m
                .make_read_only()
                .map(ImageBytes::Map)
                .map_err(|e| AnnError::Io {
                    disk_full: e.kind() == std::io::ErrorKind::StorageFull,
                    detail: format!("temporary image file: {e}"),
                }),
        }
    }
}

/// Builds an image from `keys` (unique) and their vectors (`keys.len() * dims` floats, row-major).
///
/// Insertion runs on `threads` worker threads. The calling thread only calls `poll(done)` about
/// every 20 ms, so a caller that must service interrupts can do so on its own thread; returning
/// [`Poll::Cancel`] stops the workers and yields [`AnnError::Cancelled`].
pub fn build_image(
    params: &BuildParams,
    keys: &[u64],
    vectors: &[f32],
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
) -> Result<Vec<u8>> {
    params.validate()?;
    let n = keys.len();
    if vectors.len() != n * params.dims {
        return Err(AnnError::DimensionMismatch {
            expected: n * params.dims,
            got: vectors.len(),
        });
    }
    let mut b = ImageBuilder::new(params, n, threads)?;
    b.add_batch(keys, vectors, poll)?;
    Ok(b.finish(poll, None)?.into_vec())
}

/// An image built from input that arrives in batches (a heap scan): each batch goes into the
/// graph at once (`build.rs`, our HNSW builder), so the whole input is never held in memory
/// twice. [`ImageBuilder::finish`] links the items no search reaches, serializes and
/// self-checks.
pub struct ImageBuilder {
    params: BuildParams,
    graph: crate::build::Graph,
    threads: usize,
    /// Items before this position are not self-checked (they came from an image that was
    /// checked already; `usize::MAX`: no self-check at all).
    checked: usize,
    /// The self-check's widths: an item passes if found at one of them.
    check_ef: &'static [usize],
    /// What [`ImageBuilder::tune`] did, written into the image's header, and the sample it
    /// tuned to (the finish repairs again after its own relinking).
    tuning: Option<(crate::tune::Tuning, crate::tune::Sample)>,
}

impl ImageBuilder {
    /// A builder for about `capacity` items (it grows past that as needed).
    pub fn new(params: &BuildParams, capacity: usize, threads: usize) -> Result<ImageBuilder> {
        params.validate()?;
        Ok(ImageBuilder {
            params: *params,
            graph: crate::build::Graph::new(
                params.dims,
                params.metric,
                params.quantization,
                params.m,
                params.ef_construction,
                capacity,
                true,
            ),
            threads: threads.clamp(1, 64),
            checked: 0,
            check_ef: &SELF_CHECK_EF,
            tuning: None,
        })
    }

    /// A builder that starts from the graph of `image` (an f32 image built with `params`'
    /// metric and dimensions): its items stay as they are, [`ImageBuilder::add_batch`] inserts
    /// more, and [`ImageBuilder::finish`] repairs and serializes the whole. The graph is loaded
    /// as a writable copy; `extra` sizes it for the items to come.
    pub fn from_image<B: AsRef<[u8]>>(
        params: &BuildParams,
        image: &Image<B>,
        extra: usize,
        threads: usize,
    ) -> Result<ImageBuilder> {
        params.validate()?;
        let h = image.header;
        if h.quantization != Quantization::F32
            || params.quantization != Quantization::F32
            || h.dims != params.dims
            || h.metric != params.metric
        {
            return Err(AnnError::Engine(
                "only an f32 image of the same metric and dimensions can be extended".into(),
            ));
        }
        let graph = crate::build::Graph::load(
            image.graph(),
            params.dims,
            params.metric,
            params.m,
            params.ef_construction,
            extra,
        )?;
        if graph.len() != h.count {
            return Err(AnnError::CorruptImage(
                "graph size differs from the header".into(),
            ));
        }
        Ok(ImageBuilder {
            params: *params,
            graph,
            threads: threads.clamp(1, 64),
            checked: h.count,
            check_ef: &SELF_CHECK_EF,
            tuning: None,
        })
    }

    /// Leaves the self-check ([`SELF_CHECK_EF`]) out of [`ImageBuilder::finish`]: for a fold,
    /// which runs inside an insert and extends a graph many times over its life.
    pub fn without_self_check(mut self) -> ImageBuilder {
        self.checked = usize::MAX;
        self
    }

    /// Leaves the items added so far out of the self-check: [`ImageBuilder::finish`] checks
    /// only the items added after this call (a fold: its new rows, a search each), at
    /// [`FOLD_CHECK_EF`].
    pub fn self_check_from_here(mut self) -> ImageBuilder {
        self.checked = self.graph.len();
        self.check_ef = &FOLD_CHECK_EF;
        self
    }

    /// Frees the f16 copy of the unit vectors a cosine build's distances read (the rest of
    /// the build reads the f32 input: slower, [`estimate_build_memory`] without `unit_copy`).
    /// For a build whose memory budget cannot hold the copy; callable between batches.
    pub fn drop_unit_copy(&mut self) {
        self.graph.drop_unit_copy();
    }

    /// Items added so far.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.len() == 0
    }

    /// Bytes the graph holds now.
    pub fn graph_memory(&self) -> usize {
        self.graph.memory()
    }

    /// Adds a batch of items (the first [`WARM_UP_ITEMS`] of the build on one thread: while the
    /// graph is small, concurrent insertions link to each other and can leave islands no
    /// search reaches). `poll(done)` counts items of the whole build.
    pub fn add_batch(
        &mut self,
        keys: &[u64],
        vectors: &[f32],
        poll: &mut dyn FnMut(usize) -> Poll,
    ) -> Result<()> {
        let dims = self.params.dims;
        if vectors.len() != keys.len() * dims {
            return Err(AnnError::DimensionMismatch {
                expected: keys.len() * dims,
                got: vectors.len(),
            });
        }
        for v in vectors.chunks_exact(dims) {
            validate_vector(v, Some(dims))?;
        }
        let base = self.graph.push(keys, vectors);
        let graph = &self.graph;
        let warm = WARM_UP_ITEMS.saturating_sub(base).min(keys.len());
        let first: Vec<usize> = (base..base + warm).collect();
        let rest: Vec<usize> = (base + warm..base + keys.len()).collect();
        let insert = |s: &mut crate::build::Scratch, slot: usize| {
            graph.insert(slot, s);
            Ok(false)
        };
        parallel_with(&first, 1, &mut |d| poll(base + d), insert)?;
        parallel_with(&rest, self.threads, &mut |d| poll(base + warm + d), insert)?;
        Ok(())
    }

    /// Tunes the graph to a sample of the queries it will be asked (`queries`: `dims` floats
    /// each, row-major): query-aware level-0 links (`tune.rs`). Call once, after the last
    /// batch and before [`ImageBuilder::finish`], whose self-check then checks the tuned graph.
    /// `poll(done)` counts queries per phase.
    pub fn tune(
        &mut self,
        queries: &[f32],
        params: &crate::tune::TuneParams,
        poll: &mut dyn FnMut(usize) -> Poll,
    ) -> Result<crate::tune::Tuning> {
        if self.tuning.is_some() {
            return Err(AnnError::Engine("a graph is tuned once".into()));
        }
        let sample = crate::tune::prepare(
            &mut self.graph,
            self.params.metric,
            self.params.dims,
            queries,
            params,
            self.threads,
            poll,
        )?;
        let r = crate::tune::repair(&self.graph, &sample, self.threads, poll)?;
        let t = sample.tuning(&r);
        self.tuning = Some((t, sample));
        Ok(t)
    }

    /// Level-0 links of the item with `key` (tests: what a tuning added).
    #[doc(hidden)]
    pub fn links_of(&self, key: u64) -> Option<Vec<u64>> {
        let slot = (0..self.graph.len()).find(|s| self.graph.key(*s) == key)?;
        Some(
            self.graph
                .base_links(slot)
                .into_iter()
                .map(|s| self.graph.key(s as usize))
                .collect(),
        )
    }

    /// Links the items no search reaches, serializes the image (through a temporary file in
    /// `spill` when given, so the image is not a second copy in memory), then runs the
    /// self-check ([`SELF_CHECK_EF`]) over the items added since the builder started.
    pub fn finish(
        mut self,
        poll: &mut dyn FnMut(usize) -> Poll,
        spill: Option<&std::path::Path>,
    ) -> Result<ImageBytes> {
        let graph = &self.graph;
        let n = graph.len();
        // A relink re-chooses full lists, which can drop query-aware links: a tuned graph is
        // repaired again after each relinking (links are only added then), and the header
        // records the links of both.
        let mut tuning = self.tuning.take();
        // Items no search can reach (a walk over the links from the entry point): their
        // nearest items link to them; what is still unreachable after that is an orphan.
        let mut lost = graph.unreachable();
        if !lost.is_empty() {
            parallel_with(&lost, 1, poll, |s, slot| {
                graph.relink(slot, s);
                Ok(false)
            })?;
            retune(graph, &mut tuning, self.threads, poll)?;
            lost = graph.unreachable();
        }
        let mut orphans: Vec<u64> = lost.iter().map(|s| graph.key(*s)).collect();
        orphans.sort_unstable();
        poll(n);
        let keys: Vec<u64> = (0..n).map(|s| graph.key(s)).collect();
        // The self-check, on the image as it will be returned.
        let check = |bytes: &ImageBytes, poll: &mut dyn FnMut(usize) -> Poll| {
            let mut missed: Vec<usize> = (self.checked.min(n)..n).collect();
            for &ef in self.check_ef {
                missed = self_check(bytes.as_ref(), &keys, &missed, ef, self.threads, poll)?;
            }
            Ok::<_, AnnError>(missed)
        };
        // The image of the graph as it is, with `orphans` and the tuning's record.
        let write =
            |orphans: &[u64], tuning: &Option<(crate::tune::Tuning, crate::tune::Sample)>| {
                serialize(
                    &self.params,
                    &keys,
                    orphans,
                    graph,
                    tuning.as_ref().map(|x| &x.0),
                    spill,
                )
            };
        let mut bytes = write(&orphans, &tuning)?;
        let mut missed = check(&bytes, poll)?;
        if !missed.is_empty() {
            // What both widths miss (about 1 % of clustered data at 1M) is linked again: a
            // wide search for its own vector, links to the neighbours it finds and from the
            // nearest of them. That changes other items' lists too, so the whole check runs
            // again on the new image: only what it misses then becomes an orphan.
            drop(bytes);
            parallel_with(&missed, self.threads, poll, |s, slot| {
                graph.relink(slot, s);
                Ok(false)
            })?;
            retune(graph, &mut tuning, self.threads, poll)?;
            bytes = write(&orphans, &tuning)?;
            missed = check(&bytes, poll)?;
        }
        if missed.is_empty() {
            return Ok(bytes);
        }
        drop(bytes);
        orphans.extend(missed.into_iter().map(|i| keys[i]));
        orphans.sort_unstable();
        orphans.dedup();
        write(&orphans, &tuning)
    }
}

/// A tuned graph repaired again after a relinking (which can drop query-aware links from the
/// lists it re-chooses): links are only added, and the record counts them.
fn retune(
    graph: &crate::build::Graph,
    tuning: &mut Option<(crate::tune::Tuning, crate::tune::Sample)>,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
) -> Result<()> {
    if let Some((t, sample)) = tuning.as_mut() {
        let r = crate::tune::repair(graph, sample, threads, poll)?;
        t.links += r.links;
        t.recall_after = r.after;
    }
    Ok(())
}

/// The items of `keys` at `positions` that a search of the serialized image `bytes` for their
/// own stored vector at width `ef` (as a scan's first round: `max(ef, 10)` results) does not
/// rank among its first 10, nor tie with the 10th at the item's own distance; orphans already
/// in the image are skipped (scans rank them exactly). Runs on the worker threads, like the
/// build.
fn self_check(
    bytes: &[u8],
    keys: &[u64],
    positions: &[usize],
    ef: usize,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
) -> Result<Vec<usize>> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let img = Image::open_verified(bytes)?;
    let metric = img.header.metric;
    parallel(positions, threads, poll, |i| {
        let key = keys[i];
        if img.header.orphans > 0 && img.is_orphan(key) {
            return Ok(false);
        }
        let slot = img
            .slot_of_key(key)?
            .ok_or_else(|| AnnError::Engine("a built item is missing from its image".into()))?;
        let mut v = Vec::with_capacity(img.header.dims);
        img.vector_at_slot(slot, &mut v)?;
        // A stored vector that is no valid query (all zero after quantization): an orphan.
        let Ok(q) = Query::new(metric, &v) else {
            return Ok(true);
        };
        Ok(!img.searcher(q.engine()).finds_itself(slot as usize, ef)?)
    })
}

/// Runs `f` over `items` on `threads` worker threads and returns the items for which it returned
/// true (ascending). The calling thread only calls `poll(done)` about every 20 ms, so a caller
/// that must service interrupts can do so on its own thread; [`Poll::Cancel`] stops the workers
/// and yields [`AnnError::Cancelled`]. The first error of `f` stops the workers and is returned.
fn parallel(
    items: &[usize],
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
    f: impl Fn(usize) -> Result<bool> + Sync,
) -> Result<Vec<usize>> {
    parallel_with(items, threads, poll, |_: &mut (), i| f(i))
}

/// [`parallel`] with a scratch value of type `S` per worker thread (`S::default()` at first).
pub(crate) fn parallel_with<S: Default>(
    items: &[usize],
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
    f: impl Fn(&mut S, usize) -> Result<bool> + Sync,
) -> Result<Vec<usize>> {
    parallel_chunked(items, 64, threads, poll, f)
}

/// [`parallel_with`], the workers taking `chunk` items at a time (a cancel waits for the
/// chunks in progress).
pub(crate) fn parallel_chunked<S: Default>(
    items: &[usize],
    chunk: usize,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
    f: impl Fn(&mut S, usize) -> Result<bool> + Sync,
) -> Result<Vec<usize>> {
    let chunk = chunk.max(1);
    let n = items.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let failure: Mutex<Option<AnnError>> = Mutex::new(None);
    let flagged: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = S::default();
                let mut local = Vec::new();
                'work: while !cancel.load(Ordering::Relaxed) {
                    let start = next.fetch_add(chunk, Ordering::Relaxed);
                    if start >= n {
                        break;
                    }
                    let end = (start + chunk).min(n);
                    for &i in &items[start..end] {
                        match f(&mut scratch, i) {
                            Ok(true) => local.push(i),
                            Ok(false) => {}
                            Err(e) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(e);
                                cancel.store(true, Ordering::Relaxed);
                                break 'work;
                            }
                        }
                    }
                    done.fetch_add(end - start, Ordering::Relaxed);
                }
                flagged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(local);
            });
        }
        // The calling thread watches progress and cancellation until every worker is finished.
        loop {
            let d = done.load(Ordering::Relaxed);
            if d >= n || cancel.load(Ordering::Relaxed) {
                break;
            }
            if let Poll::Cancel = poll(d) {
                cancel.store(true, Ordering::Relaxed);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(AnnError::Cancelled);
    }
    let mut out = flagged.into_inner().unwrap_or_else(|p| p.into_inner());
    out.sort_unstable();
    Ok(out)
}

fn align64(x: usize) -> usize {
    (x + 63) & !63
}

fn serialize(
    params: &BuildParams,
    keys: &[u64],
    orphans: &[u64],
    graph: &crate::build::Graph,
    tuning: Option<&crate::tune::Tuning>,
    spill: Option<&std::path::Path>,
) -> Result<ImageBytes> {
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(AnnError::Engine("duplicate item key in build input".into()));
    }
    let keys_off = HEADER_LEN;
    let orphans_off = keys_off + sorted.len() * 8;
    let nav_off = crate::layout::pad8(orphans_off + 8 + orphans.len() * 8);
    let us_off = align64(nav_off + crate::layout::nav_len(sorted.len()));
    let us_len = graph.serialized_length();
    let mut scratch = Scratch::new(us_off + us_len, spill)?;
    let buf = scratch.bytes();
    buf[0..8].copy_from_slice(MAGIC);
    put_u32(buf, 8, FORMAT_VERSION);
    put_u32(buf, 12, HEADER_LEN as u32);
    put_u32(buf, 16, params.dims as u32);
    put_u32(buf, 20, params.metric.code());
    put_u32(buf, 24, params.quantization.code());
    put_u32(buf, 28, params.m as u32);
    put_u64(buf, 32, sorted.len() as u64);
    put_u64(buf, 40, keys_off as u64);
    put_u64(buf, 48, us_off as u64);
    put_u64(buf, 56, us_len as u64);
    put_u64(buf, 64, nav_off as u64);
    if let Some(t) = tuning.filter(|t| t.queries > 0) {
        put_u32(buf, TUNING_AT, t.queries);
        put_u32(buf, TUNING_AT + 4, t.k);
        put_u32(buf, TUNING_AT + 8, t.ef);
        put_u32(buf, TUNING_AT + 12, t.extra);
        put_u64(buf, TUNING_AT + 16, t.links);
        put_u32(buf, TUNING_AT + 24, t.recall_before.to_bits());
        put_u32(buf, TUNING_AT + 28, t.recall_after.to_bits());
    }
    for (i, k) in sorted.iter().enumerate() {
        put_u64(buf, keys_off + i * 8, *k);
    }
    put_u64(buf, orphans_off, orphans.len() as u64);
    for (i, k) in orphans.iter().enumerate() {
        put_u64(buf, orphans_off + 8 + i * 8, *k);
    }
    graph.serialize_into(&mut buf[us_off..])?;
    let graph = &buf[us_off..];
    let head = crate::layout::GraphHead::parse(graph, params.dims, params.quantization)?;
    let nav = crate::layout::NavTables::compute(graph, &head, params.quantization, &sorted)?;
    drop(sorted);
    nav.write(&mut buf[nav_off..nav_off + crate::layout::nav_len(keys.len())]);
    drop(nav);
    scratch.freeze()
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checksum of an image (xxh3, 64 bits).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Where to cut `image` into sections whose bytes keep their offsets (within the section) when
/// the image is extended by a fold: the item keys (new rows' keys mostly sort last), the
/// orphans, the key-to-slot table, the node offsets, the inverse norms, the stored vectors,
/// the graph's head and level table, and the node records (a fold appends nodes and changes
/// some neighbour lists in place). Ascending offsets strictly inside the image; empty when the
/// image is not a format 2 image with a graph of the known layout (it is then one section).
///
/// A store that starts each section on a page of its own, and writes a new image over the
/// pages of an older one section by section, sees only the changed bytes differ (what Generic
/// WAL then logs); the image's bytes and format are not affected.
pub fn segment_cuts(image: &[u8]) -> Vec<usize> {
    let Ok(h) = Header::parse(image) else {
        return Vec::new();
    };
    if h.version < 2 {
        return Vec::new();
    }
    let graph = &image[h.us_off..h.us_off + h.us_len];
    let Ok(g) = crate::layout::GraphHead::parse(graph, h.dims, h.quantization) else {
        return Vec::new();
    };
    let keys_end = h.keys_off + h.count * 8;
    let node_off_at = h.nav_off + crate::layout::pad8(h.count * 4);
    let inv_norm_at = node_off_at + h.count * 8;
    let vectors_at = h.us_off + g.vectors_at;
    let vectors_end = vectors_at + g.size * g.row_bytes;
    let nodes_at = h.us_off + g.nodes_at;
    let mut cuts = Vec::with_capacity(7);
    for c in [
        keys_end,
        h.nav_off,
        node_off_at,
        inv_norm_at,
        vectors_at,
        vectors_end,
        nodes_at,
    ] {
        if c > *cuts.last().unwrap_or(&0) && c < image.len() {
            cuts.push(c);
        }
    }
    cuts
}

/// Parsed header of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    /// Format version (2; 1 for images written before navigation tables were stored).
    pub version: u32,
    pub dims: usize,
    pub metric: Metric,
    pub quantization: Quantization,
    pub m: usize,
    pub count: usize,
    /// Items the graph search cannot reach (ranked exactly by scans).
    pub orphans: usize,
    keys_off: usize,
    us_off: usize,
    us_len: usize,
    /// Offset of the navigation tables (format 2), 0 for format 1.
    nav_off: usize,
    /// What tuning the graph to a sample of queries did, if it was tuned.
    pub tuning: Option<crate::tune::Tuning>,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        let bad = |m: &str| AnnError::CorruptImage(m.to_string());
        if b.len() < HEADER_LEN_V1 || &b[0..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let version = get_u32(b, 8);
        let header_len = get_u32(b, 12) as usize;
        match (version, header_len) {
            (1, HEADER_LEN_V1) => {}
            (2, HEADER_LEN) if b.len() >= HEADER_LEN => {}
            _ => return Err(bad("unsupported format version")),
        }
        let metric = Metric::from_code(get_u32(b, 20)).ok_or_else(|| bad("unknown metric"))?;
        let quantization =
            Quantization::from_code(get_u32(b, 24)).ok_or_else(|| bad("unknown quantization"))?;
        let mut h = Header {
            version,
            dims: get_u32(b, 16) as usize,
            metric,
            quantization,
            m: get_u32(b, 28) as usize,
            count: get_u64(b, 32) as usize,
            orphans: 0,
            keys_off: get_u64(b, 40) as usize,
            us_off: get_u64(b, 48) as usize,
            us_len: get_u64(b, 56) as usize,
            nav_off: if version >= 2 {
                get_u64(b, 64) as usize
            } else {
                0
            },
            tuning: None,
        };
        if version >= 2 && get_u32(b, TUNING_AT) > 0 {
            h.tuning = Some(crate::tune::Tuning {
                queries: get_u32(b, TUNING_AT),
                k: get_u32(b, TUNING_AT + 4),
                ef: get_u32(b, TUNING_AT + 8),
                extra: get_u32(b, TUNING_AT + 12),
                links: get_u64(b, TUNING_AT + 16),
                recall_before: f32::from_bits(get_u32(b, TUNING_AT + 24)),
                recall_after: f32::from_bits(get_u32(b, TUNING_AT + 28)),
            });
        }
        let keys_end = h
            .count
            .checked_mul(8)
            .and_then(|x| x.checked_add(h.keys_off));
        let us_end = h.us_off.checked_add(h.us_len);
        match (keys_end, us_end) {
            (Some(ke), Some(ue))
                if h.keys_off >= header_len
                    && ke.checked_add(8).is_some_and(|x| x <= h.us_off)
                    && ue == b.len()
                    && h.dims > 0
                    && h.dims <= crate::MAX_DIMS =>
            {
                h.orphans = get_u64(b, ke) as usize;
                let oe = match h.orphans.checked_mul(8).and_then(|x| x.checked_add(ke + 8)) {
                    Some(oe) if oe <= h.us_off && h.orphans <= h.count => oe,
                    _ => return Err(bad("orphan section exceeds its bounds")),
                };
                if version >= 2 {
                    let nav_end = h
                        .count
                        .checked_mul(16)
                        .map(|_| crate::layout::nav_len(h.count))
                        .and_then(|x| x.checked_add(h.nav_off));
                    if h.nav_off < oe
                        || !h.nav_off.is_multiple_of(8)
                        || nav_end.is_none_or(|e| e > h.us_off)
                    {
                        return Err(bad("navigation tables exceed their bounds"));
                    }
                }
                Ok(h)
            }
            _ => Err(bad("section bounds do not match the image length")),
        }
    }
}

/// A verified image whose graph is read in place (no copy) from `B`.
pub struct Image<B: AsRef<[u8]>> {
    header: Header,
    head: crate::layout::GraphHead,
    nav: crate::layout::Nav,
    /// The orphans' graph slots, looked up at their first use (scans rank every orphan).
    orphan_slots: std::sync::OnceLock<Vec<u32>>,
    bytes: B,
}

impl<B: AsRef<[u8]>> Image<B> {
    /// Verifies `bytes` against `expected_checksum`, checks every table against the graph
    /// (O(n)) and opens the image.
    pub fn open(bytes: B, expected_checksum: u64) -> Result<Self> {
        let b = bytes.as_ref();
        let sum = checksum(b);
        if sum != expected_checksum {
            return Err(AnnError::CorruptImage(format!(
                "checksum {sum:016x} does not match the expected {expected_checksum:016x}"
            )));
        }
        let header = Header::parse(b)?;
        let keys = &b[header.keys_off..header.keys_off + header.count * 8];
        let mut prev: Option<u64> = None;
        for c in keys.chunks_exact(8) {
            let k = u64::from_le_bytes(c.try_into().expect("8"));
            if prev.is_some_and(|p| p >= k) {
                return Err(AnnError::CorruptImage(
                    "item keys are not strictly ascending".into(),
                ));
            }
            prev = Some(k);
        }
        let img = Self::view(bytes, header)?;
        if let crate::layout::Nav::Stored { .. } = img.nav {
            let b = img.bytes.as_ref();
            img.nav
                .verify(b, img.graph(), &img.head, |i| img.key_at(i))?;
        }
        Ok(img)
    }

    /// Opens bytes that [`Image::open`] verified earlier (the caller vouches that they have not
    /// changed since: see the extension's verified-file marker). Only the header and the
    /// graph's head are checked: O(1) for a format 2 image. Every later read is bounds-checked,
    /// so bytes that changed after all give errors, not crashes.
    pub fn open_verified(bytes: B) -> Result<Self> {
        let header = Header::parse(bytes.as_ref())?;
        Self::view(bytes, header)
    }

    fn view(bytes: B, header: Header) -> Result<Self> {
        let b = bytes.as_ref();
        let graph = &b[header.us_off..header.us_off + header.us_len];
        let head = crate::layout::GraphHead::parse(graph, header.dims, header.quantization)?;
        if head.size != header.count {
            return Err(AnnError::CorruptImage(
                "graph size differs from the header".into(),
            ));
        }
        let nav = if header.version >= 2 {
            crate::layout::Nav::Stored {
                at: header.nav_off,
                count: header.count,
            }
        } else {
            let keys: Vec<u64> = (0..header.count)
                .map(|i| get_u64(b, header.keys_off + i * 8))
                .collect();
            crate::layout::Nav::Owned(crate::layout::NavTables::compute(
                graph,
                &head,
                header.quantization,
                &keys,
            )?)
        };
        Ok(Image {
            header,
            head,
            nav,
            orphan_slots: std::sync::OnceLock::new(),
            bytes,
        })
    }

    fn graph(&self) -> &[u8] {
        &self.bytes.as_ref()[self.header.us_off..self.header.us_off + self.header.us_len]
    }

    /// The serialized usearch graph (for tests that compare with usearch's own search).
    #[doc(hidden)]
    pub fn graph_bytes(&self) -> &[u8] {
        self.graph()
    }

    fn searcher(&self, query: &[f32]) -> crate::hnsw::Searcher<'_> {
        crate::hnsw::Searcher::new(
            self.bytes.as_ref(),
            self.graph(),
            &self.head,
            &self.nav,
            self.header.metric,
            self.header.quantization,
            query,
        )
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Keys of the items no graph search can reach (walking the stored graph from its entry
    /// point); `None` if the stored graph's layout is not the one `graph.rs` reads. Every one
    /// of them must be in the orphan list.
    pub fn unreachable(&self) -> Option<Vec<u64>> {
        crate::graph::unreachable_keys(self.graph())
    }
    pub fn len(&self) -> usize {
        self.header.count
    }
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }
    pub fn byte_len(&self) -> usize {
        self.bytes.as_ref().len()
    }

    /// The item key at sorted position `i`.
    pub fn key_at(&self, i: usize) -> u64 {
        get_u64(self.bytes.as_ref(), self.header.keys_off + i * 8)
    }

    /// The `i`-th orphan key (ascending).
    pub fn orphan_at(&self, i: usize) -> u64 {
        get_u64(
            self.bytes.as_ref(),
            self.header.keys_off + self.header.count * 8 + 8 + i * 8,
        )
    }

    /// True if `key` is an orphan (unreachable by graph search).
    pub fn is_orphan(&self, key: u64) -> bool {
        let (mut lo, mut hi) = (0usize, self.header.orphans);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.orphan_at(mid);
            if k == key {
                return true;
            }
            if k < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        false
    }

    /// Sorted position of `key`, if the graph holds it.
    pub fn position(&self, key: u64) -> Option<usize> {
        let (mut lo, mut hi) = (0usize, self.header.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.key_at(mid);
            if k == key {
                return Some(mid);
            }
            if k < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        None
    }

    /// Approximate top-`k` by the engine distance, skipping keys for which `skip` is true.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<(u64, f32)>> {
        self.search_with(query, k, ef, skip, None)
    }

    /// [`Image::search`] that calls `interrupt` every few hundred expanded nodes (a caller
    /// that must service cancellation passes its check; it may unwind).
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
        interrupt: Option<&dyn Fn()>,
    ) -> Result<Vec<(u64, f32)>> {
        Ok(self
            .search_slots(query, k, ef, skip, interrupt)?
            .into_iter()
            .map(|(key, d, _)| (key, d))
            .collect())
    }

    /// [`Image::search_with`] that also returns each item's graph slot.
    pub(crate) fn search_slots(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
        interrupt: Option<&dyn Fn()>,
    ) -> Result<Vec<(u64, f32, u32)>> {
        validate_vector(query, Some(self.header.dims))?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        self.searcher(query)
            .search(k, ef.max(k).max(1), skip, interrupt)
    }

    /// Every item, exactly ranked by the engine distance (brute force).
    pub fn exact_all(&self, query: &[f32]) -> Result<Vec<(u64, f32)>> {
        self.exact_all_with(query, None)
    }

    /// [`Image::exact_all`] with an interrupt check, as [`Image::search_with`].
    pub fn exact_all_with(
        &self,
        query: &[f32],
        interrupt: Option<&dyn Fn()>,
    ) -> Result<Vec<(u64, f32)>> {
        Ok(self
            .exact_all_slots(query, interrupt)?
            .into_iter()
            .map(|(key, d, _)| (key, d))
            .collect())
    }

    fn exact_all_slots(
        &self,
        query: &[f32],
        interrupt: Option<&dyn Fn()>,
    ) -> Result<Vec<(u64, f32, u32)>> {
        validate_vector(query, Some(self.header.dims))?;
        if self.is_empty() {
            return Ok(Vec::new());
        }
        self.searcher(query).exact_all(interrupt)
    }

    /// The orphans' graph slots (looked up once per opened image).
    fn orphan_slots(&self) -> Result<&[u32]> {
        if let Some(s) = self.orphan_slots.get() {
            return Ok(s);
        }
        let mut slots = Vec::with_capacity(self.header.orphans);
        for i in 0..self.header.orphans {
            let slot = self.slot_of_key(self.orphan_at(i))?.ok_or_else(|| {
                AnnError::CorruptImage("an orphan is not an item of the graph".into())
            })?;
            slots.push(slot);
        }
        Ok(self.orphan_slots.get_or_init(|| slots))
    }

    /// Reads one byte of each cache line of the stored vectors at `slots` (a portable
    /// prefetch: independent loads, in flight together).
    fn touch_slots(&self, slots: &[u32]) {
        crate::layout::touch_rows(self.graph(), &self.head, slots.iter().map(|&s| s as usize));
    }

    /// The stored vector at `slot`, decoded into `out`.
    fn vector_at_slot(&self, slot: u32, out: &mut Vec<f32>) -> Result<()> {
        let row = crate::layout::row(self.graph(), &self.head, slot as usize).ok_or_else(|| {
            AnnError::CorruptImage("the navigation tables point outside the graph".into())
        })?;
        crate::layout::decode(self.header.quantization, row, out);
        Ok(())
    }

    /// The scan item for `key` stored at `slot`, ranked from its stored vector (`buf`: scratch).
    fn hit_at_slot(&self, q: &Query, key: u64, slot: u32, buf: &mut Vec<f32>) -> Result<Hit> {
        self.vector_at_slot(slot, buf)?;
        let quant = self.header.quantization;
        Ok(Hit {
            key,
            dist: q.lower_bound(quant, buf),
            exact: quant == Quantization::F32,
        })
    }

    /// The stored (possibly quantized, then decoded) vector of `key`.
    pub fn vector(&self, key: u64) -> Result<Option<Vec<f32>>> {
        let Some(slot) = self.slot_of_key(key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(self.header.dims);
        self.vector_at_slot(slot, &mut out)?;
        Ok(Some(out))
    }

    /// The graph slot of `key`, if the image holds it.
    fn slot_of_key(&self, key: u64) -> Result<Option<u32>> {
        let Some(i) = self.position(key) else {
            return Ok(None);
        };
        match self.nav.slot_of(self.bytes.as_ref(), i) {
            Some(slot) if slot < self.head.size => Ok(Some(slot as u32)),
            _ => Err(AnnError::CorruptImage(
                "the navigation tables point outside the graph".into(),
            )),
        }
    }
}

/// How an ordered scan continues once its first search is used up (`twotower.iterative_scan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanOrder {
    /// Widen the search round by round; an item of a later round that is nearer than one
    /// already returned is dropped, so rows come out in distance order (the default).
    #[default]
    Strict,
    /// Widen round by round and return every new item, even one nearer than rows already
    /// returned (more rows, order only approximate across rounds).
    Relaxed,
    /// One search of `ef` candidates, no widening.
    Off,
}

/// A query prepared for an ordered scan: the vector as given (for exact distances, as the SQL
/// operators compute them) and the vector handed to the engine (unit length for cosine and
/// inner product, which ranks the same and keeps the engine's f32 arithmetic in range).
#[derive(Debug, Clone)]
pub struct Query {
    metric: Metric,
    raw: Vec<f32>,
    engine: Vec<f32>,
    norm: f64,
    /// `inner_product(raw, raw)`, for the one-pass cosine distance.
    norm2: f64,
}

impl Query {
    /// Validates `v` (finite, non-empty) and prepares it. An L2 query must be in the range the
    /// engine can rank exactly ([`crate::check_index_range`]).
    pub fn new(metric: Metric, v: &[f32]) -> Result<Query> {
        validate_vector(v, None)?;
        let engine = match metric {
            Metric::Cosine | Metric::InnerProduct => crate::unit(v).unwrap_or_else(|| v.to_vec()),
            Metric::L2 => {
                crate::check_index_range(v)?;
                v.to_vec()
            }
        };
        let norm2 = crate::inner_product(v, v);
        Ok(Query {
            metric,
            norm: norm2.sqrt(),
            norm2,
            raw: v.to_vec(),
            engine,
        })
    }
    pub fn metric(&self) -> Metric {
        self.metric
    }
    pub fn raw(&self) -> &[f32] {
        &self.raw
    }
    pub fn engine(&self) -> &[f32] {
        &self.engine
    }
    /// The distance the SQL operator of the metric returns for `v` (bit for bit; for cosine in
    /// one pass, with the query's own norm computed once).
    pub fn distance(&self, v: &[f32]) -> f64 {
        match self.metric {
            Metric::Cosine => twotower_metric::cosine_distance_from(self.norm2, &self.raw, v),
            m => m.sql_distance(&self.raw, v),
        }
    }

    /// A lower bound of the distance to the vector `x` the engine stored as `stored` under
    /// `quantization` (exact for f32). usearch rounds f32 to f16 (at most one unit in the last
    /// place: 2^-10 relative, 2^-24 absolute below the normal range) and truncates i8 after
    /// scaling the unit vector by 127 (less than 1/127 per element).
    pub fn lower_bound(&self, quantization: Quantization, stored: &[f32]) -> f64 {
        let d = self.distance(stored);
        if quantization == Quantization::F32 || d.is_nan() {
            return d;
        }
        let dims = stored.len() as f64;
        let sn = crate::inner_product(stored, stored).sqrt();
        // err: a bound of ||x - x̂|| (f16), or of ||x/|x| - x̂|| (i8, x̂ as decoded).
        let err = match quantization {
            Quantization::F16 => {
                sn * (1.0 / 1024.0) * (1.0 + 1.0 / 1024.0) + dims.sqrt() / 16_777_216.0
            }
            _ => dims.sqrt() / 127.0 + dims.sqrt() * 1e-7,
        };
        let slack = match (self.metric, quantization) {
            // |cos(q, a) - cos(q, b)| <= ||a - b|| for unit a, b, and the unit vectors of x and
            // x̂ differ by at most 2 ||x - x̂|| / |x̂| (f16) or 2 err (i8, |a| = 1).
            (Metric::Cosine, Quantization::I8) => 2.0 * err,
            (Metric::Cosine, _) if sn > 0.0 => 2.0 * err / sn,
            (Metric::Cosine, _) => 2.0,
            (Metric::InnerProduct, _) => self.norm * err,
            (Metric::L2, _) => err,
        };
        d - slack - 1e-9 * (1.0 + d.abs())
    }
}

/// One item of an ordered scan: its key and its distance in the SQL operator's terms, exact or
/// (for quantized storage) a guaranteed lower bound of the exact one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub dist: f64,
    pub exact: bool,
}

/// A hit ordered so that a max-heap has the nearest on top (ties: the smaller key; NaN last),
/// the order `sort_for_pop` gives `pop`.
#[derive(Debug, Clone, Copy)]
struct NearestFirst(Hit);

impl PartialEq for NearestFirst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for NearestFirst {}
impl PartialOrd for NearestFirst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for NearestFirst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .0
            .dist
            .total_cmp(&self.0.dist)
            .then(other.0.key.cmp(&self.0.key))
    }
}

/// Sorts hits by descending distance (the nearest at the end, for `pop`), NaN first.
pub fn sort_for_pop(hits: &mut [Hit]) {
    hits.sort_by(|a, b| b.dist.total_cmp(&a.dist).then(b.key.cmp(&a.key)));
}

/// An iterative scan over the image: yields items by ascending distance (exact for f32
/// storage, a lower bound for f16/i8), as many as the caller asks for. Each search round is
/// re-ranked from the stored vectors; when a round is used up the next one searches twice as
/// wide (unless the order is [`ScanOrder::Off`]); once the width reaches the graph size it ends
/// with an exact pass. Orphans are ranked exactly up front and merged in, so every live item is
/// reached. The cursor itself never drops an item: dropping items of a later round that are
/// nearer than rows already returned ([`ScanOrder::Strict`]) is the caller's, which also merges
/// other sources.
#[derive(Debug, Default)]
pub struct GraphCursor {
    order: ScanOrder,
    k: usize,
    emitted: std::collections::HashSet<u64>,
    /// The current round, by descending distance (the nearest at the end).
    pending: Vec<Hit>,
    exhausted: bool,
    /// Orphans, the nearest on top; None until first used. (A heap: a scan takes a few of
    /// them, and sorting thousands per query cost more than ranking them.)
    orphans: Option<std::collections::BinaryHeap<NearestFirst>>,
    /// Search rounds run so far (for statistics).
    pub rounds: usize,
    /// Called every few hundred expanded nodes of a search (a caller's cancellation check).
    pub interrupt: Option<fn()>,
}

impl GraphCursor {
    pub fn new(order: ScanOrder) -> Self {
        GraphCursor {
            order,
            ..Default::default()
        }
    }

    /// Up to `n` more hits of the scan, in the order [`GraphCursor::peek`] and
    /// [`GraphCursor::pop`] yield them (what an index scan returns, before a strict scan's
    /// caller drops an item nearer than one already returned).
    pub fn take<B: AsRef<[u8]>>(
        &mut self,
        img: &Image<B>,
        query: &Query,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
        n: usize,
    ) -> Result<Vec<Hit>> {
        let mut out = Vec::with_capacity(n.min(1024));
        while out.len() < n {
            let Some(h) = self.peek(img, query, ef, skip)? else {
                break;
            };
            self.pop();
            out.push(h);
        }
        Ok(out)
    }

    /// The next item without consuming it.
    pub fn peek<B: AsRef<[u8]>>(
        &mut self,
        img: &Image<B>,
        query: &Query,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Option<Hit>> {
        if self.orphans.is_none() {
            // Orphans are scattered over the stored vectors: each block's vectors are touched
            // together first, so their loads are in flight at once instead of one by one.
            const BLOCK: usize = 32;
            let mut o = Vec::with_capacity(img.header.orphans);
            let mut buf = Vec::with_capacity(img.header.dims);
            let slots = img.orphan_slots()?;
            for (b, block) in slots.chunks(BLOCK).enumerate() {
                img.touch_slots(block);
                for (j, &slot) in block.iter().enumerate() {
                    let key = img.orphan_at(b * BLOCK + j);
                    if skip.is_some_and(|f| f(key)) {
                        continue;
                    }
                    o.push(NearestFirst(img.hit_at_slot(query, key, slot, &mut buf)?));
                }
            }
            self.orphans = Some(std::collections::BinaryHeap::from(o));
        }
        while self.pending.is_empty() && !self.exhausted {
            self.refill(img, query, ef, skip)?;
        }
        Ok(match self.next_from_orphans() {
            Some(true) => self.orphan_head(),
            Some(false) => self.pending.last().copied(),
            None => None,
        })
    }

    fn orphan_head(&self) -> Option<Hit> {
        self.orphans.as_ref().and_then(|o| o.peek()).map(|h| h.0)
    }

    /// Whether the next item comes from the orphans (true) or the graph (false); None at the end.
    fn next_from_orphans(&self) -> Option<bool> {
        match (self.pending.last(), self.orphan_head()) {
            (Some(g), Some(o)) => Some(o.dist < g.dist),
            (Some(_), None) => Some(false),
            (None, Some(_)) => Some(true),
            (None, None) => None,
        }
    }

    /// Consumes the item `peek` returned.
    pub fn pop(&mut self) -> Option<Hit> {
        let item = match self.next_from_orphans()? {
            true => self.orphans.as_mut().and_then(|o| o.pop()).map(|h| h.0),
            false => self.pending.pop(),
        };
        if let Some(h) = item {
            self.emitted.insert(h.key);
        }
        item
    }

    fn refill<B: AsRef<[u8]>>(
        &mut self,
        img: &Image<B>,
        query: &Query,
        ef: usize,
        skip: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<()> {
        let n = img.len();
        self.k = if self.k == 0 {
            ef.max(10)
        } else {
            self.k.saturating_mul(2)
        };
        self.rounds += 1;
        let interrupt = self.interrupt.as_ref().map(|f| f as &dyn Fn());
        let results = if self.k >= n {
            self.exhausted = true;
            let all = img.exact_all_slots(query.engine(), interrupt)?;
            match skip {
                Some(f) => all.into_iter().filter(|(k, _, _)| !f(*k)).collect(),
                None => all,
            }
        } else {
            img.search_slots(query.engine(), self.k, ef.max(self.k), skip, interrupt)?
        };
        if self.order == ScanOrder::Off {
            self.exhausted = true;
        }
        let has_orphans = img.header.orphans > 0;
        let mut hits = Vec::with_capacity(results.len());
        let mut buf = Vec::with_capacity(img.header.dims);
        for (key, _, slot) in results {
            if self.emitted.contains(&key) || has_orphans && img.is_orphan(key) {
                continue;
            }
            hits.push(img.hit_at_slot(query, key, slot, &mut buf)?);
        }
        sort_for_pop(&mut hits);
        self.pending = hits;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spill_directory_that_cannot_be_made_is_an_io_error() {
        // The build's temporary file goes to the spill directory; one that cannot be created
        // (here under a regular file) is AnnError::Io, which the extension reports as 58030
        // (53100 when the disk is full), not an internal error.
        let p = BuildParams {
            dims: 4,
            metric: Metric::Cosine,
            quantization: Quantization::F32,
            m: 8,
            ef_construction: 16,
        };
        let file = std::env::temp_dir().join(format!("tt-spill-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let mut b = ImageBuilder::new(&p, 4, 1).unwrap();
        b.add_batch(
            &[1, 2],
            &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            &mut |_| Poll::Continue,
        )
        .unwrap();
        let r = b.finish(&mut |_| Poll::Continue, Some(&file.join("sub")));
        std::fs::remove_file(&file).unwrap();
        match r {
            Err(AnnError::Io { disk_full, detail }) => {
                assert!(!disk_full);
                assert!(detail.contains("tt-spill"), "{detail}");
            }
            Err(e) => panic!("another error: {e:?}"),
            Ok(_) => panic!("the build succeeded without its spill directory"),
        }
    }

    /// An empty input builds an image that opens and answers nothing (the builder writes level
    /// 0, not usearch's -1, for an empty graph's top level).
    #[test]
    fn an_empty_build_opens_and_finds_nothing() {
        let p = BuildParams {
            dims: 8,
            metric: Metric::Cosine,
            quantization: Quantization::F32,
            m: 16,
            ef_construction: 64,
        };
        let bytes = build_image(&p, &[], &[], 2, &mut |_| Poll::Continue).unwrap();
        let img = Image::open(bytes.clone(), checksum(&bytes)).unwrap();
        assert!(img.is_empty());
        assert!(img.search(&[1.0; 8], 10, 100, None).unwrap().is_empty());
    }

    /// The self-check's early stop (`Searcher::finds_itself`: decided once the search computes
    /// the item's own distance) gives the verdict the whole search gives, item for item, at
    /// both widths, on a graph where many items are missed (few links, narrow clusters) and
    /// with exact duplicates (ties at the item's own distance).
    #[test]
    fn the_self_checks_early_stop_agrees_with_the_whole_search() {
        let dims = 24;
        let mut data = twotower_testkit::vectors::clustered(6000, dims, 40, 9);
        let dup = data[..dims].to_vec();
        for i in 0..15 {
            data[(100 + i) * dims..(101 + i) * dims].copy_from_slice(&dup);
        }
        let n = data.len() / dims;
        let keys: Vec<u64> = (0..n as u64).collect();
        let p = BuildParams {
            dims,
            metric: Metric::Cosine,
            quantization: Quantization::F32,
            m: 4,
            ef_construction: 8,
        };
        let mut b = ImageBuilder::new(&p, n, 1).unwrap().without_self_check();
        b.add_batch(&keys, &data, &mut |_| Poll::Continue).unwrap();
        let bytes = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
        let img = Image::open_verified(bytes.as_slice()).unwrap();
        let (mut found, mut missed) = (0, 0);
        for ef in SELF_CHECK_EF {
            for key in 0..n as u64 {
                let slot = img.slot_of_key(key).unwrap().unwrap() as usize;
                let mut v = Vec::new();
                img.vector_at_slot(slot as u32, &mut v).unwrap();
                let s = img.searcher(Query::new(Metric::Cosine, &v).unwrap().engine());
                let own = s.dist(slot).unwrap();
                let k = ef.max(10);
                let all = s.search(k, k, None, None).unwrap();
                let first = &all[..all.len().min(10)];
                let whole =
                    first.iter().any(|h| h.0 == key) || first.len() == 10 && first[9].1 <= own;
                assert_eq!(
                    s.finds_itself(slot, ef).unwrap(),
                    whole,
                    "item {key} at ef {ef}"
                );
                if whole {
                    found += 1;
                } else {
                    missed += 1;
                }
            }
        }
        assert!(missed > 20 && found > 20, "found {found}, missed {missed}");
    }

    /// The orphan heap pops in the order `sort_for_pop` gives `pop` (ties by key, NaN last).
    #[test]
    fn the_orphan_heap_pops_in_scan_order() {
        let mut hits = Vec::new();
        let mut x = 12345u64;
        for key in 0..500u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let dist = match x >> 60 {
                0 => f64::NAN,
                1 => 0.5,
                _ => (x >> 11) as f64 / (1u64 << 53) as f64,
            };
            hits.push(Hit {
                key: (key * 7919) % 500,
                dist,
                exact: true,
            });
        }
        let mut sorted = hits.clone();
        sort_for_pop(&mut sorted);
        let mut heap: std::collections::BinaryHeap<NearestFirst> =
            hits.into_iter().map(NearestFirst).collect();
        while let Some(want) = sorted.pop() {
            let got = heap.pop().expect("as many").0;
            assert_eq!(got.key, want.key);
            assert_eq!(got.dist.to_bits(), want.dist.to_bits());
        }
        assert!(heap.is_empty());
    }
}
