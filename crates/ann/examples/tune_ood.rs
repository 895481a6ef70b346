//! Query-aware tuning on synthetic out-of-distribution queries, in process (no PostgreSQL): a
//! plain graph and the same items tuned to a sample of queries, searched with held-out queries
//! at several widths. The SQL-level benchmark is bench/query_aware.py; this one is for quick
//! experiments with the tuning's options.
//!
//! `cargo run --release -p twotower-ann --example tune_ood` with TT_N (items, 200000), TT_DIMS
//! (32), TT_SAMPLE (sample queries, 2000), TT_HELD (held-out queries, 500), TT_K (100),
//! TT_EXTRA (16), TT_M (16); TT_TOPICS (0): with 0, items in n/200 clusters and queries that
//! are means of TT_PER (8) random items plus noise TT_NOISE (0.05) (queries with no shared
//! structure: the sample tells little about the others); with a topic count, a latent-topic
//! model (items around their topic's centre, users mixing one to three Zipf-drawn topics: the
//! shape of a two-tower model's users and items).

use std::time::Instant;
use twotower_ann::*;
use twotower_testkit::vectors::{clustered, mixtures};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A latent-topic model: `topics` centres; each item is its topic's centre plus noise (σ 0.35
/// per dimension); each user mixes one to three topics drawn by a Zipf law (weights random) plus
/// noise of σ `noise`. Returns items, sample users, held-out users (unit vectors, row-major).
fn latent(
    n: usize,
    dims: usize,
    topics: usize,
    ns: usize,
    nh: usize,
    noise: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    struct R(u64);
    impl R {
        fn u(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn g(&mut self) -> f32 {
            let (u1, u2) = (self.u().max(1e-12), self.u());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        }
    }
    let mut r = R(0x1234_5678_9abc_def0);
    let centres: Vec<f32> = (0..topics * dims).map(|_| r.g()).collect();
    let unit = |v: &mut Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
    };
    let mut items = Vec::with_capacity(n * dims);
    for i in 0..n {
        let t = i % topics;
        let mut v: Vec<f32> = (0..dims)
            .map(|j| centres[t * dims + j] + 0.6 * r.g())
            .collect();
        unit(&mut v);
        items.extend(v);
    }
    // Zipf over topics: P(t) ∝ 1 / (t + 1).
    let h: f64 = (1..=topics).map(|t| 1.0 / t as f64).sum();
    let users = |count: usize, r: &mut R| {
        let mut out = Vec::with_capacity(count * dims);
        for _ in 0..count {
            let parts = 1 + (r.u() * 3.0) as usize;
            let mut v = vec![0f32; dims];
            for _ in 0..parts.min(3) {
                let mut x = r.u() * h;
                let mut t = 0;
                while t + 1 < topics && x > 1.0 / (t + 1) as f64 {
                    x -= 1.0 / (t + 1) as f64;
                    t += 1;
                }
                let w = 0.5 + r.u() as f32;
                for j in 0..dims {
                    v[j] += w * centres[t * dims + j];
                }
            }
            for x in v.iter_mut() {
                *x += noise * 4.0 * r.g();
            }
            unit(&mut v);
            out.extend(v);
        }
        out
    };
    let sample = users(ns, &mut r);
    let held = users(nh, &mut r);
    (items, sample, held)
}

