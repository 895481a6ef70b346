//! Recall and robustness of the image on clustered synthetic data.

mod common;
use common::{build, key_of};
use twotower_ann::*;
use twotower_testkit::vectors::clustered;

/// `n` base vectors and `nq` held-out queries drawn from the same clusters.
fn split(n: usize, nq: usize, dims: usize, clusters: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut all = clustered(n + nq, dims, clusters, seed);
    let q = all.split_off(n * dims);
    (all, q)
}

fn exact_topk(metric: Metric, data: &[f32], dims: usize, q: &[f32], k: usize) -> Vec<u64> {
    let mut d: Vec<(f32, u64)> = data
        .chunks_exact(dims)
        .enumerate()
        .map(|(i, v)| (metric.engine_distance(q, v), key_of(i)))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    d.into_iter().take(k).map(|x| x.1).collect()
}

fn recall_at(
    img: &Image<Vec<u8>>,
    metric: Metric,
    data: &[f32],
    dims: usize,
    queries: &[f32],
    k: usize,
    ef: usize,
) -> f64 {
    let mut hit = 0usize;
    let nq = queries.len() / dims;
    for q in queries.chunks_exact(dims) {
        let truth = exact_topk(metric, data, dims, q, k);
        let got: std::collections::HashSet<u64> = img
            .search(q, k, ef, None)
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        hit += truth.iter().filter(|t| got.contains(t)).count();
    }
    hit as f64 / (nq * k) as f64
}

#[test]
fn recall_100k_by_64_at_default_settings() {
    let (n, dims) = (
        std::env::var("TT_N")
            .map(|s| s.parse().unwrap())
            .unwrap_or(100_000),
        64,
    );
    let (data, queries) = split(n, 200, dims, 100, 7);
    let bytes = build(Metric::Cosine, Quantization::F32, &data, dims, 2);
    let sum = checksum(&bytes);
    let img = Image::open(bytes, sum).unwrap();
    assert_eq!(img.len(), n);
    for ef in [64, 128, 256] {
        eprintln!(
            "ef={ef} recall@10 = {:.4}",
            recall_at(&img, Metric::Cosine, &data, dims, &queries, 10, ef)
        );
    }
    let r10 = recall_at(&img, Metric::Cosine, &data, dims, &queries, 10, 64);
    eprintln!("recall@10 (ef_search=64) = {r10:.4}");
    assert!(r10 >= 0.95, "recall@10 = {r10}");
}

#[test]
fn multithreaded_build_matches_single_threaded_and_reaches_every_node() {
    // usearch issue #735 reports nodes left unreachable under concurrent insertion. We check that
    // in a two-thread build no item is lost (every item the stored graph cannot reach is in the
    // orphan list that scans rank exactly), that a scan for each item's own vector at one of
    // the build's self-check widths finds it among its first 10 (every one: the build's
    // self-check lists what its searches miss as orphans, so this holds whatever the threads'
    // interleaving), and that it keeps the recall of a one-thread build.
    let (n, dims) = (20_000, 32);
    let (data, queries) = split(n, 200, dims, 50, 11);
    let mut recalls = Vec::new();
    for threads in [1, 2] {
        let bytes = build(Metric::Cosine, Quantization::F32, &data, dims, threads);
        let sum = checksum(&bytes);
        let img = Image::open(bytes, sum).unwrap();
        let unreachable = img.unreachable().expect("the stored graph is walkable");
        for k in &unreachable {
            assert!(
                img.is_orphan(*k),
                "item {k} is unreachable and not in the orphan list"
            );
        }
        // A scan for each item's own vector yields it among its first 10 at one of the
        // self-check's widths, through the graph or through the orphan list.
        let first_ten = |v: &[f32], ef: usize| -> Vec<u64> {
            let query = Query::new(Metric::Cosine, v).unwrap();
            GraphCursor::new(ScanOrder::Relaxed)
                .take(&img, &query, ef, None, 10)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect()
        };
        let mut missing = 0;
        for (i, v) in data.chunks_exact(dims).enumerate() {
            if !SELF_CHECK_EF
                .iter()
                .any(|&ef| first_ten(v, ef).contains(&key_of(i)))
            {
                missing += 1;
            }
        }
        eprintln!(
            "threads={threads}: {} orphans kept; {missing} of {n} items not found by their own vector",
            img.header().orphans
        );
        assert_eq!(missing, 0, "items not found by their own vector");
        recalls.push(recall_at(
            &img,
            Metric::Cosine,
            &data,
            dims,
            &queries,
            10,
            64,
        ));
    }
    eprintln!("recall@10 single={:.4} multi={:.4}", recalls[0], recalls[1]);
    assert!(
        recalls[1] >= recalls[0] - 0.01,
        "multi-threaded recall {} < single {}",
        recalls[1],
        recalls[0]
    );
}

