//! Our search engine over the stored graph: the same answers as usearch's search of the same
//! graph, images of the previous format, and damaged images (errors, never crashes).

mod common;
use common::{build, key_of};
use twotower_ann::*;
use twotower_testkit::vectors::clustered;

/// usearch's own index over the image's graph (a copy), as the reference.
fn usearch_of(img: &Image<Vec<u8>>) -> usearch::Index {
    let h = img.header();
    let opts = usearch::IndexOptions {
        dimensions: h.dims,
        metric: match h.metric {
            Metric::Cosine => usearch::MetricKind::Cos,
            Metric::InnerProduct => usearch::MetricKind::IP,
            Metric::L2 => usearch::MetricKind::L2sq,
        },
        quantization: match h.quantization {
            Quantization::F32 => usearch::ScalarKind::F32,
            Quantization::F16 => usearch::ScalarKind::F16,
            Quantization::I8 => usearch::ScalarKind::I8,
        },
        connectivity: h.m,
        expansion_add: 64,
        expansion_search: 64,
        multi: false,
    };
    let idx = usearch::Index::new(&opts).unwrap();
    idx.load_from_buffer(img.graph_bytes()).unwrap();
    idx
}

fn exact_topk(metric: Metric, data: &[f32], dims: usize, q: &[f32], k: usize) -> Vec<u64> {
    let mut d: Vec<(f64, u64)> = data
        .chunks_exact(dims)
        .enumerate()
        .map(|(i, v)| (metric.sql_distance(q, v), key_of(i)))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    d.into_iter().take(k).map(|x| x.1).collect()
}

#[test]
fn our_search_matches_usearch_on_the_same_graph() {
    let (n, dims) = (6_000, 32);
    let mut data = clustered(n + 100, dims, 30, 21);
    let queries = data.split_off(n * dims);
    for (metric, q) in [
        (Metric::Cosine, Quantization::F32),
        (Metric::Cosine, Quantization::F16),
        (Metric::Cosine, Quantization::I8),
        (Metric::InnerProduct, Quantization::F32),
        (Metric::L2, Quantization::F32),
        (Metric::L2, Quantization::F16),
    ] {
        let bytes = build(metric, q, &data, dims, 2);
        let img = Image::open(bytes.clone(), checksum(&bytes)).unwrap();
        assert_eq!(img.header().version, 2);
        let us = usearch_of(&img);
        // Stored vectors decode as usearch decodes them.
        for i in (0..n).step_by(97) {
            let mut theirs = vec![0f32; dims];
            us.get(key_of(i), &mut theirs).unwrap();
            let ours = img.vector(key_of(i)).unwrap().unwrap();
            let diff: Vec<(usize, f32, f32)> = ours
                .iter()
                .zip(&theirs)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(j, (a, b))| (j, *a, *b))
                .collect();
            assert!(diff.is_empty(), "{metric:?}/{q:?} item {i}: {diff:?}");
        }
        for ef in [16usize, 64] {
            us.change_expansion_search(ef);
            let (mut ours_hit, mut theirs_hit, mut same) = (0usize, 0usize, 0usize);
            for qv in queries.chunks_exact(dims) {
                let engine = Query::new(metric, qv).unwrap();
                let truth = exact_topk(metric, &data, dims, qv, 10);
                let ours: Vec<u64> = img
                    .search(engine.engine(), 10, ef, None)
                    .unwrap()
                    .into_iter()
                    .map(|x| x.0)
                    .collect();
                let theirs = us.search(engine.engine(), 10).unwrap().keys;
                ours_hit += truth.iter().filter(|t| ours.contains(t)).count();
                theirs_hit += truth.iter().filter(|t| theirs.contains(t)).count();
                same += ours.iter().filter(|t| theirs.contains(t)).count();
            }
            let total = (queries.len() / dims * 10) as f64;
            let (ro, rt, overlap) = (
                ours_hit as f64 / total,
                theirs_hit as f64 / total,
                same as f64 / total,
            );
            eprintln!("{metric:?}/{q:?} ef={ef}: recall@10 ours {ro:.4} usearch {rt:.4}, overlap {overlap:.4}");
            assert!(
                ro >= rt - 0.002,
                "{metric:?}/{q:?} ef={ef}: ours {ro} < usearch {rt}"
            );
            assert!(
                overlap >= 0.97,
                "{metric:?}/{q:?} ef={ef}: overlap {overlap}"
            );
        }
    }
}

