//! Query-aware links (`tune.rs`): a graph tuned to a sample of out-of-distribution queries.

#[allow(dead_code)] // (the helpers the other test files use)
mod common;
use common::key_of;
use twotower_ann::*;
use twotower_testkit::vectors::{clustered, mixtures};

fn params(metric: Metric, dims: usize, m: usize, efc: usize) -> BuildParams {
    BuildParams {
        dims,
        metric,
        quantization: Quantization::F32,
        m,
        ef_construction: efc,
    }
}

/// Builds `data` (at most 10 000 rows: inserted on one thread, so repeatable) and tunes it to
/// `sample` with `threads` worker threads.
fn tuned(
    p: &BuildParams,
    data: &[f32],
    sample: Option<(&[f32], TuneParams)>,
    threads: usize,
) -> (Vec<u8>, Option<Tuning>) {
    let n = data.len() / p.dims;
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let mut b = ImageBuilder::new(p, n, threads).unwrap();
    b.add_batch(&keys, data, &mut |_| Poll::Continue).unwrap();
    let t = sample.map(|(q, tp)| b.tune(q, &tp, &mut |_| Poll::Continue).unwrap());
    let img = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
    (img, t)
}

/// Exact top-`k` (key, distance) by the image's own distances, ties by key.
fn exact(img: &Image<Vec<u8>>, q: &[f32], k: usize) -> Vec<(u64, f32)> {
    let mut all = img.exact_all(q).unwrap();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Mean recall@k of the image's search at `ef` over `queries`.
fn recall(img: &Image<Vec<u8>>, queries: &[f32], dims: usize, k: usize, ef: usize) -> f64 {
    let (mut hit, mut all) = (0usize, 0usize);
    for q in queries.chunks_exact(dims) {
        let truth: Vec<u64> = exact(img, q, k).into_iter().map(|x| x.0).collect();
        let got: std::collections::HashSet<u64> = img
            .search(q, k, ef, None)
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        hit += truth.iter().filter(|t| got.contains(t)).count();
        all += truth.len();
    }
    hit as f64 / all as f64
}

/// A case built to be hard for the plain graph: few links a node (m 4), a narrow build, tight
/// clusters, and queries that are means of items from several clusters.
fn hard_case(metric: Metric) -> (BuildParams, Vec<f32>, Vec<f32>) {
    let dims = 16;
    let data = clustered(4000, dims, 40, 7);
    let queries = mixtures(&data, dims, 150, 6, 0.05, 8);
    (params(metric, dims, 4, 8), data, queries)
}

#[test]
fn a_tuned_image_finds_the_exact_neighbours_of_every_sample_query() {
    for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
        let (p, data, queries) = hard_case(metric);
        let (k, ef) = (20, 20);
        let (plain, _) = tuned(&p, &data, None, 2);
        let plain = Image::open_verified(plain).unwrap();
        let before = recall(&plain, &queries, p.dims, k, ef);
        assert!(before < 0.97, "{metric:?}: the case is not hard ({before})");
        let tp = TuneParams {
            k,
            ef,
            extra: 8,
            rounds: 16,
        };
        let (img, t) = tuned(&p, &data, Some((&queries, tp)), 2);
        let t = t.unwrap();
        let img = Image::open_verified(img).unwrap();
        for (i, q) in queries.chunks_exact(p.dims).enumerate() {
            let want = exact(&img, q, k);
            let got = img.search(q, k, ef, None).unwrap();
            // Equal distances may come in either order: compare the distances, then the keys
            // of the distances that are not tied.
            let wd: Vec<f32> = want.iter().map(|x| x.1).collect();
            let gd: Vec<f32> = got.iter().map(|x| x.1).collect();
            assert_eq!(gd, wd, "{metric:?}: query {i} after tuning ({t:?})");
        }
        assert_eq!(t.queries as usize, queries.len() / p.dims);
        assert!(
            t.links > 0 && t.recall_before < 1.0 && t.recall_after == 1.0,
            "{t:?}"
        );
        // Recorded before the build's own relinking, which the plain image had.
        assert!(t.recall_before < 0.97, "{t:?} vs {before}");
        // The header says what was done; a plain build says nothing.
        // (The header counts the links the finish added again after its own relinking too.)
        let h = img.header().tuning.unwrap();
        assert!(
            h.links >= t.links && h.links <= t.links + t.links / 10,
            "{h:?}"
        );
        assert_eq!(
            Tuning {
                links: t.links,
                ..h
            },
            t
        );
        assert_eq!(plain.header().tuning, None);
    }
}