#[test]
fn every_metric_and_quantization() {
    let (n, dims) = (3_000, 16);
    let (data, queries) = split(n, 50, dims, 20, 3);
    for (metric, q, min) in [
        (Metric::Cosine, Quantization::F32, 0.95),
        (Metric::Cosine, Quantization::F16, 0.95),
        // Re-ranked from the stored vectors, i8 meets the f32 bar too.
        (Metric::Cosine, Quantization::I8, 0.95),
        (Metric::InnerProduct, Quantization::F32, 0.95),
        (Metric::L2, Quantization::F32, 0.95),
        (Metric::L2, Quantization::F16, 0.95),
    ] {
        let bytes = build(metric, q, &data, dims, 2);
        let sum = checksum(&bytes);
        let img = Image::open(bytes, sum).unwrap();
        // What a scan returns: the candidates re-ranked by their stored vectors.
        let mut hit = 0usize;
        for qv in queries.chunks_exact(dims) {
            let truth = exact_topk(metric, &data, dims, qv, 10);
            let query = Query::new(metric, qv).unwrap();
            let got: Vec<u64> = scan_topk(&img, &query, ScanOrder::Strict, 64, 10, None)
                .into_iter()
                .map(|h| h.key)
                .collect();
            hit += truth.iter().filter(|t| got.contains(t)).count();
        }
        let r = hit as f64 / (queries.len() / dims * 10) as f64;
        eprintln!("{metric:?}/{q:?}: recall@10 = {r:.4}");
        assert!(r >= min, "{metric:?}/{q:?} recall {r}");
    }
}

#[test]
fn cursor_yields_everything_once_in_near_order_and_skips() {
    let (n, dims) = (2_000, 8);
    let data = clustered(n, dims, 10, 5);
    let bytes = build(Metric::L2, Quantization::F32, &data, dims, 2);
    let sum = checksum(&bytes);
    let img = Image::open(bytes, sum).unwrap();
    let dead: std::collections::HashSet<u64> = (0..n).step_by(3).map(key_of).collect();
    let skip = |k: u64| dead.contains(&k);
    let mut cur = GraphCursor::new(ScanOrder::Relaxed);
    let q = Query::new(Metric::L2, &data[0..dims]).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut first = Vec::new();
    while let Some(Hit {
        key: k, dist: d, ..
    }) = cur.peek(&img, &q, 40, Some(&skip)).unwrap()
    {
        cur.pop();
        assert!(!dead.contains(&k), "a skipped key was returned");
        assert!(seen.insert(k), "key returned twice");
        if first.len() < 10 {
            first.push(d);
        }
    }
    assert_eq!(
        seen.len(),
        n - dead.len(),
        "the cursor must reach every live item"
    );
    assert!(first.windows(2).all(|w| w[0] <= w[1]));
    assert!(cur.rounds >= 2);
}

/// The top `k` of an ordered scan as a caller applying `order` sees it: in strict order an
/// item nearer than one already returned is dropped.
fn scan_topk(
    img: &Image<Vec<u8>>,
    q: &Query,
    order: ScanOrder,
    ef: usize,
    k: usize,
    skip: Option<&dyn Fn(u64) -> bool>,
) -> Vec<Hit> {
    let mut cur = GraphCursor::new(order);
    let mut out: Vec<Hit> = Vec::new();
    while out.len() < k {
        let Some(h) = cur.peek(img, q, ef, skip).unwrap() else {
            break;
        };
        cur.pop();
        if order == ScanOrder::Strict && out.last().is_some_and(|l| h.dist < l.dist) {
            continue;
        }
        out.push(h);
    }
    out
}

