//! The index image: a self-describing byte container holding the sorted item keys and the
//! serialized usearch HNSW graph. The extension stores it in the index's WAL-logged pages and
//! materializes it as a cache file that every backend maps read-only.
//!
//! Layout (all integers little-endian):
//! ```text
//! 0   magic "TTHNSW01"
//! 8   format version u32, header length u32
//! 16  dims u32, metric u32, quantization u32, connectivity u32
//! 32  count u64
//! 40  keys offset u64, usearch offset u64, usearch length u64
//! 64  keys: count × u64, ascending
//! ..  orphans: orphan count u64, then that many u64 keys, ascending
//! ..  padding to a 64-byte boundary
//! ..  usearch image
//! ```
//!
//! Orphans are items the graph search cannot reach (concurrent insertion — usearch issue #735 —
//! can leave a node with no path from the entry point). The build finds them by walking the
//! graph's edges from the entry point (`graph.rs`; by searching every item's own vector if the
//! serialized layout were ever unknown), re-inserts them one at a time, and scans rank whatever
//! is left exactly, so every item stays findable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{AnnError, Result};
use crate::metric::{validate_vector, Metric, Quantization};

pub const MAGIC: &[u8; 8] = b"TTHNSW01";
pub const FORMAT_VERSION: u32 = 1;
/// Items inserted on one thread before the parallel insertion starts.
const WARM_UP_ITEMS: usize = 10_000;
const HEADER_LEN: usize = 64;

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

    fn options(&self) -> usearch::IndexOptions {
        usearch::IndexOptions {
            dimensions: self.dims,
            metric: self.metric.usearch(),
            quantization: self.quantization.usearch(),
            connectivity: self.m,
            expansion_add: self.ef_construction,
            expansion_search: 64,
            multi: false,
        }
    }
}

/// Estimated peak memory of building an image of `n` vectors, in bytes: the input vectors,
/// the in-memory graph, and the serialized copy.
pub fn estimate_build_memory(p: &BuildParams, n: usize) -> usize {
    let vectors_in = n * p.dims * 4;
    let per_node = p.dims * p.quantization.bytes_per_scalar() + (2 * p.m + p.m / 2) * 4 + 64;
    let graph = n * per_node;
    graph + vectors_in.max(graph + n * 8)
}