#[test]
fn tuning_helps_held_out_queries_and_leaves_item_queries_as_good() {
    let dims = 24;
    let data = clustered(9000, dims, 60, 11);
    let p = params(Metric::Cosine, dims, 6, 24);
    let sample = mixtures(&data, dims, 1500, 8, 0.05, 12);
    let held_out = mixtures(&data, dims, 300, 8, 0.05, 13);
    let items: Vec<f32> = clustered(9300, dims, 60, 11)[9000 * dims..].to_vec();
    let (k, ef) = (50, 50);
    let (plain, _) = tuned(&p, &data, None, 2);
    let tp = TuneParams {
        k,
        ef,
        extra: 12,
        rounds: 3,
    };
    let (img, t) = tuned(&p, &data, Some((&sample, tp)), 2);
    let (plain, img) = (
        Image::open_verified(plain).unwrap(),
        Image::open_verified(img).unwrap(),
    );
    let (b, a) = (
        recall(&plain, &held_out, dims, k, ef),
        recall(&img, &held_out, dims, k, ef),
    );
    // Held-out users: fewer of their nearest items missed (at least a third fewer).
    assert!(
        1.0 - a <= (1.0 - b) * 0.67,
        "held out: {b:.4} -> {a:.4} ({t:?})"
    );
    // Items asking for their neighbours (in distribution): no worse.
    let (ib, ia) = (
        recall(&plain, &items, dims, 10, 32),
        recall(&img, &items, dims, 10, 32),
    );
    assert!(ia >= ib - 0.002, "items: {ib:.4} -> {ia:.4}");
}

#[test]
fn tuning_is_the_same_on_one_thread_or_two_and_keeps_every_old_link() {
    let (p, data, queries) = hard_case(Metric::Cosine);
    let tp = TuneParams {
        k: 20,
        ef: 20,
        extra: 8,
        rounds: 4,
    };
    let (a, ta) = tuned(&p, &data, Some((&queries, tp)), 1);
    let (b, tb) = tuned(&p, &data, Some((&queries, tp)), 2);
    assert_eq!(ta, tb);
    assert!(
        a == b,
        "the tuned images differ between one and two threads"
    );
    // Links are only added: every plain link is still there.
    let n = data.len() / p.dims;
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let mut plain = ImageBuilder::new(&p, n, 1).unwrap();
    plain
        .add_batch(&keys, &data, &mut |_| Poll::Continue)
        .unwrap();
    let mut tuned_b = ImageBuilder::new(&p, n, 1).unwrap();
    tuned_b
        .add_batch(&keys, &data, &mut |_| Poll::Continue)
        .unwrap();
    tuned_b
        .tune(&queries, &tp, &mut |_| Poll::Continue)
        .unwrap();
    let mut added = 0;
    for &key in &keys {
        let before = plain.links_of(key).unwrap();
        let after = tuned_b.links_of(key).unwrap();
        assert!(
            before.iter().all(|x| after.contains(x)),
            "a link of {key} was lost"
        );
        assert!(after.len() <= 2 * p.m + tp.extra);
        added += after.len() - before.len();
    }
    assert_eq!(added as u64, ta.unwrap().links);
    // Tuned once only.
    assert!(tuned_b
        .tune(&queries, &tp, &mut |_| Poll::Continue)
        .is_err());
}

#[test]
fn tuning_answers_a_cancel_and_refuses_bad_queries_and_options() {
    let (p, data, queries) = hard_case(Metric::L2);
    let n = data.len() / p.dims;
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let fresh = || {
        let mut b = ImageBuilder::new(&p, n, 2).unwrap();
        b.add_batch(&keys, &data, &mut |_| Poll::Continue).unwrap();
        b
    };
    let tp = TuneParams::default();
    let r = fresh().tune(&queries, &tp, &mut |_| Poll::Cancel);
    assert!(matches!(r, Err(AnnError::Cancelled)), "{r:?}");
    let mut nan = queries[..p.dims].to_vec();
    nan[3] = f32::NAN;
    assert!(matches!(
        fresh().tune(&nan, &tp, &mut |_| Poll::Continue),
        Err(AnnError::NonFinite { .. })
    ));
    assert!(matches!(
        fresh().tune(&queries[..p.dims + 1], &tp, &mut |_| Poll::Continue),
        Err(AnnError::DimensionMismatch { .. })
    ));
    for bad in [
        TuneParams { k: 0, ..tp },
        TuneParams { ef: 0, ..tp },
        TuneParams { extra: 257, ..tp },
        TuneParams { rounds: 0, ..tp },
    ] {
        assert!(matches!(
            fresh().tune(&queries, &bad, &mut |_| Poll::Continue),
            Err(AnnError::InvalidOption { .. })
        ));
    }
    // An empty sample tunes nothing and says so.
    let mut b = fresh();
    let t = b.tune(&[], &tp, &mut |_| Poll::Continue).unwrap();
    assert_eq!((t.queries, t.links), (0, 0));
    let img = b.finish(&mut |_| Poll::Continue, None).unwrap().into_vec();
    assert_eq!(Header::parse(&img).unwrap().tuning, None);
}