/// f32 storage gives exact distances (the SQL operator's value, bit for bit); f16 and i8 give
/// lower bounds that hold for every item; a strict scan whose filter forces several widening
/// rounds returns a non-decreasing sequence while a relaxed one may not.
#[test]
fn scan_distances_are_exact_or_lower_bounds_and_strict_order_holds() {
    let (n, dims) = (6_000, 24);
    let data = clustered(n, dims, 30, 21);
    let vec_of = |key: u64| {
        let i = (key >> 16) as usize * 100 + (key & 0xffff) as usize - 1;
        &data[i * dims..(i + 1) * dims]
    };
    for (metric, quant) in [
        (Metric::Cosine, Quantization::F32),
        (Metric::Cosine, Quantization::F16),
        (Metric::Cosine, Quantization::I8),
        (Metric::InnerProduct, Quantization::F32),
        (Metric::InnerProduct, Quantization::F16),
        (Metric::L2, Quantization::F32),
        (Metric::L2, Quantization::F16),
    ] {
        let bytes = build(metric, quant, &data, dims, 2);
        let sum = checksum(&bytes);
        let img = Image::open(bytes, sum).unwrap();
        // Keep 1 item in 20: the scan has to widen several times.
        let skip = |k: u64| (k & 0xffff) % 20 != 7;
        let mut inversions_relaxed = 0usize;
        for qi in 0..30 {
            let q = Query::new(metric, &data[qi * 97 * dims..(qi * 97 + 1) * dims]).unwrap();
            for order in [ScanOrder::Strict, ScanOrder::Relaxed] {
                let hits = scan_topk(&img, &q, order, 10, 60, Some(&skip));
                for h in &hits {
                    let exact = metric.sql_distance(q.raw(), vec_of(h.key));
                    if quant == Quantization::F32 {
                        assert!(
                            h.exact && h.dist == exact,
                            "{metric:?}/{quant:?}: {} vs {exact}",
                            h.dist
                        );
                    } else {
                        assert!(
                            !h.exact && h.dist <= exact,
                            "{metric:?}/{quant:?}: bound {} > exact {exact}",
                            h.dist
                        );
                    }
                }
                let inv = hits.windows(2).filter(|w| w[1].dist < w[0].dist).count();
                match order {
                    ScanOrder::Strict => {
                        assert_eq!(inv, 0, "{metric:?}/{quant:?}: strict order inverted")
                    }
                    _ => inversions_relaxed += inv,
                }
            }
        }
        eprintln!("{metric:?}/{quant:?}: {inversions_relaxed} inversions in relaxed order");
        // The filter really forces widening rounds that find nearer items: the strict check
        // above is not vacuous.
        assert!(
            inversions_relaxed > 0,
            "{metric:?}/{quant:?}: relaxed order never inverted"
        );
    }
}

/// `off` runs one search and stops: at most max(ef, 10) graph items.
#[test]
fn scan_order_off_does_not_widen() {
    let data = clustered(3_000, 8, 10, 4);
    let bytes = build(Metric::L2, Quantization::F32, &data, 8, 1);
    let sum = checksum(&bytes);
    let img = Image::open(bytes, sum).unwrap();
    let q = Query::new(Metric::L2, &data[0..8]).unwrap();
    let off = scan_topk(&img, &q, ScanOrder::Off, 40, 1000, None);
    assert!(
        off.len() <= 40 + img.header().orphans,
        "{} items",
        off.len()
    );
    let relaxed = scan_topk(&img, &q, ScanOrder::Relaxed, 40, 1000, None);
    assert_eq!(relaxed.len(), 1000);
}

#[test]
fn corrupt_images_are_rejected_not_crashed_on() {
    let data = clustered(500, 8, 5, 9);
    let bytes = build(Metric::Cosine, Quantization::F32, &data, 8, 1);
    let sum = checksum(&bytes);
    // Wrong checksum.
    assert!(matches!(
        Image::open(bytes.clone(), sum ^ 1),
        Err(AnnError::CorruptImage(_))
    ));
    // Flipped byte with a matching checksum: the header check catches it.
    let mut b = bytes.clone();
    b[17] ^= 0x40;
    let s = checksum(&b);
    assert!(Image::open(b, s).is_err());
    // Truncated.
    let t = bytes[..bytes.len() / 2].to_vec();
    let s = checksum(&t);
    assert!(Image::open(t, s).is_err());
    // Wrong query length never reaches usearch.
    let img = Image::open(bytes, sum).unwrap();
    assert!(matches!(
        img.search(&[1.0; 7], 5, 10, None),
        Err(AnnError::DimensionMismatch { .. })
    ));
    assert!(matches!(
        img.search(&[f32::NAN; 8], 5, 10, None),
        Err(AnnError::NonFinite { .. })
    ));
}