/// What the build loop tells the caller's poll function, and what the poll function answers.
pub enum Poll {
    Continue,
    Cancel,
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
    let index = usearch::Index::new(&params.options())?;
    let threads = threads.clamp(1, 64);
    index.reserve_capacity_and_threads(n.max(1), threads)?;
    // The first items go in on one thread: while the graph is small, concurrent insertions link
    // to each other and leave islands no search reaches (usearch issue #735).
    let warm = n.min(WARM_UP_ITEMS);
    let first: Vec<usize> = (0..warm).collect();
    let rest: Vec<usize> = (warm..n).collect();
    let add = &|i: usize| -> Result<bool> {
        let v = &vectors[i * params.dims..(i + 1) * params.dims];
        validate_vector(v, Some(params.dims))?;
        index.add(keys[i], v)?;
        Ok(false)
    };
    parallel(&first, 1, poll, add)?;
    parallel(&rest, threads, &mut |d| poll(warm + d), add)?;
    let pos: std::collections::HashMap<u64, usize> =
        keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    // Items no search can reach: read from the graph's edges when its layout is the known one
    // (one walk over the edges), otherwise found by searching every item's own vector. The walk
    // also names the weakly linked items; of those, the ones a search for their own vector
    // misses are re-inserted too (a small, consistent recall gain for about 1 % more time).
    let lost = |only: Option<&[usize]>,
                poll: &mut dyn FnMut(usize) -> Poll|
     -> Result<(Vec<u64>, Vec<usize>)> {
        if let Some(a) = analyze_graph(&index)? {
            let unreachable = a.unreachable.into_iter().filter(|k| pos.contains_key(k)).collect();
            let weak: Vec<usize> = a.weak.iter().filter_map(|k| pos.get(k).copied()).collect();
            return Ok((unreachable, weak));
        }
        Ok((find_orphans(params, keys, vectors, &index, threads, poll, only)?, Vec::new()))
    };
    let (mut orphans, weak) = lost(None, poll)?;
    index.change_expansion_search(64);
    let hard = parallel(&weak, threads, poll, |i| {
        let m = index.search(&vectors[i * params.dims..(i + 1) * params.dims], 4)?;
        Ok(!m.keys.contains(&keys[i]))
    })?;
    if !orphans.is_empty() || !hard.is_empty() {
        // Re-insert the unreachable and hard-to-find items one at a time: a lone insertion
        // links a node properly. Whatever is still unreachable after that stays in the orphan
        // list.
        let mut again: Vec<usize> = orphans.iter().filter_map(|k| pos.get(k).copied()).collect();
        again.extend(hard);
        again.sort_unstable();
        again.dedup();
        for &i in &again {
            index.remove(keys[i])?;
        }
        parallel(&again, 1, poll, add)?;
        orphans = lost(Some(&again), poll)?.0;
    }
    poll(n);
    serialize(params, keys, &orphans, &index)
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
    const CHUNK: usize = 64;
    let n = items.len();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let cancel = AtomicBool::new(false);
    let failure: Mutex<Option<AnnError>> = Mutex::new(None);
    let flagged: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut local = Vec::new();
                'work: while !cancel.load(Ordering::Relaxed) {
                    let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                    if start >= n {
                        break;
                    }
                    let end = (start + CHUNK).min(n);
                    for &i in &items[start..end] {
                        match f(i) {
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

/// Level-0 in-links at or below which an item counts as weakly linked.
const WEAK_IN_LINKS: u32 = 4;

/// Unreachable and weakly linked keys, from the serialized graph's edges (see `graph.rs`);
/// `None` when the serialized layout is not the one that module reads.
fn analyze_graph(index: &usearch::Index) -> Result<Option<crate::graph::Analysis>> {
    let mut blob = vec![0u8; index.serialized_length()];
    index.save_to_buffer(&mut blob)?;
    Ok(crate::graph::analyze(&blob, WEAK_IN_LINKS))
}

/// Items the graph cannot reach: a search for their own vector does not return them, even a wide
/// one (4 × ef_construction, at least 256). Cheap searches over every item come first; the wide
/// one only sees the few they missed. All passes run on the worker threads.
fn find_orphans(
    params: &BuildParams,
    keys: &[u64],
    vectors: &[f32],
    index: &usearch::Index,
    threads: usize,
    poll: &mut dyn FnMut(usize) -> Poll,
    only: Option<&[usize]>,
) -> Result<Vec<u64>> {
    let finds_itself = |i: usize, k: usize| -> Result<bool> {
        let m = index.search(&vectors[i * params.dims..(i + 1) * params.dims], k)?;
        // Found, or tied at distance zero with a full page of exact duplicates: reachable.
        Ok(m.keys.contains(&keys[i])
            || (m.keys.len() == k && m.distances.last().is_some_and(|d| *d <= 0.0)))
    };
    // Each pass re-checks only what the previous, cheaper one missed.
    let mut suspects: Vec<usize> = match only {
        Some(items) => items.to_vec(),
        None => (0..keys.len()).collect(),
    };
    let wide = (params.ef_construction * 4).max(256);
    for (ef, k) in [(16, 1), (64, 4), (wide, 16)] {
        if suspects.is_empty() {
            break;
        }
        index.change_expansion_search(ef);
        suspects = parallel(&suspects, threads, poll, |i| Ok(!finds_itself(i, k)?))?;
    }
    let lost = suspects;
    let mut orphans: Vec<u64> = lost.into_iter().map(|i| keys[i]).collect();
    orphans.sort_unstable();
    Ok(orphans)
}

fn align64(x: usize) -> usize {
    (x + 63) & !63
}

fn serialize(
    params: &BuildParams,
    keys: &[u64],
    orphans: &[u64],
    index: &usearch::Index,
) -> Result<Vec<u8>> {
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(AnnError::Engine("duplicate item key in build input".into()));
    }
    let keys_off = HEADER_LEN;
    let orphans_off = keys_off + sorted.len() * 8;
    let us_off = align64(orphans_off + 8 + orphans.len() * 8);
    let us_len = index.serialized_length();
    let mut buf = vec![0u8; us_off + us_len];
    buf[0..8].copy_from_slice(MAGIC);
    put_u32(&mut buf, 8, FORMAT_VERSION);
    put_u32(&mut buf, 12, HEADER_LEN as u32);
    put_u32(&mut buf, 16, params.dims as u32);
    put_u32(&mut buf, 20, params.metric.code());
    put_u32(&mut buf, 24, params.quantization.code());
    put_u32(&mut buf, 28, params.m as u32);
    put_u64(&mut buf, 32, sorted.len() as u64);
    put_u64(&mut buf, 40, keys_off as u64);
    put_u64(&mut buf, 48, us_off as u64);
    put_u64(&mut buf, 56, us_len as u64);
    for (i, k) in sorted.iter().enumerate() {
        put_u64(&mut buf, keys_off + i * 8, *k);
    }
    put_u64(&mut buf, orphans_off, orphans.len() as u64);
    for (i, k) in orphans.iter().enumerate() {
        put_u64(&mut buf, orphans_off + 8 + i * 8, *k);
    }
    index.save_to_buffer(&mut buf[us_off..])?;
    Ok(buf)
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

/// Parsed header of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
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
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        let bad = |m: &str| AnnError::CorruptImage(m.to_string());
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        if get_u32(b, 8) != FORMAT_VERSION || get_u32(b, 12) as usize != HEADER_LEN {
            return Err(bad("unsupported format version"));
        }
        let metric = Metric::from_code(get_u32(b, 20)).ok_or_else(|| bad("unknown metric"))?;
        let quantization =
            Quantization::from_code(get_u32(b, 24)).ok_or_else(|| bad("unknown quantization"))?;
        let mut h = Header {
            dims: get_u32(b, 16) as usize,
            metric,
            quantization,
            m: get_u32(b, 28) as usize,
            count: get_u64(b, 32) as usize,
            orphans: 0,
            keys_off: get_u64(b, 40) as usize,
            us_off: get_u64(b, 48) as usize,
            us_len: get_u64(b, 56) as usize,
        };
        let keys_end = h
            .count
            .checked_mul(8)
            .and_then(|x| x.checked_add(h.keys_off));
        let us_end = h.us_off.checked_add(h.us_len);
        match (keys_end, us_end) {
            (Some(ke), Some(ue))
                if h.keys_off >= HEADER_LEN
                    && ke + 8 <= h.us_off
                    && ue == b.len()
                    && h.dims > 0 =>
            {
                h.orphans = get_u64(b, ke) as usize;
                match h.orphans.checked_mul(8).and_then(|x| x.checked_add(ke + 8)) {
                    Some(oe) if oe <= h.us_off && h.orphans <= h.count => Ok(h),
                    _ => Err(bad("orphan section exceeds its bounds")),
                }
            }
            _ => Err(bad("section bounds do not match the image length")),
        }
    }
}

/// A verified image whose graph is viewed in place (no copy) from `B`.
pub struct Image<B: AsRef<[u8]>> {
    // Field order matters: the usearch view must be dropped before the bytes it points into.
    index: usearch::Index,
    header: Header,
    bytes: B,
}

impl<B: AsRef<[u8]>> Image<B> {
    /// Verifies `bytes` against `expected_checksum` and views the graph in place.
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
        if keys
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] >= w[1])
        {
            return Err(AnnError::CorruptImage(
                "item keys are not strictly ascending".into(),
            ));
        }
        Self::view(bytes, header)
    }

    /// Views bytes that [`Image::open`] verified earlier (the caller vouches that they have not
    /// changed since: see the extension's verified-file marker). Only the header is checked.
    pub fn open_verified(bytes: B) -> Result<Self> {
        let header = Header::parse(bytes.as_ref())?;
        Self::view(bytes, header)
    }

    fn view(bytes: B, header: Header) -> Result<Self> {
        let b = bytes.as_ref();
        let params = BuildParams {
            dims: header.dims,
            metric: header.metric,
            quantization: header.quantization,
            m: header.m.max(2),
            ef_construction: 64,
        };
        let index = usearch::Index::new(&params.options())?;
        let graph = &b[header.us_off..header.us_off + header.us_len];
        // SAFETY: `graph` borrows from `bytes`, which this struct owns and drops after `index`
        // (field order); the checksum (now or when the bytes were first verified) guarantees
        // they are the ones usearch wrote.
        unsafe { index.view_from_buffer(graph)? };
        if index.size() != header.count || index.dimensions() != header.dims {
            return Err(AnnError::CorruptImage(
                "graph size or dimensions differ from the header".into(),
            ));
        }
        Ok(Image {
            index,
            header,
            bytes,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Keys of the items no graph search can reach (walking the stored graph from its entry
    /// point); `None` if the stored graph's layout is not the one `graph.rs` reads. Every one
    /// of them must be in the orphan list.
    pub fn unreachable(&self) -> Option<Vec<u64>> {
        let b = self.bytes.as_ref();
        crate::graph::unreachable_keys(&b[self.header.us_off..self.header.us_off + self.header.us_len])
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
        validate_vector(query, Some(self.header.dims))?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        self.index.change_expansion_search(ef.max(k).max(1));
        let m = match skip {
            None => self.index.search(query, k)?,
            Some(f) => self.index.filtered_search(query, k, |key| !f(key))?,
        };
        Ok(m.keys.into_iter().zip(m.distances).collect())
    }

    /// Every item, exactly ranked by the engine distance (brute force).
    pub fn exact_all(&self, query: &[f32]) -> Result<Vec<(u64, f32)>> {
        validate_vector(query, Some(self.header.dims))?;
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let m = self.index.exact_search(query, self.header.count)?;
        Ok(m.keys.into_iter().zip(m.distances).collect())
    }

    /// The stored (possibly quantized, then decoded) vector of `key`.
    pub fn vector(&self, key: u64) -> Result<Option<Vec<f32>>> {
        let mut out = vec![0f32; self.header.dims];
        let n = self.index.get(key, &mut out)?;
        Ok(if n == 0 { None } else { Some(out) })
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
        Ok(Query {
            metric,
            norm: crate::inner_product(v, v).sqrt(),
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
    /// The distance the SQL operator of the metric returns for `v` (bit for bit).
    pub fn distance(&self, v: &[f32]) -> f64 {
        self.metric.sql_distance(&self.raw, v)
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
            Quantization::F16 => sn * (1.0 / 1024.0) * (1.0 + 1.0 / 1024.0) + dims.sqrt() / 16_777_216.0,
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

impl<B: AsRef<[u8]>> Image<B> {
    /// The scan item for `key`, ranked from its stored vector.
    pub fn hit(&self, q: &Query, key: u64) -> Result<Option<Hit>> {
        let Some(v) = self.vector(key)? else {
            return Ok(None);
        };
        let quant = self.header.quantization;
        Ok(Some(Hit {
            key,
            dist: q.lower_bound(quant, &v),
            exact: quant == Quantization::F32,
        }))
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
    /// Orphans by descending distance (nearest at the end); None until first used.
    orphans: Option<Vec<Hit>>,
    /// Search rounds run so far (for statistics).
    pub rounds: usize,
}

impl GraphCursor {
    pub fn new(order: ScanOrder) -> Self {
        GraphCursor {
            order,
            ..Default::default()
        }
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
            let mut o = Vec::with_capacity(img.header.orphans);
            for i in 0..img.header.orphans {
                let key = img.orphan_at(i);
                if skip.is_some_and(|f| f(key)) {
                    continue;
                }
                if let Some(h) = img.hit(query, key)? {
                    o.push(h);
                }
            }
            sort_for_pop(&mut o);
            self.orphans = Some(o);
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
        self.orphans.as_ref().and_then(|o| o.last()).copied()
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
            true => self.orphans.as_mut().and_then(|o| o.pop()),
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
        let results = if self.k >= n {
            self.exhausted = true;
            let all = img.exact_all(query.engine())?;
            match skip {
                Some(f) => all.into_iter().filter(|(k, _)| !f(*k)).collect(),
                None => all,
            }
        } else {
            img.search(query.engine(), self.k, ef.max(self.k), skip)?
        };
        if self.order == ScanOrder::Off {
            self.exhausted = true;
        }
        let has_orphans = img.header.orphans > 0;
        let mut hits = Vec::with_capacity(results.len());
        for (key, _) in results {
            if self.emitted.contains(&key) || has_orphans && img.is_orphan(key) {
                continue;
            }
            if let Some(h) = img.hit(query, key)? {
                hits.push(h);
            }
        }
        sort_for_pop(&mut hits);
        self.pending = hits;
        Ok(())
    }
}
