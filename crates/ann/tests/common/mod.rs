//! Helpers the core's integration tests share.

use twotower_ann::*;

/// Keys look like heap TIDs: block << 16 | offset.
pub fn key_of(i: usize) -> u64 {
    (((i / 100) as u64) << 16) | ((i % 100) as u64 + 1)
}

/// An image of `data` (row-major, `dims` wide) keyed by [`key_of`], at M 16 and
/// ef_construction 64.
pub fn build(
    metric: Metric,
    q: Quantization,
    data: &[f32],
    dims: usize,
    threads: usize,
) -> Vec<u8> {
    let n = data.len() / dims;
    let keys: Vec<u64> = (0..n).map(key_of).collect();
    let p = BuildParams {
        dims,
        metric,
        quantization: q,
        m: 16,
        ef_construction: 64,
    };
    build_image(&p, &keys, data, threads, &mut |_| Poll::Continue).expect("build")
}