#[test]
fn build_is_cancellable_and_rejects_bad_input() {
    let data = clustered(50_000, 32, 10, 1);
    let keys: Vec<u64> = (0..50_000).map(key_of).collect();
    let p = BuildParams {
        dims: 32,
        metric: Metric::Cosine,
        quantization: Quantization::F32,
        m: 16,
        ef_construction: 64,
    };
    // Cancellation latency: from the poll that answers Cancel to the build's return (usually a
    // few ms: a chunk of 64 insertions and one 20 ms poll). The bound is relative to the work a
    // cancel saves, measured in the same run, so a loaded machine stretches both: the rest of
    // the build, at the rate of its first items, would take about `rest`; a cancel must land
    // in a tenth of that, or in 1 s, whichever is longer.
    let started = std::time::Instant::now();
    let mut asked: Option<(std::time::Instant, usize)> = None;
    let r = build_image(&p, &keys, &data, 2, &mut |done| {
        if done > 1000 {
            asked.get_or_insert_with(|| (std::time::Instant::now(), done));
            Poll::Cancel
        } else {
            Poll::Continue
        }
    });
    assert_eq!(r.err(), Some(AnnError::Cancelled));
    let (at, done) = asked.expect("the build polled past 1000 items");
    let latency = at.elapsed();
    let rest = at
        .duration_since(started)
        .mul_f64((keys.len() - done) as f64 / done as f64);
    let bound = (rest / 10).max(std::time::Duration::from_secs(1));
    eprintln!("cancel after {done} items: returned in {latency:?}; the rest of the build would take about {rest:?}");
    assert!(
        latency < bound,
        "cancel took {latency:?}, more than {bound:?}"
    );
    let mut bad = data[..3200].to_vec();
    bad[100] = f32::NAN;
    let r = build_image(&p, &keys[..100], &bad, 2, &mut |_| Poll::Continue);
    assert!(matches!(r, Err(AnnError::NonFinite { .. })));
    let bad_p = BuildParams {
        quantization: Quantization::I8,
        metric: Metric::L2,
        ..p
    };
    assert!(
        build_image(&bad_p, &keys[..100], &data[..3200], 1, &mut |_| {
            Poll::Continue
        })
        .is_err()
    );
}

/// The graph walk agrees with search: every item it calls unreachable is missed even by a very
/// wide search for its own vector, and a raw parallel build (no re-insertion) is walked without
/// falling back.
#[test]
fn graph_walk_finds_exactly_what_no_search_reaches() {
    let dims = 32;
    let n = 60_000;
    let data = clustered(n, dims, 60, 11);
    let opts = usearch::IndexOptions {
        dimensions: dims,
        metric: usearch::MetricKind::Cos,
        quantization: usearch::ScalarKind::F32,
        connectivity: 8,
        expansion_add: 32,
        expansion_search: 64,
        multi: false,
    };
    let index = usearch::Index::new(&opts).unwrap();
    index.reserve_capacity_and_threads(n, 2).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (index, data) = (&index, &data);
            s.spawn(move || {
                for i in (t..n).step_by(2) {
                    index
                        .add(i as u64, &data[i * dims..(i + 1) * dims])
                        .unwrap();
                }
            });
        }
    });
    let mut blob = vec![0u8; index.serialized_length()];
    index.save_to_buffer(&mut blob).unwrap();
    let lost = twotower_ann::graph::unreachable_keys(&blob).expect("known layout");
    index.change_expansion_search(2000);
    for &k in &lost {
        let i = k as usize;
        let m = index.search(&data[i * dims..(i + 1) * dims], 200).unwrap();
        assert!(
            !m.keys.contains(&k),
            "item {k} is reached by a search but the walk says it is not"
        );
    }
    // And the walk does not flag reachable items wholesale: nearly every item is reached.
    assert!(lost.len() < n / 20, "{} of {n} unreachable", lost.len());
    // A damaged buffer is refused, not misread.
    assert!(twotower_ann::graph::unreachable_keys(&blob[..blob.len() - 1]).is_none());
    assert!(twotower_ann::graph::unreachable_keys(&blob[..100]).is_none());
    eprintln!(
        "raw parallel build: {} of {n} items unreachable",
        lost.len()
    );
}