fn main() {
    let (n, dims, ns, nh, k, extra, per, m) = (
        env("TT_N", 200_000),
        env("TT_DIMS", 32),
        env("TT_SAMPLE", 2000),
        env("TT_HELD", 500),
        env("TT_K", 100),
        env("TT_EXTRA", 16),
        env("TT_PER", 8),
        env("TT_M", 16),
    );
    let noise: f32 = std::env::var("TT_NOISE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.05);
    let topics = env("TT_TOPICS", 0);
    let (data, sample, held) = if topics == 0 {
        let data = clustered(n, dims, (n / 200).max(10), 3);
        let sample = mixtures(&data, dims, ns, per, noise, 4);
        let held = mixtures(&data, dims, nh, per, noise, 5);
        (data, sample, held)
    } else {
        latent(n, dims, topics, ns, nh, noise)
    };
    let items: Vec<f32> = data[..nh.min(n) * dims].to_vec();
    let keys: Vec<u64> = (0..n as u64).collect();
    let p = BuildParams {
        dims,
        metric: Metric::Cosine,
        quantization: Quantization::F32,
        m,
        ef_construction: 64,
    };
    let build = |tune: Option<TuneParams>| {
        let t0 = Instant::now();
        let mut b = ImageBuilder::new(&p, n, 2).unwrap();
        for (kc, vc) in keys
            .chunks(BUILD_BATCH)
            .zip(data.chunks(BUILD_BATCH * dims))
        {
            b.add_batch(kc, vc, &mut |_| Poll::Continue).unwrap();
        }
        let built = t0.elapsed().as_secs_f64();
        let t = tune.map(|tp| b.tune(&sample, &tp, &mut |_| Poll::Continue).unwrap());
        let tuned = t0.elapsed().as_secs_f64() - built;
        let img = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
        eprintln!(
            "build {built:.1} s, tuning {tuned:.1} s, finish {:.1} s, {:?}, image {} bytes",
            t0.elapsed().as_secs_f64() - built - tuned,
            t,
            img.len()
        );
        Image::open_verified(img).unwrap()
    };
    let plain = build(None);
    let tuned = build(Some(TuneParams {
        k: env("TT_TK", k),
        ef: env("TT_TEF", 100),
        extra,
        ..TuneParams::default()
    }));
    let truth = |img: &Image<Vec<u8>>, qs: &[f32], kk: usize| -> Vec<Vec<u64>> {
        qs.chunks_exact(dims)
            .map(|q| {
                let mut all = img.exact_all(q).unwrap();
                all.sort_by(|a, b| a.1.total_cmp(&b.1));
                all.into_iter().take(kk).map(|x| x.0).collect()
            })
            .collect()
    };
    let t_held = truth(&plain, &held, k);
    let t_items = truth(&plain, &items, 10);
    let t_sample = truth(&plain, &sample[..sample.len().min(2000 * dims)], k);
    let seen: std::collections::HashSet<u64> = t_sample.iter().flatten().copied().collect();
    let covered = t_held.iter().flatten().filter(|x| seen.contains(x)).count();
    println!(
        "held-out neighbours that are some (first 2000) sample query's neighbour: {:.3} ({} distinct items in the sample's lists)",
        covered as f64 / (t_held.len() * k) as f64,
        seen.len()
    );
    println!("| queries | ef | plain recall | plain QPS | tuned recall | tuned QPS |");
    println!("|---|---|---|---|---|---|");
    let measure = |img: &Image<Vec<u8>>, qs: &[f32], tr: &[Vec<u64>], kk: usize, ef: usize| {
        let t0 = Instant::now();
        let mut hit = 0usize;
        for (q, t) in qs.chunks_exact(dims).zip(tr) {
            let got: std::collections::HashSet<u64> = img
                .search(q, kk, ef, None)
                .unwrap()
                .into_iter()
                .map(|x| x.0)
                .collect();
            hit += t.iter().filter(|x| got.contains(x)).count();
        }
        let secs = t0.elapsed().as_secs_f64();
        (hit as f64 / (tr.len() * kk) as f64, tr.len() as f64 / secs)
    };
    for ef in [100, 120, 150, 200, 250, 300, 400, 600] {
        let (rp, qp) = measure(&plain, &held, &t_held, k, ef);
        let (rt, qt) = measure(&tuned, &held, &t_held, k, ef);
        println!("| held-out users @{k} | {ef} | {rp:.4} | {qp:.0} | {rt:.4} | {qt:.0} |");
    }
    for ef in [20, 40, 100] {
        let (rp, qp) = measure(&plain, &items, &t_items, 10, ef);
        let (rt, qt) = measure(&tuned, &items, &t_items, 10, ef);
        println!("| items @10 | {ef} | {rp:.4} | {qp:.0} | {rt:.4} | {qt:.0} |");
    }
}