#[test]
fn filtered_search_walks_through_skipped_items() {
    let (n, dims) = (4_000, 16);
    let data = clustered(n, dims, 10, 4);
    let bytes = build(Metric::L2, Quantization::F32, &data, dims, 1);
    let img = Image::open(bytes.clone(), checksum(&bytes)).unwrap();
    // Keep 2 % of the items: the search must find the nearest kept ones (walking through the
    // skipped), as an exact pass over the kept items ranks them.
    let kept = |k: u64| k % 50 == 7;
    let skip = |k: u64| !kept(k);
    let mut hit = 0;
    for qi in 0..20 {
        let qv = &data[qi * 37 * dims..(qi * 37 + 1) * dims];
        let got: Vec<u64> = img
            .search(qv, 5, 400, Some(&skip))
            .unwrap()
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert!(got.iter().all(|k| kept(*k)), "a skipped item was returned");
        let mut truth: Vec<(f64, u64)> = (0..n)
            .filter(|i| kept(key_of(*i)))
            .map(|i| {
                (
                    Metric::L2.sql_distance(qv, &data[i * dims..(i + 1) * dims]),
                    key_of(i),
                )
            })
            .collect();
        truth.sort_by(|a, b| a.0.total_cmp(&b.0));
        hit += truth.iter().take(5).filter(|t| got.contains(&t.1)).count();
    }
    assert!(hit >= 98, "filtered recall {hit} of 100");
    // The interrupt hook is called during a long search (and may stop it by unwinding).
    let calls = std::cell::Cell::new(0);
    let f = || calls.set(calls.get() + 1);
    let none = |_k: u64| true;
    assert!(img
        .search_with(&data[0..dims], 5, 64, Some(&none), Some(&f))
        .unwrap()
        .is_empty());
    assert!(
        calls.get() >= 10,
        "interrupt called {} times over a whole-graph walk",
        calls.get()
    );
}

/// The same image in format 1 (before the navigation tables were stored): header of 64 bytes,
/// keys, orphans, padding to 64 bytes, graph.
fn to_format1(b: &[u8]) -> Vec<u8> {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let count = u64_at(32);
    let (keys_off, us_off, us_len) = (u64_at(40), u64_at(48), u64_at(56));
    let orphans = u64_at(keys_off + count * 8);
    let mut out = b[0..64].to_vec();
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    out[12..16].copy_from_slice(&64u32.to_le_bytes());
    out.extend_from_slice(&b[keys_off..keys_off + count * 8 + 8 + orphans * 8]);
    while !out.len().is_multiple_of(64) {
        out.push(0);
    }
    let new_us = out.len();
    out[40..48].copy_from_slice(&64u64.to_le_bytes());
    out[48..56].copy_from_slice(&(new_us as u64).to_le_bytes());
    out.extend_from_slice(&b[us_off..us_off + us_len]);
    out
}