/// A build fed in batches (as CREATE INDEX streams its heap scan) through a spill directory
/// gives the same quality as one call; the f32 input is not kept, the temporary files are gone,
/// and the memory estimate covers what the graph really takes, without overshooting.
#[test]
fn streamed_build_spills_and_stays_within_its_estimate() {
    let dims = 64;
    let (data, queries) = split(50_000, 100, dims, 50, 11);
    let n = data.len() / dims;
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let spill = std::env::temp_dir().join(format!("tt-spill-{}", std::process::id()));
    for quantization in [Quantization::F32, Quantization::F16] {
        let p = BuildParams {
            dims,
            metric: Metric::Cosine,
            quantization,
            m: 16,
            ef_construction: 64,
        };
        // Capacity deliberately too small: the builder grows.
        let mut b = ImageBuilder::new(&p, 10_000, 2).expect("builder");
        for (k, v) in keys
            .chunks(BUILD_BATCH)
            .zip(data.chunks(BUILD_BATCH * dims))
        {
            b.add_batch(k, v, &mut |_| Poll::Continue).expect("batch");
        }
        assert_eq!(b.len(), n);
        let estimate = estimate_build_memory(&p, n, 2, true);
        // What the graph holds (f32 input, links, keys: the builder's own count), plus what
        // the finish adds beside it (two threads' visited stamps, the keys in slot order and
        // sorted): a lower bound of the peak the estimate must cover (RSS measured by the
        // build_speed example with TT_STREAM).
        let held = b.graph_memory() + n * (2 * 4 + 2 * 8);
        let bytes = b
            .finish(&mut |_| Poll::Continue, Some(&spill))
            .expect("finish");
        assert!(
            estimate >= held,
            "{quantization:?}: estimate {estimate} below the {held} bytes held"
        );
        assert!(
            estimate <= held * 2,
            "{quantization:?}: estimate {estimate} far above the {held} bytes held"
        );
        assert!(matches!(bytes, ImageBytes::Map(_)), "spilled to a file");
        let left: Vec<_> = std::fs::read_dir(&spill).unwrap().collect();
        assert!(
            left.is_empty(),
            "temporary files are unlinked at once: {left:?}"
        );
        let v = bytes.into_vec();
        let img = Image::open(v.clone(), checksum(&v)).expect("valid image");
        let r = recall_at(&img, Metric::Cosine, &data, dims, &queries, 10, 100);
        assert!(r >= 0.95, "{quantization:?}: recall@10 {r}");
    }
    let _ = std::fs::remove_dir_all(&spill);
}

/// Cosine, f32, M 16, ef_construction 64: what a fold builds.
fn cosine_f32(dims: usize) -> BuildParams {
    BuildParams {
        dims,
        metric: Metric::Cosine,
        quantization: Quantization::F32,
        m: 16,
        ef_construction: 64,
    }
}

#[test]
fn an_image_extended_in_place_holds_old_and_new_items_and_finds_them() {
    let dims = 32;
    let (data, queries) = split(12_000, 100, dims, 40, 17);
    let (old, new) = data.split_at(8_000 * dims);
    let p = cosine_f32(dims);
    let old_keys: Vec<u64> = (0..8_000).map(key_of).collect();
    let first =
        Image::open_verified(build_image(&p, &old_keys, old, 2, &mut |_| Poll::Continue).unwrap())
            .unwrap();
    let mut b = ImageBuilder::from_image(&p, &first, 4_000, 2).unwrap();
    assert_eq!(b.len(), 8_000);
    let new_keys: Vec<u64> = (8_000..12_000).map(key_of).collect();
    b.add_batch(&new_keys, new, &mut |_| Poll::Continue)
        .unwrap();
    let bytes = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
    let img = Image::open(bytes.clone(), checksum(&bytes)).unwrap();
    assert_eq!(img.len(), 12_000);
    // Every item keeps its exact vector, old and new.
    for i in [0usize, 4_321, 7_999, 8_000, 11_999] {
        assert_eq!(
            img.vector(key_of(i)).unwrap().unwrap(),
            data[i * dims..(i + 1) * dims].to_vec()
        );
    }
    assert!(img
        .unreachable()
        .is_some_and(|u| u.iter().all(|k| img.is_orphan(*k))));
    let r = recall_at(&img, Metric::Cosine, &data, dims, &queries, 10, 64);
    assert!(r >= 0.95, "recall@10 of the extended image {r}");
    // Only f32 images of the same shape can be extended.
    let q8 = BuildParams {
        quantization: Quantization::I8,
        ..p
    };
    assert!(ImageBuilder::from_image(&q8, &first, 10, 1).is_err());
    let other = BuildParams { dims: 16, ..p };
    assert!(ImageBuilder::from_image(&other, &first, 10, 1).is_err());
}

