//! Where an index build's time goes: usearch insertion on 1 and 2 threads, then the orphan
//! self-search pass, on clustered synthetic vectors. `cargo run --release -p twotower-ann
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
            "graph: usearch memory_usage {} MB, peak RSS +{} MB",
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
            twotower_ann::estimate_build_memory(&params, n) >> 20
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
        return;
    }
    let only: Option<usize> = std::env::var("TT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok());
    for threads in [1usize, 2]
        .into_iter()
        .filter(|t| only.is_none_or(|o| o == *t))
    {
        let opts = usearch::IndexOptions {
            dimensions: dims,
            metric: usearch::MetricKind::Cos,
            quantization: usearch::ScalarKind::F32,
            connectivity: m,
            expansion_add: efc,
            expansion_search: 64,
            multi: false,
        };
        let index = usearch::Index::new(&opts).unwrap();
        index.reserve_capacity_and_threads(n, threads).unwrap();
        let t = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let index = &index;
                let data = &data;
                s.spawn(move || {
                    let mut i = t;
                    while i < n {
                        index
                            .add(i as u64, &data[i * dims..(i + 1) * dims])
                            .unwrap();
                        i += threads;
                    }
                });
            }
        });
        let add = t.elapsed().as_secs_f64();
        {
            let mut blob = vec![0u8; index.serialized_length()];
            index.save_to_buffer(&mut blob).unwrap();
            for w in [0u32, 1, 2, 3, 4] {
                let a = twotower_ann::graph::analyze(&blob, w).unwrap();
                println!(
                    "  in-degree <= {w}: {} weak, {} unreachable",
                    a.weak.len(),
                    a.unreachable.len()
                );
            }
        }
        if let Ok(w) = std::env::var("TT_WEAK") {
            // Recall@10 at ef=64 on held-out queries before and after re-inserting the
            // unreachable and weakly linked items one at a time.
            let w: u32 = w.parse().unwrap();
            let qs = clustered(n + 1000, dims, (n / 1000).max(1), 7).split_off(n * dims);
            let truth: Vec<Vec<u64>> = qs
                .chunks_exact(dims)
                .map(|q| {
                    let mut d: Vec<(f32, u64)> = data
                        .chunks_exact(dims)
                        .enumerate()
                        .map(|(i, v)| {
                            (twotower_ann::Metric::Cosine.engine_distance(q, v), i as u64)
                        })
                        .collect();
                    d.select_nth_unstable_by(10, |a, b| a.0.total_cmp(&b.0));
                    d[..10].iter().map(|x| x.1).collect()
                })
                .collect();
            let recall = |index: &usearch::Index| -> f64 {
                index.change_expansion_search(64);
                let mut hit = 0;
                for (q, t) in qs.chunks_exact(dims).zip(&truth) {
                    let m = index.search(q, 10).unwrap();
                    hit += m.keys.iter().filter(|k| t.contains(k)).count();
                }
                hit as f64 / (10 * truth.len()) as f64
            };
            println!("  recall@10 ef=64 before: {:.4}", recall(&index));
            let mut blob = vec![0u8; index.serialized_length()];
            index.save_to_buffer(&mut blob).unwrap();
            let a = twotower_ann::graph::analyze(&blob, w).unwrap();
            let t = Instant::now();
            // TT_SELFSEARCH=1: of the weak items, only those a search for their own vector
            // misses (ef 64, top 4); TT_SELFSEARCH=all: every item, as the old build did.
            let mode = std::env::var("TT_SELFSEARCH").unwrap_or_default();
            let candidates: Vec<u64> = match mode.as_str() {
                "all" => (0..n as u64).collect(),
                "1" => a.weak.clone(),
                _ => Vec::new(),
            };
            let mut targets: Vec<u64> = a.unreachable.clone();
            if mode.is_empty() {
                targets.extend(&a.weak);
            } else {
                index.change_expansion_search(64);
                for &k in &candidates {
                    let i = k as usize;
                    let m = index.search(&data[i * dims..(i + 1) * dims], 4).unwrap();
                    if !m.keys.contains(&k) {
                        targets.push(k);
                    }
                }
            }
            for k in &targets {
                let i = *k as usize;
                index.remove(*k).unwrap();
                index.add(*k, &data[i * dims..(i + 1) * dims]).unwrap();
            }
            println!(
                "  re-inserted {} (mode {mode:?}) in {:.1} s; recall@10 ef=64 after: {:.4}",
                targets.len(),
                t.elapsed().as_secs_f64(),
                recall(&index)
            );
            let mut blob = vec![0u8; index.serialized_length()];
            index.save_to_buffer(&mut blob).unwrap();
            let b = twotower_ann::graph::analyze(&blob, w).unwrap();
            println!(
                "  after: {} weak, {} unreachable",
                b.weak.len(),
                b.unreachable.len()
            );
            continue;
        }
        if std::env::var("TT_NO_CHECK").is_ok() {
            println!(
                "threads {threads}: add {add:.1} s ({:.0}/s)",
                n as f64 / add
            );
            continue;
        }
        let t = Instant::now();
        index.change_expansion_search(16);
        let mut lost = 0;
        for i in 0..n {
            let r = index.search(&data[i * dims..(i + 1) * dims], 1).unwrap();
            if r.keys.first() != Some(&(i as u64)) {
                lost += 1;
            }
        }
        let check = t.elapsed().as_secs_f64();
        println!(
            "threads {threads}: add {add:.1} s ({:.0}/s, {:.0} us/insert/thread); self-search ef=16 on 1 thread {check:.1} s, {lost} not first",
            n as f64 / add,
            add * 1e6 * threads as f64 / n as f64
        );
    }
}