#[test]
fn format_1_images_open_and_search_alike() {
    let (n, dims) = (3_000, 16);
    let data = clustered(n, dims, 10, 8);
    for q in [Quantization::F32, Quantization::I8] {
        let v2 = build(Metric::Cosine, q, &data, dims, 1);
        let v1 = to_format1(&v2);
        let a = Image::open(v2.clone(), checksum(&v2)).unwrap();
        let b = Image::open(v1.clone(), checksum(&v1)).unwrap();
        assert_eq!((a.header().version, b.header().version), (2, 1));
        assert_eq!(a.len(), b.len());
        let b2 = Image::open_verified(v1.clone()).unwrap();
        for qi in 0..30 {
            let qv = &data[qi * 91 * dims..(qi * 91 + 1) * dims];
            let ra = a.search(qv, 10, 40, None).unwrap();
            assert_eq!(ra, b.search(qv, 10, 40, None).unwrap());
            assert_eq!(ra, b2.search(qv, 10, 40, None).unwrap());
        }
        for i in (0..n).step_by(101) {
            assert_eq!(a.vector(key_of(i)).unwrap(), b.vector(key_of(i)).unwrap());
        }
        // A format 1 image can still be extended by a fold.
        if q == Quantization::F32 {
            let p = BuildParams {
                dims,
                metric: Metric::Cosine,
                quantization: q,
                m: 16,
                ef_construction: 64,
            };
            let mut ext = ImageBuilder::from_image(&p, &b, 1, 1).unwrap();
            ext.add_batch(&[u64::MAX - 1], &data[0..dims], &mut |_| Poll::Continue)
                .unwrap();
            let out = ext
                .finish(&mut |_| Poll::Continue, None)
                .unwrap()
                .into_vec();
            let img = Image::open(out.clone(), checksum(&out)).unwrap();
            assert_eq!((img.header().version, img.len()), (2, n + 1));
        }
    }
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Exercises every read path of `img`; errors are fine, panics are not.
fn use_image(img: &Image<Vec<u8>>, data: &[f32], dims: usize) {
    let q = Query::new(Metric::Cosine, &data[0..dims]).unwrap();
    let _ = img.search(q.engine(), 10, 32, None);
    let skip = |k: u64| k.is_multiple_of(3);
    let _ = img.search(q.engine(), 10, 32, Some(&skip));
    let _ = img.exact_all(q.engine());
    let _ = img.vector(key_of(5));
    let _ = img.unreachable();
    let mut cur = GraphCursor::new(ScanOrder::Strict);
    for _ in 0..15 {
        match cur.peek(img, &q, 8, None) {
            Ok(Some(_)) => {
                cur.pop();
            }
            _ => break,
        }
    }
}

#[test]
fn damaged_images_give_errors_never_crashes() {
    let (n, dims) = (600, 8);
    let data = clustered(n, dims, 5, 2);
    let bytes = build(Metric::Cosine, Quantization::F32, &data, dims, 1);
    let sum = checksum(&bytes);
    let good = Image::open(bytes.clone(), sum).unwrap();
    let graph_at = bytes.len() - good.graph_bytes().len();
    drop(good);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut opened = [0usize; 2];
    for round in 0..3_000 {
        let mut b = bytes.clone();
        // Damage the header, the tables, the graph's head or anywhere, 1 to 8 bytes.
        for _ in 0..1 + rng.below(8) {
            let at = match round % 4 {
                0 => rng.below(128),
                1 => 128 + rng.below(graph_at - 128),
                2 => {
                    graph_at + n * dims * 4 + rng.below(200.min(b.len() - graph_at - n * dims * 4))
                }
                _ => rng.below(b.len()),
            };
            b[at] = (rng.next() & 0xff) as u8;
        }
        // With a matching checksum, the open's checks see it...
        let s = checksum(&b);
        if let Ok(img) = Image::open(b.clone(), s) {
            opened[0] += 1;
            use_image(&img, &data, dims);
        }
        // ... and as a file changed after it was verified, only the reads' bounds checks do.
        if let Ok(img) = Image::open_verified(b.clone()) {
            opened[1] += 1;
            use_image(&img, &data, dims);
        }
    }
    // Truncated and extended.
    for len in [0, 7, 64, 127, 128, 500, graph_at, bytes.len() - 1] {
        let t = bytes[..len].to_vec();
        assert!(
            Image::open_verified(t.clone()).is_err(),
            "truncated to {len} bytes was accepted"
        );
        assert!(Image::open(t.clone(), checksum(&t)).is_err());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Image::open_verified(longer).is_err());
    eprintln!(
        "damaged images opened: verified {} of 3000, unverified {} of 3000",
        opened[0], opened[1]
    );
    // Many damaged bytes change only vectors or links: some must still open and be read.
    assert!(opened[1] > 100, "the fuzzing never reached the read paths");
}

#[test]
fn low_connectivity_graphs_search_without_errors() {
    // m = 4 and ef_construction = 8 (the smallest a user may pick): a greedy descent over the
    // upper levels must only follow lists that exist.
    let (n, dims) = (4_000, 32);
    let data = clustered(n, dims, 1, 5);
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    for m in [2usize, 4] {
        let p = BuildParams {
            dims,
            metric: Metric::L2,
            quantization: Quantization::F32,
            m,
            ef_construction: 8,
        };
        let bytes = build_image(&p, &keys, &data, 2, &mut |_| Poll::Continue).unwrap();
        let img = Image::open(bytes.clone(), checksum(&bytes)).unwrap();
        for qi in 0..50 {
            let qv = &data[qi * 13 * dims..(qi * 13 + 1) * dims];
            for ef in [1usize, 10, 100] {
                img.search(qv, 10, ef, None)
                    .unwrap_or_else(|e| panic!("m={m} ef={ef}: {e}"));
            }
        }
    }
}

#[test]
fn images_of_every_small_size_open() {
    // The sections' padding differs with the item and orphan counts: every layout must parse.
    let dims = 4;
    let data = clustered(300, dims, 3, 6);
    for n in (1..=80).chain([127, 128, 129, 255, 256, 300]) {
        for (metric, q) in [
            (Metric::L2, Quantization::F32),
            (Metric::Cosine, Quantization::F16),
            (Metric::Cosine, Quantization::I8),
        ] {
            let bytes = build(metric, q, &data[..n * dims], dims, 1);
            let img = Image::open(bytes.clone(), checksum(&bytes))
                .unwrap_or_else(|e| panic!("n={n} {q:?}: {e}"));
            Image::open_verified(bytes).unwrap();
            assert_eq!(
                img.search(&data[0..dims], 3, 10, None).unwrap().len(),
                n.min(3)
            );
        }
    }
}

#[test]
fn headers_of_every_section_padding_parse() {
    // The writer's layout for every item and orphan count: the navigation tables end right
    // where the padding before the graph starts (found by a 4000-item m = 4 index whose tables
    // ended on a 64-byte boundary).
    let pad = |x: usize, a: usize| x.div_ceil(a) * a;
    for count in 1..200usize {
        for orphans in 0..6usize.min(count + 1) {
            let nav_off = pad(128 + count * 8 + 8 + orphans * 8, 8);
            let nav_len = pad(count * 4, 8) + count * 12;
            let us_off = pad(nav_off + nav_len, 64);
            let mut b = vec![0u8; us_off + 64];
            b[0..8].copy_from_slice(b"TTHNSW01");
            let put = |b: &mut Vec<u8>, at: usize, v: u64, w: usize| {
                b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w])
            };
            for (at, v, w) in [
                (8, 2, 4),
                (12, 128, 4),
                (16, 4, 4),
                (20, 1, 4),
                (24, 1, 4),
                (28, 16, 4),
                (32, count as u64, 8),
                (40, 128, 8),
                (48, us_off as u64, 8),
                (56, 64, 8),
                (64, nav_off as u64, 8),
                ((128 + count * 8) as u64 as usize, orphans as u64, 8),
            ] {
                put(&mut b, at, v, w);
            }
            let h = Header::parse(&b)
                .unwrap_or_else(|e| panic!("count {count}, orphans {orphans}: {e}"));
            assert_eq!((h.count, h.orphans), (count, orphans));
        }
    }
}
