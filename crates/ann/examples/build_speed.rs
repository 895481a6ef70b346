//! Where an index build's time goes, on clustered synthetic vectors: our builder against
//! usearch's (default), the whole image build (TT_FULL=1), the streamed build's memory
//! (TT_STREAM=<dir>). `cargo run --release -p twotower-ann
//! --example build_speed -- [n] [dims] [m] [efc]`.
use std::time::Instant;
use twotower_testkit::vectors::clustered;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let n = *a.first().unwrap_or(&100_000);
    let dims = *a.get(1).unwrap_or(&64);
    let m = *a.get(2).unwrap_or(&16);
    let efc = *a.get(3).unwrap_or(&64);
    let data = clustered(n, dims, (n / 1000).max(1), 7);
    if let Ok(dir) = std::env::var("TT_STREAM") {
        // The streamed build CREATE INDEX runs (batches, spill directory); prints the resident
        // memory it added beside the input, to check estimate_build_memory against.
        let params = twotower_ann::BuildParams {
            dims,
            metric: twotower_ann::Metric::Cosine,
            quantization: twotower_ann::Quantization::F32,
            m,
            ef_construction: efc,
        };
        let rss = || -> usize {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
            l.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
                * 1024
        };
        let before = rss();
        let keys: Vec<u64> = (1..=n as u64).collect();
        let t = Instant::now();
        let mut b = twotower_ann::ImageBuilder::new(&params, n, 2).unwrap();
        let bs = twotower_ann::BUILD_BATCH;
        for (k, v) in keys.chunks(bs).zip(data.chunks(bs * dims)) {
            b.add_batch(k, v, &mut |_| twotower_ann::Poll::Continue)
                .unwrap();
        }
        println!(
            "graph: {} MB held, peak RSS +{} MB",
            b.graph_memory() >> 20,
            (rss() - before) >> 20
        );
        let img = b
            .finish(
                &mut |_| twotower_ann::Poll::Continue,
                Some(std::path::Path::new(&dir)),
            )
            .unwrap();
        println!(
            "streamed build: {:.1} s, {} bytes; peak RSS +{} MB beside the input; estimate {} MB",
            t.elapsed().as_secs_f64(),
            img.as_ref().len(),
            (rss() - before) >> 20,
            twotower_ann::estimate_build_memory(&params, n, 2, true) >> 20
        );
        return;
    }
    if std::env::var("TT_FULL").is_ok() {
        // The whole image build as CREATE INDEX runs it (warm-up, parallel insertion, orphan
        // search and re-insertion, serialization), on 2 threads.
        let params = twotower_ann::BuildParams {
            dims,
            metric: twotower_ann::Metric::Cosine,
            quantization: twotower_ann::Quantization::F32,
            m,
            ef_construction: efc,
        };
        let keys: Vec<u64> = (1..=n as u64).collect();
        let t = Instant::now();
        let mut last = (Instant::now(), 0usize);
        let img = twotower_ann::build_image(&params, &keys, &data, 2, &mut |d| {
            if d < last.1 {
                println!(
                    "  phase change at {:.1} s (progress {} -> {d})",
                    t.elapsed().as_secs_f64(),
                    last.1
                );
            }
            last = (Instant::now(), d);
            twotower_ann::Poll::Continue
        })
        .unwrap();
        let h = twotower_ann::Header::parse(&img).unwrap();
        println!(
            "build_image: {:.1} s, {} bytes, {} orphans",
            t.elapsed().as_secs_f64(),
            img.len(),
            h.orphans
        );
        if std::env::var("TT_VERIFY").is_ok() {
            // As the core test multithreaded_build_matches_single_threaded_and_reaches_every_node
            // checks at 20,000 items: a scan for each item's own vector at one of the
            // self-check's widths yields it among its first 10.
            let sum = twotower_ann::checksum(&img);
            let img = twotower_ann::Image::open(&img[..], sum).unwrap();
            let first_ten = |v: &[f32], ef: usize| -> Vec<u64> {
                let query = twotower_ann::Query::new(twotower_ann::Metric::Cosine, v).unwrap();
                twotower_ann::GraphCursor::new(twotower_ann::ScanOrder::Relaxed)
                    .take(&img, &query, ef, None, 10)
                    .unwrap()
                    .iter()
                    .map(|h| h.key)
                    .collect()
            };
            let missing = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for part in 0..2 {
                    let (data, first_ten, missing) = (&data, &first_ten, &missing);
                    s.spawn(move || {
                        for (i, v) in data.chunks_exact(dims).enumerate().skip(part).step_by(2) {
                            if !twotower_ann::SELF_CHECK_EF
                                .iter()
                                .any(|&ef| first_ten(v, ef).contains(&(i as u64 + 1)))
                            {
                                missing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            println!(
                "verified: {} of {n} items not found by their own vector at {:?}",
                missing.into_inner(),
                twotower_ann::SELF_CHECK_EF
            );
        }
        return;
    }
    // Our builder against usearch's, on 2 threads: insertion time, level-0 in-degrees, and
    // what usearch's own search finds in each graph (recall@10 at ef 64 on held-out queries; an
    // item's own vector in the first 10 at ef 16), so the graphs are compared by one searcher.
    let opts = usearch::IndexOptions {
        dimensions: dims,
        metric: usearch::MetricKind::Cos,
        quantization: usearch::ScalarKind::F32,
        connectivity: m,
        expansion_add: efc,
        expansion_search: 64,
        multi: false,
    };
    let qs = clustered(n + 1000, dims, (n / 1000).max(1), 7).split_off(n * dims);
    let truth: Vec<Vec<u64>> = qs
        .chunks_exact(dims)
        .map(|q| {
            let mut d: Vec<(f32, u64)> = data
                .chunks_exact(dims)
                .enumerate()
                .map(|(i, v)| (twotower_ann::Metric::Cosine.engine_distance(q, v), i as u64))
                .collect();
            d.select_nth_unstable_by(10, |a, b| a.0.total_cmp(&b.0));
            d[..10].iter().map(|x| x.1).collect()
        })
        .collect();
    let report = |name: &str, index: &usearch::Index, secs: f64| {
        let mut blob = vec![0u8; index.serialized_length()];
        index.save_to_buffer(&mut blob).unwrap();
        // Mean level-0 and level-1 out-degree, and nodes per level (graph.rs's layout).
        let rows = u32::from_le_bytes(blob[0..4].try_into().unwrap()) as usize;
        let rb = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
        let at = 8 + rows * rb + 64;
        let word = |i: usize| {
            u64::from_le_bytes(blob[at + 8 * i..at + 8 * i + 8].try_into().unwrap()) as usize
        };
        let (size, conn, base) = (word(0), word(1), word(2));
        let mut node = at + 40 + 2 * size;
        let (mut deg0, mut deg1, mut n1) = (0usize, 0usize, 0usize);
        let mut per_level = [0usize; 8];
        for _ in 0..size {
            let level = i16::from_le_bytes(blob[node + 8..node + 10].try_into().unwrap()) as usize;
            per_level[level.min(7)] += 1;
            deg0 += u32::from_le_bytes(blob[node + 10..node + 14].try_into().unwrap()) as usize;
            if level >= 1 {
                let l1 = node + 14 + 4 * base;
                deg1 += u32::from_le_bytes(blob[l1..l1 + 4].try_into().unwrap()) as usize;
                n1 += 1;
            }
            node += 10 + 4 + 4 * base + level * (4 + 4 * conn);
        }
        println!(
            "  {name}: mean out-degree level 0 {:.2}, level 1 {:.2}; nodes per level {per_level:?}",
            deg0 as f64 / size as f64,
            deg1 as f64 / n1.max(1) as f64
        );
        let weak: Vec<usize> = [0u32, 1, 2]
            .iter()
            .map(|w| twotower_ann::graph::analyze(&blob, *w).unwrap().weak.len())
            .collect();
        index.change_expansion_search(64);
        let mut hit = 0;
        for (q, t) in qs.chunks_exact(dims).zip(&truth) {
            let r = index.search(q, 10).unwrap();
            hit += r.keys.iter().filter(|k| t.contains(k)).count();
        }
        let sample = n.min(20_000);
        let mut missed = [0usize; 2];
        for (j, ef) in [16usize, 256].into_iter().enumerate() {
            index.change_expansion_search(ef);
            for i in (0..n).step_by((n / sample).max(1)) {
                let r = index.search(&data[i * dims..(i + 1) * dims], 10).unwrap();
                if !r.keys.contains(&(i as u64)) {
                    missed[j] += 1;
                }
            }
        }
        println!(
            "{name}: insertion {secs:.1} s; in-degree 0/<=1/<=2: {weak:?}; recall@10 ef 64 {:.4}; own vector missed at ef 16, 256: {missed:?} of {sample}",
            hit as f64 / (10 * truth.len()) as f64
        );
    };
    if std::env::var("TT_ONLY_OURS").is_err() {
        let index = usearch::Index::new(&opts).unwrap();
        index.reserve_capacity_and_threads(n, 2).unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            for t in 0..2 {
                let (index, data) = (&index, &data);
                s.spawn(move || {
                    let mut i = t;
                    while i < n {
                        index
                            .add(i as u64, &data[i * dims..(i + 1) * dims])
                            .unwrap();
                        i += 2;
                    }
                });
            }
        });
        report("usearch", &index, t.elapsed().as_secs_f64());
    }
    {
        let params = twotower_ann::BuildParams {
            dims,
            metric: twotower_ann::Metric::Cosine,
            quantization: twotower_ann::Quantization::F32,
            m,
            ef_construction: efc,
        };
        let keys: Vec<u64> = (0..n as u64).collect();
        let t = Instant::now();
        let threads = std::env::var("TT_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(2);
        let mut b = twotower_ann::ImageBuilder::new(&params, n, threads).unwrap();
        b.add_batch(&keys, &data, &mut |_| twotower_ann::Poll::Continue)
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let img = b
            .without_self_check()
            .finish(&mut |_| twotower_ann::Poll::Continue, None)
            .unwrap();
        let img = twotower_ann::Image::open_verified(img).unwrap();
        let index = usearch::Index::new(&opts).unwrap();
        index.load_from_buffer(img.graph_bytes()).unwrap();
        report("ours", &index, secs);
    }
}