/// What a fold changes, section by section (`segment_cuts`): a store that writes the extended
/// image over the pages of the old one logs only what differs. Old items' vectors, keys (new
/// rows' keys sort last) and node records keep their offsets within their sections; of the node
/// records only the neighbour lists the new items joined change.
#[test]
fn a_fold_keeps_the_old_bytes_of_each_section_in_place() {
    let dims = 64;
    let (data, _) = split(8_256, 1, dims, 40, 23);
    let (old, new) = data.split_at(8_000 * dims);
    let p = cosine_f32(dims);
    let old_keys: Vec<u64> = (0..8_000).map(key_of).collect();
    let first = build_image(&p, &old_keys, old, 2, &mut |_| Poll::Continue).unwrap();
    let a = Image::open_verified(first.clone()).unwrap();
    let mut b = ImageBuilder::from_image(&p, &a, 256, 2)
        .unwrap()
        .without_self_check();
    let new_keys: Vec<u64> = (8_000..8_256).map(key_of).collect();
    b.add_batch(&new_keys, new, &mut |_| Poll::Continue)
        .unwrap();
    let second = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
    let (ca, cb) = (segment_cuts(&first), segment_cuts(&second));
    assert_eq!(ca.len(), 7, "{ca:?}");
    assert_eq!(cb.len(), 7, "{cb:?}");
    let section = |img: &[u8], cuts: &[usize], s: usize| -> Vec<u8> {
        let start = if s == 0 { 0 } else { cuts[s - 1] };
        let end = cuts.get(s).copied().unwrap_or(img.len());
        img[start..end].to_vec()
    };
    let mut changed_total = 0usize;
    for s in 0..8 {
        let (x, y) = (section(&first, &ca, s), section(&second, &cb, s));
        assert!(y.len() >= x.len(), "section {s} shrank");
        let changed = x.iter().zip(&y).filter(|(p, q)| p != q).count();
        eprintln!(
            "section {s}: {} -> {} bytes, {changed} of the old bytes changed",
            x.len(),
            y.len()
        );
        changed_total += changed + (y.len() - x.len());
        // The header's count in section 0; the keys, the key-to-slot table, the stored
        // vectors: appended to (new keys sort last here); the node offsets all move by the
        // level table's growth (two bytes of each change).
        match s {
            0 => assert!(changed <= 8, "header and keys: {changed}"),
            2 | 5 => assert_eq!(changed, 0, "section {s}"),
            _ => {}
        }
        if s == 7 {
            assert!(
                changed * 5 < x.len(),
                "node records: {changed} of {} bytes changed",
                x.len()
            );
        }
    }
    // All in all, far less than the image changed.
    assert!(
        changed_total * 3 < second.len(),
        "{changed_total} of {} bytes",
        second.len()
    );
}

/// A cosine build that gives up its f16 copy of the unit vectors half-way (a memory budget that
/// cannot hold it) frees that copy and keeps the recall of a build that kept it.
#[test]
fn a_build_without_its_f16_copy_keeps_its_recall() {
    let (n, dims) = (20_000, 32);
    let (data, queries) = split(n, 200, dims, 50, 13);
    let p = BuildParams {
        dims,
        metric: Metric::Cosine,
        quantization: Quantization::F32,
        m: 16,
        ef_construction: 64,
    };
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let mut recalls = Vec::new();
    for drop_half_way in [false, true] {
        let mut b = ImageBuilder::new(&p, n, 2).unwrap();
        let half = n / 2;
        b.add_batch(&keys[..half], &data[..half * dims], &mut |_| Poll::Continue)
            .unwrap();
        if drop_half_way {
            let before = b.graph_memory();
            b.drop_unit_copy();
            assert!(
                before - b.graph_memory() >= half * dims * 2,
                "the copy's memory is freed"
            );
        }
        b.add_batch(&keys[half..], &data[half * dims..], &mut |_| Poll::Continue)
            .unwrap();
        let bytes = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
        let sum = checksum(&bytes);
        let img = Image::open(bytes, sum).unwrap();
        assert_eq!(img.len(), n);
        recalls.push(recall_at(
            &img,
            Metric::Cosine,
            &data,
            dims,
            &queries,
            10,
            64,
        ));
    }
    eprintln!(
        "recall@10 at ef 64 with the copy {:.4}, without from half-way {:.4}",
        recalls[0], recalls[1]
    );
    assert!(recalls[1] >= 0.95, "{recalls:?}");
    assert!(recalls[1] >= recalls[0] - 0.01, "{recalls:?}");
}
